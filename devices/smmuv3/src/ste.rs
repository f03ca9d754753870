//! Stream table lookup (linear and 2-level) and STE decoding with every validity rule.

use crate::evtq::EventType;
use crate::guest::read_u64;
use crate::regs::{IdRegs, StrtabCfg, pa_size_bits};
use crate::walk::{Granule, WalkCfg, s2_concat, s2_start_level};
use sluice_devapi::{SteConfig, SteMode};
use thiserror::Error;
use vm_memory::GuestMemoryBackend;

/// Why a StreamID does not reach a usable STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SteError {
    /// StreamID beyond the table, or in an L1 descriptor with invalid/out-of-bounds Span.
    #[error("StreamID {sid:#x} out of range of the stream table")]
    BadStreamId {
        /// StreamID.
        sid: u32,
    },
    /// Reading the L1 descriptor or the STE failed.
    #[error("fetching stream table entry at {addr:#x} failed")]
    Fetch {
        /// Address of the failed read.
        addr: u64,
    },
    /// The STE is invalid or ILLEGAL.
    #[error("bad STE: {0}")]
    Illegal(&'static str),
}

impl SteError {
    /// The event this error produces.
    pub fn event_type(&self) -> EventType {
        match self {
            SteError::BadStreamId { .. } => EventType::CBadStreamid,
            SteError::Fetch { .. } => EventType::FSteFetch,
            SteError::Illegal(_) => EventType::CBadSte,
        }
    }
}

/// Finds the address of the STE for `sid`. The 2-level table's L2 arrays hold 2^(Span−1)
/// entries (QEMU wrongly accepts 2^Span).
pub fn ste_address<M: GuestMemoryBackend>(
    mem: &M,
    st: &StrtabCfg,
    sid: u32,
) -> Result<u64, SteError> {
    let bad = SteError::BadStreamId { sid };
    if u64::from(sid) >> st.log2size != 0 {
        return Err(bad);
    }
    if !st.two_level {
        let base = st.base & !((1u64 << (st.log2size + 6)) - 1);
        return Ok(base + u64::from(sid) * 64);
    }
    if !matches!(st.split, 6 | 8 | 10) {
        return Err(SteError::Illegal("STRTAB_BASE_CFG.SPLIT is not 6, 8 or 10"));
    }
    let split = st.split.min(st.log2size);
    let l1_idx = u64::from(sid) >> split;
    let l1_addr = st.base + l1_idx * 8;
    let l1 = read_u64(mem, l1_addr).map_err(|_| SteError::Fetch { addr: l1_addr })?;
    let span = (l1 & 0x1f) as u32;
    if span == 0 || span > 11 || span > split + 1 {
        return Err(bad);
    }
    let l2_idx = u64::from(sid) & ((1u64 << split) - 1);
    if l2_idx >= 1u64 << (span - 1) {
        return Err(bad);
    }
    let l2_base = l1 & 0x000f_ffff_ffff_ffc0 & !((1u64 << (5 + span)) - 1);
    Ok(l2_base + l2_idx * 64)
}

/// Stage-1 part of an STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S1Ste {
    /// S1ContextPtr (a PA, or an IPA when stage 2 is enabled).
    pub ctx_ptr: u64,
    /// S1Fmt after applying the "ignored" rules: 0 linear, 1 2-level 4K, 2 2-level 64K.
    pub fmt: u8,
    /// S1CDMax.
    pub cd_max: u32,
    /// S1DSS.
    pub dss: u8,
}

/// Stage-2 part of an STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S2Ste {
    /// S2VMID.
    pub vmid: u16,
    /// Walk parameters.
    pub walk: WalkCfg,
    /// S2AFFD: access-flag faults disabled.
    pub affd: bool,
    /// S2R: record faults.
    pub record: bool,
}

/// A decoded STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ste {
    /// Config 0b0xx: abort, no event.
    Abort,
    /// Config 0b100.
    Bypass,
    /// Config 0b101/0b110/0b111.
    Translate {
        /// Stage 1, if enabled.
        s1: Option<S1Ste>,
        /// Stage 2, if enabled.
        s2: Option<S2Ste>,
        /// VMID even when stage 2 is bypassed (S2VMID tags stage-1 TLB entries).
        vmid: u16,
    },
}

