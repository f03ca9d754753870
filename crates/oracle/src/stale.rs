//! Mapping-level `stale-config`: the IOVA ranges each IOMMU context had invalidated (and, for
//! models that announce mappings, not re-mapped since), and the test of a translated DMA against
//! them (`docs/escape-oracle.md`, "Mapping-level `stale-config`").
//!
//! Two kinds of evidence, depending on what the model can report:
//!
//! - **Without fill generations** (virtio-iommu): the model announces every MAP before it is
//!   visible and every completed UNMAP. A translated DMA reported after the UNMAP, in that
//!   domain, at an address the UNMAP covered and no MAP covered since, is stale. Report order is
//!   enough because the seam reports each access while it holds the cache entry it used, and the
//!   UNMAP completes only after invalidating (which waits for such accesses).
//! - **With fill generations** (SMMUv3, zPCI): page tables live in guest memory and new
//!   mappings are not observable, so ranges are never cleared by mappings. Instead every cached
//!   entry a DMA used carries the generation its walk began at, and the DMA the model's
//!   completion number when it began. The use is stale when an invalidation covers the entry,
//!   took effect at a later generation than the entry's walk began at, and had completed before
//!   the DMA began. A fresh walk after the invalidation has a fill generation at least as large
//!   and is never stale; so is a DMA that overlapped the invalidation.
//!
//! Memory is bounded: each context keeps at most `cap` disjoint ranges (oldest evicted first),
//! at most `max_sets` contexts are kept, and both losses are counted in `dropped`. Overlapping
//! invalidations overwrite each other's pieces (the newer one is the stronger claim for every
//! use after it completed); adjacent pieces merge only when merging cannot change a verdict.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use sluice_devapi::{CacheKind, CacheUse, ContextSel};

use crate::timeline::TimelineEvent;

/// Default bound on the ranges kept per context.
pub const DEFAULT_RANGES_PER_CONTEXT: usize = 4096;
/// Default bound on the contexts (exact or wildcard) kept per oracle.
pub const DEFAULT_CONTEXTS: usize = 1024;

/// What one kept range says.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    /// See `sluice_devapi::Invalidation::generation`.
    pub generation: Option<u64>,
    /// See `sluice_devapi::Invalidation::completion`.
    pub completion: u64,
    /// The timeline record of the invalidation, shown with an escape it explains.
    pub cause: Arc<TimelineEvent>,
    /// Insertion order (eviction).
    seq: u64,
}

impl Meta {
    pub(crate) fn new(generation: Option<u64>, completion: u64, cause: Arc<TimelineEvent>) -> Self {
        Meta {
            generation,
            completion,
            cause,
            seq: 0,
        }
    }

    /// Whether two adjacent pieces may become one without changing any verdict: both without
    /// generations (only presence counts; the newer cause is kept), or pieces of one
    /// invalidation.
    fn merges_with(&self, other: &Meta) -> bool {
        match (self.generation, other.generation) {
            (None, None) => true,
            (a, b) => a == b && self.completion == other.completion,
        }
    }
}

#[derive(Debug, Clone)]
struct Piece {
    last: u64,
    meta: Meta,
}

/// Disjoint inclusive ranges with their metadata, bounded.
#[derive(Debug)]
pub(crate) struct RangeSet {
    map: BTreeMap<u64, Piece>,
    /// (start, seq) in insertion order; entries whose piece moved or went are skipped lazily.
    order: VecDeque<(u64, u64)>,
    next_seq: u64,
    cap: usize,
}

