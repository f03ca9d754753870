//! What the model tells the escape oracle about its shadow IOTLB (`sluice_devapi::Invalidation`,
//! `CachedTranslation`).
//!
//! Each function counts its *refreshes*: every RPCIT commit and every drop of all shadow
//! entries (IOAT deregistration or replacement, disable, deconfigure, reserve) adds one. A shadow
//! entry remembers the refresh that installed or last confirmed it (its fill generation). A DMA
//! reports the entries it used and the refresh count it saw; an RPCIT that answered cc 0 reports
//! the range it walked, and a drop reports everything, both with their refresh number as
//! generation and completion. A correct model then never serves, after a refresh, an entry of
//! that refresh's range filled before it: RPCIT re-installs every valid frame of its range (with
//! the new number) and removes the rest. Contexts are function indexes.
//!
//! An RPCIT that did not answer cc 0 (insufficient resources, a malformed table, any refusal) is
//! not reported: the guest cannot rely on it, and the model may legitimately keep old entries.

use sluice_devapi::{CacheKind, CacheUse, ContextSel, Endpoint, Invalidation};
use std::time::Instant;

use crate::model::{Slot, Zpci};

/// `source` of every report.
pub const SOURCE: &str = "zpci";

/// Cached entries listed per DMA; further ones are not listed (see `sluice_devapi::CacheUse`).
pub const MAX_LISTED_USES: usize = 8;

/// Deliberate model bugs, for escape-oracle tests only. Everything else runs the real path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultInjection {
    /// RPCIT installs the valid frames of its range but keeps the shadow entries of frames the
    /// tables no longer map.
    pub skip_rpcit_invalidation: bool,
}

/// The shadow entries one DMA used, merged where consecutive pieces share a fill generation.
#[derive(Debug, Default)]
pub(crate) struct Uses {
    list: [CacheUse; MAX_LISTED_USES],
    len: usize,
}

impl Uses {
    pub(crate) fn record(&mut self, context: u64, first: u64, last: u64, filled: u64) {
        if let Some(prev) = self
            .len
            .checked_sub(1)
            .and_then(|i| self.list.get_mut(i))
            .filter(|p| p.filled == filled && p.last.checked_add(1) == Some(first))
        {
            prev.last = last;
            return;
        }
        if let Some(slot) = self.list.get_mut(self.len) {
            *slot = CacheUse {
                cache: CacheKind::Translation,
                context,
                first,
                last,
                filled,
            };
            self.len += 1;
        }
    }

    pub(crate) fn as_slice(&self) -> &[CacheUse] {
        self.list.get(..self.len).unwrap_or(&[])
    }
}

impl Zpci {
    /// Reports that function `slot` (handle `fh`) dropped or refreshed `[first, last]` at
    /// refresh number `refresh`. Call with no function lock held.
    pub(crate) fn report_refresh(
        &self,
        slot: &Slot,
        fh: u32,
        kind: &str,
        (first, last): (u64, u64),
        refresh: u64,
    ) {
        self.hooks.invalidated(&Invalidation {
            source: SOURCE,
            kind,
            cache: CacheKind::Translation,
            endpoint: Some(Endpoint::Zpci { fh }),
            contexts: ContextSel::exact(u64::from(slot.idx)),
            first,
            last,
            generation: Some(refresh),
            completion: refresh,
            completed_at: Instant::now(),
        });
    }

    /// Reports a drop of every shadow entry that an instruction left in the function's state
    /// (see `FnInner::drop_translations`). Call with no function lock held.
    pub(crate) fn report_drops(&self, slot: &Slot) {
        let dropped = {
            let mut g = slot.write();
            g.unreported_drop
                .take()
                .map(|(refresh, why)| (refresh, why, g.fh(slot.idx)))
        };
        if let Some((refresh, why, fh)) = dropped {
            self.report_refresh(slot, fh, why, (0, u64::MAX), refresh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pieces_of_one_refresh_merge_and_the_list_is_bounded() {
        let mut u = Uses::default();
        u.record(1, 0x1000, 0x1fff, 4);
        u.record(1, 0x2000, 0x2fff, 4);
        u.record(1, 0x3000, 0x3fff, 5);
        assert_eq!(u.as_slice().len(), 2);
        assert_eq!(
            (u.as_slice()[0].first, u.as_slice()[0].last),
            (0x1000, 0x2fff)
        );
        for i in 0..100u64 {
            u.record(1, i << 20, (i << 20) + 0xfff, i);
        }
        assert_eq!(u.as_slice().len(), MAX_LISTED_USES);
    }
}
