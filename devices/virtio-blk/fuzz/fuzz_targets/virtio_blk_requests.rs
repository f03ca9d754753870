//! virtio-blk request handling: a split queue in guest memory built by the input, served by
//! the device loop over a checking in-memory disk; checks disk bounds, read-only, the memory
//! footprint, used lengths and that failed requests change nothing.
//! Body: `sluice_virtio_blk::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_blk_requests` (from devices/virtio-blk).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin virtio_blk_requests -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_virtio_blk::fuzzing::run(data));

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once.
#[cfg(not(fuzzing))]
fn main() {
    sluice_devapi::fuzz_support::replay_main(|data: &[u8]| sluice_virtio_blk::fuzzing::run(data));
}
