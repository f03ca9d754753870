//! Deferred request completions (`Hooks::defer`): the doorbell returns at once, the request
//! takes effect and is published later on the worker, in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_devapi::{RecordingHooks, RecordingInterrupts};
use sluice_pci::PciInterrupt;
use sluice_virtio_pci::{
    ActivationContext, DmaMemory, SharedMemory, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Bytes;

use super::*;

fn run(inline: bool) {
    let phys = ram();
    let rq = MockSplitQueue::create(&phys, GuestAddress(0x1_0000), 16);
    phys.write_slice(&encode(&attach(1, EP)), GuestAddress(0x4_0000))
        .unwrap();
    phys.write_slice(&encode(&attach(2, EP2)), GuestAddress(0x4_2000))
        .unwrap();
    phys.write_obj(0xffu8, GuestAddress(0x4_1000)).unwrap();
    phys.write_obj(0xffu8, GuestAddress(0x4_3000)).unwrap();
    rq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(0x4_0000, 20, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x4_1000, 4, 2, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x4_2000, 20, 1, 3)),
            RawDescriptor::from(SplitDescriptor::new(0x4_3000, 4, 2, 0)),
        ],
        0,
    )
    .unwrap();
    let eq = MockSplitQueue::create(&phys, GuestAddress(0x2_0000), 16);
    let queues: Vec<(u16, Queue)> = vec![
        (0, rq.create_queue().unwrap()),
        (1, eq.create_queue().unwrap()),
    ];
    let rec = Arc::new(RecordingInterrupts::default());
    let interrupt = Arc::new(VirtioInterrupt::new(
        PciInterrupt::new(rec.clone(), None),
        2,
    ));
    // Defers the first ATTACH (of `EP`, to domain 1) by 200 ms.
    let hooks = Arc::new(RecordingHooks::default().with_defer(|ctx| {
        (ctx.point == crate::POINT_ATTACH && ctx.domain == Some(1))
            .then_some(Duration::from_millis(200))
    }));
    let mut d = VirtioIommu::new(
        "viommu0",
        ViommuConfig {
            inline_requests: inline,
            ..cfg()
        },
        hooks.clone(),
    );
    d.activate(ActivationContext {
        mem: SharedMemory::new(phys.clone()),
        dma: DmaMemory::Direct(SharedMemory::new(phys.clone())),
        queues,
        interrupt,
        acked_features: all_features(),
        queue_events: Vec::new(),
    })
    .unwrap();
    let t = Instant::now();
    d.queue_notify(0);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "the doorbell does not wait"
    );
    // Nothing took effect yet: not the deferred ATTACH, nor the one behind it.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.attached_domain(EP), None);
    assert_eq!(d.attached_domain(EP2), None);
    assert_eq!(phys.read_obj::<u8>(GuestAddress(0x4_1000)).unwrap(), 0xff);
    // A second doorbell meanwhile does not overtake the deferred request.
    d.queue_notify(0);
    assert_eq!(d.attached_domain(EP2), None);
    while phys.read_obj::<u8>(GuestAddress(0x4_3000)).unwrap() != 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(phys.read_obj::<u8>(GuestAddress(0x4_1000)).unwrap(), 0);
    assert_eq!(
        (d.attached_domain(EP), d.attached_domain(EP2)),
        (Some(1), Some(2))
    );
    assert!(!rec.take().is_empty(), "the completion interrupted");
    // Each request was asked about exactly once.
    let asked: Vec<_> = hooks
        .defer_questions()
        .into_iter()
        .map(|q| (q.point, q.domain))
        .collect();
    assert_eq!(
        asked,
        vec![
            (crate::POINT_ATTACH.to_string(), Some(1)),
            (crate::POINT_ATTACH.to_string(), Some(2))
        ]
    );
}

#[test]
fn deferred_completion_inline_doorbell() {
    run(true);
}

#[test]
fn deferred_completion_worker_doorbell() {
    run(false);
}
