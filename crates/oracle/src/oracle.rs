//! The oracle itself: a `Hooks` implementation with a lock-free fast path for legitimate DMAs, a
//! slow path that applies the rules, and a bounded lock-free timeline drained by a writer thread.

mod provenance;
mod writer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;
use sluice_devapi::{
    CachedTranslation, DmaDirection, DmaOutcome, DmaRecord, Endpoint, Hooks, Invalidation,
    MapEvent, PointCtx, StateEvent,
};
use thiserror::Error;

use crate::report::{ClassCounts, EndpointReport, OracleReport, TimelineSummary};
use crate::shadow::{
    Classified, ConfigProbe, FAST_ANY_TRANSLATED, FAST_BYPASS, FAST_DOMAIN, Shadow,
};
use crate::stale::{DEFAULT_CONTEXTS, DEFAULT_RANGES_PER_CONTEXT, StaleStore};
use crate::timeline::{
    DmaEvent, EscapeClass, EventKind, TIMELINE_VERSION, TimelineEvent, Verdict, thread_id,
    thread_name,
};
use crate::topology::{IommuTopo, Key, Topology};
use provenance::Finding;
use writer::{Drain, write_line, writer_loop};

/// File name of the timeline inside a run directory.
pub const TIMELINE_FILE: &str = "timeline.jsonl";
/// Console lines containing this text carry a marker after it (fallback channel).
pub const CONSOLE_MARKER_PREFIX: &str = "sluice-marker:";

/// Tuning of the oracle. `Default` suits a run.
#[derive(Debug, Clone)]
pub struct OracleConfig {
    /// Timeline buffer capacity in records (records beyond it are dropped and counted).
    pub queue_capacity: usize,
    /// Log one legitimate DMA of every `sample_every` per endpoint (1: all).
    pub sample_every: u64,
    /// Events kept before each escape in the report.
    pub context_events: usize,
    /// Escapes listed in full in the report (all are counted and logged).
    pub max_escape_reports: usize,
    /// Upper bound of the in-memory timeline, in bytes (records beyond it are counted as dropped).
    pub max_timeline_bytes: usize,
    /// Ask a model to re-derive one of every `recheck_every` translations it serves from its
    /// caches per endpoint (`Hooks::recheck_cached`, the `unsynced-config` check; 1: all).
    pub recheck_every: u64,
    /// Ask for every cached translation to be re-derived (see [`Oracle::set_paranoid`]).
    pub paranoid: bool,
    /// Invalidated ranges kept per IOMMU context for `stale-config` (oldest dropped beyond).
    pub stale_ranges_per_context: usize,
    /// IOMMU contexts (domains, ASIDs, ...) with invalidated ranges kept.
    pub stale_contexts: usize,
    /// Names of the points that fire per I/O rather than per configuration change (doorbells,
    /// request completions, MAP/UNMAP): the caller, which knows its devices' points, lists them.
    /// Their arrivals are sampled like legitimate DMAs (one in `sample_every`); every other
    /// point is written in full. Empty (the default): every point is written.
    pub hot_points: HashSet<String>,
}

impl Default for OracleConfig {
    fn default() -> Self {
        OracleConfig {
            queue_capacity: 1 << 16,
            sample_every: 256,
            context_events: 40,
            max_escape_reports: 100,
            max_timeline_bytes: 256 << 20,
            recheck_every: DEFAULT_RECHECK_EVERY,
            paranoid: false,
            stale_ranges_per_context: DEFAULT_RANGES_PER_CONTEXT,
            stale_contexts: DEFAULT_CONTEXTS,
            hot_points: HashSet::new(),
        }
    }
}

/// `finish` could not complete.
#[derive(Debug, Error)]
pub enum OracleError {
    /// `finish` was already called.
    #[error("the oracle has already finished")]
    AlreadyFinished,
    /// The timeline file cannot be written.
    #[error("cannot write the timeline {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Default of [`OracleConfig::recheck_every`] (chosen from `benches/oracle.rs`, see
/// `docs/escape-oracle.md`, "Overhead").
pub const DEFAULT_RECHECK_EVERY: u64 = 128;

/// The IOMMU firmware declares an endpoint behind.
#[derive(Debug, Clone)]
struct IommuRef {
    index: usize,
    name: String,
    virtio: bool,
}

/// "One in `n`" for a counter, without a division on the hot path when `n` is a power of two (a
/// 64-bit division costs tens of cycles, more than the rest of a legitimate DMA's path).
#[derive(Debug, Clone, Copy)]
struct Period {
    n: u64,
}

impl Period {
    fn new(n: u64) -> Self {
        Period { n: n.max(1) }
    }

