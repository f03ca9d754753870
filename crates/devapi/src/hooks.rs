//! The one hook interface: named points (for race injection) and observations (for the escape
//! oracle and the timeline).
//!
//! Models call [`Hooks::point`] at every place a race window can be widened (register writes,
//! doorbells, request completions). An implementation may block the calling thread there: that
//! is how a *stall* is injected, so models must never hold a lock that other vCPUs need while
//! calling it. Point names are stable strings (`virtio.blk0.notify`, `smmuv3.cmd.CMD_SYNC`, ...).

use crate::endpoint::Endpoint;

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
#[derive(Debug, Clone, Copy)]
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
    /// Who changed, e.g. `virtio-iommu`, `smmuv3`, `pci 0000:00:02.0`.
    pub source: &'a str,
    /// What happened, e.g. `attach`, `driver-ok`, `bus-master-enable`.
    pub what: &'a str,
    /// Endpoint concerned, if any.
    pub endpoint: Option<Endpoint>,
    /// A value (domain, register value, new status, ...).
    pub value: u64,
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
            what: "w",
            endpoint: None,
            value: 0,
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
