//! The shadow IOTLB: what the function translates through, changed only by RPCIT (and cleared
//! by IOAT deregistration and release), plus the host mapping budget.
//!
//! Like QEMU's `iommu->iotlb`, entries are keyed by frame-aligned IOVA. 4 KiB pages and 1 MiB
//! segment frames live in two maps; a lookup probes the page map, then (only if any segment
//! frame is cached) the segment map. Each entry, of either size, costs one unit of budget
//! (QEMU shadows a 1 MiB frame as 256 page entries; one host mapping per frame is the better
//! model of what VFIO would be asked for).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use sluice_devapi::key_hash::KeyHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::walk::{Frame, Mapping, PAGE_SIZE, SEG_SIZE};

type FrameMap = HashMap<u64, Cached, BuildHasherDefault<KeyHasher>>;

/// An entry and the refresh that installed (or last confirmed) it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cached {
    entry: Entry,
    filled: u64,
}

/// One cached translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Guest-physical frame base.
    pub gpa: u64,
    /// Writes allowed.
    pub writable: bool,
}

/// Result of a lookup: the entry and the size of its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Entry.
    pub entry: Entry,
    /// Frame size.
    pub frame: Frame,
    /// The function's refresh count when the RPCIT that installed or last confirmed the entry
    /// committed (what the escape oracle compares with later refreshes of the frame).
    pub filled: u64,
}

/// Per-function shadow translations.
#[derive(Debug, Default)]
pub struct Iotlb {
    pages: FrameMap,
    segs: FrameMap,
}

/// Outcome of installing one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Identical entry already cached.
    Unchanged,
    /// An entry for the same frame was replaced.
    Replaced,
    /// New entry (costs one budget unit).
    Added,
}

impl Iotlb {
    /// Cached translation for `iova`.
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<Hit> {
        if let Some(c) = self.pages.get(&(iova >> 12)) {
            return Some(Hit {
                entry: c.entry,
                frame: Frame::Page,
                filled: c.filled,
            });
        }
        if self.segs.is_empty() {
            return None;
        }
        self.segs.get(&(iova >> 20)).map(|c| Hit {
            entry: c.entry,
            frame: Frame::Segment,
            filled: c.filled,
        })
    }

    /// Number of cached entries (budget units held).
    pub fn len(&self) -> usize {
        self.pages.len() + self.segs.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything; returns the number of entries dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.len();
        self.pages.clear();
        self.segs.clear();
        n
    }

    /// Whether installing `m` needs a new budget unit.
    pub fn would_add(&self, m: &Mapping) -> bool {
        match m.frame {
            Frame::Page => !self.pages.contains_key(&(m.iova >> 12)),
            Frame::Segment => !self.segs.contains_key(&(m.iova >> 20)),
        }
    }

    /// Installs `m` as confirmed by the refresh numbered `filled` (also when it is unchanged).
    /// Entries of the other size overlapping it are dropped; the number dropped is returned
    /// with the outcome.
    pub fn install(&mut self, m: &Mapping, filled: u64) -> (Install, usize) {
        let e = Entry {
            gpa: m.gpa,
            writable: m.writable,
        };
        let (map, key, dropped) = match m.frame {
            Frame::Page => {
                let d = self.segs.remove(&(m.iova >> 20)).map_or(0, |_| 1);
                (&mut self.pages, m.iova >> 12, d)
            }
            Frame::Segment => {
                let d = remove_range(&mut self.pages, m.iova, m.iova + SEG_SIZE, 12);
                (&mut self.segs, m.iova >> 20, d)
            }
        };
        let how = match map.insert(key, Cached { entry: e, filled }) {
            None => Install::Added,
            Some(old) if old.entry == e => Install::Unchanged,
            Some(_) => Install::Replaced,
        };
        (how, dropped)
    }

    /// Drops every entry overlapping `[start, end)`; returns how many.
    pub fn remove_range(&mut self, start: u64, end: u64) -> usize {
        remove_range(&mut self.pages, start, end, 12) + remove_range(&mut self.segs, start, end, 20)
    }

    /// Every cached page entry, for tests and reference comparisons: (iova, entry, frame).
    pub fn entries(&self) -> Vec<(u64, Entry, Frame)> {
        let mut v: Vec<_> = self
            .pages
            .iter()
            .map(|(k, c)| (k << 12, c.entry, Frame::Page))
            .chain(
                self.segs
                    .iter()
                    .map(|(k, c)| (k << 20, c.entry, Frame::Segment)),
            )
            .collect();
        v.sort_by_key(|(k, _, _)| *k);
        v
    }
}

fn remove_range(map: &mut FrameMap, start: u64, end: u64, shift: u32) -> usize {
    if map.is_empty() || end <= start {
        return 0;
    }
    let first = start >> shift;
    let last = (end - 1) >> shift;
    let span = last - first + 1;
    let before = map.len();
    if span > map.len() as u64 {
        map.retain(|k, _| *k < first || *k > last);
    } else {
        for k in first..=last {
            map.remove(&k);
        }
    }
    before - map.len()
}

/// Host mapping budget shared by every function of a model (QEMU's per-container
/// `S390PCIDMACount`, VFIO's `dma_entry_limit`). `None` = unlimited.
#[derive(Debug)]
pub struct Budget {
    limit: Option<u64>,
    used: AtomicU64,
}

impl Budget {
    /// A budget of `limit` entries.
    pub fn new(limit: Option<u64>) -> Self {
        Budget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Takes one unit; false when exhausted.
    pub fn try_take(&self) -> bool {
        let Some(limit) = self.limit else {
            self.used.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < limit).then_some(u + 1)
            })
            .is_ok()
    }

    /// Returns `n` units.
    pub fn give(&self, n: usize) {
        let n = n as u64;
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Units in use.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Units left (`u64::MAX` when unlimited).
    pub fn available(&self) -> u64 {
        self.limit
            .map_or(u64::MAX, |l| l.saturating_sub(self.used()))
    }
}

/// Page-aligned start of `iova`.
pub const fn page_of(iova: u64) -> u64 {
    iova & !(PAGE_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(iova: u64, gpa: u64) -> Mapping {
        Mapping {
            iova,
            gpa,
            frame: Frame::Page,
            writable: true,
        }
    }

    #[test]
    fn install_replace_remove() {
        let mut t = Iotlb::default();
        assert_eq!(t.install(&page(0x1000, 0x5000), 1).0, Install::Added);
        assert_eq!(t.install(&page(0x1000, 0x5000), 1).0, Install::Unchanged);
        assert_eq!(t.install(&page(0x1000, 0x6000), 2).0, Install::Replaced);
        assert_eq!(t.lookup(0x1fff).map(|h| h.entry.gpa), Some(0x6000));
        assert_eq!(t.lookup(0x1fff).map(|h| h.filled), Some(2));
        t.install(&page(0x1000, 0x6000), 5);
        assert_eq!(
            t.lookup(0x1000).map(|h| h.filled),
            Some(5),
            "an unchanged entry is confirmed by the later refresh"
        );
        let seg = Mapping {
            iova: 0,
            gpa: 0x10_0000,
            frame: Frame::Segment,
            writable: false,
        };
        assert_eq!(t.install(&seg, 3), (Install::Added, 1));
        assert_eq!(t.lookup(0x1000).map(|h| h.frame), Some(Frame::Segment));
        assert_eq!(t.remove_range(0x8000, 0x9000), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn budget_limits() {
        let b = Budget::new(Some(2));
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take());
        b.give(1);
        assert_eq!(b.available(), 1);
        b.give(10);
        assert_eq!(b.used(), 0);
    }
}
