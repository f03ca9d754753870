//! The virtio-pci transport with PCI config space and MSI-X, driven by operation sequences
//! against a recording mock device; checks window, activation, doorbell, config-space,
//! interrupt and BAR-decode invariants. Body: `sluice_virtio_pci::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_pci_transport` (from devices/virtio-pci).
//! Replay without libFuzzer: `cargo run --manifest-path fuzz/Cargo.toml --bin virtio_pci_transport -- FILE|DIR...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_virtio_pci::fuzzing::run(data));

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once.
#[cfg(not(fuzzing))]
fn main() {
    sluice_devapi::fuzz_support::replay_main(|data: &[u8]| sluice_virtio_pci::fuzzing::run(data));
}
