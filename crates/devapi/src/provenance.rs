//! What an IOMMU model tells the escape oracle about its caches, so that the oracle can tell a
//! translation that outlived a completed invalidation (`stale-config`, a model bug) from a
//! legitimate one, and a cached translation from what guest memory says now (`unsynced-config`,
//! a guest-driver bug).
//!
//! Three kinds of report, each through a defaulted [`crate::Hooks`] method:
//!
//! - [`Invalidation`] (`Hooks::invalidated`): an UNMAP, TLBI/CFGI or RPCIT/deregistration has
//!   *completed*, i.e. the guest may now rely on it (virtio-iommu: the UNMAP's caches are
//!   invalidated before its status is returned; SMMUv3: the CMD_SYNC after the command; zPCI:
//!   the instruction's commit).
//! - [`MapEvent`] (`Hooks::mapped`): a mapping is about to become visible to translation
//!   (virtio-iommu MAP). Models whose mappings live in guest memory (SMMUv3 page tables, zPCI
//!   DMA tables) cannot announce this; they report [`CacheUse`]s instead, which say when each
//!   cached entry was filled.
//! - [`CachedTranslation`] (`Hooks::dma_cached`): a DMA served (partly) from a cache, with the
//!   entries it used and, when the hooks asked for it (`Hooks::recheck_cached`), whether a fresh
//!   derivation from guest memory agrees.
//!
//! Generations and completion numbers are the model's own counters; the oracle only compares
//! values from one model with each other, never with its clock.

use std::time::Instant;

use crate::endpoint::Endpoint;

/// The cache of an IOMMU model an entry or an invalidation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum CacheKind {
    /// Translations (IOTLB, virtio-iommu mappings, zPCI shadow entries).
    #[default]
    Translation,
    /// Configuration structures (SMMUv3 STEs and CDs).
    Config,
}

/// The cached contexts an invalidation covers: a context tag `t` is covered when
/// `t & mask == value & mask`. What a tag means is the model's choice, used consistently in its
/// [`Invalidation`]s and [`CacheUse`]s (virtio-iommu: the domain; SMMUv3 IOTLB:
/// `VMID << 32 | ASID`; SMMUv3 config cache: the StreamID; zPCI: the function index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContextSel {
    /// Tag bits that must match.
    pub value: u64,
    /// Which bits are compared (0: every context).
    pub mask: u64,
}

impl ContextSel {
    /// Every context.
    pub const ALL: ContextSel = ContextSel { value: 0, mask: 0 };

    /// Exactly the context `tag`.
    pub const fn exact(tag: u64) -> Self {
        ContextSel {
            value: tag,
            mask: u64::MAX,
        }
    }

    /// Whether `tag` is covered.
    pub const fn covers(&self, tag: u64) -> bool {
        tag & self.mask == self.value & self.mask
    }
}

/// An invalidation (or unmap) the guest may now rely on.
#[derive(Debug, Clone, Copy)]
pub struct Invalidation<'a> {
    /// The model, as in its `StateEvent::source` (`smmuv3`, `zpci`, the virtio-iommu's name).
    pub source: &'a str,
    /// What the guest asked for: `UNMAP`, `TLBI_NH_VA`, `CFGI_STE`, `RPCIT`, `DEREG_IOAT`, ...
    pub kind: &'a str,
    /// The cache concerned.
    pub cache: CacheKind,
    /// The endpoint concerned, when the invalidation is about one (a zPCI function, the stream
    /// of a CFGI_STE); lets the oracle find the IOMMU without knowing the model's name.
    pub endpoint: Option<Endpoint>,
    /// Contexts covered.
    pub contexts: ContextSel,
    /// First address covered (for the config cache: first slot, see [`CacheUse::first`]).
    pub first: u64,
    /// Last address covered, inclusive (`u64::MAX` with `first == 0`: everything).
    pub last: u64,
    /// The model's cache generation at which the invalidation took effect: a correct model
    /// holds no covered entry filled at an earlier generation once the invalidation completed.
    /// `None` when the model reports no fill generations for this cache; then every translated
    /// use of a covered address after this report is stale until a [`MapEvent`] covers it again.
    pub generation: Option<u64>,
    /// The model's completion number of this invalidation (SMMUv3: the CMD_SYNC count; zPCI: the
    /// function's refresh count). Uses that began before it ([`CachedTranslation::completions_seen`]
    /// smaller) may still hold the old translation.
    pub completion: u64,
    /// When the invalidation completed.
    pub completed_at: Instant,
}

/// A mapping about to become visible to translation (announced before it is).
#[derive(Debug, Clone, Copy)]
pub struct MapEvent<'a> {
    /// The model, as in its `StateEvent::source`.
    pub source: &'a str,
    /// The context (virtio-iommu: the domain).
    pub context: u64,
    /// First IOVA.
    pub first: u64,
    /// Last IOVA, inclusive.
    pub last: u64,
}

/// One cached entry a translation used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheUse {
    /// The cache it came from.
    pub cache: CacheKind,
    /// Its context tag (see [`ContextSel`]).
    pub context: u64,
    /// First address the entry covers. Config entries use slots: 0 is the STE, `n + 1` the CD
    /// of substream `n`.
    pub first: u64,
    /// Last address it covers, inclusive.
    pub last: u64,
    /// The model's cache generation when the walk or fetch that produced it began.
    pub filled: u64,
}

/// What a model's translation looks like, for comparing a cached one with a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// Translated to `gpa` with model-defined permission bits `perms`.
    Translated {
        /// Guest-physical address of the byte at the divergence.
        gpa: u64,
        /// Permission bits (the model's encoding).
        perms: u8,
    },
    /// Untranslated (bypass).
    Bypassed,
    /// Refused with a model reason code.
    Faulted {
        /// Reason (event code).
        reason: u32,
    },
}

/// A cached translation that guest memory no longer agrees with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Divergence {
    /// First IOVA at which the two differ.
    pub iova: u64,
    /// What the caches gave there.
    pub cached: Derived,
    /// What a fresh derivation from guest memory gives there.
    pub fresh: Derived,
}

/// How a DMA reported through `Hooks::dma_cached` was served.
#[derive(Debug, Clone, Copy)]
pub struct CachedTranslation<'a> {
    /// The model, as in its `StateEvent::source`.
    pub source: &'a str,
    /// Cached entries used (a model may stop listing after a few; fresh walks are not listed).
    pub uses: &'a [CacheUse],
    /// The model's completion number when the translation began.
    pub completions_seen: u64,
    /// Set when the model re-derived the translation from guest memory (because
    /// `Hooks::recheck_cached` asked) and the result differs.
    pub divergence: Option<Divergence>,
    /// Whether the model re-derived it at all.
    pub rechecked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_selectors_cover_what_they_say() {
        assert!(ContextSel::ALL.covers(0xdead_beef));
        assert!(ContextSel::exact(7).covers(7));
        assert!(!ContextSel::exact(7).covers(8));
        // An aligned block of 4 tags, as CFGI_STE_RANGE selects StreamIDs.
        let block = ContextSel {
            value: 0x10,
            mask: !3,
        };
        assert!((0x10..=0x13).all(|t| block.covers(t)));
        assert!(!block.covers(0x14) && !block.covers(0xf));
    }
}
