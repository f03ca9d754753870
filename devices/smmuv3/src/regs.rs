//! The SMMUv3 register file: offsets, ID register values, write masks and the decoded view of
//! the configuration registers that translation needs.
//!
//! Page 0 holds every register; page 1 (at +64 KiB) holds only the event- and PRI-queue
//! producer/consumer pointers. Linux reserves `0xe00` bytes of each page for itself.

/// Size of the MMIO window: page 0 + page 1.
pub const MMIO_SIZE: u64 = 0x2_0000;
/// Offset of page 1.
pub const PAGE1: u64 = 0x1_0000;

/// Register offsets (page 0 unless noted).
pub mod off {
    pub const IDR0: u64 = 0x00;
    pub const IDR1: u64 = 0x04;
    pub const IDR2: u64 = 0x08;
    pub const IDR3: u64 = 0x0c;
    pub const IDR4: u64 = 0x10;
    pub const IDR5: u64 = 0x14;
    pub const IIDR: u64 = 0x18;
    pub const AIDR: u64 = 0x1c;
    pub const CR0: u64 = 0x20;
    pub const CR0ACK: u64 = 0x24;
    pub const CR1: u64 = 0x28;
    pub const CR2: u64 = 0x2c;
    pub const STATUSR: u64 = 0x40;
    pub const GBPA: u64 = 0x44;
    pub const AGBPA: u64 = 0x48;
    pub const IRQ_CTRL: u64 = 0x50;
    pub const IRQ_CTRLACK: u64 = 0x54;
    pub const GERROR: u64 = 0x60;
    pub const GERRORN: u64 = 0x64;
    pub const GERROR_IRQ_CFG0: u64 = 0x68;
    pub const GERROR_IRQ_CFG1: u64 = 0x70;
    pub const GERROR_IRQ_CFG2: u64 = 0x74;
    pub const STRTAB_BASE: u64 = 0x80;
    pub const STRTAB_BASE_CFG: u64 = 0x88;
    pub const CMDQ_BASE: u64 = 0x90;
    pub const CMDQ_PROD: u64 = 0x98;
    pub const CMDQ_CONS: u64 = 0x9c;
    pub const EVENTQ_BASE: u64 = 0xa0;
    /// Page-1 register; page-0 offset (aliased, as QEMU does and as Cavium parts need).
    pub const EVENTQ_PROD: u64 = 0xa8;
    /// Page-1 register; page-0 offset (aliased).
    pub const EVENTQ_CONS: u64 = 0xac;
    pub const EVENTQ_IRQ_CFG0: u64 = 0xb0;
    pub const EVENTQ_IRQ_CFG1: u64 = 0xb8;
    pub const EVENTQ_IRQ_CFG2: u64 = 0xbc;
    pub const PRIQ_BASE: u64 = 0xc0;
    /// Page-1 register; page-0 offset (aliased).
    pub const PRIQ_PROD: u64 = 0xc8;
    /// Page-1 register; page-0 offset (aliased).
    pub const PRIQ_CONS: u64 = 0xcc;
    pub const PRIQ_IRQ_CFG0: u64 = 0xd0;
    pub const PRIQ_IRQ_CFG1: u64 = 0xd8;
    pub const PRIQ_IRQ_CFG2: u64 = 0xdc;
}

/// IDR0 fields.
pub mod idr0 {
    pub const S2P: u32 = 1 << 0;
    pub const S1P: u32 = 1 << 1;
    pub const TTF_AARCH64: u32 = 2 << 2;
    pub const COHACC: u32 = 1 << 4;
    pub const HYP: u32 = 1 << 9;
    pub const ATS: u32 = 1 << 10;
    pub const ASID16: u32 = 1 << 12;
    pub const MSI: u32 = 1 << 13;
    pub const SEV: u32 = 1 << 14;
    pub const PRI: u32 = 1 << 16;
    pub const VMID16: u32 = 1 << 18;
    pub const CD2L: u32 = 1 << 19;
    pub const TTENDIAN_LE: u32 = 2 << 21;
    pub const STALL_MODEL_SHIFT: u32 = 24;
    pub const STALL_NONE: u32 = 1 << STALL_MODEL_SHIFT;
    pub const TERM_MODEL: u32 = 1 << 26;
    pub const ST_LEVEL_2LVL: u32 = 1 << 27;
}

/// CR0 fields.
pub mod cr0 {
    pub const SMMUEN: u32 = 1 << 0;
    pub const PRIQEN: u32 = 1 << 1;
    pub const EVTQEN: u32 = 1 << 2;
    pub const CMDQEN: u32 = 1 << 3;
    pub const ATSCHK: u32 = 1 << 4;
    pub const VMW: u32 = 7 << 6;
}

