//! MPCIFC (Modify PCI Function Controls): register/deregister interrupts and the DMA address
//! space, reset error/blocked state, set measurement.
//!
//! Order of checks follows QEMU's `mpcifc_service_call`: FIB address alignment (specification
//! exception), handle lookup and state (cc 3 unless enabled, error or blocked), FIB fetch
//! (addressing exception), FIB format (operand exception), then the operation. Parse first
//! ([`MpcifcRequest::parse`]), then apply ([`Zpci::mpcifc_apply`]).

use sluice_devapi::ZpciState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::codes::{InsnStatus, ProgramException, pec, status};
use crate::fib::Fib;
use crate::function::{FunctionState, Transition};
use crate::model::{ErrorEvent, FnInner, IoatReg, IrqReg, Slot, Zpci};
use crate::walk::Iota;

/// MPCIFC operation controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MpcifcOp {
    /// 2: register adapter interruptions.
    RegInt,
    /// 3: deregister adapter interruptions.
    DeregInt,
    /// 4: register I/O address translation parameters.
    RegIoat,
    /// 5: deregister them.
    DeregIoat,
    /// 6: re-register them.
    ReregIoat,
    /// 7: reset the error state.
    ResetError,
    /// 9: reset load/store blocked.
    ResetBlock,
    /// 10: set the function-measurement block.
    SetMeasure,
}

impl MpcifcOp {
    /// Every operation.
    pub const ALL: [MpcifcOp; 8] = [
        MpcifcOp::RegInt,
        MpcifcOp::DeregInt,
        MpcifcOp::RegIoat,
        MpcifcOp::DeregIoat,
        MpcifcOp::ReregIoat,
        MpcifcOp::ResetError,
        MpcifcOp::ResetBlock,
        MpcifcOp::SetMeasure,
    ];

    /// Decodes an operation control.
    pub fn from_code(oc: u8) -> Option<Self> {
        Some(match oc {
            2 => MpcifcOp::RegInt,
            3 => MpcifcOp::DeregInt,
            4 => MpcifcOp::RegIoat,
            5 => MpcifcOp::DeregIoat,
            6 => MpcifcOp::ReregIoat,
            7 => MpcifcOp::ResetError,
            9 => MpcifcOp::ResetBlock,
            10 => MpcifcOp::SetMeasure,
            _ => return None,
        })
    }

    /// Operation control value.
    pub fn code(self) -> u8 {
        match self {
            MpcifcOp::RegInt => 2,
            MpcifcOp::DeregInt => 3,
            MpcifcOp::RegIoat => 4,
            MpcifcOp::DeregIoat => 5,
            MpcifcOp::ReregIoat => 6,
            MpcifcOp::ResetError => 7,
            MpcifcOp::ResetBlock => 9,
            MpcifcOp::SetMeasure => 10,
        }
    }

    /// Hook point name (`zpci.mpcifc.<op>`).
    pub fn point(self) -> &'static str {
        match self {
            MpcifcOp::RegInt => "zpci.mpcifc.reg_int",
            MpcifcOp::DeregInt => "zpci.mpcifc.dereg_int",
            MpcifcOp::RegIoat => "zpci.mpcifc.reg_ioat",
            MpcifcOp::DeregIoat => "zpci.mpcifc.dereg_ioat",
            MpcifcOp::ReregIoat => "zpci.mpcifc.rereg_ioat",
            MpcifcOp::ResetError => "zpci.mpcifc.reset_error",
            MpcifcOp::ResetBlock => "zpci.mpcifc.reset_block",
            MpcifcOp::SetMeasure => "zpci.mpcifc.set_measure",
        }
    }
}

/// A decoded MPCIFC instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpcifcRequest {
    /// Function handle (R1 bits 0-31).
    pub fh: u32,
    /// DMA address space number (R1 bits 40-47).
    pub dmaas: u8,
    /// Operation, or the raw code when unknown (operand exception once the handle checks pass).
    pub op: Result<MpcifcOp, u8>,
    /// The FIB, or why it could not be fetched.
    pub fib: Result<Fib, ProgramException>,
}

impl MpcifcRequest {
    /// Decodes R1 (`fh << 32 | dmaas << 16 | oc`) and fetches the FIB at `fiba`.
    /// A misaligned FIB address is a specification exception before anything else.
    pub fn parse<M: GuestMemoryBackend>(
        mem: &M,
        r1: u64,
        fiba: u64,
    ) -> Result<Self, ProgramException> {
        if fiba & 7 != 0 {
            return Err(ProgramException::Specification);
        }
        let oc = (r1 & 0xff) as u8;
        let fib = Fib::read(mem, fiba).map_err(|_| ProgramException::Addressing { addr: fiba });
        Ok(MpcifcRequest {
            fh: (r1 >> 32) as u32,
            dmaas: ((r1 >> 16) & 0xff) as u8,
            op: MpcifcOp::from_code(oc).ok_or(oc),
            fib,
        })
    }
}

