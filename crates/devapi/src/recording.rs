//! [`RecordingHooks`]: a [`Hooks`] test double that records every call, for unit tests of
//! device models.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::dma::{DmaFault, DmaResolution, DmaTranslate};
use crate::endpoint::Endpoint;
use crate::hooks::{DmaRecord, Hooks, PointCtx, StateEvent};
use crate::provenance::{
    CacheKind, CacheUse, CachedTranslation, ContextSel, Divergence, Invalidation, MapEvent,
};

/// An arrival at a named point ([`PointCtx`], owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPoint {
    /// Point name.
    pub point: String,
    /// Endpoint concerned, if any.
    pub endpoint: Option<Endpoint>,
    /// Domain / context concerned, if any.
    pub domain: Option<u32>,
    /// The point-specific value.
    pub value: u64,
}

impl From<&PointCtx<'_>> for RecordedPoint {
    fn from(ctx: &PointCtx<'_>) -> Self {
        RecordedPoint {
            point: ctx.point.to_string(),
            endpoint: ctx.endpoint,
            domain: ctx.domain,
            value: ctx.value,
        }
    }
}

/// A state change ([`StateEvent`], owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedState {
    /// Who changed.
    pub source: String,
    /// What happened ([`crate::StateChange::name`]).
    pub what: String,
    /// Endpoint concerned, if any.
    pub endpoint: Option<Endpoint>,
    /// The event's value ([`crate::StateChange::value`]).
    pub value: u64,
    /// The event itself.
    pub change: crate::StateChange,
}

/// A completed invalidation ([`Invalidation`], owned; without its wall-clock time, so records
/// compare equal across runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedInvalidation {
    /// The model.
    pub source: String,
    /// What the guest asked for (`UNMAP`, `TLBI_NH_VA`, ...).
    pub kind: String,
    /// The cache concerned.
    pub cache: CacheKind,
    /// The endpoint concerned, if any.
    pub endpoint: Option<Endpoint>,
    /// Contexts covered.
    pub contexts: ContextSel,
    /// First address covered.
    pub first: u64,
    /// Last address covered, inclusive.
    pub last: u64,
    /// The model's cache generation, if it reports one.
    pub generation: Option<u64>,
    /// The model's completion number.
    pub completion: u64,
}

/// A mapping announced before it became visible ([`MapEvent`], owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMapping {
    /// The model.
    pub source: String,
    /// The context (virtio-iommu: the domain).
    pub context: u64,
    /// First IOVA.
    pub first: u64,
    /// Last IOVA, inclusive.
    pub last: u64,
}

/// A DMA served from a model's caches ([`Hooks::dma_cached`], owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCachedDma {
    /// The DMA (also listed by [`RecordingHooks::dmas`]).
    pub rec: DmaRecord,
    /// The cached entries it used.
    pub uses: Vec<CacheUse>,
    /// Completions the model had seen when the DMA began.
    pub completions_seen: u64,
    /// Where a fresh derivation disagreed, if it was rechecked and did.
    pub divergence: Option<Divergence>,
    /// Whether the model rechecked the translation against guest memory.
    pub rechecked: bool,
}

/// One hook call, as recorded by [`RecordingHooks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedEvent {
    /// [`Hooks::point`].
    Point(RecordedPoint),
    /// [`Hooks::defer`] was asked (with the context it was asked with).
    DeferAsked(RecordedPoint),
    /// [`Hooks::dma`].
    Dma(DmaRecord),
    /// [`Hooks::dma_cached`].
    CachedDma(RecordedCachedDma),
    /// [`Hooks::state`].
    State(RecordedState),
    /// [`Hooks::invalidated`].
    Invalidated(RecordedInvalidation),
    /// [`Hooks::mapped`].
    Mapped(RecordedMapping),
}

type PointAction = Box<dyn Fn(&PointCtx<'_>) + Send + Sync>;
type DeferDecision = Box<dyn Fn(&PointCtx<'_>) -> Option<Duration> + Send + Sync>;

/// Records every hook call in arrival order; for unit tests of device models. Never defers and
/// never asks for rechecks unless told to ([`RecordingHooks::with_defer`],
/// [`RecordingHooks::set_recheck_cached`]); can run a test's action at every point
/// ([`RecordingHooks::with_point_action`]), e.g. to park a thread there.
#[derive(Default)]
pub struct RecordingHooks {
    log: Mutex<Vec<RecordedEvent>>,
    recheck_cached: AtomicBool,
    point_action: Option<PointAction>,
    defer_decision: Option<DeferDecision>,
}

impl std::fmt::Debug for RecordingHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingHooks")
            .field("log", &*self.lock())
            .field("recheck_cached", &self.recheck_cached)
            .field("point_action", &self.point_action.is_some())
            .field("defer_decision", &self.defer_decision.is_some())
            .finish()
    }
}

