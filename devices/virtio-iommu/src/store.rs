//! One domain's mappings: an interval map keyed by IOVA start (a `BTreeMap`), so lookup, MAP
//! and UNMAP cost O(log n) plus the mappings they touch.
//!
//! Mappings never overlap, so the mapping that may contain an address is the one with the
//! greatest start at or below it (`range(..=addr).next_back()`). Ends are inclusive, as on the
//! wire, so a mapping may end at `u64::MAX`.
//!
//! In front of the tree sits a page index: every 4 KiB page of a page-aligned mapping of at most
//! [`INDEXED_PAGES`] pages (what Linux's DMA API maps in strict and lazy mode) is a key of a hash
//! map holding the mapping. A lookup probes it first (one probe, whatever the number of
//! mappings) and asks a second, small tree of the other mappings (large or unaligned ones) only
//! on a miss. An indexed mapping covers its pages whole and mappings never overlap, so a page
//! found in the index has no other mapping that could contain the address.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;

use sluice_devapi::key_hash::KeyHasher;

use thiserror::Error;

/// One MAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Guest-physical address of the first byte.
    pub phys: u64,
    /// `VIRTIO_IOMMU_MAP_F_*`.
    pub flags: u32,
}

/// Why the store refused a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum StoreError {
    /// The new mapping overlaps an existing one.
    #[error("range {start:#x}..={end:#x} overlaps an existing mapping")]
    Overlap {
        /// First IOVA requested.
        start: u64,
        /// Last IOVA requested.
        end: u64,
    },
    /// The unmap range cuts a mapping in two.
    #[error("unmap {start:#x}..={end:#x} would split a mapping")]
    Split {
        /// First IOVA requested.
        start: u64,
        /// Last IOVA requested.
        end: u64,
    },
}

/// Mappings of at most this many 4 KiB pages (page aligned) are found by one hash probe.
pub const INDEXED_PAGES: u64 = 16;

const PAGE_SHIFT: u32 = 12;

/// A domain's mappings.
#[derive(Debug, Default, Clone)]
pub struct MapStore {
    /// Every mapping, by start: overlap checks, UNMAP, iteration.
    map: BTreeMap<u64, Mapping>,
    /// Page number → (start, mapping) for every page of an indexed mapping.
    pages: HashMap<u64, (u64, Mapping), BuildHasherDefault<KeyHasher>>,
    /// The mappings not in `pages` (larger, or not page aligned), by start.
    other: BTreeMap<u64, Mapping>,
}

/// The pages of `[start, m.end]` if the mapping is indexed: page aligned at both ends and at
/// most [`INDEXED_PAGES`] long.
fn indexed_pages(start: u64, m: &Mapping) -> Option<std::ops::RangeInclusive<u64>> {
    let page = (1u64 << PAGE_SHIFT) - 1;
    let aligned = start & page == 0 && m.end & page == page;
    let (first, last) = (start >> PAGE_SHIFT, m.end >> PAGE_SHIFT);
    (aligned && last - first < INDEXED_PAGES).then_some(first..=last)
}

