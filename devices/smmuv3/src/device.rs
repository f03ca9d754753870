//! The SMMU object: construction, the MMIO register interface, GERROR, interrupts and the event
//! queue. Command processing is in `exec.rs`, translation in `translate.rs`.

use crate::cfgcache::ConfigCache;
use crate::evtq::{Delivery, Event, QueuePtrs};
use crate::guest::{write_dwords, write_u32};
use crate::iotlb::Iotlb;
use crate::provenance::{FaultInjection, Provenance};
use crate::regs::{
    self, IdRegs, MMIO_SIZE, MSI_ADDR_MASK, PAGE1, Part, REG64, RegFile, STRTAB_BASE_CFG_MASK,
    STRTAB_BASE_MASK, Snapshot, StrtabCfg, cr0, gbpa, gerror, irq_ctrl, off, q,
};
use sluice_devapi::{Hooks, InterruptSink, PointCtx, SmmuState, StateEvent};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::GuestMemoryBackend;

/// Wired interrupt line of the event queue.
pub const IRQ_EVENTQ: u32 = 0;
/// Wired interrupt line of the PRI queue (never raised: PRI is not modelled).
pub const IRQ_PRIQ: u32 = 1;
/// Wired interrupt line of CMD_SYNC completion (CS=SIG_IRQ without an MSI address).
pub const IRQ_CMD_SYNC: u32 = 2;
/// Wired interrupt line of GERROR.
pub const IRQ_GERROR: u32 = 3;

/// The x86 interrupt window: an MSI there is only an interrupt, anywhere else it is also a
/// memory write.
const APIC_WINDOW: std::ops::RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

/// Whether caches behave like hardware or are bypassed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Cache STEs, CDs and translations until the matching CFGI/TLBI, like hardware may.
    #[default]
    LikeHardware,
    /// Read every structure from memory on every translation.
    NeverCache,
}

/// Construction parameters.
#[derive(Debug, Clone, Copy)]
pub struct SmmuConfig {
    /// The ID registers to present.
    pub idr: IdRegs,
    /// Cache behaviour.
    pub cache_mode: CacheMode,
    /// IOTLB capacity in entries.
    pub iotlb_capacity: usize,
    /// Config cache capacity (STEs + CDs); when full it is emptied, as hardware may.
    pub config_cache_capacity: usize,
    /// GBPA value at reset (ABORT=1 makes an unconfigured SMMU block DMA).
    pub gbpa_reset: u32,
    /// Commands consumed per trigger at most (a PROD write, a CONS read through
    /// [`SmmuV3::mmio_read_mem`], [`SmmuV3::process_pending`]); at least 1.
    pub cmdq_batch: u32,
}

/// Default [`SmmuConfig::cmdq_batch`]: a queue of Linux's usual size drains in one doorbell,
/// while the worst case (2^19 entries) costs a vCPU at most this many commands per access.
pub const DEFAULT_CMDQ_BATCH: u32 = 256;

impl Default for SmmuConfig {
    fn default() -> Self {
        SmmuConfig {
            idr: IdRegs::default(),
            cache_mode: CacheMode::LikeHardware,
            iotlb_capacity: 4096,
            config_cache_capacity: 4096,
            gbpa_reset: 0,
            cmdq_batch: DEFAULT_CMDQ_BATCH,
        }
    }
}

/// An interrupt to deliver once the register lock is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Irq {
    /// Pulse a wired line.
    Wired(u32),
    /// An MSI write.
    Msi { addr: u64, data: u32 },
}

/// An Arm SMMUv3.
pub struct SmmuV3 {
    pub(crate) idr: IdRegs,
    pub(crate) regs: Mutex<RegFile>,
    pub(crate) cmdq_busy: AtomicBool,
    pub(crate) cmdq_batch: u32,
    cache_mode: AtomicU8,
    gbpa_reset: u32,
    pub(crate) cfg_cache: ConfigCache,
    pub(crate) iotlb: Iotlb,
    pub(crate) irq: Arc<dyn InterruptSink>,
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) provenance: Provenance,
}

impl std::fmt::Debug for SmmuV3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmmuV3")
            .field("idr", &self.idr)
            .field("regs", &self.regs)
            .finish()
    }
}