impl RecordingHooks {
    /// Runs `action` at every point, after recording the arrival and with no lock held: it may
    /// block (a stall) or signal the test.
    pub fn with_point_action(
        mut self,
        action: impl Fn(&PointCtx<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.point_action = Some(Box::new(action));
        self
    }

    /// Answers [`Hooks::defer`] with `decide` (after recording the question) instead of `None`.
    pub fn with_defer(
        mut self,
        decide: impl Fn(&PointCtx<'_>) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.defer_decision = Some(Box::new(decide));
        self
    }

    /// What [`Hooks::recheck_cached`] answers from now on (initially `false`).
    pub fn set_recheck_cached(&self, recheck: bool) {
        self.recheck_cached.store(recheck, Ordering::Relaxed);
    }

    /// Every recorded call, in arrival order.
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.lock().clone()
    }

    /// Arrivals at points, in order.
    pub fn points(&self) -> Vec<RecordedPoint> {
        self.select(|e| match e {
            RecordedEvent::Point(p) => Some(p.clone()),
            _ => None,
        })
    }

    /// Names of the points arrived at, in order.
    pub fn point_names(&self) -> Vec<String> {
        self.points().into_iter().map(|p| p.point).collect()
    }

    /// `(point, value)` of every arrival, in order.
    pub fn point_values(&self) -> Vec<(String, u64)> {
        self.points()
            .into_iter()
            .map(|p| (p.point, p.value))
            .collect()
    }

    /// Contexts [`Hooks::defer`] was asked with, in order.
    pub fn defer_questions(&self) -> Vec<RecordedPoint> {
        self.select(|e| match e {
            RecordedEvent::DeferAsked(p) => Some(p.clone()),
            _ => None,
        })
    }

    /// Every DMA reported, through [`Hooks::dma`] or [`Hooks::dma_cached`], in order.
    pub fn dmas(&self) -> Vec<DmaRecord> {
        self.select(|e| match e {
            RecordedEvent::Dma(rec) => Some(*rec),
            RecordedEvent::CachedDma(c) => Some(c.rec),
            _ => None,
        })
    }

    /// DMAs served from caches ([`Hooks::dma_cached`]), in order.
    pub fn cached_dmas(&self) -> Vec<RecordedCachedDma> {
        self.select(|e| match e {
            RecordedEvent::CachedDma(c) => Some(c.clone()),
            _ => None,
        })
    }

    /// State events, in order.
    pub fn states(&self) -> Vec<RecordedState> {
        self.select(|e| match e {
            RecordedEvent::State(s) => Some(s.clone()),
            _ => None,
        })
    }

    /// `(what, value)` of every state event, in order.
    pub fn state_values(&self) -> Vec<(String, u64)> {
        self.states()
            .into_iter()
            .map(|s| (s.what, s.value))
            .collect()
    }

    /// Completed invalidations, in order.
    pub fn invalidations(&self) -> Vec<RecordedInvalidation> {
        self.select(|e| match e {
            RecordedEvent::Invalidated(i) => Some(i.clone()),
            _ => None,
        })
    }

    /// Announced mappings, in order.
    pub fn mappings(&self) -> Vec<RecordedMapping> {
        self.select(|e| match e {
            RecordedEvent::Mapped(m) => Some(m.clone()),
            _ => None,
        })
    }

    fn select<T>(&self, pick: impl FnMut(&RecordedEvent) -> Option<T>) -> Vec<T> {
        self.lock().iter().filter_map(pick).collect()
    }

    /// A panicking test thread must not hide what was recorded from the others.
    fn lock(&self) -> MutexGuard<'_, Vec<RecordedEvent>> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, event: RecordedEvent) {
        self.lock().push(event);
    }
}

impl Hooks for RecordingHooks {
    fn point(&self, ctx: &PointCtx<'_>) {
        self.push(RecordedEvent::Point(ctx.into()));
        if let Some(action) = &self.point_action {
            action(ctx);
        }
    }
    fn defer(&self, ctx: &PointCtx<'_>) -> Option<Duration> {
        self.push(RecordedEvent::DeferAsked(ctx.into()));
        self.defer_decision.as_ref().and_then(|decide| decide(ctx))
    }
    fn dma(&self, rec: &DmaRecord) {
        self.push(RecordedEvent::Dma(*rec));
    }
    fn state(&self, ev: &StateEvent<'_>) {
        self.push(RecordedEvent::State(RecordedState {
            source: ev.source.to_string(),
            what: ev.change.name().to_string(),
            endpoint: ev.endpoint,
            value: ev.change.value(),
            change: ev.change,
        }));
    }
    fn invalidated(&self, inv: &Invalidation<'_>) {
        self.push(RecordedEvent::Invalidated(RecordedInvalidation {
            source: inv.source.to_string(),
            kind: inv.kind.to_string(),
            cache: inv.cache,
            endpoint: inv.endpoint,
            contexts: inv.contexts,
            first: inv.first,
            last: inv.last,
            generation: inv.generation,
            completion: inv.completion,
        }));
    }
    fn mapped(&self, map: &MapEvent<'_>) {
        self.push(RecordedEvent::Mapped(RecordedMapping {
            source: map.source.to_string(),
            context: map.context,
            first: map.first,
            last: map.last,
        }));
    }
    fn dma_cached(&self, rec: &DmaRecord, via: &CachedTranslation<'_>) {
        self.push(RecordedEvent::CachedDma(RecordedCachedDma {
            rec: *rec,
            uses: via.uses.to_vec(),
            completions_seen: via.completions_seen,
            divergence: via.divergence,
            rechecked: via.rechecked,
        }));
    }
    fn recheck_cached(&self, _endpoint: Endpoint) -> bool {
        self.recheck_cached.load(Ordering::Relaxed)
    }
}

