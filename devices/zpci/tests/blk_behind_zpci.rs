//! A real virtio-blk behind a zPCI function, with no guest: the device's every DMA (rings and
//! buffers, IOVAs in the function's DMA window) goes through the seam in its model-owned form,
//! is translated by the function's DMA tables exactly once and reported exactly once (by the
//! model); after the function is disabled the same device is refused, without touching disk
//! or memory.

mod common;

use std::sync::Arc;

use common::*;
use sluice_devapi::{CountingTranslator, DmaOutcome, EndpointIommu, RecordingHooks, TableMemory};
use sluice_virtio_blk::testing;
use sluice_virtio_blk::{BlockDevice, MemDisk};
use sluice_virtio_pci::{ActivationContext, DmaMemory, SharedMemory, VirtioDevice};
use sluice_zpci::InsnStatus;
use sluice_zpci::clp::SetPciFnOp;
use sluice_zpci::seam::FunctionTranslator;
use virtio_queue::QueueT;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

/// Rings (guest-physical; three pages).
const QUEUE: u64 = 0x90_0000;
/// Request buffers (guest-physical; four pages).
const BUFS: u64 = 0xa0_0000;

/// The IOVA the device uses for guest-physical `gpa`: the window maps PBA + x onto x.
fn iova(gpa: u64) -> u64 {
    PBA + gpa
}

#[test]
fn virtio_blk_dma_is_translated_once_and_reported_once_by_the_zpci_model() {
    let mut r = rig();
    r.t.map_range(&r.m, iova(QUEUE), QUEUE, 3, true).unwrap();
    r.t.map_range(&r.m, iova(BUFS), BUFS, 4, true).unwrap();
    assert_eq!(r.z.rpcit(&r.m, r.fh, iova(QUEUE), 0x3000), InsnStatus::OK);
    assert_eq!(r.z.rpcit(&r.m, r.fh, iova(BUFS), 0x4000), InsnStatus::OK);

    let m = &r.m;
    let q = MockSplitQueue::create(m, GuestAddress(QUEUE), 16);
    let sector = [0xa5u8; 512];
    q.add_desc_chains(&testing::write_then_read(m, BUFS, &sector, iova), 0)
        .unwrap();
    // The driver gives the device the rings' IOVAs.
    let mut queue = q.create_queue::<virtio_queue::Queue>().unwrap();
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(iova(q.desc_table_addr().0));
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(iova(q.avail_addr().0));
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(iova(q.used_addr().0));
    queue.set_used_ring_address(lo, hi);

    let mem_now = r.m.clone();
    let tables: TableMemory = Arc::new(move || Arc::new(mem_now.clone()));
    let counting = Arc::new(CountingTranslator::new(
        FunctionTranslator::new(r.z.clone(), tables, FID).unwrap(),
    ));
    let seam_hooks = Arc::new(RecordingHooks::default());
    let seam = EndpointIommu::model_owned(
        sluice_devapi::Endpoint::Zpci { fh: r.fh },
        counting.clone(),
        seam_hooks.clone(),
    );
    let disk = Arc::new(MemDisk::new(1 << 20));
    let mut dev = BlockDevice::new("blk0", disk.clone(), false);
    let dma = DmaMemory::Translated {
        phys: SharedMemory::new(r.m.clone()),
        iommu: seam.clone(),
    };
    dev.activate(ActivationContext::single_queue(
        m,
        dma,
        queue,
        (1 << 32) | (1 << 33),
    ))
    .unwrap();
    dev.queue_notify(0);
    assert!(testing::wait_for(|| q.used().idx().load() >= 2));
    testing::assert_write_then_read_done(m, BUFS, &disk, &sector);

    let accesses = counting.calls();
    let reported = r.rec.dmas();
    assert!(accesses >= 6, "rings and buffers: {accesses} accesses");
    assert_eq!(reported.len() as u64, accesses, "{reported:?}");
    assert!(
        reported
            .iter()
            .all(|d| matches!(d.outcome, DmaOutcome::Translated { .. })),
        "{reported:?}"
    );
    assert!(seam_hooks.dmas().is_empty());
    assert_eq!(seam.stats().hits, 0);
    assert_eq!(seam.stats().misses, accesses);

    // The guest disables the function: the device's next request is refused at its first
    // access (the ring), so nothing is written anywhere.
    r.z.clp_set_pci_fn(r.fh, SetPciFnOp::Disable).unwrap();
    let lone = testing::write_from(m, BUFS, 4, iova(BUFS + testing::at::DATA), 6, iova);
    q.add_desc_chains(&lone, 6).unwrap();
    let before = counting.calls();
    dev.queue_notify(0);
    assert!(testing::wait_for(|| counting.calls() > before));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(q.used().idx().load(), 2, "nothing was published");
    assert!(disk.contents()[2048..2560].iter().all(|&b| b == 0));
    let refused = r
        .rec
        .dmas()
        .into_iter()
        .filter(|d| matches!(d.outcome, DmaOutcome::Faulted { .. }))
        .count();
    assert!(refused > 0);
    assert_eq!(
        r.rec.dmas().len() as u64,
        counting.calls(),
        "refusals too are reported once"
    );
    dev.reset();
}