impl SmmuV3 {
    /// A new SMMU in its reset state.
    pub fn new(cfg: SmmuConfig, irq: Arc<dyn InterruptSink>, hooks: Arc<dyn Hooks>) -> Self {
        let regs = RegFile {
            gbpa: cfg.gbpa_reset & gbpa::FIELDS,
            ..RegFile::default()
        };
        SmmuV3 {
            idr: cfg.idr,
            regs: Mutex::new(regs),
            cmdq_busy: AtomicBool::new(false),
            cmdq_batch: cfg.cmdq_batch.max(1),
            cache_mode: AtomicU8::new(cfg.cache_mode as u8),
            gbpa_reset: cfg.gbpa_reset & gbpa::FIELDS,
            cfg_cache: ConfigCache::new(cfg.config_cache_capacity),
            iotlb: Iotlb::new(cfg.iotlb_capacity),
            irq,
            hooks,
            provenance: Provenance::default(),
        }
    }

    /// Breaks the model on purpose, for escape-oracle tests only (see [`FaultInjection`]).
    pub fn set_fault_injection(&self, faults: FaultInjection) {
        self.provenance.set_faults(faults);
    }

    /// Invalidations not reported to the hooks because too many were waiting for a CMD_SYNC.
    pub fn unreported_invalidations(&self) -> u64 {
        self.provenance.dropped()
    }

    /// The ID registers presented.
    pub fn id_regs(&self) -> &IdRegs {
        &self.idr
    }

    /// Resets registers and empties every cache.
    pub fn reset(&self) {
        *self.lock() = RegFile {
            gbpa: self.gbpa_reset,
            ..RegFile::default()
        };
        self.provenance.forget();
        self.flush_caches();
    }

    /// Empties the config cache and the IOTLB.
    pub fn flush_caches(&self) {
        self.cfg_cache.clear();
        self.iotlb.invalidate(crate::iotlb::TagSel::All);
    }

    /// The current cache mode.
    pub fn cache_mode(&self) -> CacheMode {
        if self.cache_mode.load(Ordering::Relaxed) == CacheMode::NeverCache as u8 {
            CacheMode::NeverCache
        } else {
            CacheMode::LikeHardware
        }
    }

    /// Switches the cache mode; caches are emptied.
    pub fn set_cache_mode(&self, mode: CacheMode) {
        self.cache_mode.store(mode as u8, Ordering::Relaxed);
        self.flush_caches();
    }

    pub(crate) fn caching(&self) -> bool {
        self.cache_mode() == CacheMode::LikeHardware
    }

    /// Number of IOTLB entries.
    pub fn iotlb_len(&self) -> usize {
        self.iotlb.len()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, RegFile> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let r = self.lock();
        Snapshot {
            smmuen: r.cr0 & cr0::SMMUEN != 0,
            gbpa_abort: r.gbpa & gbpa::ABORT != 0,
            strtab: StrtabCfg::decode(r.strtab_base, r.strtab_base_cfg, &self.idr),
        }
    }

    fn read_reg(&self, r: &RegFile, o: u64) -> u64 {
        let v32 = |v: u32| u64::from(v);
        match o {
            off::IDR0..=off::IDR5 => {
                let i = ((o - off::IDR0) / 4) as usize;
                v32(self.idr.idr.get(i).copied().unwrap_or(0))
            }
            off::IIDR => v32(self.idr.iidr),
            off::AIDR => v32(self.idr.aidr),
            off::CR0 | off::CR0ACK => v32(r.cr0),
            off::CR1 => v32(r.cr1),
            off::CR2 => v32(r.cr2),
            off::GBPA => v32(r.gbpa),
            off::IRQ_CTRL | off::IRQ_CTRLACK => v32(r.irq_ctrl),
            off::GERROR => v32(r.gerror),
            off::GERRORN => v32(r.gerrorn),
            off::GERROR_IRQ_CFG0 => r.gerror_irq_cfg0,
            off::GERROR_IRQ_CFG1 => v32(r.gerror_irq_cfg1),
            off::GERROR_IRQ_CFG2 => v32(r.gerror_irq_cfg2),
            off::STRTAB_BASE => r.strtab_base,
            off::STRTAB_BASE_CFG => v32(r.strtab_base_cfg),
            off::CMDQ_BASE => r.cmdq_base,
            off::CMDQ_PROD => v32(r.cmdq_prod),
            off::CMDQ_CONS => v32(r.cmdq_cons),
            off::EVENTQ_BASE => r.eventq_base,
            off::EVENTQ_PROD => v32(r.eventq_prod),
            off::EVENTQ_CONS => v32(r.eventq_cons),
            off::EVENTQ_IRQ_CFG0 => r.eventq_irq_cfg0,
            off::EVENTQ_IRQ_CFG1 => v32(r.eventq_irq_cfg1),
            off::EVENTQ_IRQ_CFG2 => v32(r.eventq_irq_cfg2),
            off::PRIQ_BASE => r.priq_base,
            off::PRIQ_PROD => v32(r.priq_prod),
            off::PRIQ_CONS => v32(r.priq_cons),
            off::PRIQ_IRQ_CFG0 => r.priq_irq_cfg0,
            off::PRIQ_IRQ_CFG1 => v32(r.priq_irq_cfg1),
            off::PRIQ_IRQ_CFG2 => v32(r.priq_irq_cfg2),
            _ => 0,
        }
    }

