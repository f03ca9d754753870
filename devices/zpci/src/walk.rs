//! I/O translation: the IOTA and the region-third → segment → page table walk.
//!
//! All tables are big-endian in guest memory. A region-third table and a segment table have 2048
//! eight-byte entries (16 KiB, 16 KiB aligned); a page table has 256 entries (2 KiB, 2 KiB
//! aligned). An IOVA splits into RTX = bits 41:31, SX = bits 30:20, PX = bits 19:12 and a 12-bit
//! byte index. The walker is pure: it reads guest memory and returns what it found; the model
//! decides what to do with it.

use std::fmt;
use std::ops::ControlFlow;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

use crate::codes::pec;

/// 4 KiB page.
pub const PAGE_SIZE: u64 = 1 << 12;
/// 1 MiB segment.
pub const SEG_SIZE: u64 = 1 << 20;
/// 2 GiB covered by one region-third entry.
pub const REGION_SIZE: u64 = 1 << 31;
/// 4 TiB covered by one region-third table.
pub const RT_REACH: u64 = 1 << 42;

/// Bit definitions (Linux `pci_dma.h`, QEMU `s390-pci-bus.h`).
pub mod bits {
    /// IOTA: translation enabled ("T").
    pub const IOTA_T: u64 = 0x800;
    /// IOTA / entry: protection (read-only).
    pub const PROT: u64 = 0x200;
    /// IOTA: designation type shift (3 bits).
    pub const IOTA_DT_SHIFT: u64 = 2;
    /// IOTA designation type: region-third table origin.
    pub const DT_RTTO: u8 = 1;
    /// IOTA: table origin mask.
    pub const IOTA_ORIGIN_MASK: u64 = !0x3fff;
    /// Region/segment entry: invalid.
    pub const TE_INVALID: u64 = 0x20;
    /// Segment entry: format control (1 MiB frame).
    pub const TE_FC: u64 = 0x400;
    /// Region/segment entry: table type field.
    pub const TE_TYPE_MASK: u64 = 0xc;
    /// Table type of a region-third entry.
    pub const TE_TYPE_RTX: u64 = 0x4;
    /// Table type of a segment entry.
    pub const TE_TYPE_SX: u64 = 0x0;
    /// Region-third entry: table length, must be 0b11.
    pub const RTE_LEN_MASK: u64 = 0x3;
    /// Region-third entry: table offset, must be 0.
    pub const RTE_OFFSET_MASK: u64 = 0xc0;
    /// Region-third entry: segment-table origin.
    pub const RTE_ADDR_MASK: u64 = !0x3fff;
    /// Segment entry: page-table origin.
    pub const STE_ADDR_MASK: u64 = !0x7ff;
    /// Segment entry with FC: frame address.
    pub const SFAA_MASK: u64 = !((1 << 20) - 1);
    /// Page entry: invalid.
    pub const PTE_INVALID: u64 = 0x400;
    /// Page entry: frame address.
    pub const PTE_ADDR_MASK: u64 = !0xfff;
}

/// Region-third index (bits 41:31).
pub const fn rtx(iova: u64) -> u64 {
    (iova >> 31) & 0x7ff
}
/// Segment index (bits 30:20).
pub const fn sx(iova: u64) -> u64 {
    (iova >> 20) & 0x7ff
}
/// Page index (bits 19:12).
pub const fn px(iova: u64) -> u64 {
    (iova >> 12) & 0xff
}

/// A decoded, supported I/O translation anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iota {
    /// Region-third table origin.
    pub origin: u64,
    /// Whole address space read-only.
    pub protected: bool,
    /// The raw value the guest registered.
    pub raw: u64,
}

/// An IOTA the model does not translate through (MPCIFC answers an operand exception).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IotaError {
    /// T = 0 (relaxed / no translation) is not offered.
    #[error("IOTA {0:#x}: translation not enabled and relaxed translation not offered")]
    NotTranslated(u64),
    /// Designation type other than region-third.
    #[error("IOTA designation type {0} unsupported (only region-third, 1)")]
    UnsupportedDesignation(u8),
}

impl Iota {
    /// Parses a registered IOTA.
    pub fn parse(raw: u64) -> Result<Iota, IotaError> {
        if raw & bits::IOTA_T == 0 {
            return Err(IotaError::NotTranslated(raw));
        }
        let dt = ((raw >> bits::IOTA_DT_SHIFT) & 7) as u8;
        if dt != bits::DT_RTTO {
            return Err(IotaError::UnsupportedDesignation(dt));
        }
        Ok(Iota {
            origin: raw & bits::IOTA_ORIGIN_MASK,
            protected: raw & bits::PROT != 0,
            raw,
        })
    }
}

