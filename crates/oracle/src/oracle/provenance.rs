//! The oracle's side of cache provenance (`sluice_devapi::Invalidation`, `MapEvent`,
//! `CachedTranslation`): keeping invalidated ranges, and the mapping-level `stale-config` and
//! the re-derivation `unsynced-config` findings a DMA may carry into the slow path.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_devapi::{
    CacheKind, CacheUse, CachedTranslation, Derived, Divergence, DmaOutcome, DmaRecord, Endpoint,
    Invalidation, MapEvent, StateChange, StateEvent, ViommuState,
};

use super::{EpEntry, Oracle};
use crate::shadow::secs;
use crate::stale::Meta;
use crate::timeline::{EscapeClass, EventKind, TimelineEvent};
use crate::topology::{IommuTopo, Key};

/// An escape the cache provenance found, waiting for the slow path (whose shadow rules come
/// first).
pub(crate) struct Finding {
    pub class: EscapeClass,
    pub why: String,
    /// The invalidation it contradicts.
    pub cause: Option<Arc<TimelineEvent>>,
}

fn cache_name(c: CacheKind) -> &'static str {
    match c {
        CacheKind::Translation => "translation",
        CacheKind::Config => "config",
    }
}

impl Oracle {
    /// Asks models to re-derive *every* translation they serve from their caches (on), or one in
    /// [`crate::OracleConfig::recheck_every`] per endpoint (off).
    pub fn set_paranoid(&self, on: bool) {
        self.paranoid.store(on, Ordering::Relaxed);
    }

    /// Invalidated ranges not kept (evicted or no room), so far.
    pub(super) fn stale_dropped(&self) -> u64 {
        self.stale.read().unwrap_or_else(|p| p.into_inner()).dropped
    }

    /// A virtio-iommu model names itself in its state events; its ATTACH events tie the name to
    /// the IOMMU that firmware declares the endpoint behind.
    pub(super) fn learn_model_name(&self, ev: &StateEvent<'_>) {
        if !matches!(
            ev.change,
            StateChange::Viommu(ViommuState::AttachBegin { .. } | ViommuState::Attach { .. })
        ) {
            return;
        }
        let Some(index) = ev
            .endpoint
            .and_then(|e| self.declared_iommu(Key::of(e)))
            .filter(|i| i.virtio)
            .map(|i| i.index)
        else {
            return;
        };
        let known = self
            .model_names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ev.source)
            == Some(&index);
        if !known {
            self.model_names
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ev.source.to_string(), index);
        }
    }

    fn declared_iommu(&self, key: Key) -> Option<&super::IommuRef> {
        self.fixed
            .iter()
            .find(|e| e.key == key)
            .and_then(|e| e.iommu.as_ref())
    }

    /// The topology index of the IOMMU a report comes from: an SMMU by its source name, else
    /// the IOMMU its endpoint is declared behind, else a virtio-iommu model learned by name.
    fn iommu_of(&self, source: &str, endpoint: Option<Endpoint>) -> Option<usize> {
        let smmu = self
            .topology
            .iommus
            .iter()
            .position(|t| matches!(t, IommuTopo::Smmu { source: s, .. } if s == source));
        smmu.or_else(|| {
            endpoint
                .and_then(|e| self.declared_iommu(Key::of(e)))
                .map(|i| i.index)
        })
        .or_else(|| {
            self.model_names
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(source)
                .copied()
        })
    }

    /// Records an invalidation on the timeline (sampled: one in `sample_every`, they come with
    /// every unmap) and keeps its range; the record itself is kept as the cause of any escape
    /// that contradicts it.
    pub(super) fn on_invalidated(&self, inv: &Invalidation<'_>) {
        let t = self.now_ns();
        let cause = TimelineEvent {
            t,
            tid: self.thread_tid(t),
            kind: EventKind::Invalidated {
                source: inv.source.to_string(),
                what: inv.kind.to_string(),
                cache: cache_name(inv.cache).to_string(),
                endpoint: inv.endpoint.map(|e| e.to_string()),
                context: inv.contexts.value,
                context_mask: inv.contexts.mask,
                first: inv.first,
                last: inv.last,
                generation: inv.generation,
                completion: inv.completion,
            },
        };
        if self.sample_hot() {
            self.push_raw(cause.clone());
        }
        let Some(iommu) = self.iommu_of(inv.source, inv.endpoint) else {
            return;
        };
        let meta = Meta::new(inv.generation, inv.completion, Arc::new(cause));
        let mut st = self.stale.write().unwrap_or_else(|p| p.into_inner());
        st.invalidate(
            (iommu, inv.cache),
            inv.contexts,
            (inv.first, inv.last),
            meta,
        );
        self.stale_live.store(st.live, Ordering::Release);
        self.stale_version.fetch_add(1, Ordering::AcqRel);
    }

    /// A mapping is about to be visible: its range is no longer stale.
    pub(super) fn on_mapped(&self, map: &MapEvent<'_>) {
        let t = self.now_ns();
        if self.sample_hot() {
            self.push(
                t,
                EventKind::Mapped {
                    source: map.source.to_string(),
                    context: map.context,
                    first: map.first,
                    last: map.last,
                },
            );
        }
        let Some(iommu) = self.iommu_of(map.source, None) else {
            return;
        };
        let mut st = self.stale.write().unwrap_or_else(|p| p.into_inner());
        st.mapped(
            (iommu, CacheKind::Translation),
            map.context,
            (map.first, map.last),
        );
        self.stale_live.store(st.live, Ordering::Release);
        self.stale_version.fetch_add(1, Ordering::AcqRel);
    }

    /// virtio-iommu: a translated DMA at an address its domain unmapped and did not map again.
    pub(super) fn unmapped_finding(&self, entry: &EpEntry, rec: &DmaRecord) -> Option<Finding> {
        let iommu = entry.iommu.as_ref().filter(|i| i.virtio)?;
        let DmaOutcome::Translated { domain, .. } = rec.outcome else {
            return None;
        };
        if self.stale_live.load(Ordering::Acquire) == 0 {
            return None;
        }
        let last = rec.iova.saturating_add(rec.len.max(1) - 1);
        let cause = self
            .stale
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .unmapped_use(
                (iommu.index, CacheKind::Translation),
                u64::from(domain),
                (rec.iova, last),
            )?;
        let why = format!(
            "{} and nothing mapped the address again since; the model still translated it in domain {domain}",
            describe_invalidation(&cause)
        );
        Some(Finding {
            class: EscapeClass::StaleConfig,
            why,
            cause: Some(cause),
        })
    }

    /// A DMA a model served from its caches: a used entry an invalidation should have removed
    /// (`stale-config`), or a cached translation guest memory no longer agrees with
    /// (`unsynced-config`).
    pub(super) fn cache_finding(
        &self,
        entry: &EpEntry,
        rec: &DmaRecord,
        via: &CachedTranslation<'_>,
    ) -> Option<Finding> {
        if matches!(rec.outcome, DmaOutcome::Faulted { .. }) {
            return None;
        }
        let iommu = entry.iommu.as_ref()?.index;
        let version = self.stale_version.load(Ordering::Acquire);
        let memo = ((version & 0xffff_ffff) << 32) | digest(via.uses, via.completions_seen);
        if self.stale_live.load(Ordering::Acquire) > 0
            && entry.clean.load(Ordering::Relaxed) != memo
        {
            let st = self.stale.read().unwrap_or_else(|p| p.into_inner());
            for u in via.uses {
                if let Some(cause) = st.stale_use(iommu, u, via.completions_seen) {
                    let why = format!(
                        "served from {}; {}, before this translation began (it saw completion {})",
                        describe_use(u),
                        describe_invalidation(&cause),
                        via.completions_seen
                    );
                    return Some(Finding {
                        class: EscapeClass::StaleConfig,
                        why,
                        cause: Some(cause),
                    });
                }
            }
            entry.clean.store(memo, Ordering::Relaxed);
        }
        let d = via.divergence?;
        Some(Finding {
            class: EscapeClass::UnsyncedConfig,
            why: describe_divergence(&d),
            cause: None,
        })
    }
}

