//! The fuzz body shared by the cargo-fuzz target (`fuzz/fuzz_targets/zpci_ops.rs`) and a plain
//! unit test. The input is an operation sequence: table edits (valid maps and raw corrupting
//! writes), FIB-driven MPCIFC, RPCIT, DMA, lifecycle and CLP calls, PCILG/PCISTG. Invariants
//! checked after every step:
//!
//! - the model never panics or hangs (RPCIT ranges go up to 2^51 bytes and windows up to
//!   8 TiB; the arena is 4 MiB; the RPCIT step limit is [`FUZZ_RPCIT_STEP_LIMIT`]);
//! - the mapping budget in use equals the number of shadow entries across functions;
//! - a successful DMA happens only on an enabled function, and each piece agrees with the
//!   shadow IOTLB (shadow mode);
//! - after a deconfigure, until the next configure, every DMA is refused as after-release.

use std::sync::Arc;

use sluice_devapi::NoHooks;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::clp::SetPciFnOp;
use crate::fib::Fib;
use crate::function::{FunctionConfig, FunctionState};
use crate::guest::{GuestTables, write_be};
use crate::model::{TlbMode, Zpci, ZpciOptions};
use crate::translate::RefusalKind;

const MEM_SIZE: usize = 4 << 20;
const TABLE_BASE: u64 = 0x10_0000;
const TABLE_LIMIT: u64 = 0x30_0000;
const FIB_ADDR: u64 = 0x3f_0000;
const WINDOW: u64 = 0x1_0000_0000;
/// Walk steps per RPCIT pass. Lower than the model's default (65 536, covered by
/// `tests/rpcit_bound.rs`) so that a refresh of a window with segment tables (4 096 steps per
/// pass for 4 GiB) stops and resumes instead of walking all of it: the same code (cut short
/// with cc 2, resumed on the retry, completed) at a fraction of the cost per input.
pub const FUZZ_RPCIT_STEP_LIMIT: u64 = 256;

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied();
        self.pos += 1;
        b
    }
    fn u64(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for _ in 0..8 {
            v = (v << 8) | u64::from(self.byte()?);
        }
        Some(v)
    }
    fn u16(&mut self) -> Option<u16> {
        Some((u16::from(self.byte()?) << 8) | u16::from(self.byte()?))
    }
}

/// A failed invariant (the fuzz target aborts on it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("zpci fuzz invariant violated: {0}")]
pub struct InvariantViolation(pub String);

fn check(cond: bool, what: &str) -> Result<(), InvariantViolation> {
    if cond {
        Ok(())
    } else {
        Err(InvariantViolation(what.to_string()))
    }
}

