//! virtio-blk (virtio 1.x §5.2) backed by a raw disk image.
//!
//! [`request`] turns one descriptor chain into a completed request against a [`disk::Disk`];
//! [`device::BlockDevice`] is the `VirtioDevice` with a worker thread per activation.
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

pub mod device;
pub mod disk;
#[doc(hidden)]
pub mod fuzzing;
pub mod request;
#[doc(hidden)]
pub mod testing;

pub use device::{BlockCounters, BlockDevice, DeferState};
pub use disk::{Disk, MemDisk, RawDisk};

/// Hook point of request completion of device `name`: `virtio.<name>.complete` (value: the
/// request type, 0 IN, 1 OUT, 4 FLUSH, 8 GET_ID; `u64::MAX` if unreadable). Announced after
/// the request executed and before its used-ring entry is published, and it can defer: with
/// a deferral the request waits, unexecuted, on the device's worker (see [`DeferState`]).
pub fn complete_point(name: &str) -> String {
    format!("virtio.{name}.complete")
}

/// The points of block device `name` beyond its transport's: the completion, once per
/// request, which the device can defer.
pub fn instance_points(name: &str) -> Vec<sluice_devapi::PointDecl> {
    vec![
        sluice_devapi::PointDecl::new(complete_point(name))
            .deferrable()
            .hot(),
    ]
}

/// Sector size the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u16 = 2;

/// Feature bits (virtio 1.x §5.2.3).
pub mod features {
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u32 = 2;
    /// Device is read-only.
    pub const RO: u32 = 5;
    /// Block size of disk is in `blk_size`.
    pub const BLK_SIZE: u32 = 6;
    /// Cache flush command support.
    pub const FLUSH: u32 = 9;
}
