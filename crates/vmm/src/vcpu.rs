//! vCPU setup (CPUID, MSRs, LAPIC LINTs, boot registers) and the per-vCPU exit loop.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{Msrs, kvm_lapic_state, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::VmmError;
use crate::boot::{Entry, fpu, regs_for, sregs_for};
use crate::guest_debug::{GuestDebug, VcpuDebug};
use crate::platform::{PioAction, Platform, VcpuStop};

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// Boot MSRs (as Firecracker sets them): SYSENTER/SYSCALL state cleared, TSC 0, fast strings,
/// MTRRs enabled with write-back default.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x10, 0),              // TSC
        (0x1a0, 1),             // MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, WB
    ]
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| l.regs.get(off + i).map_or(0, |c| *c as u8);
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        if let Some(c) = l.regs.get_mut(off + i) {
            *c = *byte as _;
        }
    }
}

/// LINT0 = ExtINT (the 8259), LINT1 = NMI, as on a PC.
pub fn set_lints(l: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(l, APIC_LVT0);
    set_lapic_reg(l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(l, APIC_LVT1);
    set_lapic_reg(l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

/// Configures one vCPU. The boot CPU (id 0) also gets the entry registers; the others wait
/// for INIT/SIPI in the in-kernel LAPIC.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &kvm_bindings::CpuId,
    entry: Entry,
) -> Result<(), VmmError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| VmmError::Kvm("KVM_SET_CPUID2", e))?;
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| VmmError::Config(format!("MSRs: {e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| VmmError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; PVM refuses some.
        let bad = entries.get(set).map_or(0, |e| e.index);
        log::warn!(
            "vCPU {id}: KVM set {set} of {} boot MSRs (refused {bad:#x})",
            entries.len()
        );
    }
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| VmmError::Kvm("KVM_GET_LAPIC", e))?;
    set_lints(&mut lapic);
    vcpu.set_lapic(&lapic)
        .map_err(|e| VmmError::Kvm("KVM_SET_LAPIC", e))?;
    vcpu.set_fpu(&fpu())
        .map_err(|e| VmmError::Kvm("KVM_SET_FPU", e))?;
    if id == 0 {
        let base = vcpu
            .get_sregs()
            .map_err(|e| VmmError::Kvm("KVM_GET_SREGS", e))?;
        vcpu.set_sregs(&sregs_for(entry, base))
            .map_err(|e| VmmError::Kvm("KVM_SET_SREGS", e))?;
        vcpu.set_regs(&regs_for(entry))
            .map_err(|e| VmmError::Kvm("KVM_SET_REGS", e))?;
    }
    Ok(())
}

/// The instruction bytes KVM reports with an emulation failure
/// (`KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: data[0] = flags, then the length
/// byte and up to 15 bytes).
pub fn emulation_insn_bytes(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    const FLAG_INSTRUCTION_BYTES: u64 = 1;
    if suberror != 1 || data.first().copied()? & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let bytes: Vec<u8> = data
        .get(1..3)?
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let len = usize::from(*bytes.first()?).min(15);
    bytes.get(1..1 + len).map(<[u8]>::to_vec)
}

/// Works around instructions nested PVM's emulator cannot run, when the VMM can do their job
/// itself. Today: INT3 (Linux's `int3_selftest` and kprobes/jump-label patching), injected as
/// the #BP trap it is (RIP after the instruction). Returns true if the vCPU may continue.
fn emulation_fixup(vcpu: &mut VcpuFd, insn: &[u8]) -> bool {
    if let Some((len, dst, value)) = vcpu.get_regs().ok().and_then(|r| popcnt(insn, &r)) {
        let Ok(mut regs) = vcpu.get_regs() else {
            return false;
        };
        if let Some(r) = gpr_mut(&mut regs, dst) {
            *r = value;
        }
        // POPCNT clears OF, SF, ZF, AF, CF, PF and sets ZF for a zero source.
        regs.rflags &= !0x8d5;
        if value == 0 {
            regs.rflags |= 0x40;
        }
        regs.rip += len;
        return vcpu.set_regs(&regs).is_ok();
    }
    // CLAC (0f 01 ca) / STAC (0f 01 cb): clear/set RFLAGS.AC.
    if let Some(op @ (0xca | 0xcb)) = insn
        .get(..3)
        .and_then(|b| (b[..2] == [0x0f, 0x01]).then_some(b[2]))
    {
        let Ok(mut regs) = vcpu.get_regs() else {
            return false;
        };
        if op == 0xca {
            regs.rflags &= !(1 << 18);
        } else {
            regs.rflags |= 1 << 18;
        }
        regs.rip += 3;
        return vcpu.set_regs(&regs).is_ok();
    }
    if insn.first() != Some(&0xcc) {
        return false;
    }
    let (Ok(mut regs), Ok(mut events)) = (vcpu.get_regs(), vcpu.get_vcpu_events()) else {
        return false;
    };
    regs.rip += 1;
    events.exception.injected = 1;
    events.exception.nr = 3;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_regs(&regs).is_ok() && vcpu.set_vcpu_events(&events).is_ok()
}