/// Table level, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Region-third table.
    Region,
    /// Segment table.
    Segment,
    /// Page table.
    Page,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Region => "region-third",
            Level::Segment => "segment",
            Level::Page => "page",
        })
    }
}

/// Size of a translated frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frame {
    /// 4 KiB page from a page table.
    Page,
    /// 1 MiB frame from a segment entry with FC set.
    Segment,
}

impl Frame {
    /// Bytes in the frame.
    pub const fn size(self) -> u64 {
        match self {
            Frame::Page => PAGE_SIZE,
            Frame::Segment => SEG_SIZE,
        }
    }
}

/// One valid translation found by the walker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA of the frame (frame aligned).
    pub iova: u64,
    /// Guest-physical base of the frame.
    pub gpa: u64,
    /// Frame size.
    pub frame: Frame,
    /// False when the IOTA or any entry on the path has the protection bit.
    pub writable: bool,
}

/// What the walker found for a stretch of IOVA space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A valid frame.
    Mapped(Mapping),
    /// `[start, start+len)` has no valid translation (an invalid bit on the path).
    Invalid {
        /// First IOVA.
        start: u64,
        /// Length in bytes (multiple of 4 KiB).
        len: u64,
    },
}

/// A malformed table: the function enters the error state with [`WalkError::pec`].
#[derive(Debug, Error)]
pub enum WalkError {
    /// An all-zero entry.
    #[error("zero {level} entry at {addr:#x}")]
    ZeroEntry {
        /// Level.
        level: Level,
        /// Entry address.
        addr: u64,
    },
    /// Region-third entry with table length other than 0b11 or a non-zero table offset.
    #[error("region-third entry {entry:#x}: bad table length/offset")]
    BadLength {
        /// Entry value.
        entry: u64,
    },
    /// Wrong table type or a null origin/frame.
    #[error("{level} entry {entry:#x}: bad type or null origin")]
    BadType {
        /// Level.
        level: Level,
        /// Entry value.
        entry: u64,
    },
    /// FC set in a segment entry without the 1 MiB capability.
    #[error("segment entry {entry:#x}: 1 MiB frame without the capability")]
    SegmentFrameUnsupported {
        /// Entry value.
        entry: u64,
    },
    /// IOVA at or above 4 TiB cannot be translated by a region-third table.
    #[error("IOVA {iova:#x} beyond the reach of a region-third table")]
    BeyondReach {
        /// IOVA.
        iova: u64,
    },
    /// A table could not be read from guest memory.
    #[error("{level} table at {addr:#x} unreadable")]
    Unreadable {
        /// Level.
        level: Level,
        /// Address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl WalkError {
    /// The PCI error-event code the function reports.
    pub fn pec(&self) -> u16 {
        match self {
            WalkError::ZeroEntry { .. } | WalkError::Unreadable { .. } => pec::INVALTE,
            WalkError::BadLength { .. } => pec::INVALTL,
            WalkError::BadType { .. } | WalkError::SegmentFrameUnsupported { .. } => pec::TT,
            WalkError::BeyondReach { .. } => pec::OORANGE,
        }
    }
}

/// Reads one big-endian table entry. The common case resolves the entry's host address once
/// (`get_slice` checks that the 8 bytes lie inside one region) and does one volatile load,
/// instead of a generic `Bytes` copy; anything else (outside guest RAM, across a region end)
/// takes the copying path, which reports the failure.
#[inline]
fn read_entry<M: GuestMemoryBackend>(mem: &M, addr: u64, level: Level) -> Result<u64, WalkError> {
    if let Ok(s) = mem.get_slice(GuestAddress(addr), 8)
        && let Ok(r) = s.get_ref::<u64>(0)
    {
        return Ok(u64::from_be(r.load()));
    }
    read_entry_slow(mem, addr, level)
}

#[cold]
fn read_entry_slow<M: GuestMemoryBackend>(
    mem: &M,
    addr: u64,
    level: Level,
) -> Result<u64, WalkError> {
    let mut b = [0u8; 8];
    mem.read_slice(&mut b, GuestAddress(addr))
        .map_err(|source| WalkError::Unreadable {
            level,
            addr,
            source,
        })?;
    Ok(u64::from_be_bytes(b))
}

/// Decoded region-third entry: `None` when invalid, else (segment-table origin, protected).
fn decode_rte(entry: u64, addr: u64) -> Result<Option<(u64, bool)>, WalkError> {
    if entry == 0 {
        return Err(WalkError::ZeroEntry {
            level: Level::Region,
            addr,
        });
    }
    if entry & bits::TE_INVALID != 0 {
        return Ok(None);
    }
    if entry & bits::RTE_LEN_MASK != bits::RTE_LEN_MASK || entry & bits::RTE_OFFSET_MASK != 0 {
        return Err(WalkError::BadLength { entry });
    }
    let sto = entry & bits::RTE_ADDR_MASK;
    if entry & bits::TE_TYPE_MASK != bits::TE_TYPE_RTX || sto == 0 {
        return Err(WalkError::BadType {
            level: Level::Region,
            entry,
        });
    }
    Ok(Some((sto, entry & bits::PROT != 0)))
}

/// Decoded segment entry.
enum Ste {
    Invalid,
    Table { pto: u64, prot: bool },
    Frame { base: u64, prot: bool },
}

fn decode_ste(entry: u64, addr: u64, one_meg: bool) -> Result<Ste, WalkError> {
    if entry == 0 {
        return Err(WalkError::ZeroEntry {
            level: Level::Segment,
            addr,
        });
    }
    if entry & bits::TE_INVALID != 0 {
        return Ok(Ste::Invalid);
    }
    let prot = entry & bits::PROT != 0;
    if entry & bits::TE_TYPE_MASK != bits::TE_TYPE_SX {
        return Err(WalkError::BadType {
            level: Level::Segment,
            entry,
        });
    }
    if entry & bits::TE_FC != 0 {
        if !one_meg {
            return Err(WalkError::SegmentFrameUnsupported { entry });
        }
        let base = entry & bits::SFAA_MASK;
        if base == 0 {
            return Err(WalkError::BadType {
                level: Level::Segment,
                entry,
            });
        }
        return Ok(Ste::Frame { base, prot });
    }
    let pto = entry & bits::STE_ADDR_MASK;
    if pto == 0 {
        return Err(WalkError::BadType {
            level: Level::Segment,
            entry,
        });
    }
    Ok(Ste::Table { pto, prot })
}

/// Decoded page entry: `None` when invalid, else (frame, protected).
fn decode_pte(entry: u64, addr: u64) -> Result<Option<(u64, bool)>, WalkError> {
    if entry == 0 {
        return Err(WalkError::ZeroEntry {
            level: Level::Page,
            addr,
        });
    }
    if entry & bits::PTE_INVALID != 0 {
        return Ok(None);
    }
    let frame = entry & bits::PTE_ADDR_MASK;
    if frame == 0 {
        return Err(WalkError::BadType {
            level: Level::Page,
            entry,
        });
    }
    Ok(Some((frame, entry & bits::PROT != 0)))
}

fn next_boundary(iova: u64, size: u64, end: u64) -> u64 {
    (iova & !(size - 1)).saturating_add(size).min(end)
}

/// Walks one IOVA: three entry reads, no buffer. Gives exactly what [`walk_range`] gives for
/// the IOVA's page (the same step, the same error), which a property test checks.
pub fn walk_one<M: GuestMemoryBackend>(
    mem: &M,
    iota: &Iota,
    iova: u64,
    one_meg: bool,
) -> Result<Step, WalkError> {
    let page = iova & !(PAGE_SIZE - 1);
    if page >= RT_REACH {
        return Err(WalkError::BeyondReach { iova: page });
    }
    let invalid = Step::Invalid {
        start: page,
        len: PAGE_SIZE,
    };
    let raddr = iota.origin.wrapping_add(rtx(page) * 8);
    let Some((sto, rprot)) = decode_rte(read_entry(mem, raddr, Level::Region)?, raddr)? else {
        return Ok(invalid);
    };
    let saddr = sto.wrapping_add(sx(page) * 8);
    let base_w = !iota.protected && !rprot;
    match decode_ste(read_entry(mem, saddr, Level::Segment)?, saddr, one_meg)? {
        Ste::Invalid => Ok(invalid),
        Ste::Frame { base, prot } => Ok(Step::Mapped(Mapping {
            iova: page & !(SEG_SIZE - 1),
            gpa: base,
            frame: Frame::Segment,
            writable: base_w && !prot,
        })),
        Ste::Table { pto, prot } => {
            let paddr = pto.wrapping_add(px(page) * 8);
            Ok(
                match decode_pte(read_entry(mem, paddr, Level::Page)?, paddr)? {
                    None => invalid,
                    Some((gpa, pprot)) => Step::Mapped(Mapping {
                        iova: page,
                        gpa,
                        frame: Frame::Page,
                        writable: base_w && !prot && !pprot,
                    }),
                },
            )
        }
    }
}

/// [`walk_one`] as it was before it had its own code: one page through [`walk_range`]. Kept as
/// the reference the property test compares [`walk_one`] with.
#[doc(hidden)]
pub fn walk_one_by_range<M: GuestMemoryBackend>(
    mem: &M,
    iota: &Iota,
    iova: u64,
    one_meg: bool,
) -> Result<Step, WalkError> {
    let mut found = None;
    let page = iova & !(PAGE_SIZE - 1);
    walk_range(
        mem,
        iota,
        page,
        page.saturating_add(PAGE_SIZE),
        one_meg,
        &mut |s| found = Some(s),
    )
    .map_err(|(_, e)| e)?;
    Ok(found.unwrap_or(Step::Invalid {
        start: page,
        len: PAGE_SIZE,
    }))
}

/// Walks `[start, end)` (4 KiB aligned by the caller), calling `out` for every frame or invalid
/// stretch in IOVA order. Page tables are read in one access per segment. On a malformed table
/// the steps already emitted stand and the failing IOVA is returned with the error.
pub fn walk_range<M: GuestMemoryBackend>(
    mem: &M,
    iota: &Iota,
    start: u64,
    end: u64,
    one_meg: bool,
    out: &mut dyn FnMut(Step),
) -> Result<(), (u64, WalkError)> {
    walk_range_until(mem, iota, start, end, one_meg, &mut |s| {
        out(s);
        ControlFlow::Continue(())
    })
    .map(|_| ())
}

/// Where a bounded walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEnd {
    /// The whole range was walked.
    Done,
    /// `out` asked to stop; the first IOVA not yet reported (the walk resumes there).
    Stopped(u64),
}

