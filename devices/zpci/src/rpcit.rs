//! RPCIT (Refresh PCI Translations): re-walk the guest tables for a range and update the shadow
//! IOTLB, within the host mapping budget.
//!
//! Semantics follow QEMU's `rpcit_service_call`: invalid handles and non-enabled functions get
//! cc 3, a function in the error state cc 1 / status 40; no registered IOTA (event INVALAS) or a
//! range entirely outside `[pba, pal]` (event OORANGE) puts the function into the error state with
//! cc 1 / status 8, as does a malformed table (the entries refreshed before it stay refreshed).
//! Only the part of the range inside the window is walked. Unmaps are applied before maps (what
//! QEMU's second pass achieves), and when the budget cannot hold a new entry the entry is left
//! out and RPCIT answers cc 1 / status 16 (Linux then issues a global refresh). Unlike QEMU, a
//! refresh that fits exactly into the budget answers cc 0.
//!
//! The work of one instruction is bounded whatever the range: the walk is streamed into the
//! shadow IOTLB (nothing is collected), and each of its two passes (unmaps, then maps) stops after
//! [`ZpciOptions::rpcit_step_limit`](crate::ZpciOptions) steps. A refresh cut short answers cc 2
//! (busy), which Linux's `zpci_refresh_trans` retries with the same operands; the model remembers
//! where it stopped (per function, for the last [`RESUME_SLOTS`] ranges) and the retry continues
//! there, so a huge refresh makes progress and ends with cc 0. Without the bound, a guest whose
//! tables alias one page table everywhere could make one RPCIT walk 2^30 frames.

use std::ops::ControlFlow;

use vm_memory::GuestMemoryBackend;

use crate::codes::{InsnStatus, pec, status};
use crate::function::FunctionState;
use crate::model::{ErrorEvent, FnInner, Slot, Zpci};
use crate::walk::{Iota, PAGE_SIZE, Step, WalkEnd, walk_range_until};

/// A decoded RPCIT request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcitRequest {
    /// Function handle (R1 bits 0-31).
    pub fh: u32,
    /// First IOVA (R2).
    pub start: u64,
    /// Length in bytes (R2+1).
    pub len: u64,
}

impl RpcitRequest {
    /// Decodes the register operands. `r2` must designate an even register
    /// (specification exception otherwise).
    pub fn from_regs(
        r1_value: u64,
        r2: u8,
        r2_value: u64,
        r2_plus_1_value: u64,
    ) -> Result<Self, crate::codes::ProgramException> {
        if r2 & 1 != 0 {
            return Err(crate::codes::ProgramException::Specification);
        }
        Ok(RpcitRequest {
            fh: (r1_value >> 32) as u32,
            start: r2_value,
            len: r2_plus_1_value,
        })
    }
}

/// Ranges per function whose partial refresh (cc 2) a retry can resume; more concurrent huge
/// refreshes than this on one function restart from their beginning (still bounded per
/// instruction).
pub const RESUME_SLOTS: usize = 4;

/// Where a refresh that answered cc 2 stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The guest's operands: only a retry with the same ones resumes.
    start: u64,
    len: u64,
    /// Function generation when it stopped: an IOAT change or state change forgets it.
    epoch: u64,
    /// First IOVA not yet refreshed.
    next: u64,
}

/// Range to walk once preconditions hold.
#[derive(Clone, Copy)]
struct Plan {
    iota: Iota,
    start: u64,
    end: u64,
}

/// What the commit answers: the status, an error event to emit, and the sub-range refreshed
/// completely (first, last, refresh number), reported to the oracle.
type Answer = (InsnStatus, Option<ErrorEvent>, Option<((u64, u64), u64)>);

/// Why RPCIT does not walk.
#[derive(Clone, Copy)]
enum Reject {
    /// Answer without a state change.
    Plain(InsnStatus),
    /// Error event: the function enters the error state (cc 1, status 8).
    Fault { pec: u16, addr: u64 },
}

