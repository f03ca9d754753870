//! Command-queue consumption: fetch, parse, execute, announce, complete. Bounded per trigger.

use crate::cmdq::{Command, SyncSignal};
use crate::device::{IRQ_CMD_SYNC, Irq, SmmuV3};
use crate::evtq::QueuePtrs;
use crate::guest::{read_dwords, read_u64};
use crate::iotlb::{ASID_NONE, Tag, TagSel};
use crate::provenance::{Pending, cd_slot, tlb_contexts};
use crate::regs::{cerror, cr0, gerror, q};
use crate::ste::{ste_address, ste_config};
use sluice_devapi::{CacheKind, ContextSel, Endpoint, PointCtx, SmmuState, SteConfig};
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
    /// Consumes commands between CONS and PROD, at most `cmdq_batch` of them per call, so a
    /// hostile queue (up to 2^19 entries) cannot keep a vCPU in a doorbell write. The rest stays
    /// queued, as on hardware, where CONS moves as commands complete: the next trigger (a PROD,
    /// CR0 or GERRORN write, a read of CONS through [`SmmuV3::mmio_read_mem`], or
    /// [`SmmuV3::process_pending`]) continues in queue order, so a CMD_SYNC still completes only
    /// after every command before it. Only one thread consumes at a time (a concurrent doorbell
    /// leaves its commands to the running consumer). Returns whether commands remain.
    pub(crate) fn process_cmdq<M: GuestMemoryBackend>(&self, mem: &M) -> bool {
        let mut left = self.cmdq_batch;
        loop {
            if self
                .cmdq_busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return false;
            }
            while left > 0 {
                if let Step::Idle = self.step(mem) {
                    break;
                }
                left -= 1;
            }
            self.cmdq_busy.store(false, Ordering::Release);
            // A doorbell that arrived while we held the busy flag found it taken: look again,
            // within what is left of this call's batch (each round consumes at least one
            // command or finds the queue idle and returns).
            let more = self.cmdq_has_work();
            if left == 0 || !more {
                return more;
            }
        }
    }

    /// Continues the command queue: up to one batch of commands; returns whether more remain.
    /// A host that has a device thread or a periodic poll calls this while it returns `true`;
    /// without one, the guest's reads of CMDQ_CONS (Linux polls it for CMD_SYNC) drive the
    /// queue through [`SmmuV3::mmio_read_mem`].
    pub fn process_pending<M: GuestMemoryBackend>(&self, mem: &M) -> bool {
        self.process_cmdq(mem)
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
        if matches!(cmd, Command::Sync { .. }) {
            // After the point: a stall injected there delays the sync's effect too.
            self.state(SmmuState::SyncCompleted, None);
        }
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
                let removal = self.provenance.config_removal();
                let generation = self.cfg_cache.invalidate_sids(sid, sid, removal);
                let endpoint = Endpoint::Stream { sid, ssid: None };
                let contexts = ContextSel::exact(sid.into());
                self.note_config("CFGI_STE", Some(endpoint), contexts, (0, 0), generation);
                self.state(
                    SmmuState::CfgiSte {
                        config: self.ste_config_now(mem, sid),
                    },
                    Some(endpoint),
                );
            }
            Command::CfgiSteRange { sid, range } => {
                let mask = if range >= 31 {
                    u32::MAX
                } else {
                    (1u32 << (range + 1)) - 1
                };
                let removal = self.provenance.config_removal();
                let generation = self
                    .cfg_cache
                    .invalidate_sids(sid & !mask, sid | mask, removal);
                let contexts = ContextSel {
                    value: u64::from(sid & !mask),
                    mask: !u64::from(mask),
                };
                self.note_config("CFGI_STE_RANGE", None, contexts, (0, 0), generation);
                self.state(
                    SmmuState::CfgiSteRange {
                        range,
                        first_sid: sid & !mask,
                        last_sid: sid | mask,
                    },
                    Some(Endpoint::Stream { sid, ssid: None }),
                );
            }
            Command::CfgiCd { sid, ssid, .. } => {
                let removal = self.provenance.config_removal();
                let generation = self.cfg_cache.invalidate_cd(sid, Some(ssid), removal);
                let endpoint = Endpoint::Stream {
                    sid,
                    ssid: Some(ssid),
                };
                let contexts = ContextSel::exact(sid.into());
                let slot = cd_slot(ssid);
                self.note_config(
                    "CFGI_CD",
                    Some(endpoint),
                    contexts,
                    (slot, slot),
                    generation,
                );
                self.state(SmmuState::CfgiCd, Some(endpoint));
            }
            Command::CfgiCdAll { sid } => {
                let removal = self.provenance.config_removal();
                let generation = self.cfg_cache.invalidate_cd(sid, None, removal);
                let endpoint = Endpoint::Stream { sid, ssid: None };
                let contexts = ContextSel::exact(sid.into());
                let slots = (cd_slot(0), u64::MAX);
                self.note_config("CFGI_CD_ALL", Some(endpoint), contexts, slots, generation);
                self.state(SmmuState::CfgiCdAll, Some(endpoint));
            }
            Command::TlbiNhAll { vmid } => {
                self.tlbi("TLBI_NH_ALL", TagSel::VmidS1(self.vmid(vmid)), None);
            }
            Command::TlbiNhAsid { vmid, asid } => {
                let tag = Tag {
                    vmid: self.vmid(vmid),
                    asid: u32::from(asid),
                };
                self.tlbi("TLBI_NH_ASID", TagSel::One(tag), None);
            }
            Command::TlbiNhVa { vmid, asid, range } => {
                let tag = Tag {
                    vmid: self.vmid(vmid),
                    asid: u32::from(asid),
                };
                let span = (canonical(range.addr), range.len);
                self.tlbi("TLBI_NH_VA", TagSel::One(tag), Some(span));
            }
            Command::TlbiNhVaa { vmid, range } => {
                let sel = TagSel::VmidS1(self.vmid(vmid));
                self.tlbi("TLBI_NH_VAA", sel, Some((canonical(range.addr), range.len)));
            }
            // EL2 streams are not distinguished from EL1 ones: over-invalidate, claim nothing
            // (the guest may rely on these only for EL2 streams, which this model has none of).
            Command::TlbiEl2 { .. } => {
                self.iotlb.invalidate(TagSel::All);
            }
            Command::TlbiS12Vmall { vmid } => {
                self.tlbi("TLBI_S12_VMALL", TagSel::Vmid(self.vmid(vmid)), None);
            }
            Command::TlbiS2Ipa { vmid, range } => {
                let tag = Tag {
                    vmid: self.vmid(vmid),
                    asid: ASID_NONE,
                };
                self.tlbi(
                    "TLBI_S2_IPA",
                    TagSel::One(tag),
                    Some((range.addr, range.len)),
                );
            }
            Command::TlbiNsnhAll => {
                self.tlbi("TLBI_NSNH_ALL", TagSel::All, None);
            }
            Command::Sync { .. } => self.complete_invalidations(),
        }
    }

    /// A TLBI of `sel`, of the whole address space or of `(start, len)`: the IOTLB generation
    /// moves on, the covered entries go, and the invalidation waits for its CMD_SYNC.
    fn tlbi(&self, kind: &'static str, sel: TagSel, span: Option<(u64, u64)>) {
        let generation = self.iotlb.advance();
        if self.provenance.tlb_removal() {
            match span {
                Some((start, len)) => self.iotlb.remove_range(sel, start, len),
                None => self.iotlb.remove(sel),
            };
        }
        let (first, last) = match span {
            // `remove_range` covers at least one byte and saturates at the top.
            Some((start, len)) => (start, start.saturating_add(len.max(1) - 1)),
            None => (0, u64::MAX),
        };
        self.provenance.note(Pending {
            kind,
            cache: CacheKind::Translation,
            endpoint: None,
            contexts: tlb_contexts(sel),
            first,
            last,
            generation,
        });
    }

    /// A CFGI of config-cache `slots` (0: the STE, `SSID + 1`: a CD) of `contexts`, effective
    /// at `generation`, waiting for its CMD_SYNC.
    fn note_config(
        &self,
        kind: &'static str,
        endpoint: Option<Endpoint>,
        contexts: ContextSel,
        slots: (u64, u64),
        generation: u64,
    ) {
        self.provenance.note(Pending {
            kind,
            cache: CacheKind::Config,
            endpoint,
            contexts,
            first: slots.0,
            last: slots.1,
            generation,
        });
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

    /// The STE's V and Config as memory holds them now (for the oracle and the timeline), or
    /// `None` if unreadable.
    fn ste_config_now<M: GuestMemoryBackend>(&self, mem: &M, sid: u32) -> Option<SteConfig> {
        let snap = self.snapshot();
        ste_address(mem, &snap.strtab, sid)
            .ok()
            .and_then(|a| read_u64(mem, a).ok())
            .map(ste_config)
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