/// A 32-bit digest of the entries a DMA used and the completion number it saw (FNV-1a over
/// their words; only equality matters).
fn digest(uses: &[CacheUse], seen: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |w: u64| {
        h ^= w;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    mix(seen);
    for u in uses {
        mix(u.cache as u64);
        mix(u.context);
        mix(u.first);
        mix(u.last);
        mix(u.filled);
    }
    (h ^ (h >> 32)) & 0xffff_ffff
}

fn describe_use(u: &CacheUse) -> String {
    match u.cache {
        CacheKind::Translation => format!(
            "a cached translation of [{:#x}, {:#x}] (context {:#x}) whose walk began at generation {}",
            u.first, u.last, u.context, u.filled
        ),
        CacheKind::Config => format!(
            "cached config slot {} ({}) of context {:#x} fetched at generation {}",
            u.first,
            if u.first == 0 { "STE" } else { "CD" },
            u.context,
            u.filled
        ),
    }
}

/// "UNMAP of [a, b] in context c completed at t" with generation and completion when known.
fn describe_invalidation(ev: &TimelineEvent) -> String {
    let EventKind::Invalidated {
        source,
        what,
        cache,
        context,
        context_mask,
        first,
        last,
        generation,
        completion,
        ..
    } = &ev.kind
    else {
        return format!("an invalidation at {}", secs(ev.t));
    };
    let contexts = match *context_mask {
        u64::MAX => format!("context {context:#x}"),
        0 => "every context".to_string(),
        m => format!("contexts {:#x}/{m:#x}", context & m),
    };
    let range = if (*first, *last) == (0, u64::MAX) {
        "everything".to_string()
    } else {
        format!("[{first:#x}, {last:#x}]")
    };
    match generation {
        Some(g) => format!(
            "{source} {what} of {range} of the {cache} cache in {contexts} took effect at generation {g} and completed (completion {completion}) at {}",
            secs(ev.t)
        ),
        None => format!(
            "{source} {what} of {range} in {contexts} completed at {}",
            secs(ev.t)
        ),
    }
}

fn describe_derived(d: &Derived) -> String {
    match d {
        Derived::Translated { gpa, perms } => format!("gpa {gpa:#x} perms {perms:#x}"),
        Derived::Bypassed => "bypass".to_string(),
        Derived::Faulted { reason } => format!("a fault (reason {reason:#x})"),
    }
}

fn describe_divergence(d: &Divergence) -> String {
    format!(
        "served from the model's caches as {} at iova {:#x}, but guest memory now gives {}; the guest changed its tables or configuration without invalidating (TLBI/CFGI + CMD_SYNC)",
        describe_derived(&d.cached),
        d.iova,
        describe_derived(&d.fresh)
    )
}
