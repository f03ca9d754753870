//! The config cache: decoded STEs and CDs, kept until the matching CFGI.
//!
//! Every entry remembers the cache generation at which the fetch that produced it began, and
//! every invalidation returns the generation at which it took effect. A fetch that raced with an
//! invalidation is not inserted (the generation moved), so once an invalidation has run, no
//! entry it covers with an older fill generation remains: that is what the escape oracle's
//! `stale-config` rule checks.

use crate::cd::Cd;
use crate::ste::Ste;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A cached value and the generation its fetch began at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filled<T> {
    pub value: T,
    pub filled: u64,
}

type IdMap<K, V> = sluice_devapi::key_hash::KeyMap<K, V>;

/// Decoded STEs and CDs, kept until the matching CFGI.
#[derive(Debug)]
pub(crate) struct ConfigCache {
    stes: RwLock<IdMap<u32, Filled<Ste>>>,
    cds: RwLock<IdMap<(u32, u32), Filled<Cd>>>,
    generation: AtomicU64,
    capacity: usize,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl ConfigCache {
    pub(crate) fn new(capacity: usize) -> Self {
        ConfigCache {
            stes: RwLock::new(IdMap::default()),
            cds: RwLock::new(IdMap::default()),
            generation: AtomicU64::new(0),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn ste(&self, sid: u32) -> Option<Filled<Ste>> {
        read(&self.stes).get(&sid).copied()
    }

    pub(crate) fn cd(&self, sid: u32, ssid: u32) -> Option<Filled<Cd>> {
        read(&self.cds).get(&(sid, ssid)).copied()
    }

    /// The generation to read before a fetch and pass to `put_*`.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Moves the generation on; returns the new one (the invalidation's generation).
    pub(crate) fn advance(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn put_ste(&self, sid: u32, ste: Ste, generation: u64) {
        let mut m = write(&self.stes);
        if self.generation() == generation {
            if m.len() >= self.capacity {
                m.clear();
            }
            m.insert(
                sid,
                Filled {
                    value: ste,
                    filled: generation,
                },
            );
        }
    }

    pub(crate) fn put_cd(&self, sid: u32, ssid: u32, cd: Cd, generation: u64) {
        let mut m = write(&self.cds);
        if self.generation() == generation {
            if m.len() >= self.capacity {
                m.clear();
            }
            m.insert(
                (sid, ssid),
                Filled {
                    value: cd,
                    filled: generation,
                },
            );
        }
    }

    /// Invalidates the STEs (and their CDs) of SIDs in `[lo, hi]`; returns the generation at
    /// which it took effect. With `remove` false only the generation moves (fault injection:
    /// a CFGI the model forgets to apply).
    pub(crate) fn invalidate_sids(&self, lo: u32, hi: u32, remove: bool) -> u64 {
        let mut s = write(&self.stes);
        let mut c = write(&self.cds);
        let generation = self.advance();
        if remove {
            if lo == hi {
                s.remove(&lo);
            } else {
                s.retain(|sid, _| !(lo..=hi).contains(sid));
            }
            c.retain(|(sid, _), _| !(lo..=hi).contains(sid));
        }
        generation
    }

    /// Invalidates one CD, or all of a stream's; returns the generation (see
    /// [`ConfigCache::invalidate_sids`] for `remove`).
    pub(crate) fn invalidate_cd(&self, sid: u32, ssid: Option<u32>, remove: bool) -> u64 {
        let mut c = write(&self.cds);
        let generation = self.advance();
        if remove {
            match ssid {
                Some(ssid) => {
                    c.remove(&(sid, ssid));
                }
                None => c.retain(|(s, _), _| *s != sid),
            }
        }
        generation
    }

    pub(crate) fn clear(&self) {
        let mut s = write(&self.stes);
        let mut c = write(&self.cds);
        self.advance();
        s.clear();
        c.clear();
    }
}
