//! Operation-sequence fuzzer over table memory, FIBs, RPCIT, DMA and the lifecycle; aborts on
//! a violated invariant. Body: `sluice_zpci::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run zpci_ops` (from devices/zpci, see docs/zpci.md).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin zpci_ops -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(
    |data: &[u8]| sluice_zpci::fuzzing::run(data).unwrap_or_else(|e| panic!("{e}"))
);

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
        let run = |data: &[u8]| sluice_zpci::fuzzing::run(data).unwrap_or_else(|e| panic!("{e}"));
        run(&data);
        ran += 1;
    }
    println!("{ran} inputs replayed, no failure");
}
