//! The DMA hot path: `translate(&self, mem, fh, iova, len, write)`.
//!
//! A hit costs one uncontended read lock of the function and one hash probe per 4 KiB (or
//! 1 MiB) piece. Every DMA is reported through [`Hooks::dma`](sluice_devapi::Hooks::dma) after
//! the lock is released; `Translated.domain` carries the low 32 bits of the function generation
//! that translated it, so an oracle can order it against release events.

use sluice_devapi::{CachedTranslation, DmaDirection, DmaOutcome, DmaRecord, Endpoint};
use thiserror::Error;
use vm_memory::GuestMemoryBackend;

use crate::codes::{pec, reason};
use crate::function::{FunctionState, fh};
use crate::model::{FnInner, Slot, TlbMode, Zpci};
use crate::provenance::{SOURCE, Uses};
use crate::walk::{Step, walk_one};

/// One contiguous guest-physical piece of a translated DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First IOVA of the piece.
    pub iova: u64,
    /// Guest-physical address of that byte.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

/// A successful translation, split at frame (4 KiB or 1 MiB) boundaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    /// Pieces in IOVA order, covering the whole DMA.
    pub pieces: Vec<Piece>,
    /// Function generation that produced it.
    pub generation: u64,
}

/// Why a DMA was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The function was released (deconfigured/reserved) or the handle is from an earlier
    /// configuration.
    AfterRelease,
    /// Unknown handle index.
    NoSuchFunction,
    /// Not enabled (disabled, or never configured).
    NotEnabled,
    /// Function in the error state.
    InError,
    /// Function in the blocked state.
    Blocked,
    /// No IOTA registered.
    NoIoat,
    /// Zero-length DMA.
    ZeroLength,
    /// Outside `[pba, pal]` (error event OORANGE).
    OutOfWindow,
    /// No valid translation (error event TPROTE).
    NotMapped,
    /// Write to a protected page (error event TPROTE).
    WriteProtected,
    /// Malformed table met while walking in [`TlbMode::AlwaysWalk`] (error event per entry).
    BadTable,
}

/// A refused DMA; nothing reached memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("zPCI DMA refused at {iova:#x}: {kind:?} (reason {reason:#x})")]
pub struct DmaRefusal {
    /// Classification.
    pub kind: RefusalKind,
    /// Reason code reported in [`DmaOutcome::Faulted`]: a [`pec`] code when the refusal is an
    /// error event, else a [`reason`] code.
    pub reason: u32,
    /// Faulting IOVA.
    pub iova: u64,
}

impl DmaRefusal {
    fn new(kind: RefusalKind, reason: u32, iova: u64) -> Self {
        DmaRefusal { kind, reason, iova }
    }
}

/// What a DMA saw of the shadow IOTLB, for the oracle.
#[derive(Debug, Default)]
struct Seen {
    /// The function's refresh count when the lookups began.
    refreshes: u64,
    /// Shadow entries used.
    uses: Uses,
}

/// A refusal that is also an error event (state → error).
struct Fault {
    kind: RefusalKind,
    pec: u16,
    iova: u64,
}

enum Failure {
    Plain(DmaRefusal),
    Event(Fault),
}

impl Zpci {
    /// Translates a DMA of `len` bytes at `iova` by function `fh`.
    pub fn translate<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        fh: u32,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<Translation, DmaRefusal> {
        let mut pieces = Vec::new();
        let generation = self.translate_into(mem, fh, iova, len, write, &mut pieces)?;
        Ok(Translation { pieces, generation })
    }