/// GERROR / GERRORN bits.
pub mod gerror {
    pub const CMDQ_ERR: u32 = 1 << 0;
    pub const EVTQ_ABT_ERR: u32 = 1 << 2;
    pub const PRIQ_ABT_ERR: u32 = 1 << 3;
    pub const MSI_CMDQ_ABT_ERR: u32 = 1 << 4;
    pub const MSI_EVTQ_ABT_ERR: u32 = 1 << 5;
    pub const MSI_PRIQ_ABT_ERR: u32 = 1 << 6;
    pub const MSI_GERROR_ABT_ERR: u32 = 1 << 7;
    pub const SFM_ERR: u32 = 1 << 8;
    pub const MASK: u32 = 0x1fd;
}

/// IRQ_CTRL bits.
pub mod irq_ctrl {
    pub const GERROR_IRQEN: u32 = 1 << 0;
    pub const PRIQ_IRQEN: u32 = 1 << 1;
    pub const EVTQ_IRQEN: u32 = 1 << 2;
}

/// GBPA bits.
pub mod gbpa {
    pub const ABORT: u32 = 1 << 20;
    pub const UPDATE: u32 = 1 << 31;
    /// Every writable field: MemAttr, MTCFG, ALLOCCFG, SHCFG, PRIVCFG, INSTCFG, ABORT.
    pub const FIELDS: u32 = 0x001f_3f1f;
}

/// Queue PROD/CONS bits.
pub mod q {
    pub const OVFLG: u32 = 1 << 31;
    pub const CONS_ERR_SHIFT: u32 = 24;
    pub const CONS_ERR_MASK: u32 = 0x7f << CONS_ERR_SHIFT;
    /// ADDR[51:5] of a queue base register.
    pub const BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_ffe0;
    /// The writable bits of a queue base: RA/WA, ADDR, LOG2SIZE.
    pub const BASE_MASK: u64 = (1 << 62) | BASE_ADDR_MASK | 0x1f;
}

/// CONS.ERR codes of the command queue.
pub mod cerror {
    pub const NONE: u32 = 0;
    pub const ILL: u32 = 1;
    pub const ABT: u32 = 2;
    pub const ATC_INV_SYNC: u32 = 3;
}

/// MSI address mask of the `*_IRQ_CFG0` registers (ADDR[51:2]).
pub const MSI_ADDR_MASK: u64 = 0x000f_ffff_ffff_fffc;
/// STRTAB_BASE writable bits: RA, ADDR[51:6].
pub const STRTAB_BASE_MASK: u64 = (1 << 62) | STRTAB_BASE_ADDR_MASK;
/// STRTAB_BASE ADDR[51:6].
pub const STRTAB_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_ffc0;
/// STRTAB_BASE_CFG writable bits: LOG2SIZE, SPLIT, FMT.
pub const STRTAB_BASE_CFG_MASK: u32 = 0x0003_07ff;

/// The ID registers a model presents. Configurable so a scenario can present different hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRegs {
    /// IDR0..IDR5.
    pub idr: [u32; 6],
    /// IIDR.
    pub iidr: u32,
    /// AIDR.
    pub aidr: u32,
}

impl Default for IdRegs {
    /// S1P+S2P (nested), AArch64 tables, LE, 2-level stream table, CD2L, 16-bit
    /// SID/ASID/VMID, 20-bit SSID, MSI, COHACC, no stall, terminate model, RIL, HAD,
    /// 4K/16K/64K granules, OAS 48 bits, SMMUv3.2.
    fn default() -> Self {
        use idr0::*;
        let idr0 = S2P
            | S1P
            | TTF_AARCH64
            | COHACC
            | ASID16
            | MSI
            | VMID16
            | CD2L
            | TTENDIAN_LE
            | STALL_NONE
            | TERM_MODEL
            | ST_LEVEL_2LVL;
        // SIDSIZE=16, SSIDSIZE=20, PRIQS=0, EVENTQS=19, CMDQS=19.
        let idr1 = 16 | (20 << 6) | (19 << 16) | (19 << 21);
        let idr3 = (1 << 2) | (1 << 10);
        let idr5 = 5 | (1 << 4) | (1 << 5) | (1 << 6);
        IdRegs {
            idr: [idr0, idr1, 0, idr3, 0, idr5],
            iidr: 0,
            aidr: 0x2,
        }
    }
}

