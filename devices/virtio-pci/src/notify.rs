//! Whether the driver wants a used-buffer notification.
//!
//! virtio-queue 0.18's `needs_notification` handles VIRTIO_F_EVENT_IDX but always answers
//! "yes" otherwise: it ignores the driver's VRING_AVAIL_F_NO_INTERRUPT flag (its source says so).
//! Linux sets that flag on queues it polls (virtio-iommu's request queue), so honouring it saves
//! an interrupt, an ISR read and a resample round trip per request.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// `VRING_AVAIL_F_NO_INTERRUPT` (virtio 1.x §2.7.7).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// True if the driver should be interrupted after the buffers added since the last call.
/// When the flags cannot be read the answer is "yes": a spurious interrupt is harmless, a
/// missing one hangs the driver.
pub fn driver_wants_interrupt<M: GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn honours_no_interrupt_flag() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(driver_wants_interrupt(&mut q, &m));
        m.write_obj(VRING_AVAIL_F_NO_INTERRUPT.to_le(), vq.avail_addr())
            .unwrap();
        assert!(!driver_wants_interrupt(&mut q, &m));
        // Unreadable ring: err on the side of interrupting.
        let mut far = Queue::new(16).unwrap();
        far.set_avail_ring_address(Some(0xdead_0000), Some(0));
        assert!(driver_wants_interrupt(&mut far, &m));
    }
}