    /// Like [`Zpci::translate`] but appends the pieces to `out` (no allocation once `out` has
    /// capacity); returns the generation.
    pub fn translate_into<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        fh: u32,
        iova: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Piece>,
    ) -> Result<u64, DmaRefusal> {
        let start_len = out.len();
        let mut seen = Seen::default();
        let result = self.translate_checked(mem, fh, iova, len, write, out, &mut seen);
        let direction = if write {
            DmaDirection::Write
        } else {
            DmaDirection::Read
        };
        let outcome = match &result {
            Ok(epoch) => DmaOutcome::Translated {
                gpa: out.get(start_len).map_or(0, |p| p.gpa),
                domain: *epoch as u32,
            },
            Err(r) => {
                out.truncate(start_len);
                DmaOutcome::Faulted { reason: r.reason }
            }
        };
        let rec = DmaRecord {
            endpoint: Endpoint::Zpci { fh },
            iova,
            len,
            direction,
            outcome,
        };
        if seen.uses.as_slice().is_empty() {
            self.hooks.dma(&rec);
        } else {
            self.hooks.dma_cached(
                &rec,
                &CachedTranslation {
                    source: SOURCE,
                    uses: seen.uses.as_slice(),
                    completions_seen: seen.refreshes,
                    divergence: None,
                    rechecked: false,
                },
            );
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn translate_checked<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        handle: u32,
        iova: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Piece>,
        seen: &mut Seen,
    ) -> Result<u64, DmaRefusal> {
        let Some(slot) = self.slot_by_fh(handle) else {
            return Err(DmaRefusal::new(
                RefusalKind::NoSuchFunction,
                reason::NO_SUCH_FUNCTION,
                iova,
            ));
        };
        let (epoch, failure) = {
            let g = slot.read();
            seen.refreshes = g.refreshes;
            match self.translate_locked(mem, slot, &g, handle, iova, len, write, out, seen) {
                Ok(()) => return Ok(g.epoch),
                Err(Failure::Plain(r)) => return Err(r),
                Err(Failure::Event(f)) => (g.epoch, f),
            }
        };
        let refusal = DmaRefusal::new(failure.kind, u32::from(failure.pec), failure.iova);
        let ev = {
            let mut g = slot.write();
            // Only the state the DMA was judged against may be put into error.
            (g.epoch == epoch && g.state == FunctionState::Enabled)
                .then(|| Zpci::fault_locked(slot, &mut g, failure.pec, failure.iova))
        };
        if let Some(ev) = ev {
            self.emit_error(ev);
        }
        Err(refusal)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn translate_locked<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        slot: &Slot,
        g: &FnInner,
        handle: u32,
        iova: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Piece>,
        seen: &mut Seen,
    ) -> Result<(), Failure> {
        let plain = |kind, reason| Err(Failure::Plain(DmaRefusal::new(kind, reason, iova)));
        if handle & fh::INSTANCE != g.fh(slot.idx) & fh::INSTANCE {
            return plain(RefusalKind::AfterRelease, reason::AFTER_RELEASE);
        }
        match g.state {
            FunctionState::Enabled => {}
            FunctionState::Reserved | FunctionState::Standby if g.released => {
                return plain(RefusalKind::AfterRelease, reason::AFTER_RELEASE);
            }
            FunctionState::Reserved | FunctionState::Standby | FunctionState::Disabled => {
                return plain(RefusalKind::NotEnabled, reason::NOT_ENABLED);
            }
            FunctionState::Error => return plain(RefusalKind::InError, reason::IN_ERROR),
            FunctionState::Blocked => return plain(RefusalKind::Blocked, reason::BLOCKED),
        }
        let Some(ioat) = g.ioat.as_ref() else {
            return plain(RefusalKind::NoIoat, reason::NO_IOAT);
        };
        if len == 0 {
            return plain(RefusalKind::ZeroLength, reason::ZERO_LENGTH);
        }
        let event = |kind, pec, at| {
            Err(Failure::Event(Fault {
                kind,
                pec,
                iova: at,
            }))
        };
        let last = match iova.checked_add(len - 1) {
            Some(l) if iova >= ioat.pba && l <= ioat.pal => l,
            _ => return event(RefusalKind::OutOfWindow, pec::OORANGE, iova),
        };
        let mut cur = iova;
        loop {
            let (gpa, size, writable) = match self.opts.tlb_mode {
                TlbMode::Shadow => match g.iotlb.lookup(cur) {
                    Some(h) => {
                        let size = h.frame.size();
                        let base = cur & !(size - 1);
                        let context = u64::from(slot.idx);
                        seen.uses.record(context, base, base + (size - 1), h.filled);
                        (h.entry.gpa, size, h.entry.writable)
                    }
                    None => return event(RefusalKind::NotMapped, pec::TPROTE, cur),
                },
                TlbMode::AlwaysWalk => {
                    match walk_one(mem, &ioat.iota, cur, slot.cfg.one_meg_frames) {
                        Ok(Step::Mapped(m)) => (m.gpa, m.frame.size(), m.writable),
                        Ok(Step::Invalid { .. }) => {
                            return event(RefusalKind::NotMapped, pec::TPROTE, cur);
                        }
                        Err(e) => return event(RefusalKind::BadTable, e.pec(), cur),
                    }
                }
            };
            if write && !writable {
                return event(RefusalKind::WriteProtected, pec::TPROTE, cur);
            }
            let off = cur & (size - 1);
            let piece = (size - off).min((last - cur).saturating_add(1));
            out.push(Piece {
                iova: cur,
                gpa: gpa + off,
                len: piece,
            });
            match cur.checked_add(piece) {
                Some(next) if next <= last => cur = next,
                _ => return Ok(()),
            }
        }
    }
}
