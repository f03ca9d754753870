//! The qemu CPU backend.
//!
//! QEMU runs the vCPUs, RAM, chipset and firmware (TCG here, KVM on hosts with VT-x/SVM);
//! Sluice's devices live in this process and QEMU reaches them through `x-pci-proxy-dev`:
//! [`protocol`] parses the multi-process messages, [`channel`] moves them (with file
//! descriptors) over the socket, [`memory`] maps the guest RAM QEMU shares as memfds,
//! [`server`] answers one device's config/BAR accesses and relays its INTx, and [`launcher`]
//! starts and supervises QEMU.

pub mod channel;
#[doc(hidden)]
pub mod fuzzing;
pub mod launcher;
pub mod memory;
pub mod protocol;
pub mod server;

pub use launcher::{Accel, ConsoleSink, QemuConfig, run};
pub use sluice_host::{GuestExit, RunOutcome};
