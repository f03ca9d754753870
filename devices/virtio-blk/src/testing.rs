//! Request layouts for tests that drive a virtio-blk directly (no guest driver): what a driver
//! would put in memory, with the descriptors that point at it through the device's addresses
//! (IOVAs behind an IOMMU).

use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::request::{T_IN, T_OUT, request_header};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Offsets from the layout's base (guest-physical) of what [`write_then_read`] lays out.
pub mod at {
    /// The sector written.
    pub const DATA: u64 = 0x1000;
    /// Where the read puts the sector back.
    pub const READ_BACK: u64 = 0x2000;
    /// Status byte of the write.
    pub const WRITE_STATUS: u64 = 0x200;
    /// Status byte of the read.
    pub const READ_STATUS: u64 = 0x201;
    /// Status byte of [`super::write_from`]'s request.
    pub const LONE_STATUS: u64 = 0x202;
}

/// The sector [`write_then_read`] writes (sector 2, so at byte 1024 of the disk).
pub const SECTOR: u64 = 2;

/// Lays out at guest-physical `base` (four pages) a write of `data` to [`SECTOR`] and a read of
/// it back into `base + at::READ_BACK`, status bytes 0xff, and returns the two chains'
/// descriptors (0-2 and 3-5) with device addresses `addr(gpa)`.
pub fn write_then_read(
    m: &GuestMemoryMmap,
    base: u64,
    data: &[u8; 512],
    addr: impl Fn(u64) -> u64,
) -> Vec<RawDescriptor> {
    let put = |what: &[u8], at: u64| m.write_slice(what, GuestAddress(at));
    let laid = put(&request_header(T_OUT, SECTOR), base)
        .and_then(|_| put(data, base + at::DATA))
        .and_then(|_| put(&request_header(T_IN, SECTOR), base + 0x100))
        .and_then(|_| put(&[0xff, 0xff], base + at::WRITE_STATUS));
    assert!(
        laid.is_ok(),
        "the layout must fit in guest memory: {laid:?}"
    );
    let d = |gpa: u64, len: u32, flags: u16, next: u16| {
        RawDescriptor::from(SplitDescriptor::new(addr(gpa), len, flags, next))
    };
    vec![
        d(base, 16, F_NEXT, 1),
        d(base + at::DATA, 512, F_NEXT, 2),
        d(base + at::WRITE_STATUS, 1, F_WRITE, 0),
        d(base + 0x100, 16, F_NEXT, 4),
        d(base + at::READ_BACK, 512, F_NEXT | F_WRITE, 5),
        d(base + at::READ_STATUS, 1, F_WRITE, 0),
    ]
}

/// Lays out at `base + 0x300` one write to `sector` whose data the device reads at device
/// address `data` (given as is: it may be unmapped), status at `base + at::LONE_STATUS`, and
/// returns its descriptors numbered from `first`.
pub fn write_from(
    m: &GuestMemoryMmap,
    base: u64,
    sector: u64,
    data: u64,
    first: u16,
    addr: impl Fn(u64) -> u64,
) -> Vec<RawDescriptor> {
    let laid = m
        .write_slice(&request_header(T_OUT, sector), GuestAddress(base + 0x300))
        .and_then(|_| m.write_obj(0xffu8, GuestAddress(base + at::LONE_STATUS)));
    assert!(
        laid.is_ok(),
        "the layout must fit in guest memory: {laid:?}"
    );
    vec![
        RawDescriptor::from(SplitDescriptor::new(
            addr(base + 0x300),
            16,
            F_NEXT,
            first + 1,
        )),
        RawDescriptor::from(SplitDescriptor::new(data, 512, F_NEXT, first + 2)),
        RawDescriptor::from(SplitDescriptor::new(
            addr(base + at::LONE_STATUS),
            1,
            F_WRITE,
            0,
        )),
    ]
}

/// The status byte at `base + offset` (0xff: never written).
pub fn status(m: &GuestMemoryMmap, base: u64, offset: u64) -> u8 {
    m.read_obj::<u8>(GuestAddress(base + offset))
        .unwrap_or(0xff)
}

/// Panics unless [`write_then_read`]'s requests both completed: statuses OK, `data` on the disk
/// at [`SECTOR`] and read back into `base + at::READ_BACK`.
pub fn assert_write_then_read_done(
    m: &GuestMemoryMmap,
    base: u64,
    disk: &crate::MemDisk,
    data: &[u8; 512],
) {
    assert_eq!(status(m, base, at::WRITE_STATUS), crate::request::S_OK);
    assert_eq!(status(m, base, at::READ_STATUS), crate::request::S_OK);
    let on_disk = disk.contents().get(1024..1536).map(<[u8]>::to_vec);
    assert_eq!(on_disk.as_deref(), Some(&data[..]));
    let mut back = [0u8; 512];
    let read = m.read_slice(&mut back, GuestAddress(base + at::READ_BACK));
    assert!(read.is_ok() && back == *data, "read back {read:?}");
}

/// Polls `done` every 2 ms for at most 10 s (the device works on its own thread); true when it
/// held in time.
pub fn wait_for(done: impl Fn() -> bool) -> bool {
    let t = std::time::Instant::now();
    while !done() {
        if t.elapsed() > std::time::Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    true
}
