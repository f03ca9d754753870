//! One domain's mappings: an interval map keyed by IOVA start (a `BTreeMap`), so lookup, MAP
//! and UNMAP cost O(log n) plus the mappings they touch.
//!
//! Mappings never overlap, so the mapping that may contain an address is the one with the
//! greatest start at or below it (`range(..=addr).next_back()`). Ends are inclusive, as on the
//! wire, so a mapping may end at `u64::MAX`.

use std::collections::BTreeMap;

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

/// A domain's mappings.
#[derive(Debug, Default, Clone)]
pub struct MapStore {
    map: BTreeMap<u64, Mapping>,
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
    pub fn lookup(&self, iova: u64) -> Option<(u64, Mapping)> {
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
        Ok(())
    }

    /// Removes every mapping inside `[start, end]`; refuses (removing nothing) if a mapping
    /// straddles either bound. Returns the removed mappings as `(start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let split = |a: u64| {
            self.lookup(a)
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
            self.map.remove(s);
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
}
