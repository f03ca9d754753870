//! Serving a request queue whose completions the hooks may defer: the loop virtio-blk and
//! virtio-iommu share, with the device's own request handling behind [`RequestHandler`].
//!
//! Design of deferral (`Hooks::defer`, injection mode `defer`): a request whose completion is
//! deferred is put back on the available ring (`go_to_previous_position`) and is neither
//! executed nor answered until it is due; the worker then pops it again, executes it (its DMA
//! and state changes happen at completion time, as on a slow device), publishes its used entry
//! and interrupts. Requests behind it wait too, so completions stay in order. The doorbell never
//! waits: it only posts to the worker, which wakes at the due time ([`next_messages`]). At reset
//! the worker stops and the queue is dropped with the deferred request still unanswered.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::notify::driver_wants_interrupt;

/// Deferral state of one request queue: the request already asked about and when the deferred
/// one is due.
#[derive(Debug, Default)]
pub struct DeferState {
    /// Available-ring position of the request already asked about.
    asked: Option<u16>,
    /// When the deferred request completes.
    due: Option<Instant>,
}

impl DeferState {
    /// When the deferred request is due, if one is waiting.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    fn waiting(&self) -> bool {
        self.due.is_some_and(|d| Instant::now() < d)
    }
}

/// The device-specific part of serving one request, on guest memory `M` borrowed for `'m`.
pub trait RequestHandler<'m, M: GuestMemory> {
    /// What the device reads of a chain to decide about deferral and, later, to complete it.
    type Request;

    /// Reads a popped chain. Called at every pop, so a deferred request is read again (from
    /// guest memory as it is then) when it is due.
    fn read(&self, chain: DescriptorChain<&'m M>) -> Self::Request;

    /// Whether the completion of `request` is to be deferred, and by how long (asks the
    /// hooks). Asked once per request.
    fn defer(&self, request: &Self::Request) -> Option<Duration>;

    /// Executes and answers `request` (chain head `head`); returns the used length to publish.
    fn complete(&self, head: u16, request: Self::Request) -> u32;
}

/// Completes the available requests on `queue` in order through `handler`, publishing a used
/// entry for each. With `defer`, asks about each request once and stops at one whose completion
/// is deferred and not yet due; without, never asks. Returns whether a request completed and
/// the driver wants an interrupt for it; an error when the used ring could not be written (the
/// queue is unusable until reset).
///
/// Batching: every request available is served in one pass, with the driver's doorbells
/// suppressed meanwhile (`VRING_USED_F_NO_NOTIFY`, or with VIRTIO_RING_F_EVENT_IDX no new
/// `avail_event`). Before returning, doorbells are re-enabled (`avail_event` set to the next
/// entry) and the ring is checked once more, so a request made while they were off is served
/// now rather than lost. The interrupt is asked for once per pass, after the last entry.
/// Stopping at a deferred request leaves doorbells off: the caller serves again when it is due.
pub fn serve_requests<'m, M, H>(
    queue: &mut Queue,
    mem: &'m M,
    defer: Option<&mut DeferState>,
    handler: &H,
) -> Result<bool, virtio_queue::Error>
where
    M: GuestMemory,
    H: RequestHandler<'m, M>,
{
    serve_requests_with(queue, mem, defer, handler, true)
}

/// [`serve_requests`], and with `rearm` false the driver's doorbells stay suppressed when the
/// ring is drained: for a caller that polls the ring itself and calls again with `rearm` true
/// before it stops polling (which serves what came meanwhile and asks for doorbells again).
pub fn serve_requests_with<'m, M, H>(
    queue: &mut Queue,
    mem: &'m M,
    mut defer: Option<&mut DeferState>,
    handler: &H,
    rearm: bool,
) -> Result<bool, virtio_queue::Error>
where
    M: GuestMemory,
    H: RequestHandler<'m, M>,
{
    let mut completed = false;
    // Set when the ring looked non-empty after re-enabling doorbells but nothing could be
    // popped since: a bogus avail index (hostile guest) must not spin this loop forever.
    let mut rechecked = false;
    queue.disable_notification(mem)?;
    loop {
        if defer.as_deref().is_some_and(DeferState::waiting) {
            break;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            if !rearm {
                break;
            }
            // Drained: take doorbells again; if the driver added one meanwhile, go on.
            if !rechecked && queue.enable_notification(mem)? {
                rechecked = true;
                queue.disable_notification(mem)?;
                continue;
            }
            // Leave doorbells on (the recheck above may have been skipped).
            if rechecked {
                queue.enable_notification(mem)?;
            }
            break;
        };
        rechecked = false;
        let head = chain.head_index();
        let request = handler.read(chain);
        if let Some(st) = defer.as_deref_mut() {
            let pos = queue.next_avail().wrapping_sub(1);
            if st.asked != Some(pos) {
                st.asked = Some(pos);
                if let Some(delay) = handler.defer(&request) {
                    st.due = Some(Instant::now() + delay);
                    queue.go_to_previous_position();
                    continue;
                }
            }
            st.asked = None;
            st.due = None;
        }
        let used_len = handler.complete(head, request);
        queue.add_used(mem, head, used_len)?;
        completed = true;
    }
    Ok(completed && driver_wants_interrupt(queue, mem))
}

