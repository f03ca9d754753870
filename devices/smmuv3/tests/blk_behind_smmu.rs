//! A real virtio-blk behind a stream of this SMMU, with no guest: the device's every DMA (rings
//! and buffers) goes through the seam in its model-owned form, is translated by the SMMU's
//! stage-1 tables exactly once and reported exactly once (by the SMMU), and a buffer the
//! tables do not map fails the request closed, with an event, without touching the disk.

mod common;

use std::sync::Arc;

use common::*;
use sluice_devapi::{
    CountingTranslator, DmaOutcome, Endpoint, EndpointIommu, RecordingHooks, TableMemory,
};
use sluice_smmuv3::EventType;
use sluice_smmuv3::seam::StreamTranslator;
use sluice_smmuv3::walk::Granule;
use sluice_virtio_blk::request::S_OK;
use sluice_virtio_blk::testing::{self, at};
use sluice_virtio_blk::{BlockDevice, MemDisk};
use sluice_virtio_pci::{ActivationContext, DmaMemory, SharedMemory, VirtioDevice};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

/// The disk's RID (00:03.0), which is its StreamID.
const SID: u32 = 0x18;
/// Rings (IOVA = guest-physical, three pages).
const QUEUE: u64 = 0x80_0000;
/// Request buffers (IOVA = guest-physical, four pages).
const BUFS: u64 = 0x90_0000;
/// An IOVA the tables do not map.
const UNMAPPED: u64 = 0xa0_0000;

#[test]
fn virtio_blk_dma_is_translated_once_and_reported_once_by_the_smmu() {
    let g = Granule::G4K;
    let rig = Rig::new();
    rig.enable(8);
    let root = rig.alloc(1 << g.bits(), 1 << g.bits());
    let cdaddr = rig.alloc(64, 64);
    rig.write_words(cdaddr, &cd(1, 64 - 48, g, root));
    rig.set_ste(SID, ste_s1(cdaddr, 0, 0, 0));
    rig.cfgi_ste(SID);
    rig.sync();
    let pt = Pt {
        rig: &rig,
        g,
        start_level: g.s1_start_level(48),
        input_bits: 48,
        root,
    };
    for page in (QUEUE..QUEUE + 0x3000)
        .chain(BUFS..BUFS + 0x4000)
        .step_by(0x1000)
    {
        pt.map(page, page, 3, AF);
    }

    // Two requests: write one sector, then read it back into another buffer.
    let m = &rig.mem;
    let q = MockSplitQueue::create(m, GuestAddress(QUEUE), 16);
    let sector = [0x5au8; 512];
    q.add_desc_chains(&testing::write_then_read(m, BUFS, &sector, |g| g), 0)
        .unwrap();

    let mem_now = rig.mem.clone();
    let tables: TableMemory = Arc::new(move || Arc::new(mem_now.clone()));
    let counting = Arc::new(CountingTranslator::new(StreamTranslator::new(
        rig.smmu.clone(),
        tables,
        SID,
        None,
    )));
    let seam_hooks = Arc::new(RecordingHooks::default());
    let stream = Endpoint::Stream {
        sid: SID,
        ssid: None,
    };
    let seam = EndpointIommu::model_owned(stream, counting.clone(), seam_hooks.clone());
    let disk = Arc::new(MemDisk::new(1 << 20));
    let mut dev = BlockDevice::new("blk0", disk.clone(), false);
    let dma = DmaMemory::Translated {
        phys: SharedMemory::new(rig.mem.clone()),
        iommu: seam.clone(),
    };
    dev.activate(ActivationContext::single_queue(
        m,
        dma,
        q.create_queue().unwrap(),
        (1 << 32) | (1 << 33),
    ))
    .unwrap();
    dev.queue_notify(0);
    assert!(testing::wait_for(|| q.used().idx().load() >= 2));
    assert_eq!(q.used().idx().load(), 2);
    testing::assert_write_then_read_done(m, BUFS, &disk, &sector);

    // Once and once: every access the seam carried was resolved by the SMMU (no seam cache)
    // and reported by it, translated in its stage-1 tables; the seam reported nothing.
    let accesses = counting.calls();
    let reported: Vec<_> = rig
        .hooks
        .dmas()
        .into_iter()
        .filter(|d| d.endpoint == stream)
        .collect();
    assert!(accesses >= 6, "rings and buffers: {accesses} accesses");
    assert_eq!(reported.len() as u64, accesses);
    assert!(
        reported
            .iter()
            .all(|d| matches!(d.outcome, DmaOutcome::Translated { .. })),
        "{reported:?}"
    );
    assert!(seam_hooks.dmas().is_empty());
    assert_eq!(seam.stats().hits, 0);
    assert_eq!(seam.stats().misses, accesses);

    // A buffer outside the tables: the request fails closed with a translation event, and the
    // disk is not written.
    q.add_desc_chains(&testing::write_from(m, BUFS, 4, UNMAPPED, 6, |g| g), 6)
        .unwrap();
    dev.queue_notify(0);
    assert!(testing::wait_for(|| q.used().idx().load() >= 3));
    assert_eq!(q.used().idx().load(), 3);
    assert_ne!(testing::status(m, BUFS, at::LONE_STATUS), S_OK);
    assert!(disk.contents()[2048..2560].iter().all(|&b| b == 0));
    assert!(
        rig.events()
            .iter()
            .any(|e| e.kind == EventType::FTranslation && e.input_addr == UNMAPPED),
        "{:?}",
        rig.events()
    );
    let faults = rig
        .hooks
        .dmas()
        .into_iter()
        .filter(|d| matches!(d.outcome, DmaOutcome::Faulted { .. }))
        .count();
    assert_eq!(faults, 1, "the refused access is reported once");
    assert_eq!(rig.hooks.dmas().len() as u64, counting.calls());
    dev.reset();
}