impl IdRegs {
    fn idr0(&self) -> u32 {
        self.idr[0]
    }
    /// Stage-1 translation supported.
    pub fn s1p(&self) -> bool {
        self.idr0() & idr0::S1P != 0
    }
    /// Stage-2 translation supported.
    pub fn s2p(&self) -> bool {
        self.idr0() & idr0::S2P != 0
    }
    /// EL2 (hypervisor) TLBI commands supported.
    pub fn hyp(&self) -> bool {
        self.idr0() & idr0::HYP != 0
    }
    /// ATS supported.
    pub fn ats(&self) -> bool {
        self.idr0() & idr0::ATS != 0
    }
    /// PRI supported.
    pub fn pri(&self) -> bool {
        self.idr0() & idr0::PRI != 0
    }
    /// MSIs supported.
    pub fn msi(&self) -> bool {
        self.idr0() & idr0::MSI != 0
    }
    /// 2-level CD tables supported.
    pub fn cd2l(&self) -> bool {
        self.idr0() & idr0::CD2L != 0
    }
    /// 2-level stream tables supported.
    pub fn st_2lvl(&self) -> bool {
        (self.idr0() >> 27) & 3 == 1
    }
    /// STALL_MODEL field (0 stall, 1 no stall, 2 forced stall).
    pub fn stall_model(&self) -> u32 {
        (self.idr0() >> idr0::STALL_MODEL_SHIFT) & 3
    }
    /// TERM_MODEL: CD.A must be 1.
    pub fn term_model(&self) -> bool {
        self.idr0() & idr0::TERM_MODEL != 0
    }
    /// 16-bit VMIDs.
    pub fn vmid16(&self) -> bool {
        self.idr0() & idr0::VMID16 != 0
    }
    /// SIDSIZE.
    pub fn sid_bits(&self) -> u32 {
        (self.idr[1] & 0x3f).min(32)
    }
    /// SSIDSIZE.
    pub fn ssid_bits(&self) -> u32 {
        (self.idr[1] >> 6) & 0x1f
    }
    /// EVENTQS (log2 of the largest event queue).
    pub fn evtq_max_log2(&self) -> u32 {
        (self.idr[1] >> 16) & 0x1f
    }
    /// CMDQS (log2 of the largest command queue).
    pub fn cmdq_max_log2(&self) -> u32 {
        (self.idr[1] >> 21) & 0x1f
    }
    /// Range invalidation (IDR3.RIL).
    pub fn ril(&self) -> bool {
        self.idr[3] & (1 << 10) != 0
    }
    /// Hierarchical attribute disable (IDR3.HAD).
    pub fn had(&self) -> bool {
        self.idr[3] & (1 << 2) != 0
    }
    /// Output address size in bits (IDR5.OAS), capped at 48 (no 52-bit support).
    pub fn oas_bits(&self) -> u32 {
        pa_size_bits(self.idr[5] & 7).min(48)
    }
    /// Whether a translation granule (log2 size 12, 14, 16) is supported.
    pub fn granule_supported(&self, bits: u32) -> bool {
        match bits {
            12 => self.idr[5] & (1 << 4) != 0,
            14 => self.idr[5] & (1 << 5) != 0,
            16 => self.idr[5] & (1 << 6) != 0,
            _ => false,
        }
    }
}

/// Decodes an IPS/PS/OAS encoding into bits (reserved encodings read as 48).
pub fn pa_size_bits(enc: u32) -> u32 {
    match enc {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        6 => 52,
        _ => 48,
    }
}

/// How a 64-bit register is touched by one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// All 64 bits.
    Full,
    /// Bits 31:0.
    Low,
    /// Bits 63:32.
    High,
}

impl Part {
    /// Merges `value` (already shifted into place for `Full`, or a 32-bit half) into `old`.
    pub fn merge(self, old: u64, value: u64) -> u64 {
        match self {
            Part::Full => value,
            Part::Low => (old & !0xffff_ffff) | (value & 0xffff_ffff),
            Part::High => (old & 0xffff_ffff) | (value << 32),
        }
    }
    /// Extracts what an access of this part reads from `reg`.
    pub fn extract(self, reg: u64) -> u64 {
        match self {
            Part::Full => reg,
            Part::Low => reg & 0xffff_ffff,
            Part::High => reg >> 32,
        }
    }
}

/// The offsets of the 64-bit registers.
pub const REG64: &[u64] = &[
    off::GERROR_IRQ_CFG0,
    off::STRTAB_BASE,
    off::CMDQ_BASE,
    off::EVENTQ_BASE,
    off::EVENTQ_IRQ_CFG0,
    off::PRIQ_BASE,
    off::PRIQ_IRQ_CFG0,
];