    /// Maps a window offset to a page-0 offset, or `None` for RAZ/WI space. Page 1 holds only
    /// the queue pointers; page 0 aliases them (as QEMU does, and as some parts need).
    fn page_offset(offset: u64, size: u32) -> Option<u64> {
        if !(size == 4 || size == 8)
            || !offset.is_multiple_of(u64::from(size))
            || offset >= MMIO_SIZE
        {
            return None;
        }
        if offset >= PAGE1 {
            let o = offset - PAGE1;
            let page1_regs = [
                off::EVENTQ_PROD,
                off::EVENTQ_CONS,
                off::PRIQ_PROD,
                off::PRIQ_CONS,
            ];
            return page1_regs
                .iter()
                .any(|r| *r == o || (size == 8 && *r == o + 4))
                .then_some(o);
        }
        Some(offset)
    }

    /// A register read of `size` (4 or 8) bytes. Other sizes, unaligned accesses and
    /// unknown offsets read as zero.
    pub fn mmio_read(&self, offset: u64, size: u32) -> u64 {
        let Some(o) = Self::page_offset(offset, size) else {
            return 0;
        };
        let r = self.lock();
        if REG64.contains(&o) {
            let v = self.read_reg(&r, o);
            return if size == 8 { v } else { Part::Low.extract(v) };
        }
        if o >= 4 && REG64.contains(&(o - 4)) {
            return if size == 4 {
                Part::High.extract(self.read_reg(&r, o - 4))
            } else {
                0
            };
        }
        let lo = self.read_reg(&r, o);
        if size == 8 {
            lo | (self.read_reg(&r, o + 4) << 32)
        } else {
            lo
        }
    }

    /// A register read that lets the command queue progress first when it reads CMDQ_CONS:
    /// software polls CONS for its commands (Linux, for CMD_SYNC), and on hardware CONS moves
    /// as commands complete, so each poll continues one batch (see [`SmmuConfig::cmdq_batch`]).
    /// Everything else is [`SmmuV3::mmio_read`].
    pub fn mmio_read_mem<M: GuestMemoryBackend>(&self, mem: &M, offset: u64, size: u32) -> u64 {
        let reads_cons = match Self::page_offset(offset, size) {
            Some(o) => o == off::CMDQ_CONS || (size == 8 && o == off::CMDQ_PROD),
            None => false,
        };
        if reads_cons {
            let _ = self.process_cmdq(mem);
        }
        self.mmio_read(offset, size)
    }

    /// A register write of `size` (4 or 8) bytes. Writes to read-only or unknown registers,
    /// other sizes and unaligned accesses are ignored.
    pub fn mmio_write<M: GuestMemoryBackend>(&self, mem: &M, offset: u64, size: u32, value: u64) {
        let Some(o) = Self::page_offset(offset, size) else {
            return;
        };
        if REG64.contains(&o) {
            let part = if size == 8 { Part::Full } else { Part::Low };
            self.write_reg(mem, o, part, value);
        } else if o >= 4 && REG64.contains(&(o - 4)) {
            if size == 4 {
                self.write_reg(mem, o - 4, Part::High, value & 0xffff_ffff);
            }
        } else {
            self.write_reg(mem, o, Part::Full, value & 0xffff_ffff);
            if size == 8 {
                self.write_reg(mem, o + 4, Part::Full, value >> 32);
            }
        }
    }

    fn write_reg<M: GuestMemoryBackend>(&self, mem: &M, o: u64, part: Part, value: u64) {
        let Some(point) = regs::write_point(o) else {
            return;
        };
        let merged = part.merge(self.read_reg(&self.lock(), o), value);
        // Before the write takes effect, with no lock held: an injector may stall here.
        self.hooks.point(&PointCtx::new(point, merged));
        let mut irqs = Vec::new();
        let (old, new, kick) = {
            let mut r = self.lock();
            let merged = part.merge(self.read_reg(&r, o), value);
            let old_cr0 = r.cr0;
            let old_gbpa = r.gbpa;
            let kick = self.apply(&mut r, o, merged, &mut irqs);
            ((old_cr0, old_gbpa), (r.cr0, r.gbpa), kick)
        };
        self.deliver_all(mem, &irqs);
        if (old.0 ^ new.0) & cr0::SMMUEN != 0 {
            self.state(
                SmmuState::SmmuEn {
                    enabled: new.0 & cr0::SMMUEN != 0,
                },
                None,
            );
        }
        if o == off::GBPA && old.1 != new.1 {
            self.state(SmmuState::Gbpa { value: new.1 }, None);
        }
        if kick {
            // Commands beyond one batch wait for the next trigger (see `process_cmdq`).
            let _ = self.process_cmdq(mem);
        }
    }

