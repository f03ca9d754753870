//! The VMSAv8-64 table walker shared by stage 1 and stage 2, and the permission rules of each
//! stage. Descriptor fetches go through a caller-supplied closure, so a nested stage-1 walk can
//! translate each table address through stage 2 and any fetch can fail without panicking.

use thiserror::Error;

/// Translation granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB.
    G4K,
    /// 16 KiB.
    G16K,
    /// 64 KiB.
    G64K,
}

impl Granule {
    /// log2 of the granule size.
    pub fn bits(self) -> u32 {
        match self {
            Granule::G4K => 12,
            Granule::G16K => 14,
            Granule::G64K => 16,
        }
    }
    /// Bits resolved per level.
    pub fn stride(self) -> u32 {
        self.bits() - 3
    }
    /// All three granules.
    pub const ALL: [Granule; 3] = [Granule::G4K, Granule::G16K, Granule::G64K];
    /// Whether a block descriptor is allowed at `level` (48-bit OA, no FEAT_LPA2).
    pub fn block_allowed(self, level: u32) -> bool {
        match self {
            Granule::G4K => level == 1 || level == 2,
            Granule::G16K | Granule::G64K => level == 2,
        }
    }
    /// log2 of the size mapped by one descriptor at `level`.
    pub fn level_shift(self, level: u32) -> u32 {
        self.bits() + (3u32.saturating_sub(level)) * self.stride()
    }
    /// Number of descriptors a contiguous hint groups at `level`.
    pub fn contig_count(self, level: u32) -> u64 {
        match (self, level) {
            (Granule::G4K, _) => 16,
            (Granule::G16K, 3) => 128,
            (Granule::G16K, _) => 32,
            (Granule::G64K, _) => 32,
        }
    }
    /// The first level a stage-1 walk of `input_bits` uses.
    pub fn s1_start_level(self, input_bits: u32) -> u32 {
        let bits = input_bits.saturating_sub(self.bits());
        let levels = bits.div_ceil(self.stride()).clamp(1, 4);
        4 - levels
    }
    /// Decodes a TG0 / S2TG field (0 4K, 1 64K, 2 16K).
    pub fn from_tg0(tg: u64) -> Option<Granule> {
        match tg {
            0 => Some(Granule::G4K),
            1 => Some(Granule::G64K),
            2 => Some(Granule::G16K),
            _ => None,
        }
    }
    /// Decodes a TG1 field (1 16K, 2 4K, 3 64K).
    pub fn from_tg1(tg: u64) -> Option<Granule> {
        match tg {
            1 => Some(Granule::G16K),
            2 => Some(Granule::G4K),
            3 => Some(Granule::G64K),
            _ => None,
        }
    }
}

/// Everything a walk needs besides the fetch function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkCfg {
    /// Granule.
    pub granule: Granule,
    /// Level of the first lookup.
    pub start_level: u32,
    /// Input address size in bits; addresses are checked by the caller.
    pub input_bits: u32,
    /// Output (or IPA for nested stage 1) address size in bits.
    pub oa_bits: u32,
    /// Base of the first table (possibly several concatenated tables at stage 2).
    pub ttb: u64,
    /// Hierarchical permissions disabled (CD.HADx); always true at stage 2.
    pub had: bool,
}

/// A leaf found by a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Output address of the first byte of the block/page.
    pub oa: u64,
    /// Level of the leaf.
    pub level: u32,
    /// log2 of the block/page size.
    pub size_log2: u32,
    /// The raw descriptor.
    pub desc: u64,
    /// APTable accumulated (bit 0: no unprivileged access, bit 1: read-only).
    pub ap_table: u8,
    /// PXNTable accumulated.
    pub pxn_table: bool,
    /// UXNTable / XNTable accumulated.
    pub uxn_table: bool,
    /// Address of the leaf descriptor.
    pub desc_addr: u64,
}

/// Why a walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WalkFault<E> {
    /// Invalid descriptor, or a block where the granule allows none.
    #[error("translation fault at level {level}")]
    Translation {
        /// Level of the lookup.
        level: u32,
    },
    /// A table or output address beyond the output size.
    #[error("address size fault at level {level}")]
    AddrSize {
        /// Level of the lookup.
        level: u32,
    },
    /// The fetch function failed (external abort, or a stage-2 fault of a nested walk).
    #[error("descriptor fetch at {addr:#x} failed")]
    Fetch {
        /// Descriptor address.
        addr: u64,
        /// The fetch error.
        err: E,
    },
}

