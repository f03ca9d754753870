//! Context-descriptor tables (linear and 2-level) and CD decoding with its validity rules.

use crate::evtq::EventType;
use crate::regs::{IdRegs, pa_size_bits};
use crate::ste::S1Ste;
use crate::walk::{Granule, WalkCfg};
use thiserror::Error;

/// Why a SubstreamID does not reach a usable CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CdError<E> {
    /// SubstreamID out of range, or its L1CD invalid.
    #[error("SubstreamID {ssid:#x} out of range or its L1 descriptor is invalid")]
    BadSubstream {
        /// SubstreamID.
        ssid: u32,
    },
    /// Reading the L1CD or the CD failed (external abort or stage-2 fault).
    #[error("fetching context descriptor at {addr:#x} failed")]
    Fetch {
        /// Address (PA or IPA) of the failed read.
        addr: u64,
        /// Underlying error.
        err: E,
    },
    /// The CD is invalid or ILLEGAL.
    #[error("bad CD: {0}")]
    Illegal(&'static str),
}

impl<E> CdError<E> {
    /// The event this error produces (a stage-2 fetch fault is reported by the caller).
    pub fn event_type(&self) -> EventType {
        match self {
            CdError::BadSubstream { .. } => EventType::CBadSubstreamid,
            CdError::Fetch { .. } => EventType::FCdFetch,
            CdError::Illegal(_) => EventType::CBadCd,
        }
    }
}

/// Finds the address of the CD for `ssid` (0 when the transaction has none and S1DSS selects
/// substream 0). `read_l1(addr)` reads one L1CD.
pub fn cd_address<E>(
    s1: &S1Ste,
    ssid: u32,
    read_l1: &mut impl FnMut(u64) -> Result<u64, E>,
) -> Result<u64, CdError<E>> {
    if s1.cd_max == 0 {
        return if ssid == 0 {
            Ok(s1.ctx_ptr)
        } else {
            Err(CdError::BadSubstream { ssid })
        };
    }
    if u64::from(ssid) >> s1.cd_max != 0 {
        return Err(CdError::BadSubstream { ssid });
    }
    let leaf_bits = match s1.fmt {
        0 => return Ok(s1.ctx_ptr + u64::from(ssid) * 64),
        1 => 6,
        _ => 10,
    };
    let l1_idx = u64::from(ssid) >> leaf_bits;
    let l1_addr = s1.ctx_ptr + l1_idx * 8;
    let l1 = read_l1(l1_addr).map_err(|err| CdError::Fetch { addr: l1_addr, err })?;
    if l1 & 1 == 0 {
        return Err(CdError::BadSubstream { ssid });
    }
    let l2 = l1 & 0x000f_ffff_ffff_f000;
    let l2_idx = u64::from(ssid) & ((1u64 << leaf_bits) - 1);
    Ok(l2 + l2_idx * 64)
}

/// One of the two translation regions of a CD (TTB0 / TTB1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Walk parameters.
    pub walk: WalkCfg,
    /// Top byte ignored.
    pub tbi: bool,
}

/// A decoded, valid CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cd {
    /// ASID.
    pub asid: u16,
    /// TTB0 and TTB1 regions; `None` when EPDx disables the region.
    pub regions: [Option<Region>; 2],
    /// AFFD: access-flag faults disabled.
    pub affd: bool,
    /// R: record faults.
    pub record: bool,
}

fn bits(w: u64, lo: u32, n: u32) -> u64 {
    (w >> lo) & ((1u64 << n) - 1)
}

