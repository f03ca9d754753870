//! A small DMA engine on a PCI function: the guest (a kernel driver or a VFIO program) programs a
//! copy or fill and rings a doorbell; the host can also make the device DMA on its own ("rogue"
//! DMA) to ask whether the device could reach some IOVA at a chosen moment.
//!
//! Why a device of our own: virtio-blk cannot be told by userspace to DMA on command, and the
//! DMA-ownership races (a group claimed for userspace that still reaches the kernel's domain, a
//! function that DMAs after its release) need exactly that. Every access goes through the
//! device's DMA view ([`sluice_virtio_pci::DmaMemory`]): translated by whatever IOMMU model sits
//! in front of it (and so judged by the escape oracle), or direct and reported as such.
//!
//! Register file (BAR 0, 4 KiB 32-bit memory BAR, little-endian; any access width, the bytes of
//! an access are applied in address order; see [`regs`]):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x00 | MAGIC | RO | `0x414d_4453` ("SDMA") |
//! | 0x04 | VERSION | RO | 1 |
//! | 0x08 | SRC | RW, 64-bit | source IOVA (ignored for a fill) |
//! | 0x10 | DST | RW, 64-bit | destination IOVA |
//! | 0x18 | LEN | RW | bytes, 1..=[`MAX_LEN`] |
//! | 0x1c | FLAGS | RW | bit 0 interrupt on completion, bit 1 fill with PATTERN instead of copy |
//! | 0x20 | PATTERN | RW | fill byte (low 8 bits) |
//! | 0x24 | DOORBELL | WO | any write runs the programmed operation to completion |
//! | 0x28 | STATUS | RO | [`Status`] of the last operation |
//! | 0x2c | DONE | RO | operations completed (wrapping) |
//! | 0x30 | FAULT | RO, 64-bit | IOVA of the access that failed |
//! | 0x38 | IRQ_STATUS | RW1C | bit 0 completion pending (drives INTx) |
//! | 0x3c | ERRORS | RO | operations that ended with an error status (wrapping) |
//!
//! Hostile input: lengths are bounded by [`MAX_LEN`] and copied through a fixed 4 KiB buffer,
//! unknown flag bits and wrapping ranges are refused with a status, a failed translation stops
//! the operation at once (nothing of the failed chunk reaches memory), and nothing panics.
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

mod copy;
mod device;
pub mod regs;

pub use copy::{Access, AccessError};
pub use device::{DmaEngine, RogueDma, RogueOutcome};
pub use regs::Status;

/// Vendor ID (the same unassigned ID as the marker function: no guest driver matches it).
pub const DMA_ENGINE_VENDOR: u16 = 0x5c1c;
/// Device ID of the DMA engine.
pub const DMA_ENGINE_DEVICE: u16 = 0x0002;
/// Class code: system peripheral, other (0x08/0x80).
pub const DMA_ENGINE_CLASS: u32 = 0x08_80_00;
/// Size of the register BAR (BAR 0).
pub const BAR_SIZE: u64 = 4096;
/// Longest operation, in bytes: bounds the work one doorbell can ask for.
pub const MAX_LEN: u32 = 1 << 20;

/// Injection and timeline points of engine `name` (see `docs/injection.md`).
pub mod points {
    /// The guest rang the doorbell (value: LEN), announced before any DMA: a stall here holds
    /// the ringing vCPU.
    pub fn doorbell(name: &str) -> String {
        format!("dma.{name}.doorbell")
    }
    /// The operation's DMAs are done, before STATUS/DONE are published and the interrupt raised
    /// (value: the status code).
    pub fn complete(name: &str) -> String {
        format!("dma.{name}.complete")
    }
    /// A host-armed rogue DMA is about to be issued (value: its IOVA).
    pub fn rogue(name: &str) -> String {
        format!("dma.{name}.rogue")
    }
    /// The points of engine `name`. The engine runs an operation inside the doorbell write
    /// (no worker thread), so its doorbell and completion are both reached there; the
    /// completion comes once per operation.
    pub fn instance(name: &str) -> Vec<sluice_devapi::PointDecl> {
        use sluice_devapi::PointDecl;
        vec![
            PointDecl::new(doorbell(name)).on_doorbell(),
            PointDecl::new(complete(name)).on_doorbell().hot(),
            PointDecl::new(rogue(name)),
        ]
    }
}

#[cfg(test)]
mod tests;
