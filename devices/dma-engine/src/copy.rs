//! The data movement of one operation: page-sized steps through the device's DMA view.
//!
//! Each step stays inside one 4 KiB page of both the source and the destination IOVA, so an
//! IOMMU (whose granule is at least 4 KiB) either translates a whole step or refuses it: a
//! refused write leaves none of its step in memory, and the operation stops at the first
//! refused step with the IOVA that failed.

use sluice_devapi::{DmaDirection, DmaOutcome, DmaRecord, Endpoint, Hooks};
use sluice_virtio_pci::DmaView;
use vm_memory::{Bytes, GuestAddress};

use crate::regs::{FLAG_FILL, Program};

/// Size of one step and of the bounce buffer.
const STEP: u64 = 4096;

/// Which side of an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading the source.
    Read,
    /// Writing the destination.
    Write,
}

/// An access the IOMMU refused or that fell outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA {access:?} refused at IOVA {iova:#x}")]
pub struct AccessError {
    /// Which side.
    pub access: Access,
    /// First IOVA of the refused step.
    pub iova: u64,
}

/// One DMA master's path to memory for one operation.
pub(crate) struct DmaPath<'a> {
    pub(crate) view: &'a DmaView,
    pub(crate) endpoint: Endpoint,
    pub(crate) hooks: &'a dyn Hooks,
}

impl DmaPath<'_> {
    /// Reads `buf.len()` bytes at `iova`.
    pub(crate) fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let fail = AccessError {
            access: Access::Read,
            iova,
        };
        let ok = match self.view {
            // Translated: the endpoint's seam reports the access (translated, bypassed or faulted).
            DmaView::Translated(m) => m.read_slice(buf, GuestAddress(iova)).is_ok(),
            DmaView::Direct(m) => {
                let ok = m.read_slice(buf, GuestAddress(iova)).is_ok();
                self.report_direct(ok, iova, buf.len(), DmaDirection::Read);
                ok
            }
        };
        ok.then_some(()).ok_or(fail)
    }

    /// Writes `buf` at `iova`.
    pub(crate) fn write(&self, iova: u64, buf: &[u8]) -> Result<(), AccessError> {
        let fail = AccessError {
            access: Access::Write,
            iova,
        };
        let ok = match self.view {
            DmaView::Translated(m) => m.write_slice(buf, GuestAddress(iova)).is_ok(),
            DmaView::Direct(m) => {
                let ok = m.write_slice(buf, GuestAddress(iova)).is_ok();
                self.report_direct(ok, iova, buf.len(), DmaDirection::Write);
                ok
            }
        };
        ok.then_some(()).ok_or(fail)
    }

    /// With no IOMMU in the path nobody else sees the access: tell the oracle it happened.
    fn report_direct(&self, ok: bool, iova: u64, len: usize, direction: DmaDirection) {
        if ok {
            self.hooks.dma(&DmaRecord {
                endpoint: self.endpoint,
                iova,
                len: len as u64,
                direction,
                outcome: DmaOutcome::Direct,
            });
        }
    }
}

/// Bytes to the end of the 4 KiB page holding `at`.
fn to_page_end(at: u64) -> u64 {
    STEP - (at % STEP)
}

/// An operation stopped by a refused access, after `moved` bytes went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped {
    pub(crate) error: AccessError,
    pub(crate) moved: u64,
}

/// Runs a checked `program` (see [`Program::check`]): copies SRC to DST, or fills DST with
/// PATTERN. Returns the bytes moved, or where it stopped.
pub(crate) fn run(path: &DmaPath<'_>, program: &Program) -> Result<u64, Stopped> {
    let fill = program.flags & FLAG_FILL != 0;
    let len = u64::from(program.len);
    let mut buf = [0u8; STEP as usize];
    if fill {
        buf.fill(program.pattern as u8);
    }
    let mut done = 0u64;
    while done < len {
        // `check` guaranteed neither range wraps, so these additions cannot overflow.
        let dst = program.dst + done;
        let mut step = (len - done).min(to_page_end(dst));
        if !fill {
            step = step.min(to_page_end(program.src + done));
        }
        // step <= STEP, so the slice is in bounds; `get_mut` keeps that a checked fact.
        let Some(chunk) = buf.get_mut(..step as usize) else {
            break;
        };
        let stopped = |error| Stopped { error, moved: done };
        if !fill {
            path.read(program.src + done, chunk).map_err(stopped)?;
        }
        path.write(dst, chunk).map_err(stopped)?;
        done += step;
    }
    Ok(done)
}

/// Reads `len` bytes at `iova` and discards them (a rogue read: the question is only whether
/// the device could). `len` is at most [`crate::MAX_LEN`] and `iova + len` does not wrap.
pub(crate) fn read_through(path: &DmaPath<'_>, iova: u64, len: u32) -> Result<u64, Stopped> {
    let len = u64::from(len);
    let mut buf = [0u8; STEP as usize];
    let mut done = 0u64;
    while done < len {
        let at = iova + done;
        let step = (len - done).min(to_page_end(at));
        let Some(chunk) = buf.get_mut(..step as usize) else {
            break;
        };
        path.read(at, chunk)
            .map_err(|error| Stopped { error, moved: done })?;
        done += step;
    }
    Ok(done)
}
