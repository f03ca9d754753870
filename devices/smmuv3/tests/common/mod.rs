//! A small "driver" for tests: guest memory, queue helpers, STE/CD/page-table builders.
#![allow(dead_code)]

use sluice_devapi::{RecordingHooks, RecordingInterrupts};
use sluice_smmuv3::regs::off;
use sluice_smmuv3::walk::Granule;
use sluice_smmuv3::{Event, SmmuConfig, SmmuV3};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const RAM: usize = 32 << 20;
pub const STRTAB: u64 = 0x10_0000;
pub const CMDQ: u64 = 0x20_0000;
pub const CMDQ_LOG2: u64 = 8;
pub const EVTQ: u64 = 0x21_0000;
pub const EVTQ_LOG2: u64 = 5;
pub const CDTAB: u64 = 0x30_0000;
pub const PT_BASE: u64 = 0x40_0000;

pub struct Rig {
    pub mem: GuestMemoryMmap,
    pub smmu: Arc<SmmuV3>,
    pub irq: Arc<RecordingInterrupts>,
    pub hooks: Arc<RecordingHooks>,
    pub alloc: AtomicU64,
    pub evt_cons: AtomicU64,
}

/// Every invalidation the SMMU reports names it as its source: checked once a test is done
/// with its rig (not while a failing test unwinds).
impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for inv in self.hooks.invalidations() {
            assert_eq!(inv.source, "smmuv3", "{inv:?}");
        }
    }
}

impl Rig {
    pub fn new() -> Rig {
        Self::with(SmmuConfig::default())
    }

