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

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once.
#[cfg(not(fuzzing))]
fn main() {
    sluice_devapi::fuzz_support::replay_main(|data: &[u8]| {
        sluice_zpci::fuzzing::run(data).unwrap_or_else(|e| panic!("{e}"))
    });
}
