//! Command-queue entries (16 bytes): parse into a typed [`Command`], separately from executing
//! them (see `exec.rs`).

use crate::regs::IdRegs;
use thiserror::Error;

/// Opcode values.
pub mod op {
    pub const PREFETCH_CONFIG: u8 = 0x01;
    pub const PREFETCH_ADDR: u8 = 0x02;
    pub const CFGI_STE: u8 = 0x03;
    pub const CFGI_STE_RANGE: u8 = 0x04;
    pub const CFGI_CD: u8 = 0x05;
    pub const CFGI_CD_ALL: u8 = 0x06;
    pub const TLBI_NH_ALL: u8 = 0x10;
    pub const TLBI_NH_ASID: u8 = 0x11;
    pub const TLBI_NH_VA: u8 = 0x12;
    pub const TLBI_NH_VAA: u8 = 0x13;
    pub const TLBI_EL3_ALL: u8 = 0x18;
    pub const TLBI_EL3_VA: u8 = 0x1a;
    pub const TLBI_EL2_ALL: u8 = 0x20;
    pub const TLBI_EL2_ASID: u8 = 0x21;
    pub const TLBI_EL2_VA: u8 = 0x22;
    pub const TLBI_EL2_VAA: u8 = 0x23;
    pub const TLBI_S12_VMALL: u8 = 0x28;
    pub const TLBI_S2_IPA: u8 = 0x2a;
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    pub const ATC_INV: u8 = 0x40;
    pub const PRI_RESP: u8 = 0x41;
    pub const RESUME: u8 = 0x44;
    pub const STALL_TERM: u8 = 0x45;
    pub const CMD_SYNC: u8 = 0x46;
}

/// Point names at command completion, `smmuv3.cmd.<OPCODE>`.
pub const CMD_POINTS: &[&str] = &[
    "smmuv3.cmd.PREFETCH_CONFIG",
    "smmuv3.cmd.PREFETCH_ADDR",
    "smmuv3.cmd.CFGI_STE",
    "smmuv3.cmd.CFGI_STE_RANGE",
    "smmuv3.cmd.CFGI_CD",
    "smmuv3.cmd.CFGI_CD_ALL",
    "smmuv3.cmd.TLBI_NH_ALL",
    "smmuv3.cmd.TLBI_NH_ASID",
    "smmuv3.cmd.TLBI_NH_VA",
    "smmuv3.cmd.TLBI_NH_VAA",
    "smmuv3.cmd.TLBI_EL2_ALL",
    "smmuv3.cmd.TLBI_EL2_ASID",
    "smmuv3.cmd.TLBI_EL2_VA",
    "smmuv3.cmd.TLBI_EL2_VAA",
    "smmuv3.cmd.TLBI_S12_VMALL",
    "smmuv3.cmd.TLBI_S2_IPA",
    "smmuv3.cmd.TLBI_NSNH_ALL",
    "smmuv3.cmd.ATC_INV",
    "smmuv3.cmd.PRI_RESP",
    "smmuv3.cmd.RESUME",
    "smmuv3.cmd.STALL_TERM",
    "smmuv3.cmd.CMD_SYNC",
];

/// An address range of a TLBI, in the command's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbiRange {
    /// VA or IPA (bits 11:0 clear).
    pub addr: u64,
    /// Number of bytes covered (at least one page of the range granule, or 4 KiB).
    pub len: u64,
    /// Leaf-only hint (ignored: over-invalidation is allowed).
    pub leaf: bool,
}

impl TlbiRange {
    /// Decodes VA/IPA, TG, NUM, SCALE, TTL of a TLBI command. With TG=0 (or without RIL) a
    /// single address is invalidated; its extent is the largest block the tables could hold
    /// there, which the IOTLB resolves by matching every entry that contains `addr`.
    fn decode(d0: u64, d1: u64, addr_mask: u64, ril: bool) -> Self {
        let addr = d1 & addr_mask;
        let tg = (d1 >> 10) & 3;
        let leaf = d1 & 1 != 0;
        if ril && tg != 0 {
            let gbits = match tg {
                1 => 12,
                2 => 14,
                _ => 16,
            };
            let num = (d0 >> 12) & 0x1f;
            let scale = (d0 >> 20) & 0x1f;
            let pages = (num + 1) << scale;
            TlbiRange {
                addr,
                len: pages << gbits,
                leaf,
            }
        } else {
            TlbiRange { addr, len: 1, leaf }
        }
    }
}

