//! The body of the fuzz target (`fuzz/fuzz_targets/smmuv3_ops.rs`), kept in the crate so the
//! plain `#[test]` that runs it on random inputs and the fuzzer exercise the same code.
//!
//! Input layout: a sequence of operations from the first byte on (libFuzzer's default 4 KiB
//! inputs hold ~300 of them). Guest memory is a zeroed 64 KiB at 0 that the operations build:
//! raw 8-byte writes anywhere in it, and structured writes of STEs, CDs, page-table
//! descriptors and commands into a fixed layout (below). Memory beyond 64 KiB is absent, so
//! wild pointers exercise the external-abort paths. The other operations are raw register
//! writes and reads, translations, a full invalidation, and event/GERROR acknowledgement.
//!
//! Invariants (checked with `assert!`, so the fuzzer reports them as crashes):
//! - a successful translation's segments cover the requested range, in order; bypassed
//!   translations are identity;
//! - **cached equals uncached**: a second model with `CacheMode::NeverCache` receives the same
//!   register writes and commands over the same memory. While nothing that the caches may
//!   legitimately hold stale has changed since the last full invalidation (no memory or raw
//!   register write, no fault that wrote an event, no CMD_SYNC that wrote an MSI), both must
//!   give the same answer for every translation. Inputs that put words into memory the
//!   operations did not build (raw memory or descriptor words, moved tables or queues, MSI
//!   writes) switch the comparison off from there on: a misprogrammed contiguous hint, for
//!   one, lets a cache answer where a walk faults, as the architecture allows.

use crate::regs::off;
use crate::{Access, CacheMode, SmmuConfig, SmmuV3, Translation};
use sluice_devapi::{NoHooks, NullInterrupts};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the guest memory the operations build.
pub const MEM_SIZE: usize = 0x1_0000;
const MAX_OPS: usize = 512;

/// Linear stream table of 64 STEs.
const STRTAB: u64 = 0x0000;
const STRTAB_LOG2: u64 = 6;
/// 64 context descriptors (also a linear CD table for STEs with S1CDMax > 0).
const CD_BASE: u64 = 0x1000;
/// Command queue of 256 entries.
const CMDQ: u64 = 0x2000;
const CMDQ_LOG2: u32 = 8;
/// Event queue of 128 entries.
const EVTQ: u64 = 0x3000;
const EVTQ_LOG2: u64 = 7;
/// Eight 4 KiB translation-table pages.
const PT_BASE: u64 = 0x8000;
const PT_PAGES: u64 = 8;

/// Opcodes the structured command operation picks from.
const OPCODES: [u64; 16] = [
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x11, 0x12, 0x13, 0x20, 0x28, 0x2a, 0x30, 0x46, 0x44,
];

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

fn u64_of(b: [u8; 8]) -> u64 {
    u64::from_le_bytes(b)
}

struct Pair {
    cached: SmmuV3,
    uncached: SmmuV3,
    mem: GuestMemoryMmap,
    /// Something the caches may hold stale changed since the last full invalidation.
    dirty: bool,
    /// Memory may hold descriptors the operations did not build (raw words, moved tables or
    /// queues, MSI writes): a misprogrammed contiguous hint, for one, lets a cache legitimately
    /// answer where a walk faults. The comparison is off for the rest of the input.
    tainted: bool,
}

impl Pair {
    fn write(&self, o: u64, size: u32, v: u64) {
        self.cached.mmio_write(&self.mem, o, size, v);
        self.uncached.mmio_write(&self.mem, o, size, v);
    }

