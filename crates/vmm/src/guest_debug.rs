//! `guest.sym.<symbol>[+offset]` injection points in the kvm backend: x86 hardware execution
//! breakpoints (DR0–DR3, through `KVM_SET_GUEST_DEBUG`) at the rules' guest addresses.
//!
//! A breakpoint hit is a debug exit of exactly the vCPU that reached the instruction. The VMM
//! asks the run's [`Injector`] the same question the qemu backend's TCG plugin server asks
//! (`decide(point, vcpu, stall)`, so `nth`/`count`/`after`/`prob`/`vcpu` behave identically),
//! sleeps that vCPU's thread for the drawn delay while the other vCPUs run on, then lets the
//! instruction execute once without re-trapping and continues with every breakpoint armed.
//!
//! Getting past the breakpoint (an instruction breakpoint is a fault: RIP still points at it):
//! - [`StepOver::SingleStep`]: that breakpoint is disarmed, the vCPU single-steps one
//!   instruction (`KVM_GUESTDBG_SINGLESTEP` with `KVM_GUESTDBG_BLOCKIRQ`, so that no interrupt
//!   handler is stepped into instead), and the next debug exit re-arms it. Two exits per hit;
//!   only offered where KVM has BLOCKIRQ (without it an interrupt taken at that moment would be
//!   stepped into and the breakpoint re-armed before its instruction ran: a double count).
//! - [`StepOver::ResumeFlag`]: RFLAGS.RF is set, which makes the CPU skip instruction
//!   breakpoints for one instruction (KVM does the same when it re-injects a fault). An
//!   interrupt taken first saves RF with RFLAGS and restores it with `iret`, so the
//!   instruction is still skipped exactly once. One exit per hit. A breakpoint cannot fault
//!   while RF is set, so a hit that arrives with RF set proves this KVM does not honour it
//!   (nested PVM does not): that arrival and every later one on the vCPU single-step instead.
//!
//! The default is the single step where KVM offers BLOCKIRQ (Linux 5.16 and later; this is the
//! path measured here), the resume flag otherwise.

use std::time::Instant;

use kvm_bindings::{
    KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    kvm_debug_exit_arch, kvm_guest_debug,
};
use kvm_ioctls::VcpuFd;
use sluice_devapi::PointCtx;
use sluice_inject::{Injector, Mode};
use std::sync::Arc;
use thiserror::Error;

use crate::stats::{VmmStats, bump};

/// Hardware breakpoints per vCPU (DR0–DR3).
pub const MAX_BREAKPOINTS: usize = 4;
/// DR7: global-enable bit of breakpoint `i` is `1 << (2 * i + 1)`; RW/LEN of `i` (bits
/// `16 + 4 * i`) stay 0 = instruction execution, 1 byte.
const DR7_GE: u64 = 1 << 9;
/// DR6: breakpoint `i` matched is bit `i`; single step is bit 14.
const DR6_BS: u64 = 1 << 14;
/// Debug exception vector.
const DB_VECTOR: u32 = 1;
/// RFLAGS.RF.
const RFLAGS_RF: u64 = 1 << 16;

/// `guest.sym` rules the kvm backend cannot serve.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GuestDebugError {
    /// More distinct addresses than hardware breakpoints.
    #[error(
        "{count} distinct guest.sym addresses ({points}); the kvm backend has {MAX_BREAKPOINTS} \
         hardware breakpoints (DR0-DR3): use at most {MAX_BREAKPOINTS}, or the qemu backend"
    )]
    TooMany {
        /// Distinct addresses asked for.
        count: usize,
        /// The points, for the message.
        points: String,
    },
    /// KVM refused the breakpoints.
    #[error("KVM_SET_GUEST_DEBUG on vCPU {vcpu} failed: {reason}")]
    Kvm {
        /// vCPU index.
        vcpu: u8,
        /// The error.
        reason: String,
    },
}

/// How a vCPU gets past a breakpoint it stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOver {
    /// Disarm it, single-step one instruction, re-arm.
    SingleStep,
    /// Set RFLAGS.RF (skip instruction breakpoints for one instruction).
    ResumeFlag,
}