/// CMD_SYNC completion signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSignal {
    /// CS=0b00: no signal; software polls CONS.
    None,
    /// CS=0b01: an interrupt, or the MSI write described by `msi_addr`/`msi_data`.
    Irq,
    /// CS=0b10: a WFE wake-up event.
    Sev,
}

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// PREFETCH_CONFIG / PREFETCH_ADDR: hints, no architectural effect.
    Prefetch { opcode: u8, sid: u32 },
    /// CFGI_STE: invalidate the cached STE (and its CDs unless `leaf`).
    CfgiSte { sid: u32, leaf: bool },
    /// CFGI_STE_RANGE (CFGI_ALL with range 31): SIDs `[sid & !mask, sid | mask]`.
    CfgiSteRange { sid: u32, range: u32 },
    /// CFGI_CD: one CD of one stream.
    CfgiCd { sid: u32, ssid: u32, leaf: bool },
    /// CFGI_CD_ALL: every CD of a stream.
    CfgiCdAll { sid: u32 },
    /// TLBI_NH_ALL: every stage-1 entry of `vmid`.
    TlbiNhAll { vmid: u16 },
    /// TLBI_NH_ASID.
    TlbiNhAsid { vmid: u16, asid: u16 },
    /// TLBI_NH_VA: one ASID, an address range.
    TlbiNhVa {
        vmid: u16,
        asid: u16,
        range: TlbiRange,
    },
    /// TLBI_NH_VAA: every ASID of the VMID, an address range.
    TlbiNhVaa { vmid: u16, range: TlbiRange },
    /// TLBI_EL2_ALL / _ASID / _VA / _VAA (only with IDR0.HYP).
    TlbiEl2 {
        opcode: u8,
        asid: u16,
        range: TlbiRange,
    },
    /// TLBI_S12_VMALL.
    TlbiS12Vmall { vmid: u16 },
    /// TLBI_S2_IPA.
    TlbiS2Ipa { vmid: u16, range: TlbiRange },
    /// TLBI_NSNH_ALL.
    TlbiNsnhAll,
    /// ATC_INV (only with IDR0.ATS); no ATCs are modelled.
    AtcInv { sid: u32 },
    /// PRI_RESP (only with IDR0.PRI).
    PriResp { sid: u32 },
    /// RESUME: no transaction is ever stalled, so nothing to resume.
    Resume { sid: u32 },
    /// STALL_TERM.
    StallTerm { sid: u32 },
    /// CMD_SYNC.
    Sync {
        signal: SyncSignal,
        msi_addr: u64,
        msi_data: u32,
    },
}

/// Why a command is illegal (→ CERROR_ILL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CmdParseError {
    /// The opcode is not defined.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The opcode is defined but not valid on this SMMU or this (non-secure) queue.
    #[error("opcode {opcode:#04x} not supported: {why}")]
    Unsupported {
        /// Opcode.
        opcode: u8,
        /// Which feature is missing.
        why: &'static str,
    },
    /// A field holds a reserved value.
    #[error("opcode {opcode:#04x}: reserved value in {field}")]
    Reserved {
        /// Opcode.
        opcode: u8,
        /// Field name.
        field: &'static str,
    },
}

