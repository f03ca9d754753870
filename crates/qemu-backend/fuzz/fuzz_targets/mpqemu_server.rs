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

/// Replay without libFuzzer: every FILE, or every file in a DIRECTORY, once.
#[cfg(not(fuzzing))]
fn main() {
    sluice_devapi::fuzz_support::replay_main(|data: &[u8]| sluice_qemu::fuzzing::run(data));
}