/// Bits [51:0] of a descriptor address field.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_ffff;

fn low_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Walks the tables for `addr`. `fetch(desc_addr, level)` reads one 64-bit descriptor. At most
/// four lookups happen, whatever the tables contain.
pub fn walk<E>(
    cfg: &WalkCfg,
    addr: u64,
    fetch: &mut impl FnMut(u64, u32) -> Result<u64, E>,
) -> Result<Leaf, WalkFault<E>> {
    let g = cfg.granule;
    let mut level = cfg.start_level.min(3);
    if cfg.ttb >> cfg.oa_bits.min(63) != 0 {
        return Err(WalkFault::AddrSize { level });
    }
    let mut table = cfg.ttb & ADDR_MASK;
    let mut ap_table = 0u8;
    let (mut pxn_table, mut uxn_table) = (false, false);
    let mut first = true;
    loop {
        let shift = g.level_shift(level);
        let idx_bits = if first {
            cfg.input_bits.saturating_sub(shift)
        } else {
            g.stride()
        };
        first = false;
        let idx = (addr >> shift.min(63)) & low_mask(idx_bits);
        // The start-level index may span concatenated tables; `table` was aligned by the
        // caller, lower levels are granule-aligned by construction.
        let desc_addr = table.wrapping_add(idx.wrapping_mul(8));
        let desc = fetch(desc_addr, level).map_err(|err| WalkFault::Fetch {
            addr: desc_addr,
            err,
        })?;
        if desc & 1 == 0 {
            return Err(WalkFault::Translation { level });
        }
        let is_table = desc & 2 != 0;
        if level == 3 && !is_table {
            return Err(WalkFault::Translation { level });
        }
        if level < 3 && is_table {
            let next = desc & ADDR_MASK & !low_mask(g.bits());
            if next >> cfg.oa_bits.min(63) != 0 {
                return Err(WalkFault::AddrSize { level });
            }
            if !cfg.had {
                ap_table |= ((desc >> 61) & 3) as u8;
                pxn_table |= desc & (1 << 59) != 0;
                uxn_table |= desc & (1 << 60) != 0;
            }
            table = next;
            level += 1;
            continue;
        }
        if level < 3 && !g.block_allowed(level) {
            return Err(WalkFault::Translation { level });
        }
        let oa = desc & ADDR_MASK & !low_mask(shift);
        if oa >> cfg.oa_bits.min(63) != 0 {
            return Err(WalkFault::AddrSize { level });
        }
        return Ok(Leaf {
            oa,
            level,
            size_log2: shift,
            desc,
            ap_table,
            pxn_table,
            uxn_table,
            desc_addr,
        });
    }
}

/// Permission bits held by IOTLB entries.
pub mod perm {
    /// Privileged read.
    pub const R_PRIV: u8 = 1 << 0;
    /// Privileged write.
    pub const W_PRIV: u8 = 1 << 1;
    /// Privileged instruction fetch.
    pub const X_PRIV: u8 = 1 << 2;
    /// Unprivileged read.
    pub const R_USER: u8 = 1 << 3;
    /// Unprivileged write.
    pub const W_USER: u8 = 1 << 4;
    /// Unprivileged instruction fetch.
    pub const X_USER: u8 = 1 << 5;
    /// Everything.
    pub const ALL: u8 = 0x3f;
}

/// Leaf attribute bits.
pub mod attr {
    /// Access flag.
    pub const AF: u64 = 1 << 10;
    /// Contiguous hint.
    pub const CONTIG: u64 = 1 << 52;
    /// PXN (stage 1).
    pub const PXN: u64 = 1 << 53;
    /// UXN / XN.
    pub const UXN: u64 = 1 << 54;
}

/// Stage-1 permissions of a leaf (AP[2:1], PXN, UXN, plus hierarchical limits).
pub fn s1_perms(leaf: &Leaf) -> u8 {
    let ap = (leaf.desc >> 6) & 3;
    let user = ap & 1 != 0 && leaf.ap_table & 1 == 0;
    let ro = ap & 2 != 0 || leaf.ap_table & 2 != 0;
    let pxn = leaf.desc & attr::PXN != 0 || leaf.pxn_table;
    let uxn = leaf.desc & attr::UXN != 0 || leaf.uxn_table;
    let mut p = perm::R_PRIV;
    if !ro {
        p |= perm::W_PRIV;
    }
    // Memory writable at EL0 is never privileged-executable.
    if !pxn && (!user || ro) {
        p |= perm::X_PRIV;
    }
    if user {
        p |= perm::R_USER;
        if !ro {
            p |= perm::W_USER;
        }
        if !uxn {
            p |= perm::X_USER;
        }
    }
    p
}

