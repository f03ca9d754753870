//! The virtio-pci transport with PCI config space and MSI-X, driven by operation sequences
//! against a recording mock device; checks window, activation, doorbell, config-space,
//! interrupt and BAR-decode invariants. Body: `sluice_virtio_pci::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_pci_transport` (from devices/virtio-pci).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin virtio_pci_transport -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_virtio_pci::fuzzing::run(data));

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once. Exits non-zero
/// when a file cannot be read (a failing input panics, which also exits non-zero).
#[cfg(not(fuzzing))]
fn main() {
    let mut files = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let path = std::path::PathBuf::from(arg);
        match std::fs::read_dir(&path) {
            Ok(dir) => {
                let mut inner: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
                inner.sort();
                files.extend(inner);
            }
            Err(_) => files.push(path),
        }
    }
    let mut ran = 0usize;
    for path in &files {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                std::process::exit(2);
            }
        };
        let run = |data: &[u8]| sluice_virtio_pci::fuzzing::run(data);
        run(&data);
        ran += 1;
    }
    println!("{ran} inputs replayed, no failure");
}