impl MapStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No mappings.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The mapping containing `iova`, with its start.
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<(u64, Mapping)> {
        if let Some(hit) = self.pages.get(&(iova >> PAGE_SHIFT)) {
            return Some(*hit);
        }
        let (&start, m) = self.other.range(..=iova).next_back()?;
        (m.end >= iova).then_some((start, *m))
    }

    /// The lookup the page index replaced: the whole tree. For tests comparing the two.
    #[doc(hidden)]
    pub fn lookup_in_tree(&self, iova: u64) -> Option<(u64, Mapping)> {
        let (&start, m) = self.map.range(..=iova).next_back()?;
        (m.end >= iova).then_some((start, *m))
    }

    /// True if any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.map
            .range(..=end)
            .next_back()
            .is_some_and(|(_, m)| m.end >= start)
    }

    /// Adds `[start, end] → phys`. The caller has validated the range.
    pub fn insert(&mut self, start: u64, mapping: Mapping) -> Result<(), StoreError> {
        if self.overlaps(start, mapping.end) {
            return Err(StoreError::Overlap {
                start,
                end: mapping.end,
            });
        }
        self.map.insert(start, mapping);
        match indexed_pages(start, &mapping) {
            Some(pages) => pages.for_each(|p| {
                self.pages.insert(p, (start, mapping));
            }),
            None => {
                self.other.insert(start, mapping);
            }
        }
        Ok(())
    }

    /// Removes every mapping inside `[start, end]`; refuses (removing nothing) if a mapping
    /// straddles either bound. Returns the removed mappings as `(start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let split = |a: u64| {
            self.lookup_in_tree(a)
                .is_some_and(|(s, m)| (a == start && s < start) || (a == end && m.end > end))
        };
        if split(start) || split(end) {
            return Err(StoreError::Split { start, end });
        }
        let keys: Vec<(u64, u64)> = self
            .map
            .range(start..=end)
            .map(|(&s, m)| (s, m.end))
            .collect();
        for (s, _) in &keys {
            let Some(m) = self.map.remove(s) else {
                continue;
            };
            match indexed_pages(*s, &m) {
                Some(pages) => pages.for_each(|p| {
                    self.pages.remove(&p);
                }),
                None => {
                    self.other.remove(s);
                }
            }
        }
        Ok(keys)
    }

    /// Every mapping, in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Mapping)> {
        self.map.iter().map(|(&s, m)| (s, m))
    }

    /// Mappings from the one containing `iova` (or the first after it) onwards.
    pub fn starting_at(&self, iova: u64) -> impl Iterator<Item = (u64, &Mapping)> {
        let first = self.lookup(iova).map_or(iova, |(s, _)| s);
        self.map.range(first..).map(|(&s, m)| (s, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(end: u64) -> Mapping {
        Mapping {
            end,
            phys: 0,
            flags: 3,
        }
    }

    #[test]
    fn spec_unmap_examples() {
        // (1) unmap on empty succeeds.
        let mut s = MapStore::new();
        assert_eq!(s.remove(0, 4), Ok(vec![]));
        // (2)
        s.insert(0, m(9)).unwrap();
        assert_eq!(s.remove(0, 9), Ok(vec![(0, 9)]));
        // (3)
        s.insert(0, m(4)).unwrap();
        s.insert(5, m(9)).unwrap();
        assert_eq!(s.remove(0, 9), Ok(vec![(0, 4), (5, 9)]));
        // (4) split refused, nothing removed.
        s.insert(0, m(9)).unwrap();
        assert_eq!(s.remove(0, 4), Err(StoreError::Split { start: 0, end: 4 }));
        assert_eq!(s.len(), 1);
        assert_eq!(s.remove(5, 9), Err(StoreError::Split { start: 5, end: 9 }));
        s.remove(0, 9).unwrap();
        // (5)
        s.insert(0, m(4)).unwrap();
        s.insert(5, m(9)).unwrap();
        assert_eq!(s.remove(0, 4), Ok(vec![(0, 4)]));
        assert!(s.lookup(5).is_some());
        s.remove(0, 100).unwrap();
        // (6)
        s.insert(0, m(4)).unwrap();
        assert_eq!(s.remove(0, 9), Ok(vec![(0, 4)]));
        // (7)
        s.insert(0, m(4)).unwrap();
        s.insert(10, m(14)).unwrap();
        assert_eq!(s.remove(0, 14), Ok(vec![(0, 4), (10, 14)]));
        assert!(s.is_empty());
    }

    #[test]
    fn overlap_and_lookup_at_the_edges() {
        let mut s = MapStore::new();
        s.insert(0x1000, m(0x1fff)).unwrap();
        s.insert(u64::MAX - 0xfff, m(u64::MAX)).unwrap();
        assert!(s.insert(0x1fff, m(0x2fff)).is_err());
        assert!(s.insert(0, m(0x1000)).is_err());
        assert!(s.insert(0, m(0xfff)).is_ok());
        assert!(s.insert(0x2000, m(0x2fff)).is_ok());
        assert_eq!(s.lookup(0x1fff).map(|x| x.0), Some(0x1000));
        assert_eq!(s.lookup(u64::MAX).map(|x| x.0), Some(u64::MAX - 0xfff));
        assert!(s.lookup(0x3000).is_none());
        assert_eq!(
            s.starting_at(0x1800).map(|x| x.0).collect::<Vec<_>>(),
            vec![0x1000, 0x2000, u64::MAX - 0xfff]
        );
        assert_eq!(s.remove(0, u64::MAX).map(|v| v.len()), Ok(4));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5709_e001),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// The page index answers exactly what the tree answers, through any sequence of MAPs
        /// and UNMAPs of aligned, unaligned, small, large and top-of-space ranges.
        #[test]
        fn page_index_agrees_with_the_tree(
            ops in proptest::collection::vec(
                (proptest::prelude::any::<bool>(), 0u64..64, 0u64..40, 0u8..4),
                1..80,
            ),
            probes in proptest::collection::vec(0u64..(70 << 12), 64),
        ) {
            let mut s = MapStore::new();
            for (map, page, len, shape) in ops {
                // Shapes: page aligned; unaligned start; unaligned end; the top of the space.
                let (start, end) = match shape {
                    0 => (page << 12, ((page + len + 1) << 12) - 1),
                    1 => ((page << 12) + 0x800, ((page + len + 1) << 12) - 1),
                    2 => (page << 12, ((page + len) << 12) + 0x7ff),
                    _ => (u64::MAX - (len << 12) - 0xfff, u64::MAX),
                };
                if map {
                    let _ = s.insert(start, Mapping { end, phys: page << 20, flags: 3 });
                } else {
                    let _ = s.remove(start, end);
                }
                for &a in probes.iter().chain(&[u64::MAX, u64::MAX - 0x1000, 0]) {
                    proptest::prop_assert_eq!(s.lookup(a), s.lookup_in_tree(a), "at {:#x}", a);
                }
            }
        }
    }
}