    fn write_words(&self, addr: u64, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            let _ = self.mem.write_obj(*w, GuestAddress(addr + 8 * i as u64));
        }
    }

    /// Queues one command at the cached model's PROD and rings both doorbells.
    fn command(&self, d0: u64, d1: u64) {
        let prod = self.cached.mmio_read(off::CMDQ_PROD, 4);
        let idx = prod & ((1 << CMDQ_LOG2) - 1);
        self.write_words(CMDQ + idx * 16, &[d0, d1]);
        let next = (prod + 1) & ((2 << CMDQ_LOG2) - 1);
        self.write(off::CMDQ_PROD, 4, next);
    }

    /// CFGI_ALL, TLBI_NSNH_ALL, CMD_SYNC: true when every one completed.
    fn invalidate_all(&self) -> bool {
        self.command(0x04, 31);
        self.command(0x30, 0);
        self.command(0x46, 0);
        // The queue advances a batch per trigger (SmmuConfig::cmdq_batch): drain it, bounded.
        for s in [&self.cached, &self.uncached] {
            for _ in 0..(2usize << CMDQ_LOG2) {
                if !s.process_pending(&self.mem) {
                    break;
                }
            }
        }
        let mask = (2u64 << CMDQ_LOG2) - 1;
        [&self.cached, &self.uncached].iter().all(|s| {
            let done =
                s.mmio_read(off::CMDQ_PROD, 4) & mask == s.mmio_read(off::CMDQ_CONS, 4) & mask;
            let no_error = (s.mmio_read(off::GERROR, 4) ^ s.mmio_read(off::GERRORN, 4)) & 1 == 0;
            let enabled = s.mmio_read(off::CR0ACK, 4) & 0x9 == 0x9;
            done && no_error && enabled
        })
    }
}

fn check_cover(t: &Translation, iova: u64, len: u64) {
    let mut next = iova;
    let mut total = 0u64;
    for s in &t.segments {
        assert_eq!(s.iova, next, "segments out of order");
        if t.bypassed {
            assert_eq!(s.pa, s.iova, "bypass is not identity");
        }
        next = s.iova.wrapping_add(s.len);
        total = total.saturating_add(s.len);
    }
    assert!(
        len == 0 || total == len || iova.checked_add(len).is_none(),
        "segments cover {total:#x} of {len:#x} bytes"
    );
}

fn ste(kind: u8, fz: u64) -> [u64; 8] {
    let pt = PT_BASE + ((fz >> 40) % PT_PAGES) * 0x1000;
    let t0sz = 16 + (fz & 0xf) * 2; // 16..=46
    let sl0 = (fz >> 4) % 3;
    let vmid = (fz >> 8) & 0xff;
    let s2 = |t0sz: u64| {
        (
            vmid | (t0sz << 32) | (sl0 << 38) | (5 << 48) | (1 << 51) | (1 << 58),
            pt,
        )
    };
    let ctx = CD_BASE + ((fz >> 16) % 64) * 64;
    match kind % 6 {
        0 => [1, 0, 0, 0, 0, 0, 0, 0],
        1 => [1 | (4 << 1), 0, 0, 0, 0, 0, 0, 0],
        2 => [1 | (5 << 1) | ctx, 0, 0, 0, 0, 0, 0, 0],
        3 => {
            // Linear CD table at CD_BASE, S1CDMax from the input, S1DSS from the input.
            let cd_max = (fz >> 24) % 7;
            [
                1 | (5 << 1) | CD_BASE | (cd_max << 59),
                (fz >> 28) & 3,
                0,
                0,
                0,
                0,
                0,
                0,
            ]
        }
        4 => {
            let (d2, d3) = s2(t0sz);
            [1 | (6 << 1), 0, d2, d3, 0, 0, 0, 0]
        }
        _ => {
            let (d2, d3) = s2(t0sz);
            [1 | (7 << 1) | ctx, 0, d2, d3, 0, 0, 0, 0]
        }
    }
}

fn cd(fz: u64) -> [u64; 8] {
    let t0sz = 16 + (fz & 0x1f); // 16..=47
    let tg0 = match (fz >> 5) & 3 {
        1 => 1u64,
        2 => 2,
        _ => 0,
    };
    let asid = (fz >> 8) & 0xff;
    let ttb0 = PT_BASE + ((fz >> 16) % PT_PAGES) * 0x1000;
    // TTB0 only unless bit 24 asks for TTB1 too (EPD1 clear); TBI0/TBI1 from bits 25/26.
    let epd1 = if fz & (1 << 24) != 0 { 0 } else { 1 << 30 };
    let tbi = ((fz >> 25) & 3) << 38;
    let d0 = t0sz
        | (tg0 << 6)
        | epd1
        | (1 << 31)
        | (5 << 32)
        | tbi
        | (1 << 41)
        | (1 << 45)
        | (1 << 46)
        | (asid << 48)
        | ((16 + ((fz >> 27) & 0x1f)) << 16);
    [d0, ttb0, ttb0, 0, 0, 0, 0, 0]
}

