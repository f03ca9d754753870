//! Requests built with virtio-queue's mock driver, including hostile chains.

use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::device::{BlockCounters, process_available};
use crate::disk::MemDisk;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    m.write_obj(kind, GuestAddress(at)).unwrap();
    m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    m.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

const ID: [u8; ID_LEN] = *b"sluice-test-disk\0\0\0\0";

fn run_one(
    m: &GuestMemoryMmap,
    disk: &MemDisk,
    descs: &[RawDescriptor],
    read_only: bool,
) -> (Completion, Option<BlockRequestError>) {
    let vq = MockSplitQueue::new(m, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let env = RequestEnv {
        disk,
        id: &ID,
        read_only,
    };
    execute(m, chain, &env)
}

fn disk(size: usize) -> MemDisk {
    MemDisk::new(size)
}

#[test]
fn write_then_read_back() {
    let m = mem();
    let d = disk(1 << 20);
    header(&m, 0x10_0000, T_OUT, 8);
    m.write_slice(&[0xab; 1024], GuestAddress(0x20_0000))
        .unwrap();
    let (c, e) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 1024, 0),
            desc(0x30_0000, 1, F_WRITE),
        ],
        false,
    );
    assert!(e.is_none());
    assert_eq!((c.status, c.used_len, c.bytes), (Some(S_OK), 1, 1024));
    assert_eq!(d.contents()[4096..5120], [0xab; 1024]);

    header(&m, 0x10_0000, T_IN, 8);
    let (c, e) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x21_0000, 512, F_WRITE),
            desc(0x21_0200, 512, F_WRITE),
            desc(0x30_0000, 1, F_WRITE),
        ],
        false,
    );
    assert!(e.is_none());
    assert_eq!((c.status, c.used_len), (Some(S_OK), 1025));
    let mut back = [0u8; 1024];
    m.read_slice(&mut back, GuestAddress(0x21_0000)).unwrap();
    assert_eq!(back, [0xab; 1024]);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), S_OK);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    // VERSION_1 implies ANY_LAYOUT: one readable descriptor holds header and payload.
    let m = mem();
    let d = disk(1 << 16);
    header(&m, 0x10_0000, T_OUT, 1);
    m.write_slice(&[7; 512], GuestAddress(0x10_0010)).unwrap();
    let (c, _) = run_one(
        &m,
        &d,
        &[desc(0x10_0000, 16 + 512, 0), desc(0x30_0000, 1, F_WRITE)],
        false,
    );
    assert_eq!(c.status, Some(S_OK));
    assert_eq!(d.contents()[512..1024], [7; 512]);
}

#[test]
fn get_id_flush_and_unsupported() {
    let m = mem();
    let d = disk(1 << 16);
    header(&m, 0x10_0000, T_GET_ID, 0);
    let (c, _) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 20, F_WRITE),
            desc(0x30_0000, 1, F_WRITE),
        ],
        false,
    );
    assert_eq!((c.status, c.used_len), (Some(S_OK), 21));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(id, ID);
    header(&m, 0x10_0000, T_FLUSH, 0);
    let (c, _) = run_one(
        &m,
        &d,
        &[desc(0x10_0000, 16, 0), desc(0x30_0000, 1, F_WRITE)],
        false,
    );
    assert_eq!(c.status, Some(S_OK));
    header(&m, 0x10_0000, 0x77, 0);
    let (c, e) = run_one(
        &m,
        &d,
        &[desc(0x10_0000, 16, 0), desc(0x30_0000, 1, F_WRITE)],
        false,
    );
    assert_eq!(c.status, Some(S_UNSUPP));
    assert!(e.is_none());
}

#[test]
fn out_of_range_and_read_only_are_ioerr() {
    let m = mem();
    let d = disk(4096);
    header(&m, 0x10_0000, T_IN, 8);
    let (c, e) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, F_WRITE),
            desc(0x30_0000, 1, F_WRITE),
        ],
        false,
    );
    assert_eq!(c.status, Some(S_IOERR));
    assert!(matches!(e, Some(BlockRequestError::OutOfRange { .. })));
    header(&m, 0x10_0000, T_IN, u64::MAX / 256);
    let (c, _) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, F_WRITE),
            desc(0x30_0000, 1, F_WRITE),
        ],
        false,
    );
    assert_eq!(c.status, Some(S_IOERR), "sector overflow");
    header(&m, 0x10_0000, T_OUT, 0);
    let (c, e) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, 512, 0),
            desc(0x30_0000, 1, F_WRITE),
        ],
        true,
    );
    assert_eq!(c.status, Some(S_IOERR));
    assert!(matches!(e, Some(BlockRequestError::ReadOnly)));
}

#[test]
fn malformed_chains_answer_without_panicking() {
    let m = mem();
    let d = disk(1 << 16);
    // No writable byte at all: nothing to write the status to.
    header(&m, 0x10_0000, T_IN, 0);
    let (c, e) = run_one(&m, &d, &[desc(0x10_0000, 16, 0)], false);
    assert_eq!((c.status, c.used_len), (None, 0));
    assert!(matches!(e, Some(BlockRequestError::NoStatusByte)));
    // Short header: status IOERR.
    let (c, e) = run_one(
        &m,
        &d,
        &[desc(0x10_0000, 8, 0), desc(0x30_0000, 1, F_WRITE)],
        false,
    );
    assert_eq!(c.status, Some(S_IOERR));
    assert!(matches!(e, Some(BlockRequestError::ShortHeader)));
    // Data buffer outside guest memory.
    let (c, e) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x9000_0000, 512, F_WRITE),
            desc(0x30_0000, 1, F_WRITE),
        ],
        false,
    );
    assert_eq!(c.status, None);
    assert!(matches!(e, Some(BlockRequestError::MalformedChain(_))));
    // A gigantic length never sizes an allocation: it fails on the guest memory bound.
    let (_, e) = run_one(
        &m,
        &d,
        &[
            desc(0x10_0000, 16, 0),
            desc(0x20_0000, u32::MAX, F_WRITE),
            desc(0x30_0000, 1, F_WRITE),
        ],
        false,
    );
    assert!(e.is_some());
}