    /// Whether the `count`-th arrival (0-based) is the first of its period.
    #[inline]
    fn starts(self, count: u64) -> bool {
        if self.n.is_power_of_two() {
            count & (self.n - 1) == 0
        } else {
            count.is_multiple_of(self.n)
        }
    }
}

/// Counters and fast-path word of one endpoint.
struct EpEntry {
    key: Key,
    iommu: Option<IommuRef>,
    fast: AtomicU64,
    translated: AtomicU64,
    bypassed: AtomicU64,
    faulted: AtomicU64,
    escapes: [AtomicU64; 5],
    legit: AtomicU64,
    /// Translations served from a model's caches (sampling of `recheck_cached`).
    cache_served: AtomicU64,
    /// The last cached translation found not stale: the low 32 bits of the invalidated-range
    /// store's version, and a 32-bit digest of its entries and completion number. A DMA with the
    /// same digest while the store did not change needs no look (the lock's two atomic
    /// operations were most of the oracle's cost on the SMMUv3 hit path). A digest collision can
    /// only skip a check, never invent an escape.
    clean: AtomicU64,
}

impl EpEntry {
    fn new(key: Key, iommu: Option<IommuRef>, fast: u64) -> Self {
        EpEntry {
            key,
            iommu,
            fast: AtomicU64::new(fast),
            translated: AtomicU64::new(0),
            bypassed: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            escapes: Default::default(),
            legit: AtomicU64::new(0),
            cache_served: AtomicU64::new(0),
            clean: AtomicU64::new(u64::MAX),
        }
    }