impl RangeSet {
    pub(crate) fn new(cap: usize) -> Self {
        RangeSet {
            map: BTreeMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            cap: cap.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    fn put(&mut self, first: u64, piece: Piece) {
        self.order.push_back((first, piece.meta.seq));
        self.map.insert(first, piece);
    }

    /// Removes `[first, last]` from every piece (pieces reaching outside keep their outside).
    pub(crate) fn clear(&mut self, first: u64, last: u64) {
        let hit: Vec<u64> = self
            .map
            .range(..=last)
            .rev()
            .take_while(|(_, p)| p.last >= first)
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            let Some(p) = self.map.remove(&s) else {
                continue;
            };
            if s < first {
                self.put(
                    s,
                    Piece {
                        last: first - 1,
                        meta: p.meta.clone(),
                    },
                );
            }
            if p.last > last {
                self.put(last + 1, p);
            }
        }
    }

    /// Records `[first, last]` with `meta`, replacing what it overlaps; returns how many pieces
    /// were evicted to stay within the bound.
    pub(crate) fn insert(&mut self, first: u64, last: u64, mut meta: Meta) -> usize {
        self.clear(first, last);
        meta.seq = self.next_seq;
        self.next_seq += 1;
        let (mut first, mut last) = (first, last);
        if let Some(prev) = first.checked_sub(1)
            && let Some((&s, p)) = self.map.range(..=prev).next_back()
            && p.last == prev
            && p.meta.merges_with(&meta)
        {
            self.map.remove(&s);
            first = s;
        }
        if let Some(next) = last.checked_add(1)
            && let Some(p) = self.map.get(&next)
            && p.meta.merges_with(&meta)
        {
            last = p.last;
            self.map.remove(&next);
        }
        self.put(first, Piece { last, meta });
        self.evict()
    }

    fn evict(&mut self) -> usize {
        let mut evicted = 0;
        while self.map.len() > self.cap {
            let Some((s, seq)) = self.order.pop_front() else {
                // Cannot happen (every piece has an order entry); never loop on it.
                match self.map.keys().next().copied() {
                    Some(k) => self.map.remove(&k),
                    None => break,
                };
                evicted += 1;
                continue;
            };
            if self.map.get(&s).is_some_and(|p| p.meta.seq == seq) {
                self.map.remove(&s);
                evicted += 1;
            }
        }
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(s, seq)| map.get(s).is_some_and(|p| p.meta.seq == *seq));
        }
        evicted
    }

    /// The pieces overlapping `[first, last]`, highest first.
    pub(crate) fn overlapping(&self, first: u64, last: u64) -> impl Iterator<Item = &Meta> {
        self.map
            .range(..=last)
            .rev()
            .take_while(move |(_, p)| p.last >= first)
            .map(|(_, p)| &p.meta)
    }
}

/// Which IOMMU (topology index) and cache a set belongs to.
type SetKey = (usize, CacheKind);

/// Every kept range, by IOMMU, cache and context.
#[derive(Debug)]
pub(crate) struct StaleStore {
    /// Ordered, not hashed: a DMA looks one up, and a B-tree probe of a few keys is cheaper
    /// than hashing the key.
    exact: BTreeMap<(SetKey, u64), RangeSet>,
    wildcard: Vec<(SetKey, ContextSel, RangeSet)>,
    ranges_per_context: usize,
    max_contexts: usize,
    /// Pieces evicted and invalidations not kept for lack of room.
    pub dropped: u64,
    /// Pieces kept over all sets.
    pub live: usize,
}

/// Why a use is stale: the invalidation that should have removed it.
pub(crate) type Verdict = Arc<TimelineEvent>;

impl StaleStore {
    pub(crate) fn new(ranges_per_context: usize, max_contexts: usize) -> Self {
        StaleStore {
            exact: BTreeMap::new(),
            wildcard: Vec::new(),
            ranges_per_context,
            max_contexts,
            dropped: 0,
            live: 0,
        }
    }

