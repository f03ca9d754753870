//! Operation sequences against an SMMUv3 and its guest memory (built by the operations):
//! no panic, no hang, segments cover the range, bypass is identity, and the caching model
//! agrees with an uncached one while nothing may be stale. Body: `sluice_smmuv3::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run smmuv3_ops` (from devices/smmuv3).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin smmuv3_ops -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_smmuv3::fuzzing::run(data));

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once.
#[cfg(not(fuzzing))]
fn main() {
    sluice_devapi::fuzz_support::replay_main(|data: &[u8]| sluice_smmuv3::fuzzing::run(data));
}
