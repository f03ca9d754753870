//! Command-queue consumption: fetch, parse, execute, announce, complete. Bounded per doorbell.

use crate::cmdq::{Command, SyncSignal};
use crate::device::{IRQ_CMD_SYNC, Irq, SmmuV3};
use crate::evtq::QueuePtrs;
use crate::guest::{read_dwords, read_u64};
use crate::iotlb::{ASID_NONE, Tag, TagSel};
use crate::regs::{cerror, cr0, gerror, q};
use crate::ste::ste_address;
use sluice_devapi::{Endpoint, PointCtx};
use std::sync::atomic::Ordering;
use vm_memory::GuestMemoryBackend;

/// Point announced when a command is rejected as illegal (before CONS.ERR is published).
pub const ILLEGAL_POINT: &str = "smmuv3.cmd.ILLEGAL";

enum Step {
    /// Nothing to do (queue empty, disabled or halted).
    Idle,
    /// One command consumed.
    Done,
}

impl SmmuV3 {
    /// Consumes commands between CONS and PROD. At most one queue's worth of commands is
    /// processed per call, so a hostile queue cannot keep a vCPU here; only one thread
    /// consumes at a time (a concurrent doorbell leaves its commands to the running consumer).
    pub(crate) fn process_cmdq<M: GuestMemoryBackend>(&self, mem: &M) {
        loop {
            if self
                .cmdq_busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return;
            }
            let log2 = {
                let r = self.lock();
                ((r.cmdq_base & 0x1f) as u32).min(self.idr.cmdq_max_log2())
            };
            let budget = 1u64 << log2;
            let mut exhausted = true;
            for _ in 0..budget {
                if let Step::Idle = self.step(mem) {
                    exhausted = false;
                    break;
                }
            }
            self.cmdq_busy.store(false, Ordering::Release);
            // A doorbell that arrived while we held the busy flag found it taken: look again.
            if exhausted || !self.cmdq_has_work() {
                return;
            }
        }
    }

    fn cmdq_has_work(&self) -> bool {
        let r = self.lock();
        let ptrs = QueuePtrs {
            log2: ((r.cmdq_base & 0x1f) as u32).min(self.idr.cmdq_max_log2()),
        };
        r.cr0 & cr0::CMDQEN != 0 && !r.cmdq_halted() && !ptrs.empty(r.cmdq_prod, r.cmdq_cons)
    }

    fn step<M: GuestMemoryBackend>(&self, mem: &M) -> Step {
        let (addr, ptrs, cons) = {
            let r = self.lock();
            let ptrs = QueuePtrs {
                log2: ((r.cmdq_base & 0x1f) as u32).min(self.idr.cmdq_max_log2()),
            };
            if r.cr0 & cr0::CMDQEN == 0 || r.cmdq_halted() || ptrs.empty(r.cmdq_prod, r.cmdq_cons) {
                return Step::Idle;
            }
            let base = r.cmdq_base & q::BASE_ADDR_MASK & !((16u64 << ptrs.log2) - 1);
            (
                base + u64::from(ptrs.index(r.cmdq_cons)) * 16,
                ptrs,
                r.cmdq_cons,
            )
        };
        let Ok(words) = read_dwords::<M, 2>(mem, addr) else {
            self.cmd_error(mem, cerror::ABT, 0);
            return Step::Idle;
        };
        let cmd = match Command::parse(words, &self.idr) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("smmuv3: illegal command {:#x?}: {e}", words);
                self.hooks.point(&PointCtx::new(ILLEGAL_POINT, words[0]));
                self.cmd_error(mem, cerror::ILL, words[0]);
                return Step::Idle;
            }
        };
        self.execute(mem, &cmd);
        self.hooks.point(&PointCtx::new(cmd.point(), words[0]));
        {
            let mut r = self.lock();
            // Only advance if nobody moved CONS under us (it is RO while CMDQEN=1).
            if r.cmdq_cons & ptrs.mask() == cons & ptrs.mask() {
                r.cmdq_cons = ptrs.next(cons);
            }
        }
        if let Command::Sync {
            signal: SyncSignal::Irq,
            msi_addr,
            msi_data,
        } = cmd
        {
            let irq = if self.idr.msi() && msi_addr != 0 {
                Irq::Msi {
                    addr: msi_addr,
                    data: msi_data,
                }
            } else {
                Irq::Wired(IRQ_CMD_SYNC)
            };
            if !self.deliver(mem, irq) {
                let gerr = {
                    let mut r = self.lock();
                    self.raise_gerror(&mut r, gerror::MSI_CMDQ_ABT_ERR)
                };
                self.deliver_all(mem, gerr.as_slice());
            }
        }
        Step::Done
    }

    /// Records a command error in CONS.ERR and halts the queue through GERROR.CMDQ_ERR.
    fn cmd_error<M: GuestMemoryBackend>(&self, mem: &M, err: u32, _d0: u64) {
        let irq = {
            let mut r = self.lock();
            r.cmdq_cons = (r.cmdq_cons & !q::CONS_ERR_MASK) | (err << q::CONS_ERR_SHIFT);
            self.raise_gerror(&mut r, gerror::CMDQ_ERR)
        };
        self.deliver_all(mem, irq.as_slice());
    }

    fn execute<M: GuestMemoryBackend>(&self, mem: &M, cmd: &Command) {
        match *cmd {
            Command::Prefetch { .. }
            | Command::AtcInv { .. }
            | Command::PriResp { .. }
            | Command::Resume { .. }
            | Command::StallTerm { .. } => {}
            Command::CfgiSte { sid, .. } => {
                self.cfg_cache.invalidate_sids(sid, sid);
                self.state(
                    "cfgi_ste",
                    Some(Endpoint::Stream { sid, ssid: None }),
                    self.ste_config_now(mem, sid),
                );
            }
            Command::CfgiSteRange { sid, range } => {
                let mask = if range >= 31 {
                    u32::MAX
                } else {
                    (1u32 << (range + 1)) - 1
                };
                self.cfg_cache.invalidate_sids(sid & !mask, sid | mask);
                self.state(
                    "cfgi_ste_range",
                    Some(Endpoint::Stream { sid, ssid: None }),
                    u64::from(range),
                );
            }
            Command::CfgiCd { sid, ssid, .. } => {
                self.cfg_cache.invalidate_cd(sid, Some(ssid));
                self.state(
                    "cfgi_cd",
                    Some(Endpoint::Stream {
                        sid,
                        ssid: Some(ssid),
                    }),
                    0,
                );
            }
            Command::CfgiCdAll { sid } => {
                self.cfg_cache.invalidate_cd(sid, None);
                self.state("cfgi_cd_all", Some(Endpoint::Stream { sid, ssid: None }), 0);
            }
            Command::TlbiNhAll { vmid } => {
                self.iotlb.invalidate(TagSel::VmidS1(self.vmid(vmid)));
            }
            Command::TlbiNhAsid { vmid, asid } => {
                let tag = Tag {
                    vmid: self.vmid(vmid),
                    asid: u32::from(asid),
                };
                self.iotlb.invalidate(TagSel::One(tag));
            }
            Command::TlbiNhVa { vmid, asid, range } => {
                let tag = Tag {
                    vmid: self.vmid(vmid),
                    asid: u32::from(asid),
                };
                self.iotlb
                    .invalidate_range(TagSel::One(tag), canonical(range.addr), range.len);
            }
            Command::TlbiNhVaa { vmid, range } => {
                let sel = TagSel::VmidS1(self.vmid(vmid));
                self.iotlb
                    .invalidate_range(sel, canonical(range.addr), range.len);
            }
            // EL2 streams are not distinguished from EL1 ones: over-invalidate.
            Command::TlbiEl2 { .. } => {
                self.iotlb.invalidate(TagSel::All);
            }
            Command::TlbiS12Vmall { vmid } => {
                self.iotlb.invalidate(TagSel::Vmid(self.vmid(vmid)));
            }
            Command::TlbiS2Ipa { vmid, range } => {
                let tag = Tag {
                    vmid: self.vmid(vmid),
                    asid: ASID_NONE,
                };
                self.iotlb
                    .invalidate_range(TagSel::One(tag), range.addr, range.len);
            }
            Command::TlbiNsnhAll => {
                self.iotlb.invalidate(TagSel::All);
            }
            Command::Sync { .. } => {}
        }
    }

    fn vmid(&self, vmid: u16) -> u16 {
        if !self.idr.s2p() {
            0
        } else if self.idr.vmid16() {
            vmid
        } else {
            vmid & 0xff
        }
    }

    /// STE V and Config bits (`d0 & 0xf`) as memory holds them now (for the timeline), or
    /// `u64::MAX` if unreadable.
    fn ste_config_now<M: GuestMemoryBackend>(&self, mem: &M, sid: u32) -> u64 {
        let snap = self.snapshot();
        ste_address(mem, &snap.strtab, sid)
            .ok()
            .and_then(|a| read_u64(mem, a).ok())
            .map_or(u64::MAX, |d0| d0 & 0xf)
    }
}

/// Sign-extends bit 55 into the top byte: the form in which the IOTLB keys stage-1 VAs.
pub(crate) fn canonical(va: u64) -> u64 {
    if va & (1 << 55) != 0 {
        va | (0xff << 56)
    } else {
        va & !(0xff << 56)
    }
}
