//! Fault reporting: the bounded queue translation faults wait in, and the fault record the
//! worker writes into event-queue buffers.
//!
//! The DMA path never blocks on the event queue: a fault is pushed here (a short critical
//! section on a leaf mutex), the worker is woken, and the worker copies records into event
//! buffers whenever the driver has provided some. When the queue is full the fault is dropped
//! and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::spec::FAULT_LEN;

/// One `struct virtio_iommu_fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// Endpoint ID.
    pub endpoint: u32,
    /// Faulting address (valid with FAULT_F_ADDRESS).
    pub address: u64,
}

impl FaultRecord {
    /// Wire encoding (reserved fields zero).
    pub fn encode(&self) -> [u8; FAULT_LEN] {
        let mut b = [0u8; FAULT_LEN];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }
}

type Waker = Arc<dyn Fn() + Send + Sync>;

/// Faults waiting for event buffers.
pub struct FaultQueue {
    q: Mutex<VecDeque<FaultRecord>>,
    cap: usize,
    raised: AtomicU64,
    dropped: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for FaultQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultQueue")
            .field("cap", &self.cap)
            .field("raised", &self.raised)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl FaultQueue {
    /// A queue holding at most `cap` records.
    pub fn new(cap: usize) -> Self {
        FaultQueue {
            q: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            raised: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            waker: Mutex::new(None),
        }
    }

    /// Queues `rec` (or drops it when full) and wakes the worker. Never blocks for long.
    pub fn push(&self, rec: FaultRecord) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = self.q.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= self.cap {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            q.push_back(rec);
        }
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(w) = waker {
            w();
        }
    }

    /// The oldest waiting record.
    pub fn front(&self) -> Option<FaultRecord> {
        self.q
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .copied()
    }

    /// Removes the oldest waiting record.
    pub fn pop(&self) -> Option<FaultRecord> {
        self.q.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.q.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every waiting record (device reset).
    pub fn clear(&self) {
        self.q.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Installs (or removes) the function that wakes the worker.
    pub fn set_waker(&self, w: Option<Waker>) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = w;
    }

    /// Faults raised so far (including dropped ones).
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// Faults dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_counted() {
        let q = FaultQueue::new(2);
        let woke = Arc::new(AtomicU64::new(0));
        let w = woke.clone();
        q.set_waker(Some(Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        })));
        let rec = FaultRecord {
            reason: 2,
            flags: 0x101,
            endpoint: 8,
            address: 0x1234_5678_9abc,
        };
        for _ in 0..3 {
            q.push(rec);
        }
        assert_eq!((q.len(), q.raised(), q.dropped()), (2, 3, 1));
        assert_eq!(woke.load(Ordering::Relaxed), 2);
        let b = rec.encode();
        assert_eq!(b[0], 2);
        assert_eq!(&b[4..8], &[1, 1, 0, 0]);
        assert_eq!(&b[8..12], &[8, 0, 0, 0]);
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            0x1234_5678_9abc
        );
        assert_eq!(q.pop(), Some(rec));
        q.clear();
        assert!(q.is_empty());
    }
}
