//! Deferred completions (`Hooks::defer` on `virtio.<dev>.complete`): the doorbell returns at
//! once, the request executes and is published later on the worker, in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_devapi::{Hooks, NullInterrupts, PointCtx};
use sluice_pci::PciInterrupt;
use sluice_virtio_pci::{
    ActivationContext, DmaMemory, SharedMemory, VirtioDevice, VirtioInterrupt,
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

/// Defers the first completion by 1 s; records every question and every point.
const DEFER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct DeferFirst(Mutex<(Vec<u64>, Vec<u64>)>);

impl Hooks for DeferFirst {
    fn defer(&self, ctx: &PointCtx<'_>) -> Option<Duration> {
        assert_eq!(ctx.point, "virtio.blk0.complete");
        let mut g = self.0.lock().unwrap();
        g.0.push(ctx.value);
        (g.0.len() == 1).then_some(DEFER)
    }
    fn point(&self, ctx: &PointCtx<'_>) {
        assert_eq!(ctx.point, "virtio.blk0.complete");
        self.0.lock().unwrap().1.push(ctx.value);
    }
}

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
    let hooks = Arc::new(DeferFirst::default());
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
    let g = hooks.0.lock().unwrap();
    let get_id = u64::from(T_GET_ID);
    assert_eq!(g.0, vec![get_id, get_id], "asked once per request");
    assert_eq!(g.1, vec![get_id, get_id], "completion point per request");
}