/// Like [`walk_range`], but `out` may stop the walk: after a `Break` nothing more is read and
/// the IOVA following the last reported step is returned, so a caller can bound the work of one
/// walk (RPCIT's per-instruction step limit) and resume later.
pub fn walk_range_until<M: GuestMemoryBackend>(
    mem: &M,
    iota: &Iota,
    start: u64,
    end: u64,
    one_meg: bool,
    out: &mut dyn FnMut(Step) -> ControlFlow<()>,
) -> Result<WalkEnd, (u64, WalkError)> {
    let mut cur = start & !(PAGE_SIZE - 1);
    let mut region: Option<(u64, Option<(u64, bool)>)> = None;
    while cur < end {
        if cur >= RT_REACH {
            return Err((cur, WalkError::BeyondReach { iova: cur }));
        }
        let r = rtx(cur);
        let rte = match region {
            Some((idx, v)) if idx == r => v,
            _ => {
                let addr = iota.origin.wrapping_add(r * 8);
                let v = read_entry(mem, addr, Level::Region)
                    .and_then(|e| decode_rte(e, addr))
                    .map_err(|e| (cur, e))?;
                region = Some((r, v));
                v
            }
        };
        let Some((sto, rprot)) = rte else {
            let next = next_boundary(cur, REGION_SIZE, end);
            let flow = out(Step::Invalid {
                start: cur,
                len: next - cur,
            });
            cur = next;
            if flow.is_break() {
                return Ok(stopped_at(cur, end));
            }
            continue;
        };
        let saddr = sto.wrapping_add(sx(cur) * 8);
        let ste = read_entry(mem, saddr, Level::Segment)
            .and_then(|e| decode_ste(e, saddr, one_meg))
            .map_err(|e| (cur, e))?;
        let seg_end = next_boundary(cur, SEG_SIZE, end);
        let base_w = !iota.protected && !rprot;
        let flow = match ste {
            Ste::Invalid => out(Step::Invalid {
                start: cur,
                len: seg_end - cur,
            }),
            Ste::Frame { base, prot } => out(Step::Mapped(Mapping {
                iova: cur & !(SEG_SIZE - 1),
                gpa: base,
                frame: Frame::Segment,
                writable: base_w && !prot,
            })),
            Ste::Table { pto, prot } => {
                let pt = PageTable {
                    pto,
                    writable: base_w && !prot,
                };
                match walk_page_table(mem, &pt, cur, seg_end, out)? {
                    WalkEnd::Done => ControlFlow::Continue(()),
                    WalkEnd::Stopped(at) => return Ok(stopped_at(at, end)),
                }
            }
        };
        cur = seg_end;
        if flow.is_break() {
            return Ok(stopped_at(cur, end));
        }
    }
    Ok(WalkEnd::Done)
}