    fn report(&self) -> EndpointReport {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EndpointReport {
            endpoint: self.key.to_string(),
            iommu: self.iommu.as_ref().map(|i| i.name.clone()),
            translated: l(&self.translated),
            bypassed: l(&self.bypassed),
            faulted: l(&self.faulted),
            escapes: ClassCounts::from_array(self.escapes.each_ref().map(l)),
        }
    }
}

/// The DMA escape oracle. Compose it with other hooks through `sluice_devapi::Fanout`.
pub struct Oracle {
    id: u64,
    start: Instant,
    cfg: OracleConfig,
    fixed: Vec<Arc<EpEntry>>,
    dynamic: RwLock<Vec<Arc<EpEntry>>>,
    shadow: Mutex<Shadow>,
    queue: ArrayQueue<TimelineEvent>,
    dropped: AtomicU64,
    /// Legitimate DMAs written to the timeline (the unsampled ones are the endpoints' `legit`
    /// counts minus these: one atomic increment per DMA fewer).
    sampled: AtomicU64,
    /// Arrivals at high-frequency points (doorbells, completions, MAP/UNMAP), for sampling.
    hot_points: AtomicU64,
    /// High-frequency point arrivals not written to the timeline.
    unsampled_points: AtomicU64,
    escapes_total: AtomicU64,
    drain: Mutex<Drain>,
    stop: AtomicBool,
    finished: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    writer_thread: OnceLock<std::thread::Thread>,
    /// Invalidated ranges (`stale-config`); `stale_live` mirrors its size so that DMAs skip the
    /// lock while nothing is kept, `stale_version` counts its changes (see `EpEntry::clean`).
    stale: RwLock<StaleStore>,
    stale_live: AtomicUsize,
    stale_version: AtomicU64,
    paranoid: AtomicBool,
    /// The IOMMUs of the topology, to resolve a report's `source`.
    topology: Topology,
    /// virtio-iommu models' names (their `StateEvent::source`) → topology index, learned from
    /// their ATTACH events.
    model_names: RwLock<HashMap<String, usize>>,
}

static NEXT_ORACLE: AtomicU64 = AtomicU64::new(1);

fn describe(t: &IommuTopo) -> String {
    match t {
        IommuTopo::Virtio { bdf, .. } => format!("virtio-iommu {bdf}"),
        IommuTopo::Smmu { source, .. } => format!("SMMUv3 {source}"),
        IommuTopo::Zpci { .. } => "zPCI".to_string(),
    }
}

fn ep_string(e: Option<Endpoint>) -> Option<String> {
    e.map(|e| e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Oracle {
    /// An oracle for `topology`, with its timeline writer running.
    pub fn new(topology: Topology, cfg: OracleConfig) -> Arc<Oracle> {
        let shadow = Shadow::new(&topology);
        let fixed = topology
            .declared()
            .into_iter()
            .map(|(k, i)| {
                let iommu = topology.iommus.get(i).map(|t| IommuRef {
                    index: i,
                    name: describe(t),
                    virtio: matches!(t, IommuTopo::Virtio { .. }),
                });
                Arc::new(EpEntry::new(k, iommu, shadow.fast_word(k)))
            })
            .collect();
        let cfg = OracleConfig {
            queue_capacity: cfg.queue_capacity.max(16),
            sample_every: cfg.sample_every.max(1),
            recheck_every: cfg.recheck_every.max(1),
            ..cfg
        };
        let stale = StaleStore::new(cfg.stale_ranges_per_context, cfg.stale_contexts);
        let paranoid = cfg.paranoid;
        let oracle = Arc::new(Oracle {
            id: NEXT_ORACLE.fetch_add(1, Ordering::Relaxed),
            start: Instant::now(),
            queue: ArrayQueue::new(cfg.queue_capacity),
            cfg,
            fixed,
            dynamic: RwLock::new(Vec::new()),
            shadow: Mutex::new(shadow),
            dropped: AtomicU64::new(0),
            sampled: AtomicU64::new(0),
            hot_points: AtomicU64::new(0),
            unsampled_points: AtomicU64::new(0),
            escapes_total: AtomicU64::new(0),
            drain: Mutex::new(Drain::default()),
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            writer: Mutex::new(None),
            writer_thread: OnceLock::new(),
            stale: RwLock::new(stale),
            stale_live: AtomicUsize::new(0),
            stale_version: AtomicU64::new(0),
            paranoid: AtomicBool::new(paranoid),
            topology,
            model_names: RwLock::new(HashMap::new()),
        });
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        oracle.push_raw(TimelineEvent {
            t: 0,
            tid: 0,
            kind: EventKind::Meta {
                version: TIMELINE_VERSION,
                unix_ms,
                sample_every: oracle.cfg.sample_every,
            },
        });
        let weak = Arc::downgrade(&oracle);
        match std::thread::Builder::new()
            .name("sluice-timeline".into())
            .spawn(move || writer_loop(weak))
        {
            Ok(h) => {
                let _ = oracle.writer_thread.set(h.thread().clone());
                *lock(&oracle.writer) = Some(h);
            }
            // Without a writer, `finish` drains; records beyond the buffer are counted as lost.
            Err(e) => log::warn!("oracle: no timeline writer thread: {e}"),
        }
        oracle
    }

    /// Nanoseconds since the oracle was created.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Installs a reader of in-memory configuration (enables `unsynced-config` for SMMUv3).
    pub fn add_config_probe(&self, probe: Arc<dyn ConfigProbe>) {
        let mut sh = lock(&self.shadow);
        sh.set_probe(probe);
        self.refresh_fast(&sh);
    }

    /// A guest console line (the backend feeds each line as it arrives). A line containing
    /// `sluice-marker:` is also taken as a marker (what follows it).
    pub fn console_line(&self, line: &str) {
        let line = line.trim_end_matches(['\r', '\n']);
        self.push(
            self.now_ns(),
            EventKind::Console {
                line: line.to_string(),
            },
        );
        if let Some(i) = line.find(CONSOLE_MARKER_PREFIX) {
            let rest = line.get(i + CONSOLE_MARKER_PREFIX.len()..).unwrap_or("");
            self.marker(rest.trim());
        }
    }

    /// A guest marker line (from the marker device, or the console fallback).
    pub fn marker(&self, line: &str) {
        let mut sh = lock(&self.shadow);
        let t = self.now_ns();
        let effect = sh.on_marker(line, t);
        self.refresh_fast(&sh);
        self.push(
            t,
            EventKind::Marker {
                line: line.to_string(),
                effect,
            },
        );
    }

    /// An injected delay of `dur` at `point` that just ended.
    pub fn record_delay(&self, point: &str, endpoint: Option<Endpoint>, dur: Duration) {
        self.push(
            self.now_ns(),
            EventKind::Delay {
                point: point.to_string(),
                endpoint: ep_string(endpoint),
                dur_ns: dur.as_nanos() as u64,
            },
        );
    }

    /// Escapes so far.
    pub fn escape_count(&self) -> u64 {
        self.escapes_total.load(Ordering::Relaxed)
    }

    /// Per-endpoint counters so far, sorted by endpoint.
    pub fn endpoints(&self) -> Vec<EndpointReport> {
        let mut all: Vec<Arc<EpEntry>> = self.fixed.clone();
        all.extend(
            self.dynamic
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        all.sort_by_key(|e| e.key);
        all.iter().map(|e| e.report()).collect()
    }

    /// Stops the writer, writes `dir/timeline.jsonl` and returns the report. Hooks called
    /// afterwards still count but are no longer logged.
    pub fn finish(&self, dir: &Path) -> Result<OracleReport, OracleError> {
        if self.finished.swap(true, Ordering::AcqRel) {
            return Err(OracleError::AlreadyFinished);
        }
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.writer_thread.get() {
            t.unpark();
        }
        if let Some(h) = lock(&self.writer).take()
            && h.join().is_err()
        {
            log::error!("oracle: timeline writer panicked");
        }
        let endpoints = self.endpoints();
        let mut d = lock(&self.drain);
        self.drain_into(&mut d);
        let mut summary = TimelineSummary {
            stale_ranges_dropped: self.stale_dropped(),
            events: d.events + 1,
            dropped: self.dropped.load(Ordering::Relaxed) + d.over_budget,
            unsampled_dmas: self.unsampled_dmas(),
            unsampled_points: self.unsampled_points.load(Ordering::Relaxed),
            sample_every: self.cfg.sample_every,
            endpoints: endpoints.clone(),
            escape_count: self.escape_count(),
        };
        let last = TimelineEvent {
            t: self.now_ns(),
            tid: 0,
            kind: EventKind::Summary(Box::new(summary.clone())),
        };
        write_line(&mut d.out, &last);
        let path = dir.join(TIMELINE_FILE);
        let io = |source| OracleError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(&path, &d.out).map_err(io)?;
        summary.events = d.events + 1;
        Ok(OracleReport {
            escapes: std::mem::take(&mut d.escapes),
            escape_count: self.escape_count(),
            endpoints,
            timeline: summary,
            timeline_path: Some(path),
        })
    }

    fn push(&self, t: u64, kind: EventKind) {
        let tid = self.thread_tid(t);
        self.push_raw(TimelineEvent { t, tid, kind });
    }

    /// This thread's id, announcing its name the first time this oracle sees it.
    fn thread_tid(&self, t: u64) -> u32 {
        let (tid, first) = thread_id(self.id);
        if first {
            self.push_raw(TimelineEvent {
                t,
                tid,
                kind: EventKind::Thread {
                    name: thread_name(),
                },
            });
        }
        tid
    }

    /// Whether this arrival of a high-frequency event is written (one in `sample_every`).
    fn sample_hot(&self) -> bool {
        let n = self.hot_points.fetch_add(1, Ordering::Relaxed);
        let write = Period::new(self.cfg.sample_every).starts(n);
        if !write {
            self.unsampled_points.fetch_add(1, Ordering::Relaxed);
        }
        write
    }

    fn push_raw(&self, ev: TimelineEvent) {
        if self.finished.load(Ordering::Relaxed) {
            return;
        }
        if self.queue.push(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if self.queue.len() * 2 > self.queue.capacity()
            && let Some(t) = self.writer_thread.get()
        {
            t.unpark();
        }
    }

    /// Runs `f` on the endpoint's entry; endpoints known at construction (the hot case) are
    /// found without a lock or a reference-count update.
    fn with_entry<R>(&self, key: Key, f: impl FnOnce(&Arc<EpEntry>) -> R) -> R {
        match self.fixed.iter().find(|e| e.key == key) {
            Some(e) => f(e),
            None => f(&self.entry(key)),
        }
    }

    fn entry(&self, key: Key) -> Arc<EpEntry> {
        if let Some(e) = self.fixed.iter().find(|e| e.key == key) {
            return e.clone();
        }
        {
            let dynamic = self.dynamic.read().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = dynamic.iter().find(|e| e.key == key) {
                return e.clone();
            }
        }
        let sh = lock(&self.shadow);
        let mut dynamic = self.dynamic.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = dynamic.iter().find(|e| e.key == key) {
            return e.clone();
        }
        let e = Arc::new(EpEntry::new(key, None, sh.fast_word(key)));
        dynamic.push(e.clone());
        e
    }

    fn refresh_fast(&self, sh: &Shadow) {
        for e in &self.fixed {
            e.fast.store(sh.fast_word(e.key), Ordering::Release);
        }
        for e in self
            .dynamic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            e.fast.store(sh.fast_word(e.key), Ordering::Release);
        }
    }

    fn dma_event(&self, rec: &DmaRecord, verdict: Verdict) -> DmaEvent {
        let (outcome, gpa, domain, reason) = match rec.outcome {
            DmaOutcome::Translated { gpa, domain } => ("translated", Some(gpa), Some(domain), None),
            DmaOutcome::Bypassed => ("bypassed", None, None, None),
            DmaOutcome::Direct => ("direct", None, None, None),
            DmaOutcome::Faulted { reason } => ("faulted", None, None, Some(reason)),
        };
        DmaEvent {
            endpoint: rec.endpoint.to_string(),
            iova: rec.iova,
            len: rec.len,
            dir: match rec.direction {
                DmaDirection::Read => "read",
                DmaDirection::Write => "write",
            }
            .into(),
            outcome: outcome.into(),
            gpa,
            domain,
            reason,
            verdict,
            class: None,
            message: None,
            sampled: None,
            cause: None,
        }
    }

    fn legit(&self, entry: &EpEntry, rec: &DmaRecord, t: Option<u64>) {
        let n = entry.legit.fetch_add(1, Ordering::Relaxed);
        if Period::new(self.cfg.sample_every).starts(n) {
            self.sampled.fetch_add(1, Ordering::Relaxed);
            let mut ev = self.dma_event(rec, Verdict::Ok);
            ev.sampled = Some(self.cfg.sample_every);
            self.push(t.unwrap_or_else(|| self.now_ns()), EventKind::Dma(ev));
        }
    }

    /// Legitimate DMAs counted but not written to the timeline.
    fn unsampled_dmas(&self) -> u64 {
        let dynamic = self.dynamic.read().unwrap_or_else(|p| p.into_inner());
        let legit: u64 = self
            .fixed
            .iter()
            .chain(dynamic.iter())
            .map(|e| e.legit.load(Ordering::Relaxed))
            .sum();
        legit.saturating_sub(self.sampled.load(Ordering::Relaxed))
    }

    /// The slow path: the shadow's rules first (they name the more basic failure), then what the
    /// cache provenance found.
    fn slow_dma(&self, entry: &EpEntry, rec: &DmaRecord, finding: Option<Finding>) {
        let sh = lock(&self.shadow);
        let t = self.now_ns();
        let mut c = sh.classify(entry.key, rec);
        let mut cause = None;
        if c.verdict != Verdict::Escape
            && let Some(f) = finding
        {
            c = Classified::escape(f.class, entry.key, rec, &f.why);
            cause = f.cause;
        }
        match c.verdict {
            Verdict::Ok => self.legit(entry, rec, Some(t)),
            Verdict::Fault | Verdict::Escape => {
                if let Some(class) = c.class {
                    self.count_escape(entry, class);
                }
                let mut ev = self.dma_event(rec, c.verdict);
                ev.class = c.class;
                ev.message = c.message;
                ev.cause = cause.map(|c| Box::new((*c).clone()));
                self.push(t, EventKind::Dma(ev));
            }
        }
        drop(sh);
    }

    fn count_escape(&self, entry: &EpEntry, class: EscapeClass) {
        if let Some(c) = entry.escapes.get(class.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.escapes_total.fetch_add(1, Ordering::Relaxed);
    }
}

impl Hooks for Oracle {
    /// Points only go to the timeline: the shadow learns from typed state events.
    fn point(&self, ctx: &PointCtx<'_>) {
        let t = self.now_ns();
        // Doorbells, request completions and MAP/UNMAP fire thousands of times per second of
        // guest I/O; writing each costs two allocations and a JSON line, which measurably slowed
        // guest I/O. They are sampled like legitimate DMAs; rare points stay in full.
        if self.is_hot_point(ctx.point) && !self.sample_hot() {
            return;
        }
        self.push(
            t,
            EventKind::Point {
                name: ctx.point.to_string(),
                endpoint: ep_string(ctx.endpoint),
                domain: ctx.domain,
                value: ctx.value,
            },
        );
    }

    fn dma(&self, rec: &DmaRecord) {
        self.with_entry(Key::of(rec.endpoint), |e| self.dma_on(e, rec, None));
    }

    fn dma_cached(&self, rec: &DmaRecord, via: &CachedTranslation<'_>) {
        self.with_entry(Key::of(rec.endpoint), |e| {
            let finding = self.cache_finding(e, rec, via);
            self.dma_on(e, rec, finding);
        });
    }

    fn recheck_cached(&self, endpoint: Endpoint) -> bool {
        let key = Key::of(endpoint);
        // A load and a store, not an atomic increment: this only paces sampling, and two DMAs
        // of one endpoint racing here may at worst share a sample slot.
        let bump = |c: &AtomicU64| {
            let n = c.load(Ordering::Relaxed);
            c.store(n.wrapping_add(1), Ordering::Relaxed);
            n
        };
        let n = self.with_entry(key, |e| bump(&e.cache_served));
        // The N-th, 2N-th, ... cached translation of the endpoint is re-derived.
        self.paranoid.load(Ordering::Relaxed)
            || Period::new(self.cfg.recheck_every).starts(n.wrapping_add(1))
    }

    fn invalidated(&self, inv: &Invalidation<'_>) {
        self.on_invalidated(inv);
    }

    fn mapped(&self, map: &MapEvent<'_>) {
        self.on_mapped(map);
    }

    fn state(&self, ev: &StateEvent<'_>) {
        self.learn_model_name(ev);
        let mut sh = lock(&self.shadow);
        let t = self.now_ns();
        sh.on_state(ev, t);
        self.refresh_fast(&sh);
        // The point just before it is already on the timeline.
        if ev.change.echoes_point() {
            return;
        }
        self.push(
            t,
            EventKind::State {
                source: ev.source.to_string(),
                what: ev.change.name().to_string(),
                endpoint: ep_string(ev.endpoint),
                value: ev.change.value(),
            },
        );
    }
}

impl Oracle {
    /// Whether `name` is one of the caller's high-frequency points
    /// ([`OracleConfig::hot_points`]); no hashing while there are none.
    fn is_hot_point(&self, name: &str) -> bool {
        !self.cfg.hot_points.is_empty() && self.cfg.hot_points.contains(name)
    }
}

impl Oracle {
    /// The DMA hot path: one atomic load decides whether the rules need to look, one more
    /// whether any invalidated range is kept (`stale-config`).
    fn dma_on(&self, entry: &EpEntry, rec: &DmaRecord, mut finding: Option<Finding>) {
        if finding.is_none() {
            finding = self.unmapped_finding(entry, rec);
        }
        let w = entry.fast.load(Ordering::Acquire);
        let (counter, fast_ok) = match rec.outcome {
            DmaOutcome::Translated { domain, .. } => (
                &entry.translated,
                w & FAST_ANY_TRANSLATED != 0 || (w & FAST_DOMAIN != 0 && w as u32 == domain),
            ),
            DmaOutcome::Bypassed | DmaOutcome::Direct => (&entry.bypassed, w & FAST_BYPASS != 0),
            DmaOutcome::Faulted { .. } => (&entry.faulted, false),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if fast_ok && finding.is_none() {
            self.legit(entry, rec, None);
        } else {
            self.slow_dma(entry, rec, finding);
        }
    }
}

impl std::fmt::Debug for Oracle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oracle")
            .field("escapes", &self.escape_count())
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