impl Command {
    /// Parses one command against the ID registers.
    pub fn parse(d: [u64; 2], idr: &IdRegs) -> Result<Command, CmdParseError> {
        let [d0, d1] = d;
        let opcode = (d0 & 0xff) as u8;
        let ssec = d0 & (1 << 10) != 0;
        let sid = (d0 >> 32) as u32;
        let ssid = ((d0 >> 12) & 0xf_ffff) as u32;
        let vmid = ((d0 >> 32) & 0xffff) as u16;
        let asid = ((d0 >> 48) & 0xffff) as u16;
        let leaf = d1 & 1 != 0;
        let va_mask = !0xfffu64;
        let ipa_mask = 0x000f_ffff_ffff_f000u64;
        let unsupported = |why| Err(CmdParseError::Unsupported { opcode, why });
        let needs_s1 = |c| {
            if idr.s1p() {
                Ok(c)
            } else {
                unsupported("stage 1")
            }
        };
        let needs_s2 = |c| {
            if idr.s2p() {
                Ok(c)
            } else {
                unsupported("stage 2")
            }
        };
        if ssec
            && matches!(
                opcode,
                op::CFGI_STE | op::CFGI_STE_RANGE | op::CFGI_CD | op::CFGI_CD_ALL
            )
        {
            return unsupported("SSEC=1 on the non-secure queue");
        }
        match opcode {
            op::PREFETCH_CONFIG | op::PREFETCH_ADDR => Ok(Command::Prefetch { opcode, sid }),
            op::CFGI_STE => Ok(Command::CfgiSte { sid, leaf }),
            op::CFGI_STE_RANGE => Ok(Command::CfgiSteRange {
                sid,
                range: (d1 & 0x1f) as u32,
            }),
            op::CFGI_CD => needs_s1(Command::CfgiCd { sid, ssid, leaf }),
            op::CFGI_CD_ALL => needs_s1(Command::CfgiCdAll { sid }),
            op::TLBI_NH_ALL => needs_s1(Command::TlbiNhAll { vmid }),
            op::TLBI_NH_ASID => needs_s1(Command::TlbiNhAsid { vmid, asid }),
            op::TLBI_NH_VA => needs_s1(Command::TlbiNhVa {
                vmid,
                asid,
                range: TlbiRange::decode(d0, d1, va_mask, idr.ril()),
            }),
            op::TLBI_NH_VAA => needs_s1(Command::TlbiNhVaa {
                vmid,
                range: TlbiRange::decode(d0, d1, va_mask, idr.ril()),
            }),
            op::TLBI_EL3_ALL | op::TLBI_EL3_VA => unsupported("EL3 TLBI on the non-secure queue"),
            op::TLBI_EL2_ALL | op::TLBI_EL2_ASID | op::TLBI_EL2_VA | op::TLBI_EL2_VAA => {
                if idr.hyp() {
                    Ok(Command::TlbiEl2 {
                        opcode,
                        asid,
                        range: TlbiRange::decode(d0, d1, va_mask, idr.ril()),
                    })
                } else {
                    unsupported("IDR0.HYP")
                }
            }
            op::TLBI_S12_VMALL => needs_s2(Command::TlbiS12Vmall { vmid }),
            op::TLBI_S2_IPA => needs_s2(Command::TlbiS2Ipa {
                vmid,
                range: TlbiRange::decode(d0, d1, ipa_mask, idr.ril()),
            }),
            op::TLBI_NSNH_ALL => Ok(Command::TlbiNsnhAll),
            op::ATC_INV => {
                if idr.ats() {
                    Ok(Command::AtcInv { sid })
                } else {
                    unsupported("IDR0.ATS")
                }
            }
            op::PRI_RESP => {
                if idr.pri() {
                    Ok(Command::PriResp { sid })
                } else {
                    unsupported("IDR0.PRI")
                }
            }
            op::RESUME => Ok(Command::Resume { sid }),
            op::STALL_TERM => Ok(Command::StallTerm { sid }),
            op::CMD_SYNC => {
                let signal = match (d0 >> 12) & 3 {
                    0 => SyncSignal::None,
                    1 => SyncSignal::Irq,
                    2 => SyncSignal::Sev,
                    _ => {
                        return Err(CmdParseError::Reserved {
                            opcode,
                            field: "CS",
                        });
                    }
                };
                Ok(Command::Sync {
                    signal,
                    msi_addr: d1 & 0x000f_ffff_ffff_fffc,
                    msi_data: (d0 >> 32) as u32,
                })
            }
            _ => Err(CmdParseError::UnknownOpcode(opcode)),
        }
    }