    pub fn with(cfg: SmmuConfig) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let irq = Arc::new(RecordingInterrupts::default());
        let hooks = Arc::new(RecordingHooks::default());
        let smmu = Arc::new(SmmuV3::new(cfg, irq.clone(), hooks.clone()));
        Rig {
            mem,
            smmu,
            irq,
            hooks,
            alloc: AtomicU64::new(PT_BASE),
            evt_cons: AtomicU64::new(0),
        }
    }

    pub fn w32(&self, o: u64, v: u64) {
        self.smmu.mmio_write(&self.mem, o, 4, v);
    }
    pub fn w64(&self, o: u64, v: u64) {
        self.smmu.mmio_write(&self.mem, o, 8, v);
    }
    pub fn r32(&self, o: u64) -> u64 {
        self.smmu.mmio_read(o, 4)
    }
    pub fn r64(&self, o: u64) -> u64 {
        self.smmu.mmio_read(o, 8)
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }
    pub fn read_u64(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
    pub fn read_u32(&self, addr: u64) -> u32 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
    pub fn write_words(&self, addr: u64, w: &[u64]) {
        for (i, v) in w.iter().enumerate() {
            self.write_u64(addr + 8 * i as u64, *v);
        }
    }

    /// Allocates zeroed, `align`-aligned guest memory.
    pub fn alloc(&self, size: u64, align: u64) -> u64 {
        loop {
            let cur = self.alloc.load(Ordering::Relaxed);
            let a = (cur + align - 1) & !(align - 1);
            if self
                .alloc
                .compare_exchange(cur, a + size, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                assert!(a + size <= RAM as u64, "test RAM exhausted");
                self.mem
                    .write_slice(&vec![0u8; size as usize], GuestAddress(a))
                    .unwrap();
                return a;
            }
        }
    }

    /// Linear stream table of 2^log2 STEs, queues, IRQs, SMMUEN: a short bring-up.
    pub fn enable(&self, log2: u64) {
        self.w64(off::STRTAB_BASE, STRTAB);
        self.w32(off::STRTAB_BASE_CFG, log2);
        self.w64(off::CMDQ_BASE, CMDQ | CMDQ_LOG2);
        self.w32(off::CMDQ_PROD, 0);
        self.w32(off::CMDQ_CONS, 0);
        self.w64(off::EVENTQ_BASE, EVTQ | EVTQ_LOG2);
        self.w32(0x1_0000 + off::EVENTQ_PROD, 0);
        self.w32(0x1_0000 + off::EVENTQ_CONS, 0);
        self.w32(off::CR2, 2);
        self.w32(off::IRQ_CTRL, 5);
        self.w32(off::CR0, 0xd);
        assert_eq!(self.r32(off::CR0ACK), 0xd);
    }

    /// Queues one command and rings the doorbell.
    pub fn cmd(&self, d0: u64, d1: u64) {
        let prod = self.r32(off::CMDQ_PROD);
        let idx = prod & ((1 << CMDQ_LOG2) - 1);
        self.write_words(CMDQ + idx * 16, &[d0, d1]);
        let next = (prod + 1) & ((2 << CMDQ_LOG2) - 1);
        self.w32(off::CMDQ_PROD, next);
    }

    /// Queues several commands with a single doorbell.
    pub fn cmds(&self, list: &[[u64; 2]]) {
        let mut prod = self.r32(off::CMDQ_PROD);
        for [d0, d1] in list {
            let idx = prod & ((1 << CMDQ_LOG2) - 1);
            self.write_words(CMDQ + idx * 16, &[*d0, *d1]);
            prod = (prod + 1) & ((2 << CMDQ_LOG2) - 1);
        }
        self.w32(off::CMDQ_PROD, prod);
    }

    pub fn sync(&self) {
        self.cmd(0x46, 0);
        let m = (2 << CMDQ_LOG2) - 1;
        assert_eq!(
            self.r32(off::CMDQ_PROD) & m,
            self.r32(off::CMDQ_CONS) & m,
            "SYNC did not complete"
        );
    }

    pub fn cfgi_ste(&self, sid: u32) {
        self.cmd(0x03 | (u64::from(sid) << 32), 1);
    }

    /// Pops every event record between CONS and PROD.
    pub fn events(&self) -> Vec<Event> {
        let mut out = Vec::new();
        let mask = (2u64 << EVTQ_LOG2) - 1;
        loop {
            let prod = self.r32(0x1_0000 + off::EVENTQ_PROD) & mask;
            let cons = self.r32(0x1_0000 + off::EVENTQ_CONS) & mask;
            if prod == cons {
                return out;
            }
            let idx = cons & ((1 << EVTQ_LOG2) - 1);
            let a = EVTQ + idx * 32;
            let d = [
                self.read_u64(a),
                self.read_u64(a + 8),
                self.read_u64(a + 16),
                self.read_u64(a + 24),
            ];
            out.push(Event::decode(d).expect("known event type"));
            let ovack = self.r32(0x1_0000 + off::EVENTQ_PROD) & (1 << 31);
            self.w32(0x1_0000 + off::EVENTQ_CONS, ((cons + 1) & mask) | ovack);
        }
    }

    pub fn set_ste(&self, sid: u32, ste: [u64; 8]) {
        self.write_words(STRTAB + u64::from(sid) * 64, &ste);
    }
}

pub const AF: u64 = 1 << 10;
/// S2AP read+write.
pub const S2RW: u64 = 3 << 6;

pub fn ste_bypass() -> [u64; 8] {
    [1 | (4 << 1), 0, 0, 0, 0, 0, 0, 0]
}

