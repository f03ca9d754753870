//! How a device's worker thread sleeps between passes over its queues, when it waits on the
//! queue doorbells itself.
//!
//! A backend that absorbs doorbells into eventfds (QEMU's ioeventfds through the proxy) would
//! otherwise need a thread that reads each eventfd and calls [`crate::VirtioDevice::queue_notify`],
//! which then wakes the worker: two thread wake-ups between the vCPU's write and the request.
//! A device that opts in ([`crate::VirtioDevice::waits_on_queue_events`]) gets the eventfds in
//! its [`crate::ActivationContext`], and its worker waits on them directly with
//! [`WorkerWait`]: one wake-up, as in QEMU's own virtio-blk and Cloud Hypervisor's devices.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// One queue's doorbell as an eventfd the backend's ioeventfd signals, handed to a device that
/// waits on it itself instead of receiving [`crate::VirtioDevice::queue_notify`] calls.
pub struct QueueEvent {
    /// The queue whose doorbell it is.
    pub queue: u16,
    /// Signalled once per doorbell (several doorbells may read as one).
    pub fd: EventFd,
    /// Called once per read of `fd` that found it signalled, before the queue is processed:
    /// the transport's doorbell hook point and the backend's counter.
    pub rung: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for QueueEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEvent")
            .field("queue", &self.queue)
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

/// The device's side of a worker's wake-ups: a doorbell that came as a
/// [`crate::VirtioDevice::queue_notify`] call, and the request to stop.
#[derive(Debug)]
pub struct WorkerWake {
    fd: EventFd,
    stop: AtomicBool,
}

impl WorkerWake {
    /// A wake-up channel with nothing pending.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(WorkerWake {
            fd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            stop: AtomicBool::new(false),
        }))
    }

    /// Wakes the worker for a pass over its queues.
    pub fn notify(&self) {
        if let Err(e) = self.fd.write(1) {
            // Only an overflowing counter fails, and then a wake-up is pending anyway.
            log::error!("cannot wake a device worker: {e}");
        }
    }

    /// Asks the worker to end; it finishes the pass in hand first.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.notify();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// Tags of the epoll set: the wake-up channel, the timer, and queue event `i` as `QUEUE + i`.
const WAKE: u64 = 0;
const TIMER: u64 = 1;
const QUEUE: u64 = 2;

/// What a worker waits on: its [`WorkerWake`], its queues' doorbell eventfds, and a timer for
/// the next due deferred completion.
pub struct WorkerWait {
    wake: Arc<WorkerWake>,
    events: Vec<QueueEvent>,
    epoll: Epoll,
    timer: TimerFd,
    ready: Vec<EpollEvent>,
}

impl WorkerWait {
    /// Waits on `wake` and on `events` (none: only `wake`, the `queue_notify` path).
    pub fn new(wake: Arc<WorkerWake>, events: Vec<QueueEvent>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        let watch = |fd: i32, tag: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tag),
            )
        };
        watch(wake.fd.as_raw_fd(), WAKE)?;
        watch(timer.as_raw_fd(), TIMER)?;
        for (i, e) in events.iter().enumerate() {
            watch(e.fd.as_raw_fd(), QUEUE + i as u64)?;
        }
        let ready = vec![EpollEvent::default(); events.len() + 2];
        Ok(WorkerWait {
            wake,
            events,
            epoll,
            timer,
            ready,
        })
    }

    /// Blocks until a doorbell, a `notify`, or `due` (a deferred completion; `None`: no
    /// timeout). Returns the number of doorbells read from queue eventfds, or `None` once the
    /// worker is asked to stop. Doorbells that arrived together are coalesced: one pass over
    /// the ring serves them all.
    pub fn wait(&mut self, due: Option<Instant>) -> std::io::Result<Option<u64>> {
        if self.wake.stopped() {
            return Ok(None);
        }
        match due {
            // A zero duration disarms a timerfd: a due time already past fires in 1 ns.
            Some(due) => self.timer.reset(
                due.saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1)),
                None,
            )?,
            None => self.timer.reset(Duration::ZERO, None)?,
        }
        let n = loop {
            match self.epoll.wait(-1, &mut self.ready) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let mut rung = 0;
        for ev in self.ready.iter().take(n) {
            match ev.data() {
                WAKE => {
                    let _ = self.wake.fd.read();
                }
                TIMER => {
                    // Readable, so this read does not block.
                    let _ = self.timer.wait();
                }
                tag => {
                    let queue = usize::try_from(tag - QUEUE)
                        .ok()
                        .and_then(|i| self.events.get(i));
                    if let Some(q) = queue
                        && q.fd.read().is_ok()
                    {
                        rung += 1;
                        (q.rung)();
                    }
                }
            }
        }
        Ok((!self.wake.stopped()).then_some(rung))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn queue_event(queue: u16, count: &Arc<AtomicU64>) -> (QueueEvent, EventFd) {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let theirs = fd.try_clone().unwrap();
        let count = count.clone();
        let rung = Arc::new(move || {
            count.fetch_add(1, Ordering::Relaxed);
        });
        (QueueEvent { queue, fd, rung }, theirs)
    }

    /// A doorbell on a queue eventfd, a `notify` and a due time each end a wait; the doorbell
    /// is counted and announced once, and `stop` ends the worker.
    #[test]
    fn doorbells_notifies_due_times_and_stop_each_end_a_wait() {
        let wake = WorkerWake::new().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let (event, theirs) = queue_event(0, &count);
        let mut wait = WorkerWait::new(wake.clone(), vec![event]).unwrap();

        // Two doorbells before the worker looks: one read, one pass.
        theirs.write(1).unwrap();
        theirs.write(1).unwrap();
        assert_eq!(wait.wait(None).unwrap(), Some(1));
        assert_eq!(count.load(Ordering::Relaxed), 1);

        wake.notify();
        assert_eq!(wait.wait(None).unwrap(), Some(0));

        let t = Instant::now();
        let due = t + Duration::from_millis(20);
        assert_eq!(wait.wait(Some(due)).unwrap(), Some(0));
        assert!(Instant::now() >= due, "woke before the due time");
        // A due time already past fires at once.
        assert_eq!(wait.wait(Some(t)).unwrap(), Some(0));

        // A disarmed timer and nothing pending: the wait lasts until another thread acts.
        let waker = {
            let theirs = theirs.try_clone().unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                theirs.write(1).unwrap();
            })
        };
        assert_eq!(wait.wait(None).unwrap(), Some(1));
        waker.join().unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 2);

        wake.stop();
        assert_eq!(wait.wait(None).unwrap(), None);
        assert_eq!(wait.wait(None).unwrap(), None, "stop stays");
    }
}
