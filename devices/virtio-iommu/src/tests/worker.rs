//! The device driven through `VirtioDevice`: activation, doorbells, the worker thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_devapi::{NullInterrupts, RecordingInterrupts};
use sluice_pci::PciInterrupt;
use sluice_virtio_pci::{
    ActivationContext, DmaMemory, SharedMemory, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, IommuMemory};

use super::*;
use crate::spec::{FAULT_R_DOMAIN, T_ATTACH};

fn wait_for(mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A request queue at 0x1_0000 holding one ATTACH of `EP` to domain 1 (readable at 0x4_0000,
/// its tail at 0x4_1000, status 0xff until answered).
fn attach_request_queue(phys: &GuestMemoryMmap) -> MockSplitQueue<'_, GuestMemoryMmap> {
    let rq = MockSplitQueue::create(phys, GuestAddress(0x1_0000), 16);
    phys.write_slice(&encode(&attach(1, EP)), GuestAddress(0x4_0000))
        .unwrap();
    phys.write_obj(0xffu8, GuestAddress(0x4_1000)).unwrap();
    rq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(0x4_0000, 20, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x4_1000, 4, 2, 0)),
        ],
        0,
    )
    .unwrap();
    rq
}

#[test]
fn worker_serves_requests_and_events() {
    let phys = ram();
    let rq = attach_request_queue(&phys);
    // Event queue at 0x2_0000 with one 24-byte buffer.
    let eq = MockSplitQueue::create(&phys, GuestAddress(0x2_0000), 16);
    eq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            0x5_0000, 24, 2, 0,
        ))],
        0,
    )
    .unwrap();
    let queues: Vec<(u16, Queue)> = vec![
        (0, rq.create_queue().unwrap()),
        (1, eq.create_queue().unwrap()),
    ];
    let rec = Arc::new(RecordingInterrupts::default());
    let interrupt = Arc::new(VirtioInterrupt::new(
        PciInterrupt::new(rec.clone(), None),
        2,
    ));
    let mut d = VirtioIommu::new(
        "viommu0",
        ViommuConfig {
            boot_bypass: false,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    assert_eq!(d.device_type(), 23);
    assert_eq!(d.queue_max_sizes(), &[256, 256]);
    d.activate(ActivationContext {
        mem: SharedMemory::new(phys.clone()),
        dma: DmaMemory::Direct(SharedMemory::new(phys.clone())),
        queues,
        interrupt,
        acked_features: all_features(),
        queue_events: Vec::new(),
    })
    .unwrap();
    d.queue_notify(0);
    wait_for(|| phys.read_obj::<u8>(GuestAddress(0x4_1000)).unwrap() == 0);
    assert_eq!(d.attached_domain(EP), Some(1));
    // EP2 is unattached and bypass is off: its DMA faults, and the worker reports it.
    let m = IommuMemory::new(phys.clone(), d.endpoint_iommu(EP2).unwrap(), true, ());
    assert!(m.read_obj::<u32>(GuestAddress(0x7000)).is_err());
    wait_for(|| {
        phys.read_obj::<u8>(GuestAddress(0x5_0000)).unwrap() == FAULT_R_DOMAIN
            && phys.read_obj::<u32>(GuestAddress(0x5_0008)).unwrap() == EP2
    });
    wait_for(|| d.pending_faults() == 0);
    let c: std::collections::BTreeMap<_, _> = d.counters().into_iter().collect();
    assert_eq!(c["events_written"], 1);
    assert!(c["interrupts"] >= 1);
    assert!(!rec.take().is_empty());
    d.reset();
    assert_eq!(d.attached_domain(EP), None);
    let _ = (T_ATTACH, NullInterrupts);
}

#[test]
fn activation_needs_both_queues() {
    let phys = ram();
    let rq = MockSplitQueue::create(&phys, GuestAddress(0x1_0000), 16);
    let interrupt = Arc::new(VirtioInterrupt::new(
        PciInterrupt::new(Arc::new(NullInterrupts), None),
        2,
    ));
    let mut d = device();
    let r = d.activate(ActivationContext {
        mem: SharedMemory::new(phys.clone()),
        dma: DmaMemory::Direct(SharedMemory::new(phys.clone())),
        queues: vec![(0, rq.create_queue().unwrap())],
        interrupt,
        acked_features: all_features(),
        queue_events: Vec::new(),
    });
    assert!(matches!(
        r,
        Err(sluice_virtio_pci::ActivateError::BadQueue(1))
    ));
}

#[test]
fn ioerr_when_the_request_cannot_be_read() {
    let phys = ram();
    let d = device();
    let rq = MockSplitQueue::create(&phys, GuestAddress(0x1_0000), 16);
    rq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(RAM as u64 + 0x1000, 20, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x4_1000, 4, 2, 0)),
            // A readable descriptor after a writable one: returned unwritten.
            RawDescriptor::from(SplitDescriptor::new(0x4_2000, 4, 3, 3)),
            RawDescriptor::from(SplitDescriptor::new(0x4_3000, 20, 0, 0)),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = rq.create_queue().unwrap();
    phys.write_obj(0xffu8, GuestAddress(0x4_2000)).unwrap();
    d.process_request_queue(&mut q, &phys).unwrap();
    assert_eq!(
        phys.read_obj::<u8>(GuestAddress(0x4_1000)).unwrap(),
        Status::IoErr.code()
    );
    assert_eq!(phys.read_obj::<u8>(GuestAddress(0x4_2000)).unwrap(), 0xff);
    let used_len: u32 = phys.read_obj(GuestAddress(q.used_ring() + 16)).unwrap();
    assert_eq!(used_len, 0);
}