/// Stage-2 permissions of a leaf (S2AP, XN).
pub fn s2_perms(desc: u64) -> u8 {
    let s2ap = (desc >> 6) & 3;
    let mut p = 0;
    if s2ap & 1 != 0 {
        p |= perm::R_PRIV | perm::R_USER;
    }
    if s2ap & 2 != 0 {
        p |= perm::W_PRIV | perm::W_USER;
    }
    if desc & attr::UXN == 0 {
        p |= perm::X_PRIV | perm::X_USER;
    }
    p
}

/// The stage-2 start level for S2SL0 (4K: 0→2, 1→1, 2→0; 16K/64K: 0→3, 1→2, 2→1).
pub fn s2_start_level(g: Granule, sl0: u64) -> Option<u32> {
    match (g, sl0) {
        (Granule::G4K, 0) => Some(2),
        (Granule::G4K, 1) => Some(1),
        (Granule::G4K, 2) => Some(0),
        (_, 0) => Some(3),
        (_, 1) => Some(2),
        (_, 2) => Some(1),
        _ => None,
    }
}

/// Number of concatenated start-level tables a stage-2 configuration needs, or `None` if the
/// start level and input size are inconsistent (more than 16 tables, or a level too many).
pub fn s2_concat(g: Granule, start_level: u32, input_bits: u32) -> Option<u32> {
    let resolved = g.bits() + (4 - start_level.min(3)) * g.stride();
    if input_bits + g.stride() <= resolved || input_bits > resolved + 4 {
        return None;
    }
    Some(1u32 << input_bits.saturating_sub(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_levels() {
        assert_eq!(Granule::G4K.s1_start_level(48), 0);
        assert_eq!(Granule::G4K.s1_start_level(39), 1);
        assert_eq!(Granule::G4K.s1_start_level(25), 2);
        assert_eq!(Granule::G16K.s1_start_level(48), 0);
        assert_eq!(Granule::G16K.s1_start_level(47), 1);
        assert_eq!(Granule::G64K.s1_start_level(48), 1);
        assert_eq!(Granule::G64K.s1_start_level(42), 2);
    }

    #[test]
    fn s2_concat_rules() {
        // 4K, SL0=0 (level 2): resolves 30 bits; 31..34 need 2..16 tables.
        assert_eq!(s2_concat(Granule::G4K, 2, 30), Some(1));
        assert_eq!(s2_concat(Granule::G4K, 2, 34), Some(16));
        assert_eq!(s2_concat(Granule::G4K, 2, 35), None);
        assert_eq!(s2_concat(Granule::G4K, 1, 30), None, "one level too many");
        assert_eq!(s2_concat(Granule::G4K, 1, 40), Some(2));
    }

    #[test]
    fn s1_perm_rules() {
        let leaf = |desc: u64, ap_table: u8| Leaf {
            oa: 0,
            level: 3,
            size_log2: 12,
            desc,
            ap_table,
            pxn_table: false,
            uxn_table: false,
            desc_addr: 0,
        };
        assert_eq!(
            s1_perms(&leaf(0, 0)),
            perm::R_PRIV | perm::W_PRIV | perm::X_PRIV
        );
        assert_eq!(s1_perms(&leaf(2 << 6, 0)), perm::R_PRIV | perm::X_PRIV);
        let rw_user = s1_perms(&leaf(1 << 6, 0));
        assert_eq!(rw_user & perm::X_PRIV, 0);
        assert_ne!(rw_user & perm::W_USER, 0);
        assert_eq!(s1_perms(&leaf(1 << 6, 1)) & perm::R_USER, 0);
        assert_eq!(s1_perms(&leaf(0, 2)) & perm::W_PRIV, 0);
    }

    #[test]
    fn walk_stops_after_four_lookups_even_if_every_descriptor_is_a_table() {
        let cfg = WalkCfg {
            granule: Granule::G4K,
            start_level: 0,
            input_bits: 48,
            oa_bits: 48,
            ttb: 0x1000,
            had: false,
        };
        let mut n = 0;
        let r: Result<Leaf, WalkFault<()>> = walk(&cfg, 0x1234_5678_9000, &mut |_, _| {
            n += 1;
            Ok(0x2003)
        });
        assert_eq!(n, 4);
        assert_eq!(r.map(|l| l.oa), Ok(0x2000));
    }
}
