//! The mpqemu (x-pci-proxy-dev) protocol parser and server loop: a byte stream without fds
//! served by a real DeviceServer against a checking PCI function; checks access bounds,
//! rejected accesses, the replies and the verdict against a reference parser.
//! Body: `sluice_qemu::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run mpqemu_server` (from crates/qemu-backend).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin mpqemu_server -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_qemu::fuzzing::run(data));

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
        let run = |data: &[u8]| sluice_qemu::fuzzing::run(data);
        run(&data);
        ran += 1;
    }
    println!("{ran} inputs replayed, no failure");
}