#[test]
fn queue_keeps_running_after_a_bad_chain() {
    let m = mem();
    let d = disk(1 << 16);
    let vq = MockSplitQueue::new(&m, 16);
    header(&m, 0x10_0000, T_IN, 0);
    header(&m, 0x11_0000, T_OUT, 2);
    // Chain 0: header only (no status byte). Chain 1: valid write.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x11_0000, 16, F_NEXT, 2)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 512, F_NEXT, 3)),
        RawDescriptor::from(SplitDescriptor::new(0x30_0000, 1, F_WRITE, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let counters = BlockCounters::default();
    let env = RequestEnv {
        disk: &d,
        id: &ID,
        read_only: false,
    };
    let mut notified = 0;
    assert!(process_available(&mut q, &m, &env, &counters, || {
        notified += 1
    }));
    assert_eq!(notified, 1);
    assert_eq!(
        q.used_idx(&m, std::sync::atomic::Ordering::Acquire)
            .unwrap()
            .0,
        2
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(counters.requests.load(Relaxed), 2);
    assert_eq!(counters.errors.load(Relaxed), 1);
    assert_eq!(counters.write_bytes.load(Relaxed), 512);
}

mod behind_an_iommu {
    use super::*;
    use sluice_devapi::{
        Bdf, DmaFault, DmaResolution, DmaTranslate, Endpoint, EndpointIommu, NoHooks,
    };
    use std::sync::Arc;
    use vm_memory::{IommuMemory, Permissions};

    /// IOVA [0x8000_0000, +0x40_0000) maps to GPA [0, 0x40_0000) except one hole.
    #[derive(Debug)]
    struct Offset {
        hole: u64,
    }

    const IOVA: u64 = 0x8000_0000;

    impl DmaTranslate for Offset {
        fn resolve(
            &self,
            iova: u64,
            len: u64,
            _access: Permissions,
            fill: &mut vm_memory::Iotlb,
        ) -> Result<DmaResolution, DmaFault> {
            let page = iova & !0xfff;
            let end = iova + len;
            if iova < IOVA
                || end > IOVA + 0x40_0000
                || (page..end).contains(&self.hole)
                || page == self.hole
            {
                return Err(DmaFault::new(4, format!("unmapped {iova:#x}+{len:#x}")));
            }
            let first = page;
            let last = (end + 0xfff) & !0xfff;
            fill.set_mapping(
                GuestAddress(first),
                GuestAddress(first - IOVA),
                (last - first) as usize,
                Permissions::ReadWrite,
            )
            .map_err(|e| DmaFault::new(5, e.to_string()))?;
            Ok(DmaResolution::Translated { domain: 1 })
        }
    }

    #[test]
    fn requests_are_translated_and_an_unmapped_buffer_fails_closed() {
        let phys = mem();
        let ep = EndpointIommu::new(
            Endpoint::Pci(Bdf::new(0, 3, 0)),
            Arc::new(Offset {
                hole: IOVA + 0x25_0000,
            }),
            Arc::new(NoHooks),
        );
        let m = IommuMemory::new(phys.clone(), ep, true, ());
        let d = disk(1 << 16);
        // Everything below is addressed by IOVA; the bytes land at IOVA - 0x8000_0000.
        m.write_obj(T_OUT, GuestAddress(IOVA + 0x10_0000)).unwrap();
        m.write_obj(0u32, GuestAddress(IOVA + 0x10_0004)).unwrap();
        m.write_obj(3u64, GuestAddress(IOVA + 0x10_0008)).unwrap();
        m.write_slice(&[0x5c; 512], GuestAddress(IOVA + 0x20_0000))
            .unwrap();
        let vq = MockSplitQueue::create(&m, GuestAddress(IOVA), 16);
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(IOVA + 0x10_0000, 16, F_NEXT, 1)),
                RawDescriptor::from(SplitDescriptor::new(IOVA + 0x20_0000, 512, F_NEXT, 2)),
                RawDescriptor::from(SplitDescriptor::new(IOVA + 0x30_0000, 1, F_WRITE, 0)),
                // Second request: data buffer in the unmapped hole.
                RawDescriptor::from(SplitDescriptor::new(IOVA + 0x10_0000, 16, F_NEXT, 4)),
                RawDescriptor::from(SplitDescriptor::new(IOVA + 0x25_0000, 512, F_NEXT, 5)),
                RawDescriptor::from(SplitDescriptor::new(IOVA + 0x30_0010, 1, F_WRITE, 0)),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let counters = BlockCounters::default();
        let env = RequestEnv {
            disk: &d,
            id: &ID,
            read_only: false,
        };
        assert!(process_available(&mut q, &m, &env, &counters, || {}));
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(counters.requests.load(Relaxed), 2);
        assert_eq!(
            counters.write_bytes.load(Relaxed),
            512,
            "only the mapped request wrote"
        );
        assert_eq!(d.contents()[1536..2048], [0x5c; 512]);
        // The status byte went to the translated address, i.e. GPA 0x30_0000.
        assert_eq!(phys.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), S_OK);
        assert_eq!(counters.errors.load(Relaxed), 1);
    }
}