/// Runs one input. Returns an error only when an invariant is violated.
pub fn run(data: &[u8]) -> Result<(), InvariantViolation> {
    let mut inp = Input { data, pos: 0 };
    let Some(flags) = inp.byte() else {
        return Ok(());
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return Ok(());
    };
    let opts = ZpciOptions {
        tlb_mode: if flags & 1 != 0 {
            TlbMode::AlwaysWalk
        } else {
            TlbMode::Shadow
        },
        mapping_budget: (flags & 2 != 0).then_some(u64::from(flags >> 2)),
        rpcit_step_limit: FUZZ_RPCIT_STEP_LIMIT,
        ..ZpciOptions::default()
    };
    let fns = vec![
        FunctionConfig {
            fid: 0x10,
            ..FunctionConfig::default()
        },
        FunctionConfig {
            fid: 0x11,
            one_meg_frames: true,
            ..FunctionConfig::default()
        },
    ];
    let Ok(z) = Zpci::new(fns, opts, Arc::new(NoHooks)) else {
        return Ok(());
    };
    let mut tables = Vec::new();
    for (i, fid) in [0x10u32, 0x11].into_iter().enumerate() {
        let base = TABLE_BASE + (i as u64) * (TABLE_LIMIT - TABLE_BASE) / 2;
        let Ok(t) = GuestTables::new(&mem, base, base + (TABLE_LIMIT - TABLE_BASE) / 2) else {
            return Ok(());
        };
        let _ = z.configure(fid);
        if let Some(h) = z.fh_of(fid) {
            let _ = z.clp_set_pci_fn(h, SetPciFnOp::Enable { ndas: 1 });
        }
        if let Some(h) = z.fh_of(fid) {
            let fib = Fib {
                pba: WINDOW,
                pal: WINDOW + (1 << 32) - 1,
                iota: t.iota(),
                ..Fib::default()
            };
            let _ = z.mpcifc_with_fib(&mem, h, 0, crate::MpcifcOp::RegIoat, &fib);
        }
        tables.push(t);
    }
    let mut released = [false, false];
    let mut steps = 0;
    while let Some(op) = inp.byte() {
        steps += 1;
        if steps > 256 {
            break;
        }
        let which = usize::from(op >> 7);
        let fid = 0x10 + which as u32;
        let fh = z.fh_of(fid).unwrap_or(0);
        match op & 0xf {
            0 | 1 => {
                let (Some(p), Some(g)) = (inp.u16(), inp.u16()) else {
                    break;
                };
                let iova = WINDOW + u64::from(p) * 0x1000;
                let gpa = 0x1000 + u64::from(g % 0x3ff) * 0x1000;
                if let Some(t) = tables.get_mut(which) {
                    let _ = if op & 0x10 != 0 {
                        t.unmap(&mem, iova)
                    } else {
                        t.map(&mem, iova, gpa, op & 0x20 == 0)
                    };
                }
            }
            2 => {
                let (Some(off), Some(v)) = (inp.u16(), inp.u64()) else {
                    break;
                };
                let _ = write_be(
                    &mem,
                    TABLE_BASE + u64::from(off) * 8 % (TABLE_LIMIT - TABLE_BASE),
                    v,
                );
            }
            3 | 4 => {
                let (Some(p), Some(n)) = (inp.u16(), inp.byte()) else {
                    break;
                };
                let start = WINDOW + u64::from(p) * 0x1000;
                let _ = z.rpcit(&mem, fh, start, u64::from(n % 65) * 0x1000);
            }
            5 => {
                // A refresh of up to 2^51 bytes from the window start: the model bounds the work
                // per instruction (step limit, cc 2) and by the mapping budget.
                let Some(sh) = inp.byte() else { break };
                let len = 1u64 << (12 + u32::from(sh % 40));
                let _ = z.rpcit(&mem, fh, WINDOW, len);
            }
            6 | 7 => {
                let (Some(p), Some(l), Some(w)) = (inp.u16(), inp.u16(), inp.byte()) else {
                    break;
                };
                let iova = WINDOW
                    .wrapping_add(u64::from(p) * 0x100)
                    .wrapping_sub(0x800);
                let r = z.translate(&mem, fh, iova, u64::from(l), w & 1 != 0);
                check_dma(&z, fid, r, released.get(which).copied().unwrap_or(false))?;
            }
            8 => {
                let mut raw = [0u8; crate::fib::FIB_LEN];
                for b in raw.iter_mut() {
                    *b = inp.byte().unwrap_or(0);
                }
                let Some(oc) = inp.byte() else { break };
                let _ = vm_memory::Bytes::write_slice(&mem, &raw, GuestAddress(FIB_ADDR));
                let r1 = (u64::from(fh) << 32) | u64::from(oc & 0xf) | (u64::from(oc >> 7) << 16);
                let _ = z.mpcifc(&mem, r1, FIB_ADDR + u64::from(oc & 0x40 != 0));
            }
            9 => {
                let Some(k) = inp.byte() else { break };
                let r = match k % 7 {
                    0 => z.deconfigure(fid).map(|_| ()),
                    1 => z.configure(fid).map(|_| ()),
                    2 => z.reserve(fid).map(|_| ()),
                    3 => z.unreserve(fid).map(|_| ()),
                    4 => z
                        .clp_set_pci_fn(fh, SetPciFnOp::Enable { ndas: 1 })
                        .map(|_| ())
                        .map_err(|_| crate::LifecycleError::NoSuchFid(0)),
                    5 => z
                        .clp_set_pci_fn(fh, SetPciFnOp::Disable)
                        .map(|_| ())
                        .map_err(|_| crate::LifecycleError::NoSuchFid(0)),
                    _ => {
                        let _ = z.clp_query_pci_fn(fh);
                        let _ = z.clp_list();
                        Ok(())
                    }
                };
                if let (true, Some(rel)) = (r.is_ok(), released.get_mut(which)) {
                    match k % 7 {
                        0 | 2 => *rel = true,
                        1 => *rel = false,
                        _ => {}
                    }
                }
            }
            10 => {
                let (Some(a), Some(o), Some(l)) = (inp.byte(), inp.u16(), inp.byte()) else {
                    break;
                };
                let _ = z.pcilg(fh, a & 0xf, u64::from(o), l & 0xf);
                let _ = z.pcistg(fh, a >> 4, u64::from(o), l >> 4, u64::from(o) * 0x0101);
            }
            11 => {
                let Some(k) = inp.byte() else { break };
                let op = crate::MpcifcOp::ALL.get(usize::from(k % 8)).copied();
                if let Some(op) = op {
                    // Windows of 4 GiB up to 8 TiB.
                    let fib = Fib {
                        pba: WINDOW,
                        pal: WINDOW + (1u64 << (32 + u32::from(k >> 3) % 12)) - 1,
                        iota: tables.get(which).map_or(0, GuestTables::iota),
                        ..Fib::default()
                    };
                    let _ = z.mpcifc_with_fib(&mem, fh, 0, op, &fib);
                }
            }
            12 => {
                let Some(g) = inp.u16() else { break };
                if let Some(t) = tables.get_mut(which) {
                    let _ = t.map_segment(
                        &mem,
                        WINDOW + u64::from(g & 0xff) * (1 << 20),
                        0x20_0000,
                        true,
                    );
                }
            }
            _ => {
                let _ = z.take_error_events();
            }
        }
        let held: usize = [0x10u32, 0x11]
            .iter()
            .map(|f| z.iotlb_entries(*f).len())
            .sum();
        check(
            z.budget_used() == held as u64,
            "budget in use differs from shadow entries",
        )?;
    }
    Ok(())
}