/// A [`DmaTranslate`] that counts the accesses it is asked to resolve and passes them to the
/// model it wraps: how a test sees whether the seam asked the model (a model-owned seam must
/// ask on every access; a cached one only on misses).
#[derive(Debug)]
pub struct CountingTranslator<T> {
    inner: T,
    calls: AtomicU64,
}

impl<T> CountingTranslator<T> {
    /// Counts the resolutions of `inner`.
    pub fn new(inner: T) -> Self {
        CountingTranslator {
            inner,
            calls: AtomicU64::new(0),
        }
    }

    /// Accesses resolved so far (refused ones included).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl<T: DmaTranslate> DmaTranslate for CountingTranslator<T> {
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: vm_memory::Permissions,
        fill: &mut vm_memory::Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.resolve(iova, len, access, fill)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{DmaDirection, DmaOutcome};
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn dma(outcome: DmaOutcome) -> DmaRecord {
        DmaRecord {
            endpoint: Endpoint::Zpci { fh: 1 },
            iova: 0x1000,
            len: 8,
            direction: DmaDirection::Write,
            outcome,
        }
    }

    #[test]
    fn records_every_call_in_order_with_accessors_per_kind() {
        let r = RecordingHooks::default();
        r.point(&PointCtx {
            point: "p",
            endpoint: None,
            domain: Some(3),
            value: 7,
        });
        r.state(&StateEvent {
            source: "m",
            endpoint: None,
            change: crate::ViommuState::Attach { domain: 3 }.into(),
        });
        r.dma(&dma(DmaOutcome::Faulted { reason: 4 }));
        r.mapped(&MapEvent {
            source: "m",
            context: 3,
            first: 0,
            last: 0xfff,
        });
        r.dma_cached(
            &dma(DmaOutcome::Bypassed),
            &CachedTranslation {
                source: "m",
                uses: &[CacheUse::default()],
                completions_seen: 2,
                divergence: None,
                rechecked: true,
            },
        );
        r.invalidated(&Invalidation {
            source: "m",
            kind: "UNMAP",
            cache: CacheKind::Translation,
            endpoint: None,
            contexts: ContextSel::exact(3),
            first: 0,
            last: 0xfff,
            generation: None,
            completion: 0,
            completed_at: std::time::Instant::now(),
        });
        assert_eq!(r.events().len(), 6);
        assert_eq!(r.point_values(), vec![("p".to_string(), 7)]);
        assert_eq!(r.points()[0].domain, Some(3));
        assert_eq!(r.state_values(), vec![("attach".to_string(), 3)]);
        assert_eq!(r.dmas().len(), 2, "cached DMAs are DMAs too");
        assert_eq!(r.cached_dmas()[0].completions_seen, 2);
        assert_eq!(r.mappings()[0].context, 3);
        assert_eq!(r.invalidations()[0].kind, "UNMAP");
        assert!(matches!(r.events()[3], RecordedEvent::Mapped(_)));
    }

    #[test]
    fn defers_and_rechecks_only_when_told_and_runs_the_point_action() {
        let plain = RecordingHooks::default();
        let ctx = PointCtx::new("q", 0);
        assert_eq!(plain.defer(&ctx), None);
        assert!(!plain.recheck_cached(Endpoint::Zpci { fh: 1 }));
        plain.set_recheck_cached(true);
        assert!(plain.recheck_cached(Endpoint::Zpci { fh: 1 }));
        assert_eq!(plain.defer_questions(), vec![RecordedPoint::from(&ctx)]);

        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        let r = RecordingHooks::default()
            .with_defer(|ctx| (ctx.point == "q").then_some(Duration::from_millis(5)))
            .with_point_action(move |_| {
                seen.fetch_add(1, Ordering::Relaxed);
            });
        assert_eq!(r.defer(&ctx), Some(Duration::from_millis(5)));
        assert_eq!(r.defer(&PointCtx::new("other", 0)), None);
        r.point(&ctx);
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        assert_eq!(r.point_names(), vec!["q".to_string()]);
        assert_eq!(r.defer_questions().len(), 2);
    }
}