impl Cd {
    /// Decodes a CD's first dwords against the ID registers.
    pub fn parse(d: &[u64; 8], idr: &IdRegs) -> Result<Cd, CdError<()>> {
        let [d0, d1, d2, ..] = *d;
        if d0 & (1 << 31) == 0 {
            return Err(CdError::Illegal("V=0"));
        }
        if d0 & (1 << 41) == 0 {
            return Err(CdError::Illegal(
                "AA64=0 (VMSAv8-32 LPAE tables not supported)",
            ));
        }
        if d0 & (1 << 15) != 0 {
            return Err(CdError::Illegal("ENDI=1 on a little-endian-only SMMU"));
        }
        if d0 & (1 << 44) != 0 && idr.stall_model() == 1 {
            return Err(CdError::Illegal("S=1 without stall support"));
        }
        if d0 & (1 << 46) == 0 && idr.term_model() {
            return Err(CdError::Illegal("A=0 with TERM_MODEL=1"));
        }
        let ips = pa_size_bits(bits(d0, 32, 3) as u32).min(idr.oas_bits());
        let had_ok = idr.had();
        let region = |tsz: u64, g: Option<Granule>, epd: bool, ttb: u64, had: bool, tbi: bool| {
            if epd {
                return Ok(None);
            }
            let granule = g
                .filter(|g| idr.granule_supported(g.bits()))
                .ok_or(CdError::Illegal("TGx reserved or granule not supported"))?;
            if !(16..=39).contains(&tsz) {
                return Err(CdError::Illegal("TxSZ out of range 16..=39"));
            }
            let input_bits = 64 - tsz as u32;
            Ok(Some(Region {
                walk: WalkCfg {
                    granule,
                    start_level: granule.s1_start_level(input_bits),
                    input_bits,
                    oa_bits: ips,
                    ttb: ttb & 0x000f_ffff_ffff_fff0,
                    had: had && had_ok,
                },
                tbi,
            }))
        };
        let r0 = region(
            bits(d0, 0, 6),
            Granule::from_tg0(bits(d0, 6, 2)),
            d0 & (1 << 14) != 0,
            d1,
            d1 & 2 != 0,
            d0 & (1 << 38) != 0,
        )?;
        // TBI1 is bit 39 (QEMU's TBI1 macro reads bit 38 through a precedence slip).
        let r1 = region(
            bits(d0, 16, 6),
            Granule::from_tg1(bits(d0, 22, 2)),
            d0 & (1 << 30) != 0,
            d2,
            d2 & 2 != 0,
            d0 & (1 << 39) != 0,
        )?;
        let mut asid = bits(d0, 48, 16) as u16;
        if idr.idr[0] & crate::regs::idr0::ASID16 == 0 {
            asid &= 0xff;
        }
        Ok(Cd {
            asid,
            regions: [r0, r1],
            affd: d0 & (1 << 35) != 0,
            record: d0 & (1 << 45) != 0,
        })
    }

    /// Selects the region for a VA (bit 55 picks TTB1), checks that the bits above the
    /// region's input size are a proper sign extension (ignoring the top byte when TBI), and
    /// returns the region and the address to walk.
    pub fn select(&self, va: u64) -> Option<(&Region, u64)> {
        let upper = va & (1 << 55) != 0;
        let [lo, hi] = &self.regions;
        let r = if upper { hi } else { lo }.as_ref()?;
        let top = if r.tbi { 56 } else { 64 };
        let n = r.walk.input_bits;
        let mask = if top >= 64 {
            u64::MAX << n
        } else {
            ((1u64 << top) - 1) & (u64::MAX << n)
        };
        let expected = if upper { mask } else { 0 };
        if va & mask != expected {
            return None;
        }
        Some((r, va & ((1u64 << n) - 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cd_words(d0_extra: u64) -> [u64; 8] {
        // T0SZ=16, TG0=4K, T1SZ=16, TG1=4K, V, IPS=48, AA64, R, A, ASID 5.
        let d0 = 16
            | (16 << 16)
            | (2 << 22)
            | (1 << 31)
            | (5 << 32)
            | (1 << 41)
            | (1 << 45)
            | (1 << 46)
            | (5 << 48)
            | d0_extra;
        [d0, 0x1000, 0x2000, 0, 0, 0, 0, 0]
    }

    #[test]
    fn tbi1_is_bit_39_not_bit_38() {
        let idr = IdRegs::default();
        let cd = Cd::parse(&cd_words(1 << 39), &idr).unwrap_or_else(|e| panic!("{e}"));
        assert!(cd.regions[1].is_some_and(|r| r.tbi));
        assert!(cd.regions[0].is_some_and(|r| !r.tbi));
        // With TBI1 a tagged upper address still selects TTB1.
        let va = 0xab00_ffff_8000_1000u64 | (0xff << 48);
        assert!(cd.select(va).is_some());
        let cd0 = Cd::parse(&cd_words(1 << 38), &idr).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            cd0.select(va).is_none(),
            "TBI0 does not make TTB1 ignore the tag"
        );
    }

    #[test]
    fn validity_rules() {
        let idr = IdRegs::default();
        assert!(Cd::parse(&cd_words(0), &idr).is_ok());
        let mut w = cd_words(0);
        w[0] &= !(1 << 31);
        assert_eq!(Cd::parse(&w, &idr), Err(CdError::Illegal("V=0")));
        let mut w = cd_words(0);
        w[0] &= !(1 << 41);
        assert!(Cd::parse(&w, &idr).is_err());
        let mut w = cd_words(0);
        w[0] = (w[0] & !0x3f) | 40;
        assert!(Cd::parse(&w, &idr).is_err());
        let mut w = cd_words(0);
        w[0] |= 3 << 6;
        assert!(Cd::parse(&w, &idr).is_err(), "TG0=3 reserved");
        // A disabled region is not checked.
        let mut w = cd_words(1 << 14);
        w[0] |= 3 << 6;
        assert!(Cd::parse(&w, &idr).is_ok_and(|cd| cd.regions[0].is_none()));
    }
}
