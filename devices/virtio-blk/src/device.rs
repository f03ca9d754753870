//! The virtio-blk device: configuration, activation and the queue worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_devapi::{Hooks, NoHooks, PointCtx};

pub use sluice_virtio_pci::DeferState;
use sluice_virtio_pci::{
    ActivateError, ActivationContext, DmaMemory, DmaView, RequestHandler, VirtioDevice,
    VirtioInterrupt, WorkerWait, WorkerWake, serve_requests,
};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Bytes;

use crate::disk::Disk;
use crate::request::{self, ID_LEN, RequestEnv};
use crate::{SECTOR_SIZE, VIRTIO_ID_BLOCK, features};

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Segments per request we advertise (queue size minus header and status descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Per-device counters, shared with the worker.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Requests completed (any status).
    pub requests: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    /// Requests that ended in an error status or could not be completed.
    pub errors: AtomicU64,
    /// Used-buffer interrupts raised.
    pub interrupts: AtomicU64,
    /// Doorbells received.
    pub notifies: AtomicU64,
}

struct Running {
    wake: Arc<WorkerWake>,
    handle: JoinHandle<()>,
}

/// A virtio-blk device.
pub struct BlockDevice {
    name: String,
    disk: Arc<dyn Disk>,
    read_only: bool,
    id: [u8; ID_LEN],
    counters: Arc<BlockCounters>,
    hooks: Arc<dyn Hooks>,
    running: Option<Running>,
}

impl BlockDevice {
    /// A device named `name` (also its GET_ID serial, truncated to 20 bytes) on `disk`.
    pub fn new(name: &str, disk: Arc<dyn Disk>, read_only: bool) -> Self {
        let mut id = [0u8; ID_LEN];
        for (dst, src) in id.iter_mut().zip(name.bytes()) {
            *dst = src;
        }
        BlockDevice {
            name: name.to_string(),
            disk,
            read_only,
            id,
            counters: Arc::new(BlockCounters::default()),
            hooks: Arc::new(NoHooks),
            running: None,
        }
    }