impl StepOver {
    /// The single step when KVM can block interrupts during it (`step_flags` has BLOCKIRQ),
    /// else the resume flag.
    pub fn default_for(step_flags: u32) -> StepOver {
        if step_flags & KVM_GUESTDBG_BLOCKIRQ != 0 {
            StepOver::SingleStep
        } else {
            StepOver::ResumeFlag
        }
    }
}

/// The watched addresses, each with every point name that stands for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breakpoints {
    slots: Vec<(u64, Vec<String>)>,
}

impl Breakpoints {
    /// From `Injector::guest_watch()`: (address, point) pairs, several names per address
    /// possible (`guest.sym.f` and `guest.sym.g+0x10` can be one instruction).
    pub fn from_watch(watch: &[(u64, String)]) -> Result<Self, GuestDebugError> {
        let mut slots: Vec<(u64, Vec<String>)> = Vec::new();
        for (addr, point) in watch {
            match slots.iter_mut().find(|(a, _)| a == addr) {
                Some((_, names)) if !names.contains(point) => names.push(point.clone()),
                Some(_) => {}
                None => slots.push((*addr, vec![point.clone()])),
            }
        }
        if slots.len() > MAX_BREAKPOINTS {
            let points: Vec<String> = slots
                .iter()
                .map(|(a, n)| format!("{} = {a:#x}", n.join("/")))
                .collect();
            return Err(GuestDebugError::TooMany {
                count: slots.len(),
                points: points.join(", "),
            });
        }
        Ok(Breakpoints { slots })
    }

    /// No `guest.sym` rules.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The `KVM_SET_GUEST_DEBUG` argument: every breakpoint armed except `step_over`, which is
    /// instead being single-stepped past (`extra` adds e.g. BLOCKIRQ to that step).
    pub fn control(&self, step_over: Option<usize>, extra: u32) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        let mut dr7 = DR7_GE;
        for (i, (addr, _)) in self.slots.iter().enumerate().take(MAX_BREAKPOINTS) {
            if let Some(dr) = dbg.arch.debugreg.get_mut(i) {
                *dr = *addr;
            }
            if step_over != Some(i) {
                dr7 |= 1 << (2 * i + 1);
            }
        }
        if step_over.is_some() {
            dbg.control |= KVM_GUESTDBG_SINGLESTEP | extra;
        }
        dbg.arch.debugreg[7] = dr7;
        dbg
    }

    /// Which breakpoint a debug exit reports: DR6's B0–B3, else the exit PC.
    pub fn slot_of(&self, exit: &kvm_debug_exit_arch) -> Option<usize> {
        if exit.exception != DB_VECTOR {
            return None;
        }
        let by_dr6 = (0..self.slots.len()).find(|i| exit.dr6 & (1 << i) != 0);
        by_dr6.or_else(|| self.slots.iter().position(|(a, _)| *a == exit.pc))
    }

    /// Address and point names of breakpoint `slot`.
    pub fn slot(&self, slot: usize) -> Option<(u64, &[String])> {
        self.slots.get(slot).map(|(a, n)| (*a, n.as_slice()))
    }
}

/// What every vCPU shares: the breakpoints, the injector deciding stalls, the counters.
pub struct GuestDebug {
    /// The breakpoints.
    pub breakpoints: Breakpoints,
    /// The run's injector.
    pub injector: Arc<Injector>,
    /// Counters.
    pub stats: Arc<VmmStats>,
    /// How to get past a breakpoint.
    pub step: StepOver,
    /// Control bits added to a single step (BLOCKIRQ when KVM offers it).
    pub step_flags: u32,
}

/// Supported `KVM_GUESTDBG_*` bits of this KVM (`KVM_CAP_SET_GUEST_DEBUG2`), as step flags:
/// BLOCKIRQ if offered.
pub fn step_flags(vm: &kvm_ioctls::VmFd) -> u32 {
    let supported =
        vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2));
    (supported.max(0) as u32) & KVM_GUESTDBG_BLOCKIRQ
}