/// Effect to commit.
#[derive(Debug, Clone, Copy)]
enum Plan {
    SetIoat(IoatReg),
    ClearIoat,
    ReplaceIoat(IoatReg),
    State(Transition),
    SetIrq(IrqReg),
    ClearIrq,
    SetFmb(u64),
    FmbFault(u64),
}

type Outcome = (
    Result<InsnStatus, ProgramException>,
    Option<ErrorEvent>,
    Option<ZpciState>,
);

fn plain(r: Result<InsnStatus, ProgramException>) -> Outcome {
    (r, None, None)
}

/// FMB key bits that must be zero (QEMU `FMBK_MASK`).
const FMB_KEY_MASK: u64 = 0xf;

impl Zpci {
    /// Executes MPCIFC with register R1 = `fh << 32 | dmaas << 16 | oc` and the FIB at `fiba`.
    pub fn mpcifc<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        r1: u64,
        fiba: u64,
    ) -> Result<InsnStatus, ProgramException> {
        let req = MpcifcRequest::parse(mem, r1, fiba)?;
        self.mpcifc_apply(mem, &req)
    }

    /// Executes MPCIFC with an already-built FIB (no guest-memory fetch for it).
    pub fn mpcifc_with_fib<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        fh: u32,
        dmaas: u8,
        op: MpcifcOp,
        fib: &Fib,
    ) -> Result<InsnStatus, ProgramException> {
        self.mpcifc_apply(
            mem,
            &MpcifcRequest {
                fh,
                dmaas,
                op: Ok(op),
                fib: Ok(*fib),
            },
        )
    }

    /// Applies a parsed request.
    pub fn mpcifc_apply<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        req: &MpcifcRequest,
    ) -> Result<InsnStatus, ProgramException> {
        let Some(slot) = self.slot_by_fh(req.fh) else {
            return Ok(InsnStatus::INVALID_HANDLE);
        };
        // Checks that come before the FIB in the architecture's order.
        {
            let g = slot.read();
            if let Err(cc3) = handle_ok(slot, &g, req.fh) {
                return Ok(cc3);
            }
        }
        let fib = req.fib?;
        if fib.fmt != 0 {
            return Err(ProgramException::Operand);
        }
        let op = req.op.map_err(|_| ProgramException::Operand)?;
        let value = if matches!(op, MpcifcOp::RegIoat | MpcifcOp::ReregIoat) {
            fib.iota
        } else {
            0
        };
        let prepare = |g: &FnInner| -> Result<Plan, Outcome> {
            handle_ok(slot, g, req.fh).map_err(|cc3| plain(Ok(cc3)))?;
            prepare(mem, slot, g, req.dmaas, op, &fib)
        };
        let commit = |g: &mut FnInner, p: Plan| self.commit(slot, g, p, value);
        let (result, event, change) = self.windowed(slot, op.point(), value, &prepare, &commit);
        if let Some(ev) = event {
            self.emit_error(ev);
        }
        self.report_drops(slot);
        if let (
            Some(change),
            Ok(InsnStatus {
                cc: crate::Cc::Ok, ..
            }),
        ) = (change, result)
        {
            self.emit_state(change, req.fh);
        }
        result
    }

    /// Applies a prepared plan; `value` is the IOTA of a (re-)registration.
    fn commit(&self, slot: &Slot, g: &mut FnInner, p: Plan, value: u64) -> Outcome {
        let ok = |change| (Ok(InsnStatus::OK), None, Some(change));
        match p {
            Plan::SetIoat(r) => {
                let freed = g.drop_translations("REG_IOAT");
                self.budget.give(freed);
                g.ioat = Some(r);
                ok(ZpciState::RegIoat { iota: value })
            }
            Plan::ClearIoat => {
                let freed = g.drop_translations("DEREG_IOAT");
                self.budget.give(freed);
                ok(ZpciState::DeregIoat)
            }
            Plan::ReplaceIoat(r) => {
                let freed = g.drop_translations("REREG_IOAT");
                self.budget.give(freed);
                g.ioat = Some(r);
                ok(ZpciState::ReregIoat { iota: value })
            }
            Plan::State(t) => match g.transition(t) {
                Ok(_) => ok(if t == Transition::ResetError {
                    ZpciState::ResetError
                } else {
                    ZpciState::ResetBlock
                }),
                Err(_) => plain(Ok(InsnStatus::error(status::MOD_SEQUENCE))),
            },
            Plan::SetIrq(r) => {
                g.irq = Some(r);
                ok(ZpciState::RegInt)
            }
            Plan::ClearIrq => {
                g.irq = None;
                ok(ZpciState::DeregInt)
            }
            Plan::SetFmb(a) => {
                g.fmb_addr = a;
                ok(ZpciState::SetMeasure)
            }
            Plan::FmbFault(a) => {
                g.fmb_addr = 0;
                let ev = ErrorEvent {
                    fid: slot.cfg.fid,
                    fh: g.fh(slot.idx),
                    pec: pec::FMBPRO,
                    addr: a,
                };
                (Ok(InsnStatus::error(0)), Some(ev), None)
            }
        }
    }
}

