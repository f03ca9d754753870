//! [`VirtioIommu`]: the `VirtioDevice`, its construction, configuration space, and the worker
//! thread that serves the request and event queues.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use sluice_devapi::{Bdf, Endpoint, EndpointIommu, Hooks, PointCtx, StateEvent, ViommuState};
use sluice_virtio_pci::{
    ActivateError, ActivationContext, SharedMemory, VirtioDevice, VirtioInterrupt, next_messages,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::POINT_CONFIG_WRITE;
use crate::config::ViommuConfig;
use crate::engine::{Engine, REQUEST_COUNTERS, STATUS_COUNTERS};
pub use crate::engine::{Reply, ViommuCounters};
use crate::events::FaultQueue;
use crate::model::{EpSlot, Model};
use crate::queues::DeferState;
use crate::spec::{CONFIG_BYPASS_OFFSET, VIRTIO_ID_IOMMU, features};
use crate::translate::{EndpointTranslator, EpState, Shared};

/// Request queue index.
pub const REQUEST_QUEUE: u16 = 0;
/// Event queue index.
pub const EVENT_QUEUE: u16 = 1;

/// Features this device offers (the transport adds VERSION_1 and ACCESS_PLATFORM).
pub const OFFERED_FEATURES: u64 = (1 << features::INPUT_RANGE)
    | (1 << features::DOMAIN_RANGE)
    | (1 << features::MAP_UNMAP)
    | (1 << features::PROBE)
    | (1 << features::MMIO)
    | (1 << features::BYPASS_CONFIG)
    | (1 << sluice_virtio_pci::VIRTIO_RING_F_EVENT_IDX);

enum WorkerMsg {
    Requests,
    Events,
    Stop,
}

struct Running {
    tx: Sender<WorkerMsg>,
    handle: JoinHandle<()>,
    queues: Arc<Mutex<Queues>>,
}

/// A virtio-iommu device.
pub struct VirtioIommu {
    pub(crate) engine: Arc<Engine>,
    queue_sizes: [u16; 2],
    running: Option<Running>,
}

impl VirtioIommu {
    /// A device named `name` (used in logs, state events and thread names) translating for
    /// `cfg.endpoints`, reporting to `hooks`.
    pub fn new(name: &str, cfg: ViommuConfig, hooks: Arc<dyn Hooks>) -> Self {
        let cfg = Arc::new(cfg.normalized());
        let shared = Arc::new(Shared {
            bypass: AtomicBool::new(cfg.boot_bypass),
            faults: FaultQueue::new(cfg.fault_queue_len),
        });
        let mut endpoints = BTreeMap::new();
        for &id in &cfg.endpoints {
            let state = Arc::new(EpState {
                id,
                attached: std::sync::RwLock::new(None),
            });
            let translator = Arc::new(EndpointTranslator::new(state.clone(), shared.clone()));
            let iommu =
                EndpointIommu::new(Endpoint::Pci(Bdf(id as u16)), translator, hooks.clone());
            endpoints.insert(id, EpSlot { state, iommu });
        }
        let endpoints = Arc::new(endpoints);
        let model = Model::new(
            name,
            cfg.clone(),
            hooks.clone(),
            shared.clone(),
            endpoints.clone(),
        );
        let queue_sizes = [cfg.queue_size; 2];
        VirtioIommu {
            engine: Arc::new(Engine {
                name: name.to_string(),
                cfg,
                hooks,
                shared,
                endpoints,
                model: Mutex::new(model),
                counters: ViommuCounters::default(),
                acked: AtomicU64::new(0),
                activated: AtomicBool::new(false),
            }),
            queue_sizes,
            running: None,
        }
    }

    /// The translation seam of `endpoint_id`, to wrap in
    /// `vm_memory::IommuMemory<GuestMemoryMmap, EndpointIommu>` for a device behind this IOMMU.
    /// None if the endpoint was not configured. Every call returns a handle to the same cache.
    pub fn endpoint_iommu(&self, endpoint_id: u32) -> Option<EndpointIommu> {
        self.engine
            .endpoints
            .get(&endpoint_id)
            .map(|s| s.iommu.clone())
    }

    /// Endpoint IDs behind this IOMMU, ascending.
    pub fn endpoint_ids(&self) -> Vec<u32> {
        self.engine.endpoints.keys().copied().collect()
    }

    /// The (normalised) configuration.
    pub fn config(&self) -> &ViommuConfig {
        &self.engine.cfg
    }

    /// Current `config.bypass`.
    pub fn bypass(&self) -> bool {
        self.engine.shared.bypass.load(Ordering::Acquire)
    }

    /// The domain `endpoint_id` is attached to.
    pub fn attached_domain(&self, endpoint_id: u32) -> Option<u32> {
        self.engine
            .model
            .lock()
            .ok()
            .and_then(|m| m.attached(endpoint_id))
    }

    /// Breaks the model on purpose, for escape-oracle tests only (see
    /// [`crate::model::FaultInjection`]).
    pub fn set_fault_injection(&self, faults: crate::model::FaultInjection) {
        if let Ok(mut m) = self.engine.model.lock() {
            m.set_fault_injection(faults);
        }
    }

    /// Records the features the driver accepted. Activation does this; tests, benches and the
    /// fuzzer that drive the device without a transport call it directly.
    pub fn set_acked_features(&self, acked: u64) {
        self.engine.acked.store(acked, Ordering::Release);
    }

    /// Handles one request given as bytes (readable part, and the size of the writable part)
    /// without a queue. `mem`, if given, is the guest RAM MAP targets are checked against.
    pub fn handle_request(
        &self,
        readable: &[u8],
        writable_len: u64,
        mem: Option<&GuestMemoryMmap>,
    ) -> Reply {
        let head = readable
            .get(..crate::request::MAX_READABLE)
            .unwrap_or(readable);
        self.engine
            .handle(head, readable.len() as u64, true, writable_len, mem)
    }

    /// Answers every available request on `queue` (what the worker does on a doorbell).
    pub fn process_request_queue(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, crate::queues::QueueBroken> {
        self.engine.process_requests(REQUEST_QUEUE, queue, mem)
    }

    /// Writes waiting faults into `queue`'s buffers (what the worker does on a fault or an
    /// event-queue doorbell).
    pub fn process_event_queue(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, crate::queues::QueueBroken> {
        self.engine.process_events(EVENT_QUEUE, queue, mem)
    }

    /// Faults waiting for an event buffer.
    pub fn pending_faults(&self) -> usize {
        self.engine.shared.faults.len()
    }

    fn stop(&mut self) {
        self.engine.shared.faults.set_waker(None);
        if let Some(r) = self.running.take() {
            let _ = r.tx.send(WorkerMsg::Stop);
            if r.handle.join().is_err() {
                log::error!("virtio-iommu {}: worker panicked", self.engine.name);
            }
        }
        self.engine.activated.store(false, Ordering::Release);
    }

    fn set_bypass(&self, value: u8) {
        let e = &self.engine;
        if value > 1 {
            log::warn!(
                "virtio-iommu {}: driver wrote bypass={value}; ignored",
                e.name
            );
            return;
        }
        if e.activated.load(Ordering::Acquire)
            && e.acked.load(Ordering::Acquire) & (1 << features::BYPASS_CONFIG) == 0
        {
            log::warn!(
                "virtio-iommu {}: bypass written without BYPASS_CONFIG",
                e.name
            );
            return;
        }
        let new = value == 1;
        if e.shared.bypass.swap(new, Ordering::AcqRel) != new {
            // Hold the model so no ATTACH/DETACH interleaves with the invalidation.
            match e.model.lock() {
                Ok(m) => m.bypass_changed(),
                Err(p) => p.into_inner().bypass_changed(),
            }
            e.hooks.state(&StateEvent {
                source: &e.name,
                endpoint: None,
                change: ViommuState::Bypass { enabled: new }.into(),
            });
        }
    }
}

impl Drop for VirtioIommu {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_IOMMU
    }

    fn name(&self) -> &str {
        &self.engine.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.engine.cfg.config_bytes(self.bypass());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let bypass_byte = CONFIG_BYPASS_OFFSET
            .checked_sub(offset)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| data.get(i))
            .copied();
        match bypass_byte {
            Some(v) => self.set_bypass(v),
            None => log::debug!(
                "virtio-iommu {}: ignored config write at {offset:#x}",
                self.engine.name
            ),
        }
        let first = data.first().copied().unwrap_or(0);
        self.engine.hooks.point(&PointCtx::new(
            POINT_CONFIG_WRITE,
            (offset << 8) | u64::from(first),
        ));
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.stop();
        let mut queues = ctx.queues;
        let mut take = |want: u16| {
            let i = queues.iter().position(|(i, _)| *i == want)?;
            Some(queues.swap_remove(i))
        };
        let req = take(REQUEST_QUEUE).ok_or(ActivateError::BadQueue(REQUEST_QUEUE))?;
        let evt = take(EVENT_QUEUE).ok_or(ActivateError::BadQueue(EVENT_QUEUE))?;
        self.engine
            .acked
            .store(ctx.acked_features, Ordering::Release);
        let (tx, rx) = mpsc::channel();
        let queues = Arc::new(Mutex::new(Queues {
            req,
            evt,
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            broken: false,
            defer: DeferState::default(),
        }));
        let worker = Worker {
            engine: self.engine.clone(),
            queues: queues.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("{}-worker", self.engine.name))
            .spawn(move || worker.run(rx))
            .map_err(ActivateError::Worker)?;
        let waker = tx.clone();
        self.engine.shared.faults.set_waker(Some(Arc::new(move || {
            let _ = waker.send(WorkerMsg::Events);
        })));
        self.engine.activated.store(true, Ordering::Release);
        self.running = Some(Running { tx, handle, queues });
        // Faults raised before activation (there is nowhere to report them yet) stay queued.
        if !self.engine.shared.faults.is_empty()
            && let Some(r) = &self.running
        {
            let _ = r.tx.send(WorkerMsg::Events);
        }
        Ok(())
    }

    fn queue_notify(&self, queue: u16) {
        self.engine
            .counters
            .notifies
            .fetch_add(1, Ordering::Relaxed);
        let msg = match queue {
            REQUEST_QUEUE => WorkerMsg::Requests,
            EVENT_QUEUE => WorkerMsg::Events,
            _ => return,
        };
        let Some(r) = &self.running else { return };
        if queue == REQUEST_QUEUE && self.engine.cfg.inline_requests {
            // Linux busy-polls the used ring for each request; answering on the doorbell's own
            // thread, before the doorbell write returns, spares it a cross-thread wake-up
            // while the spinning vCPU competes for the same cores.
            serve_requests_inline(&self.engine, r, true);
            return;
        }
        let _ = r.tx.send(msg);
    }

    /// The request queue, served inline (as on a doorbell) by a backend thread that polls:
    /// `quiet` keeps the driver from ringing while it does (Linux then skips the notify write
    /// of each sync, an MMIO exit), `!quiet` asks for doorbells again.
    fn poll_queue(&self, queue: u16, quiet: bool) -> Option<bool> {
        if queue != REQUEST_QUEUE || !self.engine.cfg.inline_requests {
            return None;
        }
        let r = self.running.as_ref()?;
        Some(serve_requests_inline(&self.engine, r, !quiet))
    }

    fn reset(&mut self) {
        self.stop();
        match self.engine.model.lock() {
            Ok(mut m) => m.reset(),
            Err(p) => p.into_inner().reset(),
        }
        self.engine.counters.domains.store(0, Ordering::Relaxed);
        self.engine.counters.mappings.store(0, Ordering::Relaxed);
        self.engine.acked.store(0, Ordering::Release);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.engine.counters;
        let mut out = Vec::with_capacity(32);
        for (name, v) in REQUEST_COUNTERS.iter().zip(&c.requests) {
            out.push((*name, v.load(Ordering::Relaxed)));
        }
        out.push(("requests_unparsed", c.unparsed.load(Ordering::Relaxed)));
        for (name, v) in STATUS_COUNTERS.iter().zip(&c.statuses) {
            out.push((*name, v.load(Ordering::Relaxed)));
        }
        let (mut hits, mut misses, mut faults) = (0, 0, 0);
        for slot in self.engine.endpoints.values() {
            let s = slot.iommu.stats();
            hits += s.hits;
            misses += s.misses;
            faults += s.faults;
        }
        let f = &self.engine.shared.faults;
        out.extend([
            ("translations_hit", hits),
            ("translations_miss", misses),
            ("translations_fault", faults),
            ("faults_raised", f.raised()),
            ("events_written", c.events_written.load(Ordering::Relaxed)),
            ("events_dropped", f.dropped()),
            (
                "event_buffers_bad",
                c.event_buffers_bad.load(Ordering::Relaxed),
            ),
            ("interrupts", c.interrupts.load(Ordering::Relaxed)),
            ("notifies", c.notifies.load(Ordering::Relaxed)),
            ("domains", c.domains.load(Ordering::Relaxed)),
            ("mappings", c.mappings.load(Ordering::Relaxed)),
        ]);
        out
    }
}

/// The queues and what the device needs to answer on them, shared by the doorbell path
/// (requests, inline) and the worker (events, and requests when not inline).
struct Queues {
    req: (u16, Queue),
    evt: (u16, Queue),
    mem: SharedMemory,
    interrupt: Arc<VirtioInterrupt>,
    /// A used ring could not be written: nothing more is served until reset.
    broken: bool,
    /// A request completion deferred by the hooks (`Hooks::defer`).
    defer: DeferState,
}

/// Serves the request queue on the calling thread (a doorbell's, or a backend thread that
/// polls); a deferred completion is left to the worker, which publishes it when due. `rearm`
/// as for [`serve`]. Whether any request was taken off the ring.
fn serve_requests_inline(e: &Engine, r: &Running, rearm: bool) -> bool {
    let mut q = r.queues.lock().unwrap_or_else(|p| p.into_inner());
    let before = q.req.1.next_avail();
    if serve(e, &mut q, true, false, rearm).is_some() {
        let _ = r.tx.send(WorkerMsg::Requests);
    }
    q.req.1.next_avail() != before
}

/// Serves the request and/or event queue. A broken queue is logged once and then left alone.
/// Returns when a deferred request completion is due. `rearm` false leaves the driver's request
/// doorbells suppressed once the queue is drained (a polling caller, see
/// [`VirtioDevice::poll_queue`]).
fn serve(e: &Engine, q: &mut Queues, requests: bool, events: bool, rearm: bool) -> Option<Instant> {
    if q.broken {
        return None;
    }
    let mem = q.mem.snapshot();
    let mut run = || -> Result<(), crate::queues::QueueBroken> {
        if requests
            && e.process_requests_deferring(q.req.0, &mut q.req.1, &mem, Some(&mut q.defer), rearm)?
        {
            e.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            q.interrupt.signal_queue(q.req.0);
        }
        // Requests fault nothing themselves, but a fault wake-up may have been coalesced away.
        if (events || !e.shared.faults.is_empty())
            && e.process_events(q.evt.0, &mut q.evt.1, &mem)?
        {
            e.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            q.interrupt.signal_queue(q.evt.0);
        }
        Ok(())
    };
    if let Err(err) = run() {
        log::error!("virtio-iommu {}: {err}; waiting for reset", e.name);
        q.broken = true;
        return None;
    }
    q.defer.due()
}

struct Worker {
    pub(crate) engine: Arc<Engine>,
    queues: Arc<Mutex<Queues>>,
}

impl Worker {
    fn run(self, rx: Receiver<WorkerMsg>) {
        let mut due: Option<Instant> = None;
        // A deferred completion is due at `due`: wake then even without a doorbell. Doorbells
        // and fault wake-ups that arrived meanwhile are coalesced.
        while let Some(messages) = next_messages(&rx, due, || WorkerMsg::Requests) {
            let (mut requests, mut events) = (false, false);
            for m in messages {
                match m {
                    WorkerMsg::Requests => requests = true,
                    WorkerMsg::Events => events = true,
                    WorkerMsg::Stop => return,
                }
            }
            let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            due = serve(&self.engine, &mut q, requests, events, true);
        }
    }
}
