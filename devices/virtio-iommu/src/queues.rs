//! Descriptor-chain I/O for the request and event queues.
//!
//! The IOMMU's own queues live in guest-physical memory (the IOMMU is not behind itself), so
//! they are accessed through the plain `GuestMemoryMmap`. A chain is split into its readable
//! and writable descriptors by hand rather than with virtio-queue's `Reader`/`Writer`, so a bad
//! address in the readable part can still be answered with S_IOERR through a good tail.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_virtio_pci::{RequestHandler, serve_requests_with};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::engine::{Engine, Reply};
use crate::request::MAX_READABLE;
use crate::spec::FAULT_LEN;

/// The used ring could not be updated: the queue is unusable until reset.
#[derive(Debug, Error)]
#[error("cannot update the used ring of queue {queue}: {source}")]
pub struct QueueBroken {
    /// Queue index.
    pub queue: u16,
    /// What virtio-queue reported.
    #[source]
    pub source: virtio_queue::Error,
}

/// Deferral state of the request queue (see [`sluice_virtio_pci::request_queue`]): a deferred
/// request is neither applied to the model nor answered until it is due.
pub use sluice_virtio_pci::DeferState;

/// A chain's two parts.
#[derive(Debug, Default)]
struct Gathered {
    readable: Vec<u8>,
    readable_len: u64,
    readable_ok: bool,
    writable: Vec<(GuestAddress, u32)>,
    writable_len: u64,
    /// A readable descriptor after a writable one.
    misordered: bool,
}

fn gather(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Gathered {
    let mut g = Gathered {
        readable_ok: true,
        ..Gathered::default()
    };
    for desc in chain {
        let len = desc.len();
        if desc.is_write_only() {
            g.writable.push((desc.addr(), len));
            g.writable_len = g.writable_len.saturating_add(u64::from(len));
            continue;
        }
        if !g.writable.is_empty() {
            g.misordered = true;
        }
        g.readable_len = g.readable_len.saturating_add(u64::from(len));
        let room = MAX_READABLE.saturating_sub(g.readable.len());
        let take = room.min(usize::try_from(len).unwrap_or(usize::MAX));
        if take > 0 {
            let mut buf = vec![0u8; take];
            if mem.read_slice(&mut buf, desc.addr()).is_err() {
                g.readable_ok = false;
            }
            g.readable.extend_from_slice(&buf);
        }
    }
    g
}

/// Writes `bytes` across the writable descriptors in order. False if any write failed.
fn scatter(mem: &GuestMemoryMmap, writable: &[(GuestAddress, u32)], bytes: &[u8]) -> bool {
    let mut rest = bytes;
    for &(addr, len) in writable {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        let (now, later) = rest.split_at(n);
        if mem.write_slice(now, addr).is_err() {
            return false;
        }
        rest = later;
    }
    rest.is_empty()
}

impl Engine {
    /// Answers every available request on `queue`. Returns whether the driver wants an
    /// interrupt.
    pub fn process_requests(
        &self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueBroken> {
        self.process_requests_deferring(index, queue, mem, None, true)
    }

    /// [`Engine::process_requests`] with deferral (see [`DeferState`]) when `defer` is given:
    /// stops at a request whose completion is deferred and not yet due. `rearm` false leaves
    /// the driver's doorbells suppressed once drained (see [`serve_requests_with`]).
    pub fn process_requests_deferring(
        &self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        defer: Option<&mut DeferState>,
        rearm: bool,
    ) -> Result<bool, QueueBroken> {
        let requests = EngineRequests { engine: self, mem };
        serve_requests_with(queue, mem, defer, &requests, rearm).map_err(|source| QueueBroken {
            queue: index,
            source,
        })
    }

    /// Copies waiting faults into event buffers while both exist. Returns whether the driver
    /// wants an interrupt.
    pub fn process_events(
        &self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueBroken> {
        let mut completed = false;
        while let Some(rec) = self.shared.faults.front() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Out of buffers with faults waiting: with VIRTIO_RING_F_EVENT_IDX the driver
                // only rings when `avail_event` asks it to; ask for its next buffer (and take
                // one added meanwhile).
                if queue.enable_notification(mem).unwrap_or(false)
                    && queue.pop_descriptor_chain(mem).is_some()
                {
                    queue.go_to_previous_position();
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let g = gather(mem, chain);
            let bytes = rec.encode();
            let ok = !g.misordered
                && g.readable_len == 0
                && g.writable_len >= FAULT_LEN as u64
                && scatter(mem, &g.writable, &bytes);
            let used = if ok {
                self.shared.faults.pop();
                self.counters.events_written.fetch_add(1, Ordering::Relaxed);
                FAULT_LEN as u32
            } else {
                self.counters
                    .event_buffers_bad
                    .fetch_add(1, Ordering::Relaxed);
                0
            };
            queue
                .add_used(mem, head, used)
                .map_err(|source| QueueBroken {
                    queue: index,
                    source,
                })?;
            completed = true;
        }
        Ok(completed && sluice_virtio_pci::driver_wants_interrupt(queue, mem))
    }
}

/// Serves virtio-iommu requests in the shared request loop ([`serve_requests`]).
struct EngineRequests<'a> {
    engine: &'a Engine,
    mem: &'a GuestMemoryMmap,
}

impl<'m> RequestHandler<'m, GuestMemoryMmap> for EngineRequests<'_> {
    type Request = Gathered;

    fn read(&self, chain: DescriptorChain<&'m GuestMemoryMmap>) -> Gathered {
        gather(self.mem, chain)
    }

    /// A misordered chain is never deferred: it is answered unwritten at once.
    fn defer(&self, g: &Gathered) -> Option<Duration> {
        (!g.misordered)
            .then(|| {
                self.engine
                    .defer_for(&g.readable, g.readable_len, g.writable_len)
            })
            .flatten()
    }

    fn complete(&self, _head: u16, g: Gathered) -> u32 {
        let reply = if g.misordered {
            self.engine
                .counters
                .unparsed
                .fetch_add(1, Ordering::Relaxed);
            Reply::Unwritten
        } else {
            self.engine.handle(
                &g.readable,
                g.readable_len,
                g.readable_ok,
                g.writable_len,
                Some(self.mem),
            )
        };
        match reply {
            Reply::Write(bytes) if scatter(self.mem, &g.writable, &bytes) => {
                u32::try_from(bytes.len()).unwrap_or(0)
            }
            _ => 0,
        }
    }
}