fn check_dma(
    z: &Zpci,
    fid: u32,
    r: Result<crate::Translation, crate::DmaRefusal>,
    released: bool,
) -> Result<(), InvariantViolation> {
    match r {
        Ok(t) => {
            check(!released, "DMA translated after release")?;
            check(
                z.state_of(fid) == Some(FunctionState::Enabled),
                "DMA translated while not enabled",
            )?;
            if z.options().tlb_mode == TlbMode::Shadow {
                let tlb = z.iotlb_entries(fid);
                for p in &t.pieces {
                    let hit = tlb.iter().any(|(iova, gpa, _, f)| {
                        p.iova >= *iova
                            && p.iova - iova < f.size()
                            && gpa + (p.iova - iova) == p.gpa
                    });
                    check(hit, "piece not backed by the shadow IOTLB")?;
                }
            }
            Ok(())
        }
        Err(e) => {
            if released {
                check(
                    e.kind == RefusalKind::AfterRelease,
                    "refusal after release not classified",
                )?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fuzz_body_on_pseudo_random_inputs() {
        let inputs = sluice_devapi::fuzz_support::pseudo_random_inputs(0x5eed, 3000, 600);
        for (i, mut data) in inputs.enumerate() {
            // Bias towards the interesting operations: maps then refreshes then DMA.
            if let Some(b) = data.get_mut(0) {
                *b &= if i % 2 == 0 { 0xfe } else { 0xff };
            }
            super::run(&data).unwrap_or_else(|e| panic!("input {i}: {e}: {data:02x?}"));
        }
    }
}
