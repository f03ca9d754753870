//! Arbitrary request bytes (raw and structured), DMA through the endpoints, configuration
//! writes and resets against one virtio-iommu: no panic, no hang, and an unattached endpoint
//! with bypass off never translates. Body: `sluice_virtio_iommu::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run viommu_requests` (from devices/virtio-iommu).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin viommu_requests -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_virtio_iommu::fuzzing::run(data));

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once.
#[cfg(not(fuzzing))]
fn main() {
    sluice_devapi::fuzz_support::replay_main(|data: &[u8]| sluice_virtio_iommu::fuzzing::run(data));
}
