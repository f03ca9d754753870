//! Deferred completions (`Hooks::defer` on `virtio.<dev>.complete`): the doorbell returns at
//! once, the request executes and is published later on the worker, in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_devapi::{NullInterrupts, RecordingHooks};
use sluice_pci::PciInterrupt;
use sluice_virtio_pci::{
    ActivationContext, DmaMemory, QueueEvent, SharedMemory, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BlockDevice;
use crate::disk::Disk;
use crate::request::T_GET_ID;

struct NoDisk;
impl Disk for NoDisk {
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        1 << 20
    }
}

/// How long the first completion is deferred.
const DEFER: Duration = Duration::from_secs(1);
const COMPLETE: &str = "virtio.blk0.complete";

#[test]
fn deferred_completion_keeps_order_and_never_blocks_the_doorbell() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let q = MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16);
    for (i, at) in [0x10_0000u64, 0x20_0000].iter().enumerate() {
        m.write_obj(T_GET_ID.to_le(), GuestAddress(*at)).unwrap();
        m.write_obj(0xffu8, GuestAddress(at + 0x2000)).unwrap();
        let d = (i * 3) as u16;
        q.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(*at, 16, 1, d + 1)),
                RawDescriptor::from(SplitDescriptor::new(at + 0x1000, 20, 3, d + 2)),
                RawDescriptor::from(SplitDescriptor::new(at + 0x2000, 1, 2, 0)),
            ],
            d,
        )
        .unwrap();
    }
    // Defers the first completion asked about; records every question and every point.
    let first = AtomicBool::new(true);
    let hooks = Arc::new(
        RecordingHooks::default()
            .with_defer(move |_| first.swap(false, Ordering::Relaxed).then_some(DEFER)),
    );
    let mut dev = BlockDevice::new("blk0", Arc::new(NoDisk), false).with_hooks(hooks.clone());
    let interrupt = Arc::new(VirtioInterrupt::new(
        PciInterrupt::new(Arc::new(NullInterrupts), None),
        1,
    ));
    dev.activate(ActivationContext {
        mem: SharedMemory::new(m.clone()),
        dma: DmaMemory::Direct(SharedMemory::new(m.clone())),
        queues: vec![(0, q.create_queue().unwrap())],
        interrupt,
        acked_features: 1 << 32,
        queue_events: Vec::new(),
    })
    .unwrap();
    let status = |at: u64| m.read_obj::<u8>(GuestAddress(at + 0x2000)).unwrap();
    let t = Instant::now();
    dev.queue_notify(0);
    // Order, not short wall times (the host may be loaded): had the doorbell waited for the
    // deferred completion, the first status would be written by now; the second request must not
    // overtake the first.
    assert_eq!((status(0x10_0000), status(0x20_0000)), (0xff, 0xff));
    dev.queue_notify(0);
    while status(0x20_0000) != 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(t.elapsed() >= DEFER);
    assert_eq!(status(0x10_0000), 0);
    assert_eq!(
        &m.read_obj::<[u8; 4]>(GuestAddress(0x10_1000)).unwrap(),
        b"blk0"
    );
    let get_id = (COMPLETE.to_string(), u64::from(T_GET_ID));
    let asked: Vec<_> = hooks
        .defer_questions()
        .into_iter()
        .map(|q| (q.point, q.value))
        .collect();
    assert_eq!(
        asked,
        vec![get_id.clone(), get_id.clone()],
        "asked once per request"
    );
    assert_eq!(
        hooks.point_values(),
        vec![get_id.clone(), get_id],
        "completion point per request"
    );
}

/// A doorbell handed over as an eventfd (`ActivationContext::queue_events`, the proxy's
/// ioeventfd) wakes the worker directly: the request completes with no `queue_notify` call, the
/// doorbell is announced through `rung` once and counted, and a reset ends the worker.
#[test]
fn a_doorbell_eventfd_wakes_the_worker_without_queue_notify() {
    use std::sync::atomic::AtomicU64;
    use vmm_sys_util::eventfd::EventFd;

    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let q = MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16);
    let at = 0x10_0000u64;
    m.write_obj(T_GET_ID.to_le(), GuestAddress(at)).unwrap();
    m.write_obj(0xffu8, GuestAddress(at + 0x2000)).unwrap();
    q.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(at, 16, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(at + 0x1000, 20, 3, 2)),
            RawDescriptor::from(SplitDescriptor::new(at + 0x2000, 1, 2, 0)),
        ],
        0,
    )
    .unwrap();
    let mut dev = BlockDevice::new("blk0", Arc::new(NoDisk), false);
    assert!(dev.waits_on_queue_events());
    let counters = dev.counters_handle();
    let doorbell = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let rung = Arc::new(AtomicU64::new(0));
    let seen = rung.clone();
    dev.activate(ActivationContext {
        mem: SharedMemory::new(m.clone()),
        dma: DmaMemory::Direct(SharedMemory::new(m.clone())),
        queues: vec![(0, q.create_queue().unwrap())],
        interrupt: Arc::new(VirtioInterrupt::new(
            PciInterrupt::new(Arc::new(NullInterrupts), None),
            1,
        )),
        acked_features: 1 << 32,
        queue_events: vec![QueueEvent {
            queue: 0,
            fd: doorbell.try_clone().unwrap(),
            rung: Arc::new(move || {
                seen.fetch_add(1, Ordering::Relaxed);
            }),
        }],
    })
    .unwrap();
    let status = || m.read_obj::<u8>(GuestAddress(at + 0x2000)).unwrap();
    assert_eq!(status(), 0xff, "nothing happens before the doorbell");
    doorbell.write(1).unwrap();
    let t = Instant::now();
    while status() != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the doorbell never reached the worker"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rung.load(Ordering::Relaxed), 1);
    assert_eq!(counters.notifies.load(Ordering::Relaxed), 1);
    assert_eq!(counters.requests.load(Ordering::Relaxed), 1);
    // A reset joins the worker; a doorbell after it reaches nobody.
    dev.reset();
    doorbell.write(1).unwrap();
    assert_eq!(rung.load(Ordering::Relaxed), 1);
}
