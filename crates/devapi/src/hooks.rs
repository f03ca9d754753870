//! The one hook interface: named points (for race injection) and observations (for the escape
//! oracle and the timeline).
//!
//! Models call [`Hooks::point`] at every place a race window can be widened (register writes,
//! doorbells, request completions). An implementation may block the calling thread there: that
//! is how a *stall* is injected, so models must never hold a lock that other vCPUs need while
//! calling it. Point names are stable strings (`virtio.blk0.notify`, `smmuv3.cmd.CMD_SYNC`, ...).

use crate::endpoint::Endpoint;
use crate::provenance::{CachedTranslation, Invalidation, MapEvent};
use crate::state::StateChange;

/// Context of one arrival at a named point.
#[derive(Debug, Clone, Copy)]
pub struct PointCtx<'a> {
    /// Stable point name, e.g. `virtio-iommu.req.attach`.
    pub point: &'a str,
    /// The endpoint the event concerns, if any (for endpoint filters).
    pub endpoint: Option<Endpoint>,
    /// Domain / context / ASID the event concerns, if any.
    pub domain: Option<u32>,
    /// A point-specific value (the register value written, the request status, ...).
    pub value: u64,
}

impl<'a> PointCtx<'a> {
    /// A context with only a point name and a value.
    pub fn new(point: &'a str, value: u64) -> Self {
        PointCtx {
            point,
            endpoint: None,
            domain: None,
            value,
        }
    }
}

/// Direction of a DMA, from the device's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaDirection {
    /// Device reads guest memory.
    Read,
    /// Device writes guest memory.
    Write,
}

/// What the IOMMU did with one DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaOutcome {
    /// Translated in `domain` to guest-physical `gpa` (first byte).
    Translated {
        /// Guest-physical address of the first byte.
        gpa: u64,
        /// Domain / context identifier that held the mapping.
        domain: u32,
    },
    /// Passed untranslated (IOVA used as guest-physical address).
    Bypassed,
    /// Refused; nothing reached memory.
    Faulted {
        /// Model-specific reason code (virtio-iommu fault reason, SMMU event id, zPCI status).
        reason: u32,
    },
    /// No IOMMU is in front of this endpoint.
    Direct,
}

/// One DMA observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRecord {
    /// Issuer.
    pub endpoint: Endpoint,
    /// Address the device used.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// Read or write.
    pub direction: DmaDirection,
    /// Translation outcome.
    pub outcome: DmaOutcome,
}

/// A change of IOMMU or device state worth a line on the timeline.
#[derive(Debug, Clone, Copy)]
pub struct StateEvent<'a> {
    /// Who changed (the model's instance name), e.g. `viommu0`, `smmuv3`, `virtio-pci`.
    pub source: &'a str,
    /// Endpoint concerned, if any.
    pub endpoint: Option<Endpoint>,
    /// What happened, typed ([`StateChange::name`] and [`StateChange::value`] give its display
    /// form).
    pub change: StateChange,
}

