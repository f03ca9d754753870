//! A conventional PCI function as a device model sees it.
//!
//! - [`config::ConfigSpace`]: the 256-byte type-0 header with per-bit write masks, BAR sizing,
//!   the capability list and Bus Master Enable tracking.
//! - [`msix::MsixTable`]: MSI-X table and PBA emulation (masking, pending bits).
//! - [`irq::PciInterrupt`]: the one place a function's interrupts are routed, to MSI-X when the
//!   guest enabled it and to INTx otherwise.
//! - [`PciFunction`]: the trait the device host dispatches config and BAR accesses to.
//! - [`guard::BarGuard`]: the bus-side check (size, BAR end) every BAR access passes once.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod guard;
pub mod irq;
pub mod mmio;
pub mod msix;

pub use config::{BarKind, BarSpec, ConfigError, ConfigSpace, PciIds};
pub use guard::{BarAccess, BarGuard};
pub use irq::{PciInterrupt, VectorRelay};
pub use mmio::{MmioDevice, MmioGuard};
pub use msix::MsixTable;

/// A PCI function the host can dispatch accesses to. Accesses are little-endian, 1/2/4/8 bytes.
pub trait PciFunction: Send + Sync {
    /// Reads `data.len()` bytes of configuration space at `offset`.
    fn config_read(&self, offset: u16, data: &mut [u8]);
    /// Writes configuration space.
    fn config_write(&self, offset: u16, data: &[u8]);
    /// Reads from BAR `bar` at `offset` within it.
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]);
    /// Writes to BAR `bar` at `offset` within it.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]);
    /// Locates the BAR holding guest address `addr` (`memory` selects memory or I/O space):
    /// returns (bar index, offset in the BAR).
    fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)>;
    /// Function-level reset (QEMU's device reset, or a host-driven reset).
    fn reset(&self);
    /// Size in bytes of BAR `bar`, if the function has one there. [`guard::BarGuard`] checks
    /// accesses against it; without it (the default), the guard checks that the access's last
    /// byte decodes to the same BAR, which needs the BAR placed and decoding enabled.
    fn bar_size(&self, _bar: u8) -> Option<u64> {
        None
    }
    /// Looks for the work a [`Doorbell`] would announce without the doorbell having rung: a
    /// backend that polls after a doorbell asks this instead of waiting for the next one.
    /// `quiet`: the driver is asked not to ring while the caller keeps asking; `!quiet`: asked
    /// to ring again, and anything it made available meanwhile is served too. The caller ends
    /// every run of quiet polls with a `!quiet` one before it sleeps. Returns whether work was
    /// found and served; `None` (the default) when the function cannot be polled.
    fn poll_doorbell(&self, _doorbell: &Doorbell, _quiet: bool) -> Option<bool> {
        None
    }
}

/// A BAR write that is a pure doorbell: it only tells the device to look at something (a virtio
/// queue notify), so a backend may absorb it into an eventfd (KVM ioeventfd, QEMU's
/// `memory_region_add_eventfd`) and replay it later as `bar_write(bar, offset, value)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doorbell {
    /// BAR it lies in.
    pub bar: u8,
    /// Offset in that BAR.
    pub offset: u64,
    /// Access size the guest uses (1, 2, 4 or 8).
    pub size: u8,
    /// Only writes of this value ring it (several doorbells share one address); `None`: any
    /// value of that size.
    pub datamatch: Option<u64>,
    /// The value to replay as the write (the queue index for virtio).
    pub value: u64,
}

/// Little-endian value of up to 8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .rev()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Stores `value` little-endian into `data` (truncating to its length).
pub fn put_le(data: &mut [u8], value: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = (value >> (8 * i)) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_helpers_round_trip() {
        let mut b = [0u8; 4];
        put_le(&mut b, 0x1234_5678);
        assert_eq!(b, [0x78, 0x56, 0x34, 0x12]);
        assert_eq!(le_value(&b), 0x1234_5678);
        assert_eq!(le_value(&b[..2]), 0x5678);
    }
}
