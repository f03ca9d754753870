//! The guest marker device against a reference model of its line assembler: exact lines,
//! counters, register reads, read-only config and BAR decoding. Body: `sluice_marker::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run marker_ops` (from devices/marker).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin marker_ops -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_marker::fuzzing::run(data));

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once.
#[cfg(not(fuzzing))]
fn main() {
    sluice_devapi::fuzz_support::replay_main(|data: &[u8]| sluice_marker::fuzzing::run(data));
}