/// cc 3 unless the handle is current and the function enabled, in error or blocked.
fn handle_ok(slot: &Slot, g: &FnInner, fh: u32) -> Result<(), InsnStatus> {
    if g.fh(slot.idx) != fh || !g.state.is_enabled_meta() {
        return Err(InsnStatus::INVALID_HANDLE);
    }
    Ok(())
}

fn seq() -> Outcome {
    plain(Ok(InsnStatus::error(status::MOD_SEQUENCE)))
}

/// Validates the window and IOTA of a (re-)registration.
fn ioat_from_fib(slot: &Slot, fib: &Fib) -> Result<IoatReg, ProgramException> {
    let pba = fib.pba & !0xfff;
    let pal = fib.pal | 0xfff;
    if pba > pal || pba < slot.cfg.sdma || pal > slot.cfg.edma {
        return Err(ProgramException::Operand);
    }
    let iota = Iota::parse(fib.iota).map_err(|_| ProgramException::Operand)?;
    Ok(IoatReg { iota, pba, pal })
}

fn prepare<M: GuestMemoryBackend>(
    mem: &M,
    slot: &Slot,
    g: &FnInner,
    dmaas: u8,
    op: MpcifcOp,
    fib: &Fib,
) -> Result<Plan, Outcome> {
    let dmaas_bad = || plain(Ok(InsnStatus::error(status::MOD_DMAAS_INVAL)));
    match op {
        MpcifcOp::RegIoat => {
            if dmaas != 0 {
                return Err(dmaas_bad());
            }
            if g.ioat.is_some() {
                return Err(seq());
            }
            ioat_from_fib(slot, fib)
                .map(Plan::SetIoat)
                .map_err(|e| plain(Err(e)))
        }
        MpcifcOp::DeregIoat => {
            if dmaas != 0 {
                return Err(dmaas_bad());
            }
            if g.ioat.is_none() {
                return Err(seq());
            }
            Ok(Plan::ClearIoat)
        }
        MpcifcOp::ReregIoat => {
            if dmaas != 0 {
                return Err(dmaas_bad());
            }
            if g.ioat.is_none() {
                return Err(seq());
            }
            ioat_from_fib(slot, fib)
                .map(Plan::ReplaceIoat)
                .map_err(|e| plain(Err(e)))
        }
        MpcifcOp::ResetError => match g.state {
            FunctionState::Error | FunctionState::Blocked => {
                Ok(Plan::State(Transition::ResetError))
            }
            _ => Err(seq()),
        },
        MpcifcOp::ResetBlock => match g.state {
            FunctionState::Error => Ok(Plan::State(Transition::ResetBlock)),
            _ => Err(seq()),
        },
        MpcifcOp::SetMeasure => {
            if fib.fmb_addr & FMB_KEY_MASK != 0 {
                return Ok(Plan::FmbFault(fib.fmb_addr));
            }
            Ok(Plan::SetFmb(fib.fmb_addr))
        }
        MpcifcOp::RegInt => {
            if g.irq.is_some() {
                return Err(seq());
            }
            // The indicator bit vector and summary bit must be addressable.
            let bits = u64::from(fib.aibvo()) + u64::from(fib.noi());
            let vec_len = bits.div_ceil(8).max(1);
            let readable = |addr: u64, len: u64| {
                let mut b = [0u8; 1];
                let last = addr.checked_add(len - 1);
                addr != 0
                    && last.is_some_and(|l| {
                        mem.read_slice(&mut b, GuestAddress(addr)).is_ok()
                            && mem.read_slice(&mut b, GuestAddress(l)).is_ok()
                    })
            };
            let sum_addr = fib.aisb.checked_add(u64::from(fib.aisbo() / 8));
            if fib.noi() == 0
                || !readable(fib.aibv, vec_len)
                || !sum_addr.is_some_and(|a| readable(a, 1))
            {
                return Err(plain(Ok(InsnStatus::error(status::MOD_RES_NOT_AVAIL))));
            }
            Ok(Plan::SetIrq(IrqReg {
                aibv: fib.aibv,
                aisb: fib.aisb,
                noi: fib.noi(),
                isc: fib.isc(),
            }))
        }
        MpcifcOp::DeregInt => {
            if g.irq.is_none() {
                return Err(seq());
            }
            Ok(Plan::ClearIrq)
        }
    }
}