    /// The completion point name of this command.
    pub fn point(&self) -> &'static str {
        match self {
            Command::Prefetch { opcode, .. } if *opcode == op::PREFETCH_ADDR => {
                "smmuv3.cmd.PREFETCH_ADDR"
            }
            Command::Prefetch { .. } => "smmuv3.cmd.PREFETCH_CONFIG",
            Command::CfgiSte { .. } => "smmuv3.cmd.CFGI_STE",
            Command::CfgiSteRange { .. } => "smmuv3.cmd.CFGI_STE_RANGE",
            Command::CfgiCd { .. } => "smmuv3.cmd.CFGI_CD",
            Command::CfgiCdAll { .. } => "smmuv3.cmd.CFGI_CD_ALL",
            Command::TlbiNhAll { .. } => "smmuv3.cmd.TLBI_NH_ALL",
            Command::TlbiNhAsid { .. } => "smmuv3.cmd.TLBI_NH_ASID",
            Command::TlbiNhVa { .. } => "smmuv3.cmd.TLBI_NH_VA",
            Command::TlbiNhVaa { .. } => "smmuv3.cmd.TLBI_NH_VAA",
            Command::TlbiEl2 { opcode, .. } => match *opcode {
                op::TLBI_EL2_ALL => "smmuv3.cmd.TLBI_EL2_ALL",
                op::TLBI_EL2_ASID => "smmuv3.cmd.TLBI_EL2_ASID",
                op::TLBI_EL2_VA => "smmuv3.cmd.TLBI_EL2_VA",
                _ => "smmuv3.cmd.TLBI_EL2_VAA",
            },
            Command::TlbiS12Vmall { .. } => "smmuv3.cmd.TLBI_S12_VMALL",
            Command::TlbiS2Ipa { .. } => "smmuv3.cmd.TLBI_S2_IPA",
            Command::TlbiNsnhAll => "smmuv3.cmd.TLBI_NSNH_ALL",
            Command::AtcInv { .. } => "smmuv3.cmd.ATC_INV",
            Command::PriResp { .. } => "smmuv3.cmd.PRI_RESP",
            Command::Resume { .. } => "smmuv3.cmd.RESUME",
            Command::StallTerm { .. } => "smmuv3.cmd.STALL_TERM",
            Command::Sync { .. } => "smmuv3.cmd.CMD_SYNC",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sync_and_range_tlbi() {
        let idr = IdRegs::default();
        let c = Command::parse([0x46 | (1 << 12) | (0xabcd << 32), 0x8000_1004], &idr);
        assert_eq!(
            c,
            Ok(Command::Sync {
                signal: SyncSignal::Irq,
                msi_addr: 0x8000_1004,
                msi_data: 0xabcd
            })
        );
        // NUM=3, SCALE=1, TG=4K: 8 pages.
        let d0 = 0x12 | (3 << 12) | (1 << 20) | (5u64 << 48);
        let d1 = 0x40_0000 | (1 << 10);
        match Command::parse([d0, d1], &idr) {
            Ok(Command::TlbiNhVa { asid: 5, range, .. }) => {
                assert_eq!((range.addr, range.len), (0x40_0000, 8 << 12));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Command::parse([0x7f, 0], &idr),
            Err(CmdParseError::UnknownOpcode(0x7f))
        );
        assert!(Command::parse([0x46 | (3 << 12), 0], &idr).is_err());
    }

    #[test]
    fn every_point_is_listed() {
        let idr = IdRegs::default();
        for opc in 0..=0xffu8 {
            if let Ok(c) = Command::parse([u64::from(opc), 0], &idr) {
                assert!(CMD_POINTS.contains(&c.point()), "{opc:#x}");
            }
        }
    }
}