    /// Announces `virtio.<name>.complete` to `hooks` and lets them defer completions.
    pub fn with_hooks(mut self, hooks: Arc<dyn Hooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Shared counters.
    pub fn counters_handle(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&(self.disk.size() / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            // The worker finishes the request in hand and exits; after join no DMA is in flight.
            r.wake.stop();
            if r.handle.join().is_err() {
                log::error!("virtio-blk {}: worker panicked", self.name);
            }
        }
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << features::SEG_MAX)
            | (1 << features::BLK_SIZE)
            | (1 << features::FLUSH)
            | (1 << sluice_virtio_pci::VIRTIO_RING_F_EVENT_IDX);
        if self.read_only {
            f |= 1 << features::RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| c.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` (offset 32, with CONFIG_WCE) is writable and we do not offer it.
        log::debug!(
            "virtio-blk {}: ignored config write at {offset:#x}",
            self.name
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.stop();
        let (index, queue) = ctx
            .queues
            .into_iter()
            .find(|(i, _)| *i == 0)
            .ok_or(ActivateError::BadQueue(0))?;
        let wake = WorkerWake::new().map_err(ActivateError::Worker)?;
        let wait =
            WorkerWait::new(wake.clone(), ctx.queue_events).map_err(ActivateError::Worker)?;
        let worker = Worker {
            index,
            queue,
            mem: ctx.dma,
            interrupt: ctx.interrupt,
            disk: self.disk.clone(),
            read_only: self.read_only,
            id: self.id,
            counters: self.counters.clone(),
            name: self.name.clone(),
            hooks: self.hooks.clone(),
            point: crate::complete_point(&self.name),
            defer: DeferState::default(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("{}-q0", self.name))
            .spawn(move || worker.run(wait))
            .map_err(ActivateError::Worker)?;
        self.running = Some(Running { wake, handle });
        Ok(())
    }

    fn queue_notify(&self, queue: u16) {
        self.counters.notifies.fetch_add(1, Ordering::Relaxed);
        if queue != 0 {
            return;
        }
        if let Some(r) = &self.running {
            r.wake.notify();
        }
    }

    fn waits_on_queue_events(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("requests", c.requests.load(Ordering::Relaxed)),
            ("read_bytes", c.read_bytes.load(Ordering::Relaxed)),
            ("write_bytes", c.write_bytes.load(Ordering::Relaxed)),
            ("flushes", c.flushes.load(Ordering::Relaxed)),
            ("errors", c.errors.load(Ordering::Relaxed)),
            ("interrupts", c.interrupts.load(Ordering::Relaxed)),
            ("notifies", c.notifies.load(Ordering::Relaxed)),
        ]
    }
}

struct Worker {
    index: u16,
    queue: Queue,
    mem: DmaMemory,
    interrupt: Arc<VirtioInterrupt>,
    disk: Arc<dyn Disk>,
    read_only: bool,
    id: [u8; ID_LEN],
    counters: Arc<BlockCounters>,
    name: String,
    hooks: Arc<dyn Hooks>,
    point: String,
    defer: DeferState,
}

impl Worker {
    fn run(mut self, mut wait: WorkerWait) {
        // A deferred completion is due at `defer.due()`: wake then even without a doorbell.
        // Doorbells that arrived meanwhile are coalesced; one pass drains the ring anyway.
        let mut broken = false;
        loop {
            let due = if broken { None } else { self.defer.due() };
            match wait.wait(due) {
                Ok(Some(rung)) => {
                    self.counters.notifies.fetch_add(rung, Ordering::Relaxed);
                }
                Ok(None) => return,
                Err(e) => {
                    // Without a way to wait, the queue can only be dropped (reset ends us).
                    log::error!("virtio-blk {}: cannot wait for doorbells: {e}", self.name);
                    return;
                }
            }
            if !broken && !self.process_queue() {
                log::error!(
                    "virtio-blk {}: queue is broken; waiting for reset",
                    self.name
                );
                broken = true;
            }
        }
    }

    /// Drains the available ring. Returns false if the used ring could not be written.
    pub(crate) fn process_queue(&mut self) -> bool {
        let view = self.mem.view();
        let env = RequestEnv {
            disk: self.disk.as_ref(),
            id: &self.id,
            read_only: self.read_only,
        };
        let counters = &self.counters;
        let interrupt = &self.interrupt;
        let index = self.index;
        let notify = || {
            counters.interrupts.fetch_add(1, Ordering::Relaxed);
            interrupt.signal_queue(index);
        };
        let gate = Gate {
            hooks: self.hooks.as_ref(),
            point: &self.point,
        };
        let defer = Some(&mut self.defer);
        // Behind an IOMMU every descriptor, ring and buffer access below is translated.
        match &view {
            DmaView::Direct(m) => process_gated(
                &mut self.queue,
                m.as_ref(),
                &env,
                counters,
                notify,
                &gate,
                defer,
            ),
            DmaView::Translated(m) => {
                process_gated(&mut self.queue, m, &env, counters, notify, &gate, defer)
            }
        }
    }
}

/// The completion point, announced after each request executed (none when `point` is empty).
struct Gate<'a> {
    hooks: &'a dyn Hooks,
    point: &'a str,
}

/// Completes every available request on `queue`, then notifies if the driver wants it.
/// Returns false when the used ring could not be updated (the queue is unusable).
pub fn process_available<M: vm_memory::GuestMemory<Bitmap = ()>>(
    queue: &mut Queue,
    mem: &M,
    env: &RequestEnv<'_>,
    counters: &BlockCounters,
    notify: impl FnMut(),
) -> bool {
    let gate = Gate {
        hooks: &NoHooks,
        point: "",
    };
    process_gated(queue, mem, env, counters, notify, &gate, None)
}

/// The request type in the first 4 bytes of the chain's first descriptor.
fn peek_type<M: vm_memory::GuestMemory<Bitmap = ()>>(
    chain: &virtio_queue::DescriptorChain<&M>,
    mem: &M,
) -> u64 {
    chain
        .clone()
        .next()
        .and_then(|d| mem.read_obj::<u32>(d.addr()).ok())
        .map_or(u64::MAX, |t| u64::from(u32::from_le(t)))
}

/// Serves virtio-blk requests in the shared request loop ([`serve_requests`]).
struct BlockRequests<'a, M> {
    mem: &'a M,
    env: &'a RequestEnv<'a>,
    counters: &'a BlockCounters,
    gate: &'a Gate<'a>,
}

impl<'m, M> RequestHandler<'m, M> for BlockRequests<'_, M>
where
    M: vm_memory::GuestMemory<Bitmap = ()> + 'm,
{
    /// The request type (for the point's value) and the chain, executed at completion.
    type Request = (u64, DescriptorChain<&'m M>);

    fn read(&self, chain: DescriptorChain<&'m M>) -> Self::Request {
        (peek_type(&chain, self.mem), chain)
    }

    fn defer(&self, (kind, _): &Self::Request) -> Option<Duration> {
        self.gate
            .hooks
            .defer(&PointCtx::new(self.gate.point, *kind))
    }

    fn complete(&self, head: u16, (kind, chain): Self::Request) -> u32 {
        let counters = self.counters;
        let (done, err) = request::execute(self.mem, chain, self.env);
        if !self.gate.point.is_empty() {
            self.gate.hooks.point(&PointCtx::new(self.gate.point, kind));
        }
        counters.requests.fetch_add(1, Ordering::Relaxed);
        match done.kind {
            Some(request::T_IN) => counters.read_bytes.fetch_add(done.bytes, Ordering::Relaxed),
            Some(request::T_OUT) => counters
                .write_bytes
                .fetch_add(done.bytes, Ordering::Relaxed),
            Some(request::T_FLUSH) => counters.flushes.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if let Some(e) = err {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("virtio-blk: request {head} failed: {e}");
        }
        done.used_len
    }
}

fn process_gated<M: vm_memory::GuestMemory<Bitmap = ()>>(
    queue: &mut Queue,
    mem: &M,
    env: &RequestEnv<'_>,
    counters: &BlockCounters,
    mut notify: impl FnMut(),
    gate: &Gate<'_>,
    defer: Option<&mut DeferState>,
) -> bool {
    let requests = BlockRequests {
        mem,
        env,
        counters,
        gate,
    };
    match serve_requests(queue, mem, defer, &requests) {
        Ok(wants_interrupt) => {
            if wants_interrupt {
                notify();
            }
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod defer_tests;