/// Name of a register (as used in hook point names), by page-0 offset.
pub fn reg_name(offset: u64) -> Option<&'static str> {
    Some(match offset {
        off::IDR0 => "IDR0",
        off::IDR1 => "IDR1",
        off::IDR2 => "IDR2",
        off::IDR3 => "IDR3",
        off::IDR4 => "IDR4",
        off::IDR5 => "IDR5",
        off::IIDR => "IIDR",
        off::AIDR => "AIDR",
        off::CR0 => "CR0",
        off::CR0ACK => "CR0ACK",
        off::CR1 => "CR1",
        off::CR2 => "CR2",
        off::STATUSR => "STATUSR",
        off::GBPA => "GBPA",
        off::AGBPA => "AGBPA",
        off::IRQ_CTRL => "IRQ_CTRL",
        off::IRQ_CTRLACK => "IRQ_CTRLACK",
        off::GERROR => "GERROR",
        off::GERRORN => "GERRORN",
        off::GERROR_IRQ_CFG0 => "GERROR_IRQ_CFG0",
        off::GERROR_IRQ_CFG1 => "GERROR_IRQ_CFG1",
        off::GERROR_IRQ_CFG2 => "GERROR_IRQ_CFG2",
        off::STRTAB_BASE => "STRTAB_BASE",
        off::STRTAB_BASE_CFG => "STRTAB_BASE_CFG",
        off::CMDQ_BASE => "CMDQ_BASE",
        off::CMDQ_PROD => "CMDQ_PROD",
        off::CMDQ_CONS => "CMDQ_CONS",
        off::EVENTQ_BASE => "EVENTQ_BASE",
        off::EVENTQ_PROD => "EVENTQ_PROD",
        off::EVENTQ_CONS => "EVENTQ_CONS",
        off::EVENTQ_IRQ_CFG0 => "EVENTQ_IRQ_CFG0",
        off::EVENTQ_IRQ_CFG1 => "EVENTQ_IRQ_CFG1",
        off::EVENTQ_IRQ_CFG2 => "EVENTQ_IRQ_CFG2",
        off::PRIQ_BASE => "PRIQ_BASE",
        off::PRIQ_PROD => "PRIQ_PROD",
        off::PRIQ_CONS => "PRIQ_CONS",
        off::PRIQ_IRQ_CFG0 => "PRIQ_IRQ_CFG0",
        off::PRIQ_IRQ_CFG1 => "PRIQ_IRQ_CFG1",
        off::PRIQ_IRQ_CFG2 => "PRIQ_IRQ_CFG2",
        _ => return None,
    })
}

/// Point names of register writes, `smmuv3.mmio.write.<REG>`, for every writable register.
pub const WRITE_POINTS: &[&str] = &[
    "smmuv3.mmio.write.CR0",
    "smmuv3.mmio.write.CR1",
    "smmuv3.mmio.write.CR2",
    "smmuv3.mmio.write.GBPA",
    "smmuv3.mmio.write.IRQ_CTRL",
    "smmuv3.mmio.write.GERRORN",
    "smmuv3.mmio.write.GERROR_IRQ_CFG0",
    "smmuv3.mmio.write.GERROR_IRQ_CFG1",
    "smmuv3.mmio.write.GERROR_IRQ_CFG2",
    "smmuv3.mmio.write.STRTAB_BASE",
    "smmuv3.mmio.write.STRTAB_BASE_CFG",
    "smmuv3.mmio.write.CMDQ_BASE",
    "smmuv3.mmio.write.CMDQ_PROD",
    "smmuv3.mmio.write.CMDQ_CONS",
    "smmuv3.mmio.write.EVENTQ_BASE",
    "smmuv3.mmio.write.EVENTQ_PROD",
    "smmuv3.mmio.write.EVENTQ_CONS",
    "smmuv3.mmio.write.EVENTQ_IRQ_CFG0",
    "smmuv3.mmio.write.EVENTQ_IRQ_CFG1",
    "smmuv3.mmio.write.EVENTQ_IRQ_CFG2",
    "smmuv3.mmio.write.PRIQ_BASE",
    "smmuv3.mmio.write.PRIQ_PROD",
    "smmuv3.mmio.write.PRIQ_CONS",
    "smmuv3.mmio.write.PRIQ_IRQ_CFG0",
    "smmuv3.mmio.write.PRIQ_IRQ_CFG1",
    "smmuv3.mmio.write.PRIQ_IRQ_CFG2",
];