/// Injection and observation, as one trait object handed to every model at construction.
/// Every method has a no-op default so an implementation overrides only what it needs.
pub trait Hooks: Send + Sync {
    /// Execution reached a named point. May block (stall injection).
    fn point(&self, _ctx: &PointCtx<'_>) {}
    /// A model that can publish the completion named by `ctx.point` later asks whether it
    /// should: `Some(delay)` means "complete this request `delay` from now, on the device's own
    /// thread, while the caller runs on" (defer injection). Asked once per request, before
    /// the request takes effect (`ctx.value` is 0: the status is not known yet). Must not
    /// block. Only points a model lists as deferrable ever call it.
    fn defer(&self, _ctx: &PointCtx<'_>) -> Option<std::time::Duration> {
        None
    }
    /// A DMA was attempted.
    fn dma(&self, _rec: &DmaRecord) {}
    /// Device or IOMMU state changed.
    fn state(&self, _ev: &StateEvent<'_>) {}
    /// An invalidation or unmap *completed*: the guest may rely on it from now on. Must not
    /// block.
    fn invalidated(&self, _inv: &Invalidation<'_>) {}
    /// A mapping is about to become visible to translation. Must not block.
    fn mapped(&self, _map: &MapEvent<'_>) {}
    /// A DMA that a model served (partly) from its caches, with the entries it used. Reported
    /// *instead of* [`Hooks::dma`]; the default hands the record to `dma`, so hooks that only
    /// count DMAs need not care.
    fn dma_cached(&self, rec: &DmaRecord, _via: &CachedTranslation<'_>) {
        self.dma(rec);
    }
    /// Asked by a model about to serve a DMA of `endpoint` from its caches: should it also
    /// re-derive the translation from guest memory and report whether it differs
    /// ([`CachedTranslation::divergence`])? Costly for the model; must not block.
    fn recheck_cached(&self, _endpoint: Endpoint) -> bool {
        false
    }
}

/// Hooks that do nothing; production default and fuzzing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {}

/// Several hooks as one, called in order (e.g. race injection, then the escape oracle, then
/// counters). A stall in an earlier one delays the later ones, which is what a timeline wants:
/// it records the point when execution really passes it.
#[derive(Clone, Default)]
pub struct Fanout(pub Vec<std::sync::Arc<dyn Hooks>>);

impl Hooks for Fanout {
    fn point(&self, ctx: &PointCtx<'_>) {
        self.0.iter().for_each(|h| h.point(ctx));
    }
    /// Every member is asked (so each sees the arrival); the longest delay wins.
    fn defer(&self, ctx: &PointCtx<'_>) -> Option<std::time::Duration> {
        self.0.iter().filter_map(|h| h.defer(ctx)).max()
    }
    fn dma(&self, rec: &DmaRecord) {
        self.0.iter().for_each(|h| h.dma(rec));
    }
    fn state(&self, ev: &StateEvent<'_>) {
        self.0.iter().for_each(|h| h.state(ev));
    }
    fn invalidated(&self, inv: &Invalidation<'_>) {
        self.0.iter().for_each(|h| h.invalidated(inv));
    }
    fn mapped(&self, map: &MapEvent<'_>) {
        self.0.iter().for_each(|h| h.mapped(map));
    }
    fn dma_cached(&self, rec: &DmaRecord, via: &CachedTranslation<'_>) {
        self.0.iter().for_each(|h| h.dma_cached(rec, via));
    }
    /// Every member is asked (each may keep its own sampling count); any "yes" wins.
    fn recheck_cached(&self, endpoint: Endpoint) -> bool {
        self.0
            .iter()
            .fold(false, |any, h| h.recheck_cached(endpoint) | any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize, AtomicUsize, AtomicUsize);
    impl Hooks for Count {
        fn point(&self, _: &PointCtx<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn dma(&self, _: &DmaRecord) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
        fn state(&self, _: &StateEvent<'_>) {
            self.2.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Defer(u64);
    impl Hooks for Defer {
        fn defer(&self, _: &PointCtx<'_>) -> Option<std::time::Duration> {
            Some(std::time::Duration::from_millis(self.0))
        }
    }

    #[test]
    fn fanout_defer_takes_the_longest_and_none_by_default() {
        let ctx = PointCtx::new("x", 0);
        assert_eq!(NoHooks.defer(&ctx), None);
        assert_eq!(Fanout(vec![Arc::new(NoHooks)]).defer(&ctx), None);
        let f = Fanout(vec![
            Arc::new(Defer(3)),
            Arc::new(NoHooks),
            Arc::new(Defer(7)),
        ]);
        assert_eq!(f.defer(&ctx), Some(std::time::Duration::from_millis(7)));
    }

    /// Counts `invalidated`/`mapped` and answers `recheck_cached` with a fixed value; leaves
    /// `dma_cached` to its default.
    #[derive(Default)]
    struct Provenance {
        dmas: AtomicUsize,
        events: AtomicUsize,
        asked: AtomicUsize,
        recheck: bool,
    }
    impl Hooks for Provenance {
        fn dma(&self, _: &DmaRecord) {
            self.dmas.fetch_add(1, Ordering::Relaxed);
        }
        fn invalidated(&self, _: &crate::Invalidation<'_>) {
            self.events.fetch_add(1, Ordering::Relaxed);
        }
        fn mapped(&self, _: &crate::MapEvent<'_>) {
            self.events.fetch_add(1, Ordering::Relaxed);
        }
        fn recheck_cached(&self, _: Endpoint) -> bool {
            self.asked.fetch_add(1, Ordering::Relaxed);
            self.recheck
        }
    }

    #[test]
    fn fanout_forwards_provenance_and_cached_dmas_reach_plain_dma_hooks() {
        let yes = Arc::new(Provenance {
            recheck: true,
            ..Provenance::default()
        });
        let no = Arc::new(Provenance::default());
        let f = Fanout(vec![no.clone(), yes.clone()]);
        let ep = Endpoint::Stream { sid: 1, ssid: None };
        assert!(f.recheck_cached(ep), "one member asking is enough");
        assert!(!Fanout(vec![no.clone()]).recheck_cached(ep));
        assert_eq!(no.asked.load(Ordering::Relaxed), 2, "every member is asked");
        let rec = DmaRecord {
            endpoint: ep,
            iova: 0,
            len: 1,
            direction: DmaDirection::Read,
            outcome: DmaOutcome::Bypassed,
        };
        f.dma_cached(
            &rec,
            &crate::CachedTranslation {
                source: "m",
                uses: &[],
                completions_seen: 0,
                divergence: None,
                rechecked: false,
            },
        );
        f.invalidated(&crate::Invalidation {
            source: "m",
            kind: "TLBI",
            cache: crate::CacheKind::Translation,
            endpoint: None,
            contexts: crate::ContextSel::ALL,
            first: 0,
            last: u64::MAX,
            generation: None,
            completion: 0,
            completed_at: std::time::Instant::now(),
        });
        f.mapped(&crate::MapEvent {
            source: "m",
            context: 1,
            first: 0,
            last: 0xfff,
        });
        for p in [&yes, &no] {
            assert_eq!(
                p.dmas.load(Ordering::Relaxed),
                1,
                "dma_cached defaults to dma"
            );
            assert_eq!(p.events.load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn fanout_reaches_every_member() {
        let (a, b) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let f = Fanout(vec![a.clone(), b.clone(), Arc::new(NoHooks)]);
        f.point(&PointCtx::new("x", 1));
        f.dma(&DmaRecord {
            endpoint: Endpoint::Zpci { fh: 1 },
            iova: 0,
            len: 1,
            direction: DmaDirection::Read,
            outcome: DmaOutcome::Bypassed,
        });
        f.state(&StateEvent {
            source: "s",
            endpoint: None,
            change: crate::DeviceState::Reset.into(),
        });
        for c in [a, b] {
            assert_eq!(
                (
                    c.0.load(Ordering::Relaxed),
                    c.1.load(Ordering::Relaxed),
                    c.2.load(Ordering::Relaxed)
                ),
                (1, 1, 1)
            );
        }
    }
}