impl Zpci {
    /// Executes RPCIT for `[start, start+len)` of function `fh`.
    ///
    /// Answers cc 2 (busy) when the range needs more than one instruction's worth of walking;
    /// the caller retries with the same operands, as Linux does, and the retry continues.
    pub fn rpcit<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        fh: u32,
        start: u64,
        len: u64,
    ) -> InsnStatus {
        let Some(slot) = self.slot_by_fh(fh) else {
            return InsnStatus::INVALID_HANDLE;
        };
        let prepare =
            |g: &FnInner| -> Result<Plan, Reject> { Self::rpcit_prepare(slot, g, fh, start, len) };
        let (epoch0, life0, first) = {
            let g = slot.read();
            (g.epoch, g.life(), prepare(&g))
        };
        self.hooks.point(&sluice_devapi::PointCtx {
            point: crate::POINT_RPCIT,
            endpoint: Some(sluice_devapi::Endpoint::Zpci { fh }),
            domain: None,
            value: start,
        });
        // The walk runs under the write lock, streamed into the shadow IOTLB: its work is
        // bounded by the step limit, so DMAs of this function wait at most that long.
        let (answer, event, refreshed) = {
            let mut g = slot.write();
            let plan = if g.epoch == epoch0 {
                first
            } else {
                match self.opts.ordering {
                    crate::model::CommitOrdering::Revalidate => prepare(&g),
                    crate::model::CommitOrdering::PreFixUnchecked => {
                        if first.is_ok() {
                            g.restore(life0);
                        }
                        first
                    }
                }
            };
            let fh_now = g.fh(slot.idx);
            let answer = match plan {
                Ok(p) => self.rpcit_apply(mem, slot, &mut g, &p, (start, len)),
                Err(Reject::Plain(st)) => (st, None, None),
                Err(Reject::Fault { pec, addr }) => (
                    InsnStatus::error(status::PCI_FUNC_IN_ERR),
                    Some(Zpci::fault_locked(slot, &mut g, pec, addr)),
                    None,
                ),
            };
            (answer.0, answer.1, answer.2.map(|r| (r, fh_now)))
        };
        if let Some(ev) = event {
            self.emit_error(ev);
        }
        if let Some(((range, refresh), fh_now)) = refreshed {
            self.report_refresh(slot, fh_now, "RPCIT", range, refresh);
        }
        answer
    }

    fn rpcit_prepare(
        slot: &Slot,
        g: &FnInner,
        fh: u32,
        start: u64,
        len: u64,
    ) -> Result<Plan, Reject> {
        if g.fh(slot.idx) != fh {
            return Err(Reject::Plain(InsnStatus::INVALID_HANDLE));
        }
        match g.state {
            FunctionState::Enabled | FunctionState::Blocked => {}
            FunctionState::Error => {
                return Err(Reject::Plain(InsnStatus::error(status::MOD_ERROR_RECOVER)));
            }
            _ => return Err(Reject::Plain(InsnStatus::INVALID_HANDLE)),
        }
        let fault = |pec, addr| Err(Reject::Fault { pec, addr });
        let Some(ioat) = g.ioat else {
            return fault(pec::INVALAS, start);
        };
        let end = start.saturating_add(len);
        if len > 0 && (end <= ioat.pba || start > ioat.pal) {
            return fault(pec::OORANGE, start);
        }
        let s = start.max(ioat.pba) & !(PAGE_SIZE - 1);
        let e = end.min(ioat.pal.saturating_add(1));
        Ok(Plan {
            iota: ioat.iota,
            start: s,
            end: if len == 0 { s } else { e },
        })
    }

    /// Takes the resume point of an earlier cc-2 answer to the same operands, if still valid.
    fn rpcit_resume_point(g: &mut FnInner, plan: &Plan, ops: (u64, u64)) -> u64 {
        let epoch = g.epoch;
        g.rpcit_resume.retain(|r| r.epoch == epoch);
        let found = g
            .rpcit_resume
            .iter()
            .position(|r| (r.start, r.len) == ops)
            .map(|i| g.rpcit_resume.remove(i).next);
        found
            .filter(|n| *n > plan.start && *n < plan.end)
            .unwrap_or(plan.start)
    }

    fn rpcit_remember(g: &mut FnInner, (start, len): (u64, u64), next: u64) {
        if g.rpcit_resume.len() >= RESUME_SLOTS {
            g.rpcit_resume.remove(0);
        }
        let epoch = g.epoch;
        g.rpcit_resume.push(Resume {
            start,
            len,
            epoch,
            next,
        });
    }

    /// Walks and applies one instruction's worth of `plan` under the function's write lock.
    fn rpcit_apply<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        slot: &Slot,
        g: &mut FnInner,
        plan: &Plan,
        ops: (u64, u64),
    ) -> Answer {
        let from = Self::rpcit_resume_point(g, plan, ops);
        g.refreshes += 1;
        let refresh = g.refreshes;
        let one_meg = slot.cfg.one_meg_frames;
        let limit = self.opts.rpcit_step_limit.max(1);
        // Pass 1: drop the shadow entries of every stretch the tables no longer map.
        let mut steps = 0u64;
        let mut freed = 0usize;
        let skip_unmaps = self.opts.fault_injection.skip_rpcit_invalidation;
        let iotlb = &mut g.iotlb;
        let first_pass = walk_range_until(mem, &plan.iota, from, plan.end, one_meg, &mut |s| {
            if let Step::Invalid { start, len } = s
                && !skip_unmaps
            {
                freed += iotlb.remove_range(start, start.saturating_add(len));
            }
            steps += 1;
            if steps >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        self.budget.give(freed);
        let (pass_end, error) = match first_pass {
            Ok(WalkEnd::Done) => (plan.end, None),
            Ok(WalkEnd::Stopped(at)) => (at, None),
            Err((iova, err)) => (iova, Some((iova, err))),
        };
        // Pass 2: install the valid frames of what pass 1 covered. The tables may change under
        // it (guest memory is not locked), so it is bounded too, and where it stops is where
        // this instruction's refresh ends.
        let mut steps = 0u64;
        let mut deferred = 0usize;
        let budget = &self.budget;
        let iotlb = &mut g.iotlb;
        let second_pass = walk_range_until(mem, &plan.iota, from, pass_end, one_meg, &mut |s| {
            if let Step::Mapped(m) = s {
                if iotlb.would_add(&m) && !budget.try_take() {
                    deferred += 1;
                } else {
                    let (_, dropped) = iotlb.install(&m, refresh);
                    budget.give(dropped);
                }
            }
            steps += 1;
            if steps >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        let (done_to, error) = match second_pass {
            Ok(WalkEnd::Done) => (pass_end, error),
            Ok(WalkEnd::Stopped(at)) => (at, None),
            // The tables changed between the passes; the new error stands.
            Err((iova, err)) => (iova, Some((iova, err))),
        };
        if let Some((iova, err)) = error {
            // A malformed table puts the function into the error state.
            let ev = Zpci::fault_locked(slot, g, err.pec(), iova);
            return (InsnStatus::error(status::PCI_FUNC_IN_ERR), Some(ev), None);
        }
        if deferred > 0 {
            return (InsnStatus::error(status::RPCIT_INSUFF_RES), None, None);
        }
        // Every frame of `[from, done_to)` was re-installed with this refresh number or removed
        // (an empty range refreshes nothing): that much is reported even when the rest of the
        // range waits for the guest's retry.
        let walked = (done_to > from).then(|| ((from, done_to - 1), refresh));
        if done_to < plan.end {
            Self::rpcit_remember(g, ops, done_to);
            return (InsnStatus::BUSY, None, walked);
        }
        (InsnStatus::OK, None, walked)
    }
}