    /// Applies a register write under the lock; returns whether the command queue may have
    /// work to do.
    fn apply(&self, r: &mut RegFile, o: u64, v: u64, _irqs: &mut Vec<Irq>) -> bool {
        let v32 = (v & 0xffff_ffff) as u32;
        let cmdq_log2 = self.idr.cmdq_max_log2();
        let evtq_log2 = self.idr.evtq_max_log2();
        let ptr_mask = |log2: u32| ((1u64 << (log2 + 1)) - 1) as u32;
        match o {
            off::CR0 => {
                let mut mask = cr0::SMMUEN | cr0::EVTQEN | cr0::CMDQEN | cr0::VMW;
                if self.idr.pri() {
                    mask |= cr0::PRIQEN;
                }
                if self.idr.ats() {
                    mask |= cr0::ATSCHK;
                }
                let was = r.cr0;
                r.cr0 = v32 & mask;
                return (was ^ r.cr0) & cr0::CMDQEN != 0;
            }
            off::CR1 => r.cr1 = v32 & 0xfff,
            off::CR2 => r.cr2 = v32 & 0x7,
            off::GBPA if v32 & gbpa::UPDATE != 0 => r.gbpa = v32 & gbpa::FIELDS,
            off::IRQ_CTRL => {
                let mut mask = irq_ctrl::GERROR_IRQEN | irq_ctrl::EVTQ_IRQEN;
                if self.idr.pri() {
                    mask |= irq_ctrl::PRIQ_IRQEN;
                }
                r.irq_ctrl = v32 & mask;
            }
            off::GERRORN => {
                let was_halted = r.cmdq_halted();
                r.gerrorn = v32 & gerror::MASK;
                return was_halted && !r.cmdq_halted();
            }
            off::GERROR_IRQ_CFG0 => r.gerror_irq_cfg0 = v & MSI_ADDR_MASK,
            off::GERROR_IRQ_CFG1 => r.gerror_irq_cfg1 = v32,
            off::GERROR_IRQ_CFG2 => r.gerror_irq_cfg2 = v32 & 0x3f,
            off::STRTAB_BASE if r.cr0 & cr0::SMMUEN == 0 => r.strtab_base = v & STRTAB_BASE_MASK,
            off::STRTAB_BASE_CFG if r.cr0 & cr0::SMMUEN == 0 => {
                r.strtab_base_cfg = v32 & STRTAB_BASE_CFG_MASK;
            }
            off::CMDQ_BASE if r.cr0 & cr0::CMDQEN == 0 => r.cmdq_base = v & q::BASE_MASK,
            off::CMDQ_PROD => {
                r.cmdq_prod = v32 & ptr_mask(cmdq_log2);
                return true;
            }
            off::CMDQ_CONS if r.cr0 & cr0::CMDQEN == 0 => {
                r.cmdq_cons = (r.cmdq_cons & q::CONS_ERR_MASK) | (v32 & ptr_mask(cmdq_log2));
            }
            off::EVENTQ_BASE if r.cr0 & cr0::EVTQEN == 0 => r.eventq_base = v & q::BASE_MASK,
            off::EVENTQ_PROD if r.cr0 & cr0::EVTQEN == 0 => {
                r.eventq_prod = v32 & (ptr_mask(evtq_log2) | q::OVFLG);
            }
            off::EVENTQ_CONS => r.eventq_cons = v32 & (ptr_mask(evtq_log2) | q::OVFLG),
            off::EVENTQ_IRQ_CFG0 => r.eventq_irq_cfg0 = v & MSI_ADDR_MASK,
            off::EVENTQ_IRQ_CFG1 => r.eventq_irq_cfg1 = v32,
            off::EVENTQ_IRQ_CFG2 => r.eventq_irq_cfg2 = v32 & 0x3f,
            off::PRIQ_BASE => r.priq_base = v & q::BASE_MASK,
            off::PRIQ_PROD => r.priq_prod = v32 & (0xf_ffff | q::OVFLG),
            off::PRIQ_CONS => r.priq_cons = v32 & (0xf_ffff | q::OVFLG),
            off::PRIQ_IRQ_CFG0 => r.priq_irq_cfg0 = v & MSI_ADDR_MASK,
            off::PRIQ_IRQ_CFG1 => r.priq_irq_cfg1 = v32,
            off::PRIQ_IRQ_CFG2 => r.priq_irq_cfg2 = v32 & 0x3f,
            _ => {}
        }
        false
    }

