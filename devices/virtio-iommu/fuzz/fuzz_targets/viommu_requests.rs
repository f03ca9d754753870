//! Arbitrary request bytes (raw and structured), DMA through the endpoints, configuration
//! writes and resets against one virtio-iommu: no panic, no hang, and an unattached endpoint
//! with bypass off never translates. Body: `sluice_virtio_iommu::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run viommu_requests` (from devices/virtio-iommu).
//! Replay without libFuzzer: `cargo run --bin viommu_requests -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_virtio_iommu::fuzzing::run(data));

#[cfg(not(fuzzing))]
fn main() {
    for path in std::env::args().skip(1) {
        match std::fs::read(&path) {
            Ok(data) => {
                sluice_virtio_iommu::fuzzing::run(&data);
                println!("{path}: ok");
            }
            Err(e) => eprintln!("{path}: {e}"),
        }
    }
}