fn gpr_mut(r: &mut kvm_bindings::kvm_regs, n: u8) -> Option<&mut u64> {
    Some(match n {
        0 => &mut r.rax,
        1 => &mut r.rcx,
        2 => &mut r.rdx,
        3 => &mut r.rbx,
        4 => &mut r.rsp,
        5 => &mut r.rbp,
        6 => &mut r.rsi,
        7 => &mut r.rdi,
        8 => &mut r.r8,
        9 => &mut r.r9,
        10 => &mut r.r10,
        11 => &mut r.r11,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        15 => &mut r.r15,
        _ => return None,
    })
}

/// Decodes `POPCNT reg, reg` (`F3 [REX] 0F B8 /r`, register form only) and computes it:
/// (instruction length, destination register number, result).
pub fn popcnt(insn: &[u8], regs: &kvm_bindings::kvm_regs) -> Option<(u64, u8, u64)> {
    if insn.first() != Some(&0xf3) {
        return None;
    }
    let mut i = 1;
    let rex = match insn.get(1) {
        Some(b) if b & 0xf0 == 0x40 => {
            i += 1;
            *b
        }
        _ => 0,
    };
    if insn.get(i..i + 2) != Some(&[0x0f, 0xb8]) {
        return None;
    }
    let modrm = *insn.get(i + 2)?;
    if modrm >> 6 != 3 {
        return None; // memory operand: not handled
    }
    let dst = ((modrm >> 3) & 7) | ((rex & 4) << 1);
    let src = (modrm & 7) | ((rex & 1) << 3);
    let mut copy = *regs;
    let v = *gpr_mut(&mut copy, src)?;
    let v = if rex & 8 != 0 { v } else { v & 0xffff_ffff };
    Some((i as u64 + 3, dst, u64::from(v.count_ones())))
}

fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member of
    // the exit union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal
        .data
        .iter()
        .take(n)
        .map(|d| format!("{d:#x}"))
        .collect();
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exception",
        3 => "delivery event",
        _ => "internal error",
    };
    format!(
        "KVM internal error (suberror {} = {what}) at rip {rip:#x}, data [{}]",
        internal.suberror,
        data.join(", ")
    )
}

/// Performs the port-I/O exit KVM_RUN just returned, one access per element (see
/// [`Platform::port_io`]).
fn port_exit(vcpu: &mut VcpuFd, platform: &Platform) -> PioAction {
    let run = vcpu.get_kvm_run();
    // SAFETY: called only right after KVM_RUN returned KVM_EXIT_IO (`VcpuExit::IoIn`/`IoOut`),
    // so `io` is the active member of the exit union.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let len = size.saturating_mul(io.count as usize);
    let write = u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT;
    let start = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
    // SAFETY: the same slice kvm-ioctls builds for this exit: the kernel sets `data_offset` to
    // the PIO data page inside the vCPU's `kvm_run` mapping, which lives as long as `vcpu`, and
    // bounds `size * count` to that page. No other reference to those bytes exists while the
    // slice is used (the exit value that also pointed there is no longer alive).
    let data = unsafe { std::slice::from_raw_parts_mut(start.add(io.data_offset as usize), len) };
    platform.port_io(io.port, size, data, write)
}

