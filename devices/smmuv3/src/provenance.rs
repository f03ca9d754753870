//! What the model tells the escape oracle about its caches (`sluice_devapi::Invalidation`,
//! `CachedTranslation`): which cached entries a translation used and the generation each was
//! filled at, which invalidations completed (at the CMD_SYNC after them), and, when the hooks
//! ask, whether a fresh derivation from guest memory agrees with a cached translation.
//!
//! Contexts (`sluice_devapi::ContextSel`): IOTLB entries are tagged `VMID << 32 | ASID` (ASID
//! [`ASID_NONE`] for stage-2-only entries, so a real ASID never has bit 16 set); config entries
//! are tagged with the StreamID and use slot 0 for the STE and `SSID + 1` for a CD.
//!
//! What an invalidation *claims* is what the architecture lets the guest rely on, never more:
//! CFGI_STE and CFGI_STE_RANGE claim the STEs only (whether they also drop CDs is not relied
//! on), CFGI_CD/CFGI_CD_ALL the CDs, TLBI_S2_IPA only stage-2-only entries, and the EL2 TLBIs
//! nothing (this model has no EL2 streams; it over-invalidates on them). A claim that is too
//! small can only hide a stale use; one that is too large could accuse a correct model.

use crate::device::SmmuV3;
use crate::iotlb::{ASID_NONE, Tag, TagSel, TlbEntry};
use crate::translate::{Segment, Stop, Translation};
use sluice_devapi::{CacheKind, CacheUse, ContextSel, Derived, Divergence, Endpoint, Invalidation};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// `source` of every report.
pub const SOURCE: &str = "smmuv3";

/// Cached entries listed per translation; further ones are not listed (the oracle then cannot
/// accuse them, it never wrongly accuses the listed ones).
pub const MAX_LISTED_USES: usize = 8;

/// Invalidations kept between their command and the CMD_SYNC that completes them; beyond this
/// (a guest that never syncs) they are counted and not reported.
pub const MAX_PENDING_INVALIDATIONS: usize = 1024;

/// Deliberate model bugs, for escape-oracle tests only. The command is parsed, executed and
/// announced as usual and the cache generation moves on; only the removal is skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultInjection {
    /// TLBI commands remove nothing from the IOTLB.
    pub skip_tlb_invalidation: bool,
    /// CFGI commands remove nothing from the config cache.
    pub skip_config_invalidation: bool,
}

/// The model-side state behind the reports.
#[derive(Debug, Default)]
pub(crate) struct Provenance {
    /// CMD_SYNCs completed (the completion number of the invalidations before each).
    pub(crate) syncs: AtomicU64,
    pending: Mutex<Vec<Pending>>,
    pending_dropped: AtomicU64,
    skip_tlb: AtomicBool,
    skip_config: AtomicBool,
}

/// An executed invalidation waiting for its CMD_SYNC.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    pub kind: &'static str,
    pub cache: CacheKind,
    pub endpoint: Option<Endpoint>,
    pub contexts: ContextSel,
    pub first: u64,
    pub last: u64,
    pub generation: u64,
}

impl Provenance {
    fn pending(&self) -> MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_faults(&self, f: FaultInjection) {
        self.skip_tlb
            .store(f.skip_tlb_invalidation, Ordering::Relaxed);
        self.skip_config
            .store(f.skip_config_invalidation, Ordering::Relaxed);
    }

    /// Whether TLBIs really remove entries (false only under fault injection).
    pub(crate) fn tlb_removal(&self) -> bool {
        !self.skip_tlb.load(Ordering::Relaxed)
    }

    /// Whether CFGIs really remove entries (false only under fault injection).
    pub(crate) fn config_removal(&self) -> bool {
        !self.skip_config.load(Ordering::Relaxed)
    }

