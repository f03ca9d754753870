//! A real virtio-blk behind an endpoint of this virtio-iommu, with no guest: the seam in its
//! cached form answers every access of the device (rings and buffers) once, from its cache or
//! through the model's mappings, and reports each one once; a buffer outside the domain's
//! mappings fails the request closed without touching the disk.

use std::sync::Arc;

use sluice_devapi::{DmaOutcome, RecordingHooks};
use sluice_virtio_blk::request::S_OK;
use sluice_virtio_blk::testing::{self, at};
use sluice_virtio_blk::{BlockDevice, MemDisk};
use sluice_virtio_iommu::device::OFFERED_FEATURES;
use sluice_virtio_iommu::request::{Request, encode, writable_len};
use sluice_virtio_iommu::{ViommuConfig, VirtioIommu};
use sluice_virtio_pci::{ActivationContext, DmaMemory, SharedMemory, VirtioDevice};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The disk's endpoint ID (00:03.0).
const EP: u32 = 0x18;
const QUEUE: u64 = 0x80_0000;
const BUFS: u64 = 0x90_0000;
const UNMAPPED: u64 = 0xa0_0000;

#[test]
fn virtio_blk_dma_is_answered_once_and_reported_once_by_the_seam() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let hooks = Arc::new(RecordingHooks::default());
    let viommu = VirtioIommu::new(
        "viommu0",
        ViommuConfig {
            endpoints: vec![EP],
            boot_bypass: false,
            ..ViommuConfig::default()
        },
        hooks.clone(),
    );
    viommu.set_acked_features(OFFERED_FEATURES | (1 << 32));
    let req = |r: Request| {
        let w = writable_len(r.kind(), viommu.config().probe_size);
        let status = viommu.handle_request(&encode(&r), w, Some(&m)).status();
        assert_eq!(status, Some(0), "{r:?}");
    };
    req(Request::Attach {
        domain: 1,
        endpoint: EP,
        flags: 0,
    });
    for (start, pages) in [(QUEUE, 3u64), (BUFS, 4)] {
        req(Request::Map {
            domain: 1,
            virt_start: start,
            virt_end: start + pages * 0x1000 - 1,
            phys_start: start,
            flags: 3,
        });
    }

    let q = MockSplitQueue::create(&m, GuestAddress(QUEUE), 16);
    let sector = [0x3cu8; 512];
    q.add_desc_chains(&testing::write_then_read(&m, BUFS, &sector, |g| g), 0)
        .unwrap();
    let seam = viommu.endpoint_iommu(EP).unwrap();
    assert!(!seam.is_model_owned());
    let disk = Arc::new(MemDisk::new(1 << 20));
    let mut dev = BlockDevice::new("blk0", disk.clone(), false);
    let dma = DmaMemory::Translated {
        phys: SharedMemory::new(m.clone()),
        iommu: seam.clone(),
    };
    dev.activate(ActivationContext::single_queue(
        &m,
        dma,
        q.create_queue().unwrap(),
        (1 << 32) | (1 << 33),
    ))
    .unwrap();
    dev.queue_notify(0);
    assert!(testing::wait_for(|| q.used().idx().load() >= 2));
    assert_eq!(q.used().idx().load(), 2);
    testing::assert_write_then_read_done(&m, BUFS, &disk, &sector);

    // Once and once: each access was answered by the seam (a hit, or a miss it resolved) and
    // reported by it, translated in domain 1.
    let s = seam.stats();
    let reported = hooks.dmas();
    assert!(s.hits + s.misses >= 6, "{s:?}");
    assert!(s.hits > 0, "the seam's cache is what is used: {s:?}");
    assert_eq!(reported.len() as u64, s.hits + s.misses, "{reported:?}");
    assert!(
        reported
            .iter()
            .all(|d| matches!(d.outcome, DmaOutcome::Translated { domain: 1, .. })),
        "{reported:?}"
    );

    // A buffer outside the domain: the request fails closed and the disk is not written.
    q.add_desc_chains(&testing::write_from(&m, BUFS, 4, UNMAPPED, 6, |g| g), 6)
        .unwrap();
    dev.queue_notify(0);
    assert!(testing::wait_for(|| q.used().idx().load() >= 3));
    assert_eq!(q.used().idx().load(), 3);
    assert_ne!(testing::status(&m, BUFS, at::LONE_STATUS), S_OK);
    assert!(disk.contents()[2048..2560].iter().all(|&b| b == 0));
    let s = seam.stats();
    assert_eq!(s.faults, 1);
    assert_eq!(hooks.dmas().len() as u64, s.hits + s.misses + s.faults);
    dev.reset();
}