/// One vCPU's breakpoint state.
#[derive(Debug, Default)]
pub struct VcpuDebug {
    /// Single-stepping past this breakpoint.
    stepping: Option<usize>,
    /// This vCPU saw RF ignored: it single-steps from now on.
    rf_ignored: bool,
}

impl GuestDebug {
    /// Arms every breakpoint on `vcpu`.
    pub fn arm(&self, vcpu: &VcpuFd, id: u8) -> Result<(), GuestDebugError> {
        vcpu.set_guest_debug(&self.breakpoints.control(None, 0))
            .map_err(|e| GuestDebugError::Kvm {
                vcpu: id,
                reason: e.to_string(),
            })
    }

    /// Handles a debug exit. `Err` ends the vCPU (the guest cannot continue correctly).
    pub fn on_exit(
        &self,
        vcpu: &mut VcpuFd,
        id: u8,
        state: &mut VcpuDebug,
        exit: &kvm_debug_exit_arch,
    ) -> Result<(), String> {
        if state.stepping.take().is_some() {
            // The single step past a breakpoint ended: re-arm it.
            self.arm(vcpu, id).map_err(|e| e.to_string())?;
            if exit.dr6 & DR6_BS != 0 || self.breakpoints.slot_of(exit).is_none() {
                return Ok(());
            }
        }
        let Some(slot) = self.breakpoints.slot_of(exit) else {
            return Err(format!(
                "vCPU {id}: debug exit at {:#x} (exception {}, dr6 {:#x}) matches no breakpoint",
                exit.pc, exit.exception, exit.dr6
            ));
        };
        let (addr, names) = self.breakpoints.slot(slot).unwrap_or((exit.pc, &[]));
        if self.step == StepOver::ResumeFlag && !state.rf_ignored {
            let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
            if regs.rflags & RFLAGS_RF != 0 {
                // The instruction faulted again although RF was set: the same arrival, and a
                // KVM that does not honour RF.
                if self.step_flags & KVM_GUESTDBG_BLOCKIRQ == 0 {
                    return Err(format!(
                        "vCPU {id}: KVM ignores RFLAGS.RF at breakpoint {addr:#x} and cannot \
                         single-step with KVM_GUESTDBG_BLOCKIRQ: no way past the breakpoint"
                    ));
                }
                log::info!("vCPU {id}: KVM ignores RFLAGS.RF; single-stepping past breakpoints");
                state.rf_ignored = true;
                regs.rflags &= !RFLAGS_RF;
                vcpu.set_regs(&regs)
                    .map_err(|e| format!("vCPU {id}: KVM_SET_REGS: {e}"))?;
                return self.step_past(vcpu, id, state, slot);
            }
        }
        bump(&self.stats.breakpoint_hits);
        self.stall(id, addr, names);
        self.step_past(vcpu, id, state, slot)
    }