    /// Invalidations executed and not yet completed by a CMD_SYNC that were not kept.
    pub(crate) fn dropped(&self) -> u64 {
        self.pending_dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn note(&self, p: Pending) {
        let mut list = self.pending();
        if list.len() >= MAX_PENDING_INVALIDATIONS {
            self.pending_dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            list.push(p);
        }
    }

    /// Forgets pending invalidations (reset: nothing is completed by a later CMD_SYNC).
    pub(crate) fn forget(&self) {
        self.pending().clear();
    }
}

impl SmmuV3 {
    /// CMD_SYNC: every invalidation executed before it is complete. Called when the CMD_SYNC
    /// executes, before its completion is visible to the guest (CONS, IRQ or MSI).
    pub(crate) fn complete_invalidations(&self) {
        let done = std::mem::take(&mut *self.provenance.pending());
        let completion = self.provenance.syncs.fetch_add(1, Ordering::AcqRel) + 1;
        let completed_at = Instant::now();
        for p in done {
            self.hooks.invalidated(&Invalidation {
                source: SOURCE,
                kind: p.kind,
                cache: p.cache,
                endpoint: p.endpoint,
                contexts: p.contexts,
                first: p.first,
                last: p.last,
                generation: Some(p.generation),
                completion,
                completed_at,
            });
        }
    }
}

/// The context tag of IOTLB entries of `tag`.
pub(crate) fn tlb_context(tag: Tag) -> u64 {
    (u64::from(tag.vmid) << 32) | u64::from(tag.asid)
}

/// The contexts an IOTLB tag selector covers.
pub(crate) fn tlb_contexts(sel: TagSel) -> ContextSel {
    const VMID: u64 = 0xffff << 32;
    // Bit 16 is set only in ASID_NONE: requiring it clear selects stage-1 entries.
    const STAGE2_ONLY: u64 = ASID_NONE as u64;
    match sel {
        TagSel::All => ContextSel::ALL,
        TagSel::Vmid(v) => ContextSel {
            value: u64::from(v) << 32,
            mask: VMID,
        },
        TagSel::VmidS1(v) => ContextSel {
            value: u64::from(v) << 32,
            mask: VMID | STAGE2_ONLY,
        },
        TagSel::One(t) => ContextSel::exact(tlb_context(t)),
    }
}

/// The config-cache slot of the CD of substream `ssid` (slot 0 is the STE).
pub(crate) fn cd_slot(ssid: u32) -> u64 {
    u64::from(ssid) + 1
}

/// Cached entries one translation used, and whether it may use caches at all (a fresh
/// derivation neither reads nor fills them). Shared by reference down the walk.
pub(crate) struct Trace {
    fresh: bool,
    uses: [Cell<CacheUse>; MAX_LISTED_USES],
    len: Cell<usize>,
    any: Cell<bool>,
}

impl Trace {
    /// A translation that may use and fill the caches.
    pub(crate) fn cached() -> Self {
        Trace {
            fresh: false,
            uses: Default::default(),
            len: Cell::new(0),
            any: Cell::new(false),
        }
    }

    /// A derivation from guest memory only.
    pub(crate) fn fresh() -> Self {
        Trace {
            fresh: true,
            ..Trace::cached()
        }
    }

    /// Whether caches may be read and filled.
    pub(crate) fn caching(&self, smmu: &SmmuV3) -> bool {
        !self.fresh && smmu.caching()
    }

    /// Whether any cached entry was used.
    pub(crate) fn used_cache(&self) -> bool {
        self.any.get()
    }

    pub(crate) fn record(&self, u: CacheUse) {
        self.any.set(true);
        let n = self.len.get();
        // A large access walks one entry many times; list it once.
        if n > 0 && self.uses.get(n - 1).is_some_and(|c| c.get() == u) {
            return;
        }
        if let Some(c) = self.uses.get(n) {
            c.set(u);
            self.len.set(n + 1);
        }
    }

    pub(crate) fn record_tlb(&self, context: u64, e: &TlbEntry, filled: u64) {
        let size = 1u64.checked_shl(e.size_log2).unwrap_or(0);
        self.record(CacheUse {
            cache: CacheKind::Translation,
            context,
            first: e.iova,
            last: e.iova.saturating_add(size.wrapping_sub(1)),
            filled,
        });
    }