    pub(crate) fn state(&self, change: SmmuState, endpoint: Option<sluice_devapi::Endpoint>) {
        self.hooks.state(&StateEvent {
            source: "smmuv3",
            endpoint,
            change: change.into(),
        });
    }

    /// Activates a GERROR bit (toggles it if not already active); returns the interrupt to
    /// send, if any.
    pub(crate) fn raise_gerror(&self, r: &mut RegFile, bit: u32) -> Option<Irq> {
        if r.gerror_active(bit) {
            return None;
        }
        r.gerror ^= bit;
        if r.irq_ctrl & irq_ctrl::GERROR_IRQEN == 0 {
            return None;
        }
        Some(self.irq_for(r.gerror_irq_cfg0, r.gerror_irq_cfg1, IRQ_GERROR))
    }

    fn irq_for(&self, cfg0: u64, cfg1: u32, line: u32) -> Irq {
        let addr = cfg0 & MSI_ADDR_MASK;
        if self.idr.msi() && addr != 0 {
            Irq::Msi { addr, data: cfg1 }
        } else {
            Irq::Wired(line)
        }
    }

    /// Delivers one interrupt; returns false if an MSI's memory write failed.
    pub(crate) fn deliver<M: GuestMemoryBackend>(&self, mem: &M, irq: Irq) -> bool {
        match irq {
            Irq::Wired(line) => {
                self.irq.set_level(line, true);
                self.irq.set_level(line, false);
                true
            }
            Irq::Msi { addr, data } => {
                self.irq.msi(addr, data);
                APIC_WINDOW.contains(&addr) || write_u32(mem, addr, data).is_ok()
            }
        }
    }

    pub(crate) fn deliver_all<M: GuestMemoryBackend>(&self, mem: &M, irqs: &[Irq]) {
        for irq in irqs {
            if !self.deliver(mem, *irq) && matches!(irq, Irq::Msi { .. }) {
                // A failed GERROR MSI only sets its bit; it does not interrupt again.
                let mut r = self.lock();
                let _ = self.raise_gerror(&mut r, gerror::MSI_GERROR_ABT_ERR);
            }
        }
    }

    /// Writes an event record to the event queue.
    pub(crate) fn post_event<M: GuestMemoryBackend>(&self, mem: &M, ev: &Event) -> Delivery {
        let mut irqs = Vec::new();
        let delivery = {
            let mut r = self.lock();
            if r.cr0 & cr0::EVTQEN == 0 {
                Delivery::QueueDisabled
            } else {
                let ptrs = QueuePtrs {
                    log2: ((r.eventq_base & 0x1f) as u32).min(self.idr.evtq_max_log2()),
                };
                let (prod, cons) = (r.eventq_prod, r.eventq_cons);
                if ptrs.full(prod, cons) {
                    if (prod ^ cons) & q::OVFLG == 0 {
                        r.eventq_prod ^= q::OVFLG;
                    }
                    Delivery::Overflow
                } else {
                    let base = r.eventq_base & q::BASE_ADDR_MASK & !((32u64 << ptrs.log2) - 1);
                    let addr = base + u64::from(ptrs.index(prod)) * 32;
                    if write_dwords(mem, addr, &ev.encode()).is_err() {
                        irqs.extend(self.raise_gerror(&mut r, gerror::EVTQ_ABT_ERR));
                        Delivery::WriteAbort
                    } else {
                        r.eventq_prod = (prod & q::OVFLG) | ptrs.next(prod);
                        if r.irq_ctrl & irq_ctrl::EVTQ_IRQEN != 0 {
                            irqs.push(self.irq_for(
                                r.eventq_irq_cfg0,
                                r.eventq_irq_cfg1,
                                IRQ_EVENTQ,
                            ));
                        }
                        Delivery::Written
                    }
                }
            }
        };
        for irq in irqs {
            if !self.deliver(mem, irq) {
                let gerr = {
                    let mut r = self.lock();
                    self.raise_gerror(&mut r, gerror::MSI_EVTQ_ABT_ERR)
                };
                self.deliver_all(mem, gerr.as_slice());
            }
        }
        delivery
    }
}