/// The point name for a write to the register at `offset`, if it is writable.
pub fn write_point(offset: u64) -> Option<&'static str> {
    let name = reg_name(offset)?;
    WRITE_POINTS
        .iter()
        .copied()
        .find(|p| p.strip_prefix("smmuv3.mmio.write.") == Some(name))
}

/// The guest-visible register state (everything but the ID registers).
#[derive(Debug, Clone, Default)]
pub struct RegFile {
    pub cr0: u32,
    pub cr1: u32,
    pub cr2: u32,
    pub gbpa: u32,
    pub irq_ctrl: u32,
    pub gerror: u32,
    pub gerrorn: u32,
    pub gerror_irq_cfg0: u64,
    pub gerror_irq_cfg1: u32,
    pub gerror_irq_cfg2: u32,
    pub strtab_base: u64,
    pub strtab_base_cfg: u32,
    pub cmdq_base: u64,
    pub cmdq_prod: u32,
    pub cmdq_cons: u32,
    pub eventq_base: u64,
    pub eventq_prod: u32,
    pub eventq_cons: u32,
    pub eventq_irq_cfg0: u64,
    pub eventq_irq_cfg1: u32,
    pub eventq_irq_cfg2: u32,
    pub priq_base: u64,
    pub priq_prod: u32,
    pub priq_cons: u32,
    pub priq_irq_cfg0: u64,
    pub priq_irq_cfg1: u32,
    pub priq_irq_cfg2: u32,
}

impl RegFile {
    /// Whether a GERROR bit is active (GERROR and GERRORN differ).
    pub fn gerror_active(&self, bit: u32) -> bool {
        (self.gerror ^ self.gerrorn) & bit != 0
    }
    /// The command queue is halted by an unacknowledged CMDQ_ERR.
    pub fn cmdq_halted(&self) -> bool {
        self.gerror_active(gerror::CMDQ_ERR)
    }
}

/// Stream-table configuration as translation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrtabCfg {
    /// Base address (ADDR[51:6]).
    pub base: u64,
    /// LOG2SIZE, capped to SIDSIZE.
    pub log2size: u32,
    /// SPLIT.
    pub split: u32,
    /// FMT=1: 2-level.
    pub two_level: bool,
}

impl StrtabCfg {
    /// Decodes STRTAB_BASE / STRTAB_BASE_CFG against the ID registers.
    pub fn decode(base: u64, cfg: u32, idr: &IdRegs) -> Self {
        StrtabCfg {
            base: base & STRTAB_BASE_ADDR_MASK,
            log2size: (cfg & 0x3f).min(idr.sid_bits()),
            split: (cfg >> 6) & 0x1f,
            two_level: (cfg >> 16) & 3 == 1 && idr.st_2lvl(),
        }
    }
}

/// What translation needs from the registers, copied out under the lock.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// CR0.SMMUEN.
    pub smmuen: bool,
    /// GBPA.ABORT.
    pub gbpa_abort: bool,
    /// Stream table.
    pub strtab: StrtabCfg,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_idrs_advertise_what_the_issue_asks() {
        let id = IdRegs::default();
        assert!(id.s1p() && id.s2p() && id.msi() && id.cd2l() && id.st_2lvl() && id.ril());
        assert_eq!(id.sid_bits(), 16);
        assert_eq!(id.oas_bits(), 48);
        assert!(
            id.cmdq_max_log2() > 6,
            "Linux needs more than 64 command-queue entries"
        );
        for g in [12, 14, 16] {
            assert!(id.granule_supported(g));
        }
        assert_eq!(id.stall_model(), 1);
    }

    #[test]
    fn every_writable_register_has_a_point() {
        for p in WRITE_POINTS {
            let name = p.strip_prefix("smmuv3.mmio.write.").unwrap_or("");
            assert!(reg_name_lookup(name).is_some(), "{p}");
        }
        assert_eq!(
            write_point(off::CMDQ_PROD),
            Some("smmuv3.mmio.write.CMDQ_PROD")
        );
        assert_eq!(write_point(off::IDR0), None);
    }

    fn reg_name_lookup(name: &str) -> Option<u64> {
        (0..0x100u64)
            .step_by(4)
            .find(|o| reg_name(*o) == Some(name))
    }

    #[test]
    fn part_merge_and_extract() {
        assert_eq!(
            Part::Low.merge(0x1111_2222_3333_4444, 0xaaaa_bbbb),
            0x1111_2222_aaaa_bbbb
        );
        assert_eq!(
            Part::High.merge(0x1111_2222_3333_4444, 0xaaaa_bbbb),
            0xaaaa_bbbb_3333_4444
        );
        assert_eq!(Part::High.extract(0x1111_2222_3333_4444), 0x1111_2222);
    }
}