/// Waits for the next message to a queue worker; when a deferred completion is `due` first,
/// returns `on_due()` at that time instead. Then takes every message that arrived meanwhile,
/// so a burst of doorbells is served by one pass. None once every sender is gone.
pub fn next_messages<T>(
    rx: &Receiver<T>,
    due: Option<Instant>,
    on_due: impl FnOnce() -> T,
) -> Option<Vec<T>> {
    let first = match due {
        None => rx.recv().ok()?,
        Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => on_due(),
            Err(RecvTimeoutError::Disconnected) => return None,
        },
    };
    let mut messages = vec![first];
    messages.extend(rx.try_iter());
    Some(messages)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    /// Requests are one readable byte (their tag) and one writable byte (set to the tag + 1).
    struct Echo<'a> {
        mem: &'a GuestMemoryMmap,
        /// Tags in the order they were asked about.
        asked: RefCell<Vec<u8>>,
        /// Tags in the order they completed.
        completed: RefCell<Vec<u8>>,
        /// Defers the request with this tag by this long.
        defer_tag: Option<(u8, Duration)>,
    }

    impl<'a> Echo<'a> {
        fn new(mem: &'a GuestMemoryMmap, defer_tag: Option<(u8, Duration)>) -> Self {
            Echo {
                mem,
                asked: RefCell::default(),
                completed: RefCell::default(),
                defer_tag,
            }
        }
    }

    impl<'m> RequestHandler<'m, GuestMemoryMmap> for Echo<'_> {
        type Request = (u8, GuestAddress);
        fn read(&self, chain: DescriptorChain<&'m GuestMemoryMmap>) -> Self::Request {
            let descs: Vec<_> = chain.collect();
            let tag = self.mem.read_obj::<u8>(descs[0].addr()).unwrap();
            (tag, descs[1].addr())
        }
        fn defer(&self, (tag, _): &Self::Request) -> Option<Duration> {
            self.asked.borrow_mut().push(*tag);
            self.defer_tag.filter(|(t, _)| t == tag).map(|(_, d)| d)
        }
        fn complete(&self, _head: u16, (tag, reply): Self::Request) -> u32 {
            self.completed.borrow_mut().push(tag);
            self.mem.write_obj(tag + 1, reply).unwrap();
            1
        }
    }

    fn reply(m: &GuestMemoryMmap, i: u64) -> u8 {
        m.read_obj(GuestAddress(0x2_0000 + 0x100 * i + 0x80))
            .unwrap()
    }

    fn queue_with(m: &GuestMemoryMmap, tags: &[u8]) -> Queue {
        let q = MockSplitQueue::create(m, GuestAddress(0x1_0000), 16);
        for (i, tag) in tags.iter().enumerate() {
            let at = 0x2_0000 + 0x100 * i as u64;
            m.write_obj(*tag, GuestAddress(at)).unwrap();
            let d = (2 * i) as u16;
            q.add_desc_chains(
                &[
                    RawDescriptor::from(SplitDescriptor::new(at, 1, 1, d + 1)),
                    RawDescriptor::from(SplitDescriptor::new(at + 0x80, 1, 2, 0)),
                ],
                d,
            )
            .unwrap();
        }
        q.create_queue().unwrap()
    }

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn without_deferral_every_request_completes_in_order_and_none_is_asked_about() {
        let m = ram();
        let mut q = queue_with(&m, &[1, 2, 3]);
        let h = Echo::new(&m, Some((1, Duration::from_secs(60))));
        assert!(serve_requests(&mut q, &m, None, &h).unwrap());
        assert_eq!(*h.completed.borrow(), vec![1, 2, 3]);
        assert!(h.asked.borrow().is_empty());
        assert_eq!(q.next_used(), 3);
    }

    #[test]
    fn a_deferred_request_holds_back_those_behind_it_until_due_and_is_asked_once() {
        let m = ram();
        let mut q = queue_with(&m, &[1, 2, 3]);
        let delay = Duration::from_millis(30);
        let h = Echo::new(&m, Some((2, delay)));
        let mut st = DeferState::default();
        assert!(serve_requests(&mut q, &m, Some(&mut st), &h).unwrap());
        assert_eq!(
            *h.completed.borrow(),
            vec![1],
            "2 is deferred, 3 waits behind it"
        );
        assert_eq!(
            (reply(&m, 1), reply(&m, 2)),
            (0, 0),
            "nothing answered early"
        );
        let due = st.due().expect("a deferred request is waiting");
        // Served again before it is due: nothing moves, nobody is asked again.
        assert!(!serve_requests(&mut q, &m, Some(&mut st), &h).unwrap());
        assert_eq!(*h.asked.borrow(), vec![1, 2]);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        assert!(serve_requests(&mut q, &m, Some(&mut st), &h).unwrap());
        assert_eq!(*h.completed.borrow(), vec![1, 2, 3]);
        assert_eq!(*h.asked.borrow(), vec![1, 2, 3], "2 was not asked twice");
        assert_eq!((reply(&m, 0), reply(&m, 1), reply(&m, 2)), (2, 3, 4));
        assert_eq!(st.due(), None);
        assert_eq!(q.next_used(), 3);
    }

    /// With VIRTIO_RING_F_EVENT_IDX a pass serves everything, then asks for the doorbell of
    /// the next entry (`avail_event` = next_avail) and interrupts once if `used_event` says so.
    #[test]
    fn event_idx_pass_batches_and_rearms_the_doorbell() {
        let m = ram();
        let mut q = queue_with(&m, &[1, 2, 3]);
        q.set_event_idx(true);
        let avail_event = GuestAddress(q.used_ring() + 4 + 8 * 16);
        let used_event = GuestAddress(q.avail_ring() + 4 + 2 * 16);
        // The driver wants an interrupt only after the second completion (used_event = 1).
        m.write_obj(1u16.to_le(), used_event).unwrap();
        let h = Echo::new(&m, None);
        assert!(serve_requests(&mut q, &m, None, &h).unwrap());
        assert_eq!(*h.completed.borrow(), vec![1, 2, 3]);
        assert_eq!(u16::from_le(m.read_obj(avail_event).unwrap()), 3);
        // Nothing new: no interrupt (used_event already passed), doorbell still armed.
        assert!(!serve_requests(&mut q, &m, None, &h).unwrap());
        assert_eq!(u16::from_le(m.read_obj(avail_event).unwrap()), 3);
    }

    /// Without EVENT_IDX the doorbell is off (VRING_USED_F_NO_NOTIFY) only during a pass.
    #[test]
    fn flags_suppress_doorbells_only_while_serving() {
        let m = ram();
        let mut q = queue_with(&m, &[1]);
        let h = Echo::new(&m, None);
        assert!(serve_requests(&mut q, &m, None, &h).unwrap());
        assert_eq!(m.read_obj::<u16>(GuestAddress(q.used_ring())).unwrap(), 0);
    }

    /// A hostile avail index (far past the ring) ends the pass instead of spinning on the
    /// "more entries after re-enabling" recheck.
    #[test]
    fn bogus_avail_index_does_not_spin() {
        let m = ram();
        let mut q = queue_with(&m, &[1]);
        q.set_event_idx(true);
        let h = Echo::new(&m, None);
        assert!(serve_requests(&mut q, &m, None, &h).unwrap());
        m.write_obj(1000u16.to_le(), GuestAddress(q.avail_ring() + 2))
            .unwrap();
        let t = std::time::Instant::now();
        let _ = serve_requests(&mut q, &m, None, &h);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(*h.completed.borrow(), vec![1]);
    }

    #[test]
    fn next_messages_coalesces_and_wakes_when_due() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(next_messages(&rx, None, || 0), Some(vec![1, 2]));
        let t = Instant::now();
        let due = t + Duration::from_millis(20);
        assert_eq!(next_messages(&rx, Some(due), || 7), Some(vec![7]));
        assert!(t.elapsed() >= Duration::from_millis(20));
        drop(tx);
        assert_eq!(next_messages(&rx, None, || 0), None);
    }
}