    fn contexts(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    fn set_mut(&mut self, key: SetKey, contexts: ContextSel) -> Option<&mut RangeSet> {
        let room = self.contexts() < self.max_contexts;
        let cap = self.ranges_per_context;
        if contexts.mask == u64::MAX {
            return match self.exact.entry((key, contexts.value)) {
                std::collections::btree_map::Entry::Occupied(e) => Some(e.into_mut()),
                std::collections::btree_map::Entry::Vacant(v) if room => {
                    Some(v.insert(RangeSet::new(cap)))
                }
                std::collections::btree_map::Entry::Vacant(_) => None,
            };
        }
        let normal = |c: ContextSel| (c.value & c.mask, c.mask);
        match self
            .wildcard
            .iter()
            .position(|(k, c, _)| *k == key && normal(*c) == normal(contexts))
        {
            Some(i) => self.wildcard.get_mut(i).map(|(_, _, s)| s),
            None if room => {
                self.wildcard.push((key, contexts, RangeSet::new(cap)));
                self.wildcard.last_mut().map(|(_, _, s)| s)
            }
            None => None,
        }
    }

    /// Records an invalidation of `[first, last]` of `contexts`.
    pub(crate) fn invalidate(
        &mut self,
        key: SetKey,
        contexts: ContextSel,
        (first, last): (u64, u64),
        meta: Meta,
    ) {
        let Some(set) = self.set_mut(key, contexts) else {
            self.dropped += 1;
            return;
        };
        let before = set.len();
        let evicted = set.insert(first, last, meta);
        let after = set.len();
        self.dropped += evicted as u64;
        self.live = (self.live + after).saturating_sub(before);
    }

    /// A mapping of `[first, last]` in `context` became visible: it is no longer stale there.
    pub(crate) fn mapped(&mut self, key: SetKey, context: u64, (first, last): (u64, u64)) {
        if let Some(set) = self.exact.get_mut(&(key, context)) {
            let before = set.len();
            set.clear(first, last);
            self.live = (self.live + set.len()).saturating_sub(before);
        }
    }

    /// The invalidation a translated access of `[first, last]` in `context` contradicts, for
    /// models without fill generations (every kept range without one counts).
    pub(crate) fn unmapped_use(
        &self,
        key: SetKey,
        context: u64,
        (first, last): (u64, u64),
    ) -> Option<Verdict> {
        let set = self.exact.get(&(key, context))?;
        set.overlapping(first, last)
            .find(|m| m.generation.is_none())
            .map(|m| m.cause.clone())
    }

    /// The invalidation that should have removed the cached entry `u`, used by a DMA that began
    /// after completion number `seen`.
    pub(crate) fn stale_use(&self, iommu: usize, u: &CacheUse, seen: u64) -> Option<Verdict> {
        let key = (iommu, u.cache);
        let stale = |m: &&Meta| m.generation.is_some_and(|g| u.filled < g) && seen >= m.completion;
        let exact = self
            .exact
            .get(&(key, u.context))
            .into_iter()
            .map(|s| (ContextSel::exact(u.context), s));
        let wild = self
            .wildcard
            .iter()
            .filter(|(k, _, _)| *k == key)
            .map(|(_, c, s)| (*c, s));
        exact
            .chain(wild)
            .filter(|(c, _)| c.covers(u.context))
            .find_map(|(_, s)| s.overlapping(u.first, u.last).find(stale).cloned())
            .map(|m| m.cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::EventKind;

    fn cause(n: u64) -> Arc<TimelineEvent> {
        Arc::new(TimelineEvent {
            t: n,
            tid: 0,
            kind: EventKind::Console {
                line: format!("cause {n}"),
            },
        })
    }

    fn plain(n: u64) -> Meta {
        Meta::new(None, 0, cause(n))
    }

    fn pieces(s: &RangeSet) -> Vec<(u64, u64)> {
        s.map.iter().map(|(a, p)| (*a, p.last)).collect()
    }

    #[test]
    fn unmaps_coalesce_and_maps_cut_holes() {
        let mut s = RangeSet::new(100);
        s.insert(0x1000, 0x1fff, plain(1));
        s.insert(0x2000, 0x2fff, plain(2));
        s.insert(0x4000, 0x4fff, plain(3));
        assert_eq!(pieces(&s), vec![(0x1000, 0x2fff), (0x4000, 0x4fff)]);
        s.clear(0x1800, 0x27ff);
        assert_eq!(
            pieces(&s),
            vec![(0x1000, 0x17ff), (0x2800, 0x2fff), (0x4000, 0x4fff)]
        );
        assert_eq!(s.overlapping(0x17ff, 0x2800).count(), 2);
        assert_eq!(s.overlapping(0x1800, 0x27ff).count(), 0);
        s.clear(0, u64::MAX);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_newer_invalidation_overwrites_and_pieces_of_different_generations_stay_apart() {
        let mut s = RangeSet::new(100);
        s.insert(0x1000, 0x4fff, Meta::new(Some(5), 1, cause(1)));
        s.insert(0x2000, 0x2fff, Meta::new(Some(9), 2, cause(2)));
        assert_eq!(
            pieces(&s),
            vec![(0x1000, 0x1fff), (0x2000, 0x2fff), (0x3000, 0x4fff)]
        );
        let gens: Vec<_> = s.overlapping(0, u64::MAX).map(|m| m.generation).collect();
        assert_eq!(gens, vec![Some(5), Some(9), Some(5)]);
        // The same invalidation arriving again next door merges with itself.
        s.insert(0x5000, 0x5fff, Meta::new(Some(5), 1, cause(3)));
        assert_eq!(pieces(&s).last(), Some(&(0x3000, 0x5fff)));
    }

    #[test]
    fn the_bound_evicts_oldest_first_and_the_top_of_the_space_works() {
        let mut s = RangeSet::new(4);
        let mut evicted = 0;
        for i in 0..10u64 {
            evicted += s.insert(i * 0x2000, i * 0x2000 + 0xfff, plain(i));
        }
        assert_eq!((s.len(), evicted), (4, 6));
        assert_eq!(pieces(&s).first(), Some(&(6 * 0x2000, 6 * 0x2000 + 0xfff)));
        s.insert(u64::MAX - 0xfff, u64::MAX, plain(99));
        s.insert(0, u64::MAX, plain(100));
        assert_eq!(pieces(&s), vec![(0, u64::MAX)]);
    }

    #[test]
    fn stale_uses_need_an_older_fill_and_a_completed_invalidation() {
        let mut st = StaleStore::new(16, 16);
        let key = (0, CacheKind::Translation);
        let tlbi = ContextSel::exact(7);
        st.invalidate(
            key,
            tlbi,
            (0x1000, 0x1fff),
            Meta::new(Some(10), 3, cause(1)),
        );
        let u = |filled| CacheUse {
            cache: CacheKind::Translation,
            context: 7,
            first: 0x1000,
            last: 0x1fff,
            filled,
        };
        assert!(
            st.stale_use(0, &u(9), 3).is_some(),
            "old entry after the sync"
        );
        assert!(st.stale_use(0, &u(10), 3).is_none(), "fresh walk");
        assert!(
            st.stale_use(0, &u(9), 2).is_none(),
            "DMA began before the sync"
        );
        assert!(st.stale_use(1, &u(9), 3).is_none(), "another IOMMU");
        let other = CacheUse { context: 8, ..u(9) };
        assert!(st.stale_use(0, &other, 3).is_none(), "another context");
        // A wildcard invalidation of every context of a VMID.
        let vmid = ContextSel {
            value: 1 << 32,
            mask: 0xffff << 32,
        };
        st.invalidate(key, vmid, (0, u64::MAX), Meta::new(Some(20), 4, cause(2)));
        let in_vmid = CacheUse {
            context: (1 << 32) | 5,
            ..u(15)
        };
        assert!(st.stale_use(0, &in_vmid, 4).is_some());
        assert_eq!(st.live, 2);
    }

    #[test]
    fn contexts_are_bounded_and_losses_counted() {
        let mut st = StaleStore::new(16, 2);
        let key = (0, CacheKind::Translation);
        for d in 0..5u64 {
            st.invalidate(key, ContextSel::exact(d), (0, 0xfff), plain(d));
        }
        assert_eq!((st.live, st.dropped), (2, 3));
        st.mapped(key, 0, (0, 0xfff));
        assert_eq!(st.live, 1);
        assert!(st.unmapped_use(key, 1, (0x800, 0x8ff)).is_some());
        assert!(st.unmapped_use(key, 0, (0x800, 0x8ff)).is_none());
    }
}
