//! The qemu CPU backend.
//!
//! QEMU runs the vCPUs, RAM, chipset and firmware (TCG here, KVM on hosts with VT-x/SVM);
//! Sluice's devices live in this process and QEMU reaches them through `x-pci-proxy-dev`:
//! [`protocol`] parses the multi-process messages, [`channel`] moves them (with file
//! descriptors) over the socket, [`memory`] maps the guest RAM QEMU shares as memfds,
//! [`server`] answers one device's config/BAR accesses and relays its INTx, [`platform`] serves
//! a platform device's register window and wired lines (the SMMUv3 behind QEMU's
//! `x-smmuv3-proxy`), [`fastpath`] gives a device's doorbells and MSI-X vectors eventfds QEMU
//! signals or watches instead of socket round trips, and [`launcher`] starts and supervises
//! QEMU.

pub mod channel;
pub mod console;
pub mod fastpath;
#[doc(hidden)]
pub mod fuzzing;
pub mod launcher;
pub mod memory;
pub mod platform;
pub mod poll;
pub mod protocol;
pub mod sched;
pub mod server;
mod serving;
mod step_aside;
pub mod zpci;

pub use console::ConsoleSummary;
pub use fastpath::{proxy_msix_vectors, proxy_protocol, smmu_proxy_translates_msi};
pub use launcher::{
    Accel, ConsoleSink, DeviceTraffic, PlatformTraffic, ProxyOptions, QemuConfig, QemuRun, run,
    run_qemu, run_qemu_with,
};
pub use platform::{PlatformInterrupts, PlatformServer};
pub use sluice_host::{GuestExit, RunOutcome};

/// An error and its causes on one line, `outer: cause: root cause`. Every error type here
/// leaves its cause out of its own message (the cause is its `source()`), so a chain printed
/// this way, or with anyhow's `{:#}`, names each cause once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The bit of `index` in a 64-bit mask (cores, doorbells); `None` past the mask's width.
pub(crate) fn mask_bit(index: usize) -> Option<u64> {
    u32::try_from(index).ok().and_then(|i| 1u64.checked_shl(i))
}