/// A backend thread that polls the request ring serves what the driver added without a
/// doorbell; a quiet poll leaves `avail_event` alone (with VIRTIO_RING_F_EVENT_IDX the driver
/// then does not ring), the last poll asks for doorbells again, and the event queue cannot be
/// polled.
#[test]
fn a_polled_request_ring_is_served_quietly_and_rearmed() {
    let phys = ram();
    let rq = attach_request_queue(&phys);
    let eq = MockSplitQueue::create(&phys, GuestAddress(0x2_0000), 16);
    let mut req: Queue = rq.create_queue().unwrap();
    req.set_event_idx(true);
    // `avail_event` sits after the used ring's 16 elements.
    let avail_event = GuestAddress(rq.used_addr().0 + 4 + 8 * 16);
    phys.write_obj(0u16, avail_event).unwrap();
    let mut d = device();
    d.activate(ActivationContext {
        mem: SharedMemory::new(phys.clone()),
        dma: DmaMemory::Direct(SharedMemory::new(phys.clone())),
        queues: vec![(0, req), (1, eq.create_queue().unwrap())],
        interrupt: Arc::new(VirtioInterrupt::new(
            PciInterrupt::new(Arc::new(NullInterrupts), None),
            2,
        )),
        acked_features: all_features(),
        queue_events: Vec::new(),
    })
    .unwrap();
    assert_eq!(d.poll_queue(1, true), None, "the event queue is not polled");
    assert_eq!(d.poll_queue(0, true), Some(true));
    assert_eq!(phys.read_obj::<u8>(GuestAddress(0x4_1000)).unwrap(), 0);
    assert_eq!(d.attached_domain(EP), Some(1));
    assert_eq!(
        phys.read_obj::<u16>(avail_event).unwrap(),
        0,
        "no doorbell asked for while polling"
    );
    assert_eq!(d.poll_queue(0, true), Some(false));
    assert_eq!(d.poll_queue(0, false), Some(false));
    assert_eq!(
        phys.read_obj::<u16>(avail_event).unwrap(),
        1,
        "the next request rings again"
    );
    d.reset();
    assert_eq!(d.poll_queue(0, true), None, "nothing runs after a reset");
}