/// A stop at the end of the range is a completed walk.
fn stopped_at(at: u64, end: u64) -> WalkEnd {
    if at >= end {
        WalkEnd::Done
    } else {
        WalkEnd::Stopped(at)
    }
}

/// A valid segment entry's page table.
struct PageTable {
    pto: u64,
    writable: bool,
}

/// Reports the pages `[cur, seg_end)` (within one segment) of page table `pt`. The entries are
/// read through one resolved host slice of the table (`get_slice` checks the whole run lies in
/// one RAM region), one volatile load each; a run outside RAM or across a region end is copied
/// instead, which fails as before.
fn walk_page_table<M: GuestMemoryBackend>(
    mem: &M,
    pt: &PageTable,
    cur: u64,
    seg_end: u64,
    out: &mut dyn FnMut(Step) -> ControlFlow<()>,
) -> Result<WalkEnd, (u64, WalkError)> {
    let first = px(cur);
    let n = ((seg_end - cur).div_ceil(PAGE_SIZE)) as usize;
    let taddr = pt.pto.wrapping_add(first * 8);
    if n > 256 {
        return Err((
            cur,
            WalkError::BadType {
                level: Level::Page,
                entry: 0,
            },
        ));
    }
    match mem.get_slice(GuestAddress(taddr), n * 8) {
        Ok(table) => decode_page_run(pt, cur, seg_end, taddr, n, out, |i| {
            table
                .get_ref::<u64>(i * 8)
                .ok()
                .map(|r| u64::from_be(r.load()))
        }),
        Err(_) => walk_page_table_copied(mem, pt, cur, seg_end, taddr, n, out),
    }
}