fn bits(w: u64, lo: u32, n: u32) -> u64 {
    (w >> lo) & ((1u64 << n) - 1)
}

/// STE word 0's V and Config fields, decoded for observers (the escape oracle, the timeline):
/// what the STE would do with a transaction, before the other validity rules of [`Ste::parse`].
pub fn ste_config(d0: u64) -> SteConfig {
    let config = bits(d0, 1, 3);
    let mode = match config {
        // Config 0b0xx: abort (0b000) or reserved, which no transaction gets through either.
        _ if config & 4 == 0 => SteMode::Abort,
        4 => SteMode::Bypass,
        5 => SteMode::Stage1,
        6 => SteMode::Stage2,
        _ => SteMode::Nested,
    };
    SteConfig {
        valid: d0 & 1 != 0,
        mode,
        raw: (d0 & 0xf) as u8,
    }
}

impl Ste {
    /// Decodes an STE's 8 dwords against the ID registers.
    pub fn parse(d: &[u64; 8], idr: &IdRegs) -> Result<Ste, SteError> {
        let [d0, d1, d2, d3, ..] = *d;
        if d0 & 1 == 0 {
            return Err(SteError::Illegal("V=0"));
        }
        let config = bits(d0, 1, 3);
        if config & 4 == 0 {
            return Ok(Ste::Abort);
        }
        if config == 4 {
            return Ok(Ste::Bypass);
        }
        let s1_en = config & 1 != 0;
        let s2_en = config & 2 != 0;
        if s1_en && !idr.s1p() {
            return Err(SteError::Illegal("stage 1 enabled but not implemented"));
        }
        if s2_en && !idr.s2p() {
            return Err(SteError::Illegal("stage 2 enabled but not implemented"));
        }
        let mut vmid = bits(d2, 0, 16) as u16;
        if !idr.vmid16() {
            vmid &= 0xff;
        }
        let s2 = if s2_en {
            Some(Self::parse_s2(d2, d3, vmid, idr)?)
        } else {
            None
        };
        let s1 = if s1_en {
            Some(Self::parse_s1(d0, d1, s2_en, idr)?)
        } else {
            None
        };
        Ok(Ste::Translate { s1, s2, vmid })
    }

    fn parse_s1(d0: u64, d1: u64, s2_en: bool, idr: &IdRegs) -> Result<S1Ste, SteError> {
        let ctx_ptr = d0 & 0x000f_ffff_ffff_ffc0;
        let mut cd_max = bits(d0, 59, 5) as u32;
        if idr.ssid_bits() == 0 {
            cd_max = 0;
        }
        if cd_max > idr.ssid_bits() {
            return Err(SteError::Illegal("S1CDMax larger than SSIDSIZE"));
        }
        let mut fmt = bits(d0, 4, 2) as u8;
        if cd_max == 0 || fmt == 3 {
            fmt = 0;
        }
        if fmt != 0 && !idr.cd2l() {
            return Err(SteError::Illegal("2-level CD table without IDR0.CD2L"));
        }
        if !s2_en && ctx_ptr >> idr.oas_bits() != 0 {
            return Err(SteError::Illegal("S1ContextPtr beyond OAS"));
        }
        let dss = bits(d1, 0, 2) as u8;
        if cd_max != 0 && dss == 3 {
            return Err(SteError::Illegal("S1DSS reserved"));
        }
        if d1 & (1 << 27) != 0 && idr.stall_model() == 2 {
            return Err(SteError::Illegal("S1STALLD with forced stall"));
        }
        if !s2_en {
            match bits(d1, 30, 2) {
                0 => {}
                2 if idr.hyp() => {}
                _ => return Err(SteError::Illegal("STRW reserved or EL2 without IDR0.HYP")),
            }
        }
        Ok(S1Ste {
            ctx_ptr,
            fmt,
            cd_max,
            dss,
        })
    }