    /// Asks the injector about one arrival at `addr` and holds this vCPU for the delay.
    fn stall(&self, id: u8, addr: u64, names: &[String]) {
        let arrived = Instant::now();
        let delay = names
            .iter()
            .filter_map(|point| {
                self.injector.decide(
                    &PointCtx::new(point, addr),
                    Some(u32::from(id)),
                    Mode::Stall,
                )
            })
            .max();
        if let Some(d) = delay {
            std::thread::sleep(d.saturating_sub(arrived.elapsed()));
            bump(&self.stats.breakpoint_stalls);
            let us = u64::try_from(arrived.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.stats
                .breakpoint_stalled_us
                .fetch_add(us, std::sync::atomic::Ordering::Relaxed);
            log::debug!("vCPU {id} held {d:?} at {addr:#x}");
        }
    }

    fn step_past(
        &self,
        vcpu: &mut VcpuFd,
        id: u8,
        state: &mut VcpuDebug,
        slot: usize,
    ) -> Result<(), String> {
        let step = if state.rf_ignored {
            StepOver::SingleStep
        } else {
            self.step
        };
        match step {
            StepOver::SingleStep => {
                vcpu.set_guest_debug(&self.breakpoints.control(Some(slot), self.step_flags))
                    .map_err(|e| format!("vCPU {id}: KVM_SET_GUEST_DEBUG (step): {e}"))?;
                state.stepping = Some(slot);
                Ok(())
            }
            StepOver::ResumeFlag => {
                let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
                regs.rflags |= RFLAGS_RF;
                vcpu.set_regs(&regs)
                    .map_err(|e| format!("vCPU {id}: KVM_SET_REGS (RF): {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(pairs: &[(u64, &str)]) -> Vec<(u64, String)> {
        pairs.iter().map(|(a, p)| (*a, p.to_string())).collect()
    }

    #[test]
    fn at_most_four_distinct_addresses() {
        let four = watch(&[
            (0x1000, "guest.sym.a"),
            (0x2000, "guest.sym.b"),
            (0x3000, "guest.sym.c"),
            (0x4000, "guest.sym.d"),
            (0x1000, "guest.sym.e-alias"),
        ]);
        let b = Breakpoints::from_watch(&four).unwrap();
        assert_eq!(
            b.slot(0),
            Some((
                0x1000,
                &["guest.sym.a".to_string(), "guest.sym.e-alias".to_string()][..]
            ))
        );
        let mut five = four.clone();
        five.push((0x5000, "guest.sym.f".into()));
        let e = Breakpoints::from_watch(&five).unwrap_err();
        assert!(matches!(e, GuestDebugError::TooMany { count: 5, .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("guest.sym.f = 0x5000") && msg.contains("DR0-DR3"),
            "{msg}"
        );
        assert!(Breakpoints::from_watch(&[]).unwrap().is_empty());
    }

    #[test]
    fn debug_registers_arm_every_slot_but_the_one_stepped_over() {
        let b = Breakpoints::from_watch(&watch(&[
            (0xffff_ffff_8100_0000, "guest.sym.a"),
            (0xffff_ffff_8100_0040, "guest.sym.b"),
        ]))
        .unwrap();
        let all = b.control(None, KVM_GUESTDBG_BLOCKIRQ);
        assert_eq!(all.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(all.arch.debugreg[0], 0xffff_ffff_8100_0000);
        assert_eq!(all.arch.debugreg[1], 0xffff_ffff_8100_0040);
        // G0 | G1 | GE; RW/LEN 0 = execute, 1 byte.
        assert_eq!(all.arch.debugreg[7], 0b1010 | DR7_GE);
        let step = b.control(Some(0), KVM_GUESTDBG_BLOCKIRQ);
        assert_eq!(step.arch.debugreg[7], 0b1000 | DR7_GE, "slot 0 disarmed");
        assert_eq!(
            step.control,
            KVM_GUESTDBG_ENABLE
                | KVM_GUESTDBG_USE_HW_BP
                | KVM_GUESTDBG_SINGLESTEP
                | KVM_GUESTDBG_BLOCKIRQ
        );
    }

    #[test]
    fn the_single_step_is_the_default_only_with_blockirq() {
        assert_eq!(
            StepOver::default_for(KVM_GUESTDBG_BLOCKIRQ),
            StepOver::SingleStep
        );
        assert_eq!(StepOver::default_for(0), StepOver::ResumeFlag);
    }

    #[test]
    fn exits_are_matched_by_dr6_then_pc() {
        let b = Breakpoints::from_watch(&watch(&[(0x10, "guest.sym.a"), (0x20, "guest.sym.b")]))
            .unwrap();
        let exit = |exception, pc, dr6| kvm_debug_exit_arch {
            exception,
            pc,
            dr6,
            ..Default::default()
        };
        assert_eq!(b.slot_of(&exit(1, 0x99, 0b10)), Some(1), "B1 set");
        assert_eq!(b.slot_of(&exit(1, 0x10, 0)), Some(0), "by PC");
        assert_eq!(b.slot_of(&exit(1, 0x99, DR6_BS)), None, "a single step");
        assert_eq!(b.slot_of(&exit(3, 0x10, 0)), None, "#BP is not ours");
    }
}