/// [`walk_page_table`] for a run `get_slice` refused: copy it (and fail where it is unreadable).
#[cold]
fn walk_page_table_copied<M: GuestMemoryBackend>(
    mem: &M,
    pt: &PageTable,
    cur: u64,
    seg_end: u64,
    taddr: u64,
    n: usize,
    out: &mut dyn FnMut(Step) -> ControlFlow<()>,
) -> Result<WalkEnd, (u64, WalkError)> {
    let mut buf = [0u8; 256 * 8];
    let Some(slice) = buf.get_mut(..n * 8) else {
        return Err((
            cur,
            WalkError::BadType {
                level: Level::Page,
                entry: 0,
            },
        ));
    };
    mem.read_slice(slice, GuestAddress(taddr))
        .map_err(|source| {
            (
                cur,
                WalkError::Unreadable {
                    level: Level::Page,
                    addr: taddr,
                    source,
                },
            )
        })?;
    let slice = &*slice;
    decode_page_run(pt, cur, seg_end, taddr, n, out, |i| {
        let mut e = [0u8; 8];
        e.copy_from_slice(slice.get(i * 8..i * 8 + 8)?);
        Some(u64::from_be_bytes(e))
    })
}

/// Decodes and reports `n` page entries starting at `taddr`; `entry(i)` gives the i-th (`None`
/// cannot happen for an index below `n`, and is reported as a bad entry if it does).
#[allow(clippy::too_many_arguments)]
fn decode_page_run(
    pt: &PageTable,
    cur: u64,
    seg_end: u64,
    taddr: u64,
    n: usize,
    out: &mut dyn FnMut(Step) -> ControlFlow<()>,
    entry: impl Fn(usize) -> Option<u64>,
) -> Result<WalkEnd, (u64, WalkError)> {
    // A run of invalid pages is reported as one step, when the run ends.
    let mut inval: Option<u64> = None;
    for i in 0..n {
        let iova = cur + (i as u64) * PAGE_SIZE;
        let addr = taddr.wrapping_add((i as u64) * 8);
        let Some(raw) = entry(i) else {
            return Err((
                iova,
                WalkError::BadType {
                    level: Level::Page,
                    entry: 0,
                },
            ));
        };
        let decoded = decode_pte(raw, addr);
        if !matches!(decoded, Ok(None))
            && let Some(s) = inval.take()
        {
            let flow = out(Step::Invalid {
                start: s,
                len: iova - s,
            });
            if flow.is_break() {
                return Ok(WalkEnd::Stopped(iova));
            }
        }
        match decoded {
            Err(err) => return Err((iova, err)),
            Ok(None) => {
                inval.get_or_insert(iova);
            }
            Ok(Some((gpa, pprot))) => {
                let flow = out(Step::Mapped(Mapping {
                    iova,
                    gpa,
                    frame: Frame::Page,
                    writable: pt.writable && !pprot,
                }));
                if flow.is_break() {
                    return Ok(WalkEnd::Stopped(iova + PAGE_SIZE));
                }
            }
        }
    }
    if let Some(s) = inval.take() {
        let flow = out(Step::Invalid {
            start: s,
            len: seg_end - s,
        });
        if flow.is_break() {
            return Ok(WalkEnd::Stopped(seg_end));
        }
    }
    Ok(WalkEnd::Done)
}