/// Stage-1-only STE with one CD (or a CD table when `cd_max > 0`).
pub fn ste_s1(ctx: u64, cd_max: u64, fmt: u64, dss: u64) -> [u64; 8] {
    [
        1 | (5 << 1) | (fmt << 4) | ctx | (cd_max << 59),
        dss,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

/// S2 part (dwords 2, 3): VMID, T0SZ, SL0, TG encoding, PS=48, AA64, AFFD=0, S2R.
pub fn s2_words(vmid: u64, t0sz: u64, sl0: u64, tg: u64, ttb: u64) -> (u64, u64) {
    (
        vmid | (t0sz << 32) | (sl0 << 38) | (tg << 46) | (5 << 48) | (1 << 51) | (1 << 58),
        ttb,
    )
}

pub fn ste_s2(vmid: u64, t0sz: u64, sl0: u64, tg: u64, ttb: u64) -> [u64; 8] {
    let (d2, d3) = s2_words(vmid, t0sz, sl0, tg, ttb);
    [1 | (6 << 1), 0, d2, d3, 0, 0, 0, 0]
}

pub fn ste_nested(ctx: u64, vmid: u64, t0sz: u64, sl0: u64, tg: u64, ttb: u64) -> [u64; 8] {
    let (d2, d3) = s2_words(vmid, t0sz, sl0, tg, ttb);
    [1 | (7 << 1) | ctx, 0, d2, d3, 0, 0, 0, 0]
}

pub fn tg0(g: Granule) -> u64 {
    match g {
        Granule::G4K => 0,
        Granule::G64K => 1,
        Granule::G16K => 2,
    }
}

/// CD: TTB0 only (EPD1), V, AA64, R, A, IPS=48.
pub fn cd(asid: u64, t0sz: u64, g: Granule, ttb0: u64) -> [u64; 8] {
    let d0 = t0sz
        | (tg0(g) << 6)
        | (1 << 30)
        | (1 << 31)
        | (5 << 32)
        | (1 << 41)
        | (1 << 45)
        | (1 << 46)
        | (asid << 48);
    [d0, ttb0, 0, 0, 0, 0, 0, 0]
}

/// Builds translation tables in guest memory.
pub struct Pt<'a> {
    pub rig: &'a Rig,
    pub g: Granule,
    pub start_level: u32,
    pub input_bits: u32,
    pub root: u64,
}

impl<'a> Pt<'a> {
    /// Stage-1 tables for `input_bits`.
    pub fn s1(rig: &'a Rig, g: Granule, input_bits: u32) -> Self {
        let start_level = g.s1_start_level(input_bits);
        let root = rig.alloc(1 << g.bits(), 1 << g.bits());
        Pt {
            rig,
            g,
            start_level,
            input_bits,
            root,
        }
    }

    /// Stage-2 tables with `concat` concatenated start tables.
    pub fn s2(rig: &'a Rig, g: Granule, input_bits: u32, start_level: u32, concat: u64) -> Self {
        let size = concat << g.bits();
        let root = rig.alloc(size, size);
        Pt {
            rig,
            g,
            start_level,
            input_bits,
            root,
        }
    }

    fn index(&self, va: u64, level: u32) -> u64 {
        let shift = self.g.level_shift(level);
        let bits = if level == self.start_level {
            self.input_bits - shift
        } else {
            self.g.stride()
        };
        (va >> shift) & ((1 << bits) - 1)
    }

    /// Writes a leaf at `level` mapping `va` to `pa` with `attrs` (AF etc.); creates tables.
    pub fn map(&self, va: u64, pa: u64, level: u32, attrs: u64) -> u64 {
        let mut table = self.root;
        let mut l = self.start_level;
        while l < level {
            let a = table + 8 * self.index(va, l);
            let d = self.rig.read_u64(a);
            table = if d & 3 == 3 {
                d & 0x0000_ffff_ffff_f000 & !((1 << self.g.bits()) - 1)
            } else {
                let t = self.rig.alloc(1 << self.g.bits(), 1 << self.g.bits());
                self.rig.write_u64(a, t | 3);
                t
            };
            l += 1;
        }
        let a = table + 8 * self.index(va, level);
        let ty = if level == 3 { 3 } else { 1 };
        self.rig.write_u64(a, pa | attrs | ty);
        a
    }

    /// Address of the descriptor for `va` at `level` (tables must exist).
    pub fn desc_addr(&self, va: u64, level: u32) -> u64 {
        let mut table = self.root;
        for l in self.start_level..level {
            let d = self.rig.read_u64(table + 8 * self.index(va, l));
            table = d & 0x0000_ffff_ffff_f000 & !((1 << self.g.bits()) - 1);
        }
        table + 8 * self.index(va, level)
    }
}

/// TLBI_NH_VA for one page (no range).
pub fn tlbi_va(asid: u64, va: u64) -> [u64; 2] {
    [0x12 | (asid << 48), va & !0xfff]
}

/// TLBI_NH_VA with a range: `pages` must be (NUM+1) << SCALE.
pub fn tlbi_va_range(asid: u64, va: u64, g: Granule, num: u64, scale: u64) -> [u64; 2] {
    let tg = match g {
        Granule::G4K => 1,
        Granule::G16K => 2,
        Granule::G64K => 3,
    };
    [
        0x12 | (num << 12) | (scale << 20) | (asid << 48),
        (va & !0xfff) | (tg << 10),
    ]
}