    /// The listed uses (copied out, no allocation).
    pub(crate) fn uses(&self) -> Listed {
        let mut out = Listed {
            uses: [CacheUse::default(); MAX_LISTED_USES],
            len: self.len.get(),
        };
        for (o, c) in out.uses.iter_mut().zip(&self.uses) {
            *o = c.get();
        }
        out
    }
}

/// A copy of a [`Trace`]'s listed uses.
pub(crate) struct Listed {
    uses: [CacheUse; MAX_LISTED_USES],
    len: usize,
}

impl Listed {
    pub(crate) fn as_slice(&self) -> &[CacheUse] {
        self.uses.get(..self.len).unwrap_or(&[])
    }
}

fn derived_stop(s: &Stop) -> Derived {
    let reason = match s {
        Stop::Abort(_) => 0,
        Stop::Event { ev, .. } => u32::from(ev.kind.code()),
    };
    Derived::Faulted { reason }
}

fn derived_at(t: &Translation, iova: u64) -> Derived {
    if t.bypassed {
        return Derived::Bypassed;
    }
    match t
        .segments
        .iter()
        .find(|s| iova >= s.iova && iova - s.iova < s.len)
    {
        Some(s) => Derived::Translated {
            gpa: s.pa.wrapping_add(iova - s.iova),
            perms: s.perms,
        },
        None => Derived::Faulted { reason: 0 },
    }
}

/// Where a cached translation and a fresh derivation of the same access first differ (output
/// address, permissions, or whether it translates at all), if anywhere.
pub(crate) fn first_divergence(
    iova: u64,
    cached: &Translation,
    fresh: &Result<(Translation, u32), Stop>,
) -> Option<Divergence> {
    let fresh = match fresh {
        Err(stop) => {
            return Some(Divergence {
                iova,
                cached: derived_at(cached, iova),
                fresh: derived_stop(stop),
            });
        }
        Ok((f, _)) => f,
    };
    if cached.bypassed != fresh.bypassed {
        return Some(Divergence {
            iova,
            cached: derived_at(cached, iova),
            fresh: derived_at(fresh, iova),
        });
    }
    if cached.bypassed {
        return None;
    }
    first_segment_divergence(&cached.segments, &fresh.segments).map(|at| Divergence {
        iova: at,
        cached: derived_at(cached, at),
        fresh: derived_at(fresh, at),
    })
}

/// Both lists tile the same input range; walks them together.
fn first_segment_divergence(a: &[Segment], b: &[Segment]) -> Option<u64> {
    let (mut ia, mut ib) = (a.iter(), b.iter());
    let (mut sa, mut sb) = (ia.next(), ib.next());
    let mut cur = sa.map_or(0, |s| s.iova);
    while let (Some(x), Some(y)) = (sa, sb) {
        let pa_x = x.pa.wrapping_add(cur.wrapping_sub(x.iova));
        let pa_y = y.pa.wrapping_add(cur.wrapping_sub(y.iova));
        if pa_x != pa_y || x.perms != y.perms {
            return Some(cur);
        }
        let (end_x, end_y) = (x.iova.saturating_add(x.len), y.iova.saturating_add(y.len));
        cur = end_x.min(end_y);
        if cur >= end_x {
            sa = ia.next();
        }
        if cur >= end_y {
            sb = ib.next();
        }
    }
    // One list covers more than the other: they differ where the shorter one ends.
    (sa.is_some() || sb.is_some()).then_some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(iova: u64, pa: u64, len: u64, perms: u8) -> Segment {
        Segment {
            iova,
            pa,
            len,
            perms,
        }
    }

    #[test]
    fn segment_lists_that_tile_differently_but_agree_do_not_diverge() {
        let a = [seg(0x1000, 0x9000, 0x2000, 3)];
        let b = [
            seg(0x1000, 0x9000, 0x800, 3),
            seg(0x1800, 0x9800, 0x1800, 3),
        ];
        assert_eq!(first_segment_divergence(&a, &b), None);
        let c = [
            seg(0x1000, 0x9000, 0x800, 3),
            seg(0x1800, 0x7800, 0x1800, 3),
        ];
        assert_eq!(first_segment_divergence(&a, &c), Some(0x1800));
        let d = [seg(0x1000, 0x9000, 0x2000, 1)];
        assert_eq!(first_segment_divergence(&a, &d), Some(0x1000));
        assert_eq!(first_segment_divergence(&a, &a[..0]), Some(0x1000));
    }

    #[test]
    fn tag_selectors_become_the_contexts_they_cover() {
        let s1 = tlb_context(Tag { vmid: 2, asid: 7 });
        let s2 = tlb_context(Tag {
            vmid: 2,
            asid: ASID_NONE,
        });
        let other = tlb_context(Tag { vmid: 3, asid: 7 });
        let vmid_s1 = tlb_contexts(TagSel::VmidS1(2));
        assert!(vmid_s1.covers(s1) && !vmid_s1.covers(s2) && !vmid_s1.covers(other));
        let vmid = tlb_contexts(TagSel::Vmid(2));
        assert!(vmid.covers(s1) && vmid.covers(s2) && !vmid.covers(other));
        assert!(tlb_contexts(TagSel::All).covers(other));
        let one = tlb_contexts(TagSel::One(Tag { vmid: 2, asid: 7 }));
        assert!(one.covers(s1) && !one.covers(s2));
    }

    #[test]
    fn pending_invalidations_are_bounded() {
        let p = Provenance::default();
        for _ in 0..MAX_PENDING_INVALIDATIONS + 5 {
            p.note(Pending {
                kind: "TLBI_NH_ALL",
                cache: CacheKind::Translation,
                endpoint: None,
                contexts: ContextSel::ALL,
                first: 0,
                last: u64::MAX,
                generation: 1,
            });
        }
        assert_eq!(p.pending().len(), MAX_PENDING_INVALIDATIONS);
        assert_eq!(p.dropped(), 5);
    }
}