/// Runs the vCPU until the guest powers off/resets, an error, or `stop`. `debug` serves
/// `guest.sym` breakpoints (already armed on this vCPU).
pub fn run_loop(
    mut vcpu: VcpuFd,
    id: u8,
    platform: &Platform,
    stop: &AtomicBool,
    debug: Option<&GuestDebug>,
) -> VcpuStop {
    let mut fixups = 0u64;
    let mut debug_state = VcpuDebug::default();
    loop {
        if stop.load(Ordering::Acquire) {
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            return VcpuStop::Stopped { rip };
        }
        let action = match vcpu.run() {
            // The exit's buffer holds `count × size` bytes for a string instruction; the size
            // is only in `kvm_run`, so `port_exit` re-reads the exit and splits it.
            Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => port_exit(&mut vcpu, platform),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                platform.mmio_read(addr, data);
                PioAction::None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                platform.mmio_write(addr, data);
                PioAction::None
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel irqchip HLT is handled in KVM; an exit means the vCPU
                // can never wake.
                return VcpuStop::Error(format!("vCPU {id} halted with interrupts off"));
            }
            Ok(VcpuExit::Shutdown) => return VcpuStop::Reset("triple fault"),
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
                // member of the exit union.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let insn = emulation_insn_bytes(internal.suberror, &internal.data);
                if let Some(insn) = insn
                    && emulation_fixup(&mut vcpu, &insn)
                {
                    fixups += 1;
                    if fixups <= 4 {
                        log::info!("vCPU {id}: emulated {insn:02x?} for KVM (PVM)");
                    }
                    PioAction::None
                } else {
                    return VcpuStop::Error(internal_error(&mut vcpu));
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuStop::Error(format!(
                    "vCPU {id}: KVM entry failed (reason {reason:#x}, cpu {cpu})"
                ));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                // KVM_SYSTEM_EVENT_SHUTDOWN = 1, RESET = 2.
                return if kind == 2 {
                    VcpuStop::Reset("system event")
                } else {
                    VcpuStop::PowerOff
                };
            }
            Ok(VcpuExit::Debug(exit)) => match debug {
                Some(d) => {
                    if let Err(e) = d.on_exit(&mut vcpu, id, &mut debug_state, &exit) {
                        return VcpuStop::Error(e);
                    }
                    PioAction::None
                }
                None => {
                    return VcpuStop::Error(format!(
                        "vCPU {id}: debug exit at {:#x} with no breakpoints set",
                        exit.pc
                    ));
                }
            },
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => PioAction::None,
            Ok(other) => {
                return VcpuStop::Error(format!("vCPU {id}: unexpected exit {other:?}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => PioAction::None,
            Err(e) => return VcpuStop::Error(format!("vCPU {id}: KVM_RUN failed: {e}")),
        };
        match action {
            PioAction::None => {}
            PioAction::PowerOff => return VcpuStop::PowerOff,
            PioAction::Reset(why) => return VcpuStop::Reset(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_failure_bytes_are_decoded() {
        // As PVM reported Linux 6.12's int3_selftest: flags 1, 15 bytes "cc 90 90 ...".
        let data = [0x1, 0x7c83_9090_9090_cc0f, 0x480b_0f02_7401_0424, 0x1000];
        let b = emulation_insn_bytes(1, &data).unwrap();
        assert_eq!(b.len(), 15);
        assert_eq!(&b[..3], &[0xcc, 0x90, 0x90]);
        assert_eq!(emulation_insn_bytes(1, &[0]), None, "no bytes flag");
        assert_eq!(emulation_insn_bytes(2, &data), None, "other suberror");
        assert_eq!(emulation_insn_bytes(1, &[1]), None, "short data");
    }

    #[test]
    fn popcnt_register_forms_are_emulated() {
        let regs = kvm_bindings::kvm_regs {
            rdi: 0xffff_0000_0000_00ff,
            r9: 0x7,
            ..Default::default()
        };
        // As seen in Linux 6.12's alternative_instructions: f3 48 0f b8 c7 = popcnt rax, rdi.
        assert_eq!(
            popcnt(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0x90], &regs),
            Some((5, 0, 24))
        );
        // 32-bit form: popcnt eax, edi counts the low half only.
        assert_eq!(popcnt(&[0xf3, 0x0f, 0xb8, 0xc7], &regs), Some((4, 0, 8)));
        // REX.R/REX.B: popcnt r10, r9 (f3 4d 0f b8 d1).
        assert_eq!(
            popcnt(&[0xf3, 0x4d, 0x0f, 0xb8, 0xd1], &regs),
            Some((5, 10, 3))
        );
        assert_eq!(
            popcnt(&[0xf3, 0x48, 0x0f, 0xb8, 0x07], &regs),
            None,
            "memory form"
        );
        assert_eq!(popcnt(&[0xcc], &regs), None);
    }

    #[test]
    fn lints_are_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0700);
        set_lints(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1) & 0x700, 0x400);
        assert!(boot_msrs().contains(&(0x2ff, 0x806)));
    }
}