    fn parse_s2(d2: u64, d3: u64, vmid: u16, idr: &IdRegs) -> Result<S2Ste, SteError> {
        // QEMU reaches g_assert_not_reached() here: a guest could abort it.
        if d2 & (1 << 51) == 0 {
            return Err(SteError::Illegal(
                "S2AA64=0 (AArch32 stage 2 not supported)",
            ));
        }
        if d2 & (1 << 52) != 0 {
            return Err(SteError::Illegal("S2ENDI=1 on a little-endian-only SMMU"));
        }
        if d2 & (1 << 57) != 0 && idr.stall_model() == 1 {
            return Err(SteError::Illegal("S2S=1 without stall support"));
        }
        let granule = Granule::from_tg0(bits(d2, 46, 2))
            .filter(|g| idr.granule_supported(g.bits()))
            .ok_or(SteError::Illegal("S2TG reserved or granule not supported"))?;
        let ps = pa_size_bits(bits(d2, 48, 3) as u32).min(idr.oas_bits());
        let t0sz = bits(d2, 32, 6) as u32;
        let input_bits = 64u32.saturating_sub(t0sz);
        if !(25..=48).contains(&input_bits) || input_bits > ps {
            return Err(SteError::Illegal("S2T0SZ out of range"));
        }
        let start_level =
            s2_start_level(granule, bits(d2, 38, 2)).ok_or(SteError::Illegal("S2SL0 reserved"))?;
        let concat = s2_concat(granule, start_level, input_bits)
            .ok_or(SteError::Illegal("S2SL0 inconsistent with S2T0SZ"))?;
        let ttb = d3 & 0x000f_ffff_ffff_fff0;
        if ttb >> ps != 0 {
            return Err(SteError::Illegal("S2TTB beyond S2PS"));
        }
        // The concatenated tables are aligned to their total size.
        let table_bytes = u64::from(concat) << granule.bits();
        Ok(S2Ste {
            vmid,
            walk: WalkCfg {
                granule,
                start_level,
                input_bits,
                oa_bits: ps,
                ttb: ttb & !(table_bytes - 1),
                had: true,
            },
            affd: d2 & (1 << 53) != 0,
            record: d2 & (1 << 58) != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ste_config_decodes_v_and_config_for_observers() {
        let c = |d0: u64| {
            let s = ste_config(d0);
            (s.valid, s.mode, s.raw)
        };
        assert_eq!(c(0), (false, SteMode::Abort, 0));
        assert_eq!(
            c(1 | 2 << 1),
            (true, SteMode::Abort, 5),
            "reserved: no DMA passes"
        );
        assert_eq!(c(1 | 4 << 1), (true, SteMode::Bypass, 9));
        assert_eq!(c(1 | 5 << 1 | 0xf0), (true, SteMode::Stage1, 0xb));
        assert_eq!(c(1 | 6 << 1), (true, SteMode::Stage2, 0xd));
        assert_eq!(c(7 << 1), (false, SteMode::Nested, 0xe));
    }

    fn s2_dwords(t0sz: u64, sl0: u64, tg: u64) -> [u64; 8] {
        let d0 = 1 | (0b110 << 1);
        let d2 = 7 | (t0sz << 32) | (sl0 << 38) | (tg << 46) | (5 << 48) | (1 << 51) | (1 << 58);
        [d0, 0, d2, 0x4000_0000, 0, 0, 0, 0]
    }

    #[test]
    fn s2_ste_decodes() {
        let idr = IdRegs::default();
        match Ste::parse(&s2_dwords(24, 1, 0), &idr) {
            Ok(Ste::Translate {
                s1: None,
                s2: Some(s2),
                vmid: 7,
            }) => {
                assert_eq!(s2.walk.start_level, 1);
                assert_eq!(s2.walk.input_bits, 40);
                assert!(s2.record);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn s2aa64_zero_is_a_bad_ste_not_a_crash() {
        let mut d = s2_dwords(24, 1, 0);
        d[2] &= !(1 << 51);
        assert!(matches!(
            Ste::parse(&d, &IdRegs::default()),
            Err(SteError::Illegal(_))
        ));
    }

    #[test]
    fn reserved_config_behaves_as_abort() {
        let idr = IdRegs::default();
        for cfg in 0..4u64 {
            assert_eq!(
                Ste::parse(&[1 | (cfg << 1), 0, 0, 0, 0, 0, 0, 0], &idr),
                Ok(Ste::Abort)
            );
        }
        assert_eq!(
            Ste::parse(&[1 | (4 << 1), 0, 0, 0, 0, 0, 0, 0], &idr),
            Ok(Ste::Bypass)
        );
    }
}
