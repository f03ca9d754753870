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

use vm_memory::GuestMemoryBackend;

use crate::codes::{InsnStatus, pec, status};
use crate::function::FunctionState;
use crate::model::{ErrorEvent, FnInner, Slot, Zpci};
use crate::walk::{Iota, PAGE_SIZE, Step, WalkError, walk_range};

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

/// What the guest tables said about the range.
struct Walked {
    steps: Vec<Step>,
    error: Option<(u64, WalkError)>,
}

/// Range to walk once preconditions hold.
#[derive(Clone, Copy)]
struct Plan {
    iota: Iota,
    start: u64,
    end: u64,
}

/// The status, an error event to emit, and the refresh to report (range walked, refresh number)
/// when the RPCIT completed with cc 0.
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
        let one_meg = slot.cfg.one_meg_frames;
        let walk = |p: &Plan| {
            let mut steps = Vec::new();
            let error = walk_range(mem, &p.iota, p.start, p.end, one_meg, &mut |s| {
                steps.push(s)
            })
            .err();
            Walked { steps, error }
        };
        let prepare =
            |g: &FnInner| -> Result<Plan, Reject> { Self::rpcit_prepare(slot, g, fh, start, len) };
        // Walk outside the lock; the commit re-validates by generation.
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
        let walked = first.as_ref().ok().map(walk);
        let (answer, event, refreshed) = {
            let mut g = slot.write();
            let (plan, walked) = if g.epoch == epoch0 {
                (first, walked)
            } else {
                match self.opts.ordering {
                    crate::model::CommitOrdering::Revalidate => {
                        let p = prepare(&g);
                        let w = p.as_ref().ok().map(walk);
                        (p, w)
                    }
                    crate::model::CommitOrdering::PreFixUnchecked => {
                        if first.is_ok() {
                            g.restore(life0);
                        }
                        (first, walked)
                    }
                }
            };
            let fh_now = g.fh(slot.idx);
            let answer = match (plan, walked) {
                (Ok(p), Some(w)) => self.rpcit_apply(slot, &mut g, &p, w),
                (Err(Reject::Plain(st)), _) => (st, None, None),
                (Err(Reject::Fault { pec, addr }), _) => (
                    InsnStatus::error(status::PCI_FUNC_IN_ERR),
                    Some(Zpci::fault_locked(slot, &mut g, pec, addr)),
                    None,
                ),
                (Ok(_), None) => (InsnStatus::INVALID_HANDLE, None, None),
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

    fn rpcit_apply(&self, slot: &Slot, g: &mut FnInner, plan: &Plan, w: Walked) -> Answer {
        g.refreshes += 1;
        let refresh = g.refreshes;
        let mut freed = 0usize;
        let drop_invalid = !self.opts.fault_injection.skip_rpcit_invalidation;
        for s in w.steps.iter().filter(|_| drop_invalid) {
            if let Step::Invalid { start, len } = *s {
                freed += g.iotlb.remove_range(start, start.saturating_add(len));
            }
        }
        self.budget.give(freed);
        let mut deferred = 0usize;
        for s in &w.steps {
            let Step::Mapped(m) = s else { continue };
            if g.iotlb.would_add(m) && !self.budget.try_take() {
                deferred += 1;
                continue;
            }
            let (how, dropped) = g.iotlb.install(m, refresh);
            let _ = how;
            self.budget.give(dropped);
        }
        if let Some((iova, err)) = w.error {
            // A malformed table puts the function into the error state.
            let ev = Zpci::fault_locked(slot, g, err.pec(), iova);
            return (InsnStatus::error(status::PCI_FUNC_IN_ERR), Some(ev), None);
        }
        if deferred > 0 {
            return (InsnStatus::error(status::RPCIT_INSUFF_RES), None, None);
        }
        // Every frame of the walked range was re-installed with this refresh number or
        // removed; an empty range refreshes nothing.
        let walked = (plan.end > plan.start).then(|| ((plan.start, plan.end - 1), refresh));
        (InsnStatus::OK, None, walked)
    }
}