/// Runs one input. Never panics, never hangs (for a correct model).
pub fn run(data: &[u8]) {
    let mut ops = data;
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let uncached_cfg = SmmuConfig {
        cache_mode: CacheMode::NeverCache,
        ..SmmuConfig::default()
    };
    let mut p = Pair {
        cached: SmmuV3::new(
            SmmuConfig::default(),
            Arc::new(NullInterrupts),
            Arc::new(NoHooks),
        ),
        uncached: SmmuV3::new(uncached_cfg, Arc::new(NullInterrupts), Arc::new(NoHooks)),
        mem,
        dirty: false,
        tainted: false,
    };
    // A plausible starting point so short inputs reach translation: queues and a linear
    // stream table in the layout above, everything enabled.
    let setup = [
        (off::STRTAB_BASE, 8, STRTAB),
        (off::STRTAB_BASE_CFG, 4, STRTAB_LOG2),
        (off::CMDQ_BASE, 8, CMDQ | u64::from(CMDQ_LOG2)),
        (off::EVENTQ_BASE, 8, EVTQ | EVTQ_LOG2),
        (off::IRQ_CTRL, 4, 5),
        (off::CR2, 4, 2),
        (off::CR0, 4, 0xd),
    ];
    for (o, size, v) in setup {
        p.write(o, size, v);
    }
    for _ in 0..MAX_OPS {
        let Some([kind]) = take::<1>(&mut ops) else {
            return;
        };
        match kind & 0xf {
            0 => {
                let (Some(o), Some(v)) = (take::<2>(&mut ops), take::<8>(&mut ops)) else {
                    return;
                };
                let o = u64::from(u16::from_le_bytes(o));
                let offset = if kind & 0x80 != 0 {
                    0x1_0000 | (o & 0xfc)
                } else {
                    o & 0x1fc
                };
                let size = if kind & 0x40 != 0 { 8 } else { 4 };
                let offset = offset & !(u64::from(size) - 1);
                p.write(offset, size, u64_of(v));
                p.dirty = true;
                // Moving a table or queue, or pointing an MSI somewhere, taints memory.
                let low = offset & 0xffff;
                if (0x68..0x78).contains(&low)
                    || (0x80..0x98).contains(&low)
                    || (0xa0..0xa8).contains(&low)
                    || (0xb0..0xc8).contains(&low)
                    || (0xd0..0xd8).contains(&low)
                {
                    p.tainted = true;
                }
            }
            1 => {
                let Some(o) = take::<4>(&mut ops) else {
                    return;
                };
                let o = u64::from(u32::from_le_bytes(o)) % 0x2_0000;
                // Reads move the command queue on (CONS polling), as the guest's do.
                let _ = p.cached.mmio_read_mem(&p.mem, o, 4);
            }
            2 | 3 => {
                let (Some([sid]), Some(iova), Some(len)) = (
                    take::<1>(&mut ops),
                    take::<8>(&mut ops),
                    take::<2>(&mut ops),
                ) else {
                    return;
                };
                let ssid = (kind & 0x10 != 0).then_some(u32::from(sid >> 6));
                let sid = u32::from(sid & 0x7f);
                let access = Access {
                    write: kind & 0x20 != 0,
                    privileged: kind & 0x40 == 0,
                    instruction: kind & 0x80 != 0,
                };
                let len = u64::from(u16::from_le_bytes(len));
                let raw = u64_of(iova);
                // Half the time a small address (so mapped pages are hit), keeping the top
                // byte so TBI is exercised.
                let iova = if kind & 1 != 0 {
                    raw & 0xff00_0000_003f_ffff
                } else {
                    raw
                };
                let a = p.cached.translate(&p.mem, sid, ssid, iova, len, access);
                let b = p.uncached.translate(&p.mem, sid, ssid, iova, len, access);
                if let Ok(t) = &a {
                    check_cover(t, iova, len);
                }
                if let Ok(t) = &b {
                    check_cover(t, iova, len);
                }
                let comparable = !p.dirty && !p.tainted;
                if comparable {
                    assert_eq!(
                        a.as_ref().ok(),
                        b.as_ref().ok(),
                        "cached and uncached models disagree on sid {sid} ssid {ssid:?} iova {iova:#x} len {len:#x} {access:?}: cached {a:?}, uncached {b:?}"
                    );
                }
                if a.is_err() || b.is_err() {
                    // A fault may have written an event record anywhere EVENTQ_BASE points.
                    p.dirty = true;
                }
            }
            4 => {
                let (Some(o), Some(v)) = (take::<2>(&mut ops), take::<8>(&mut ops)) else {
                    return;
                };
                let at = u64::from(u16::from_le_bytes(o)) & 0xfff8;
                p.write_words(at, &[u64_of(v)]);
                p.dirty = true;
                p.tainted = true;
            }
            5 => {
                let (Some([sid, sel]), Some(fz)) = (take::<2>(&mut ops), take::<8>(&mut ops))
                else {
                    return;
                };
                let fz = u64_of(fz);
                let mut words = ste(sel, fz);
                if sel & 0x80 != 0 {
                    if let Some(w) = words.get_mut(usize::from((sel >> 3) & 7)) {
                        *w ^= fz.rotate_left(u32::from(sel));
                    }
                    p.tainted = true;
                }
                p.write_words(STRTAB + u64::from(sid % 64) * 64, &words);
                p.dirty = true;
            }
            6 => {
                let (Some([idx, sel]), Some(fz)) = (take::<2>(&mut ops), take::<8>(&mut ops))
                else {
                    return;
                };
                let fz = u64_of(fz);
                let mut words = cd(fz);
                if sel & 0x80 != 0 {
                    if let Some(w) = words.get_mut(usize::from((sel >> 3) & 3)) {
                        *w ^= 1u64 << (sel & 0x3f);
                    }
                    p.tainted = true;
                }
                p.write_words(CD_BASE + u64::from(idx % 64) * 64, &words);
                p.dirty = true;
            }
            7 => {
                let (Some([page, sel]), Some(index), Some(fz)) = (
                    take::<2>(&mut ops),
                    take::<2>(&mut ops),
                    take::<8>(&mut ops),
                ) else {
                    return;
                };
                let fz = u64_of(fz);
                let index = u64::from(u16::from_le_bytes(index)) % 512;
                let target = PT_BASE + ((fz >> 12) % PT_PAGES) * 0x1000;
                // Attributes without the contiguous hint (bit 52), which only raw words set.
                let attrs = fz & 0x0060_0000_0000_0ffc;
                let desc = match sel % 4 {
                    // Table descriptor to another page of the pool.
                    0 => target | 3,
                    // Page (level 3) or block/page leaf: output inside memory, with AF.
                    1 => ((fz >> 12) % 0x20) << 12 | attrs | (1 << 10) | 3,
                    // Block at a 2 MiB (or 1 GiB) boundary.
                    2 => ((fz >> 21) & 0x7) << 21 | attrs | (1 << 10) | 1,
                    _ => {
                        p.tainted = true;
                        fz
                    }
                };
                let at = PT_BASE + u64::from(page) % PT_PAGES * 0x1000 + index * 8;
                p.write_words(at, &[desc]);
                p.dirty = true;
            }
            8 => {
                let (Some([sel]), Some(d0), Some(d1)) = (
                    take::<1>(&mut ops),
                    take::<8>(&mut ops),
                    take::<8>(&mut ops),
                ) else {
                    return;
                };
                let op = OPCODES
                    .get(usize::from(sel) % OPCODES.len())
                    .copied()
                    .unwrap_or(0x46);
                let d0 = if sel & 0x80 != 0 {
                    u64_of(d0)
                } else {
                    (u64_of(d0) & !0xff) | op
                };
                p.command(d0, u64_of(d1));
                if d0 & 0xff == 0x46 || sel & 0x80 != 0 {
                    // CMD_SYNC may write its MSI anywhere; raw commands may be anything.
                    p.dirty = true;
                    p.tainted = true;
                }
            }
            9 => {
                if p.invalidate_all() {
                    p.dirty = false;
                }
            }
            10 => {
                for s in [&p.cached, &p.uncached] {
                    let prod = s.mmio_read(0x1_0000 + off::EVENTQ_PROD, 4);
                    s.mmio_write(&p.mem, 0x1_0000 + off::EVENTQ_CONS, 4, prod);
                }
            }
            11 => {
                for s in [&p.cached, &p.uncached] {
                    let g = s.mmio_read(off::GERROR, 4);
                    s.mmio_write(&p.mem, off::GERRORN, 4, g);
                }
            }
            _ => {
                // Reading events back exercises nothing new; spend the byte on a register read.
                let _ = p.uncached.mmio_read(u64::from(kind) << 2, 4);
            }
        }
    }
}
