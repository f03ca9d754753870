//! Reading what a function advertises in its configuration space (capability list, BAR bases,
//! the command register), with plain config reads that have no side effects. The KVM state that
//! follows the guest's programming (ioeventfd doorbells, MSI routes) is derived from these.

use sluice_pci::PciFunction;
use sluice_pci::config::CMD_MEMORY;

/// Capability ID of vendor-specific capabilities (virtio's structures use them).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = sluice_pci::msix::CAP_ID_MSIX;

const OFF_COMMAND: u16 = 0x04;
const OFF_STATUS: u16 = 0x06;
const OFF_BAR0: u16 = 0x10;
const OFF_CAP_PTR: u16 = 0x34;
const STATUS_CAP_LIST: u16 = 1 << 4;
/// A 256-byte configuration space holds at most 48 capabilities after the header; a longer
/// walk means the list loops.
const MAX_CAPS: usize = 48;

/// One byte of configuration space.
pub fn cfg_u8(f: &dyn PciFunction, offset: u16) -> u8 {
    let mut b = [0u8; 1];
    f.config_read(offset, &mut b);
    b[0]
}

/// A 16-bit configuration register.
pub fn cfg_u16(f: &dyn PciFunction, offset: u16) -> u16 {
    let mut b = [0u8; 2];
    f.config_read(offset, &mut b);
    u16::from_le_bytes(b)
}

/// A 32-bit configuration register.
pub fn cfg_u32(f: &dyn PciFunction, offset: u16) -> u32 {
    let mut b = [0u8; 4];
    f.config_read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// `(offset, id)` of every capability in list order.
pub fn capabilities(f: &dyn PciFunction) -> Vec<(u16, u8)> {
    let mut caps = Vec::new();
    if cfg_u16(f, OFF_STATUS) & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut ptr = u16::from(cfg_u8(f, OFF_CAP_PTR) & !3);
    while ptr >= 0x40 && caps.len() < MAX_CAPS {
        caps.push((ptr, cfg_u8(f, ptr)));
        ptr = u16::from(cfg_u8(f, ptr + 1) & !3);
    }
    caps
}

/// The guest-physical base of memory BAR `bar` while the function decodes memory space, or
/// `None` (decoding off, an I/O BAR, no such BAR, or a BAR still at 0).
pub fn memory_bar_base(f: &dyn PciFunction, bar: u8) -> Option<u64> {
    if bar > 5 || cfg_u16(f, OFF_COMMAND) & CMD_MEMORY == 0 {
        return None;
    }
    let reg = OFF_BAR0 + 4 * u16::from(bar);
    let low = cfg_u32(f, reg);
    if low & 1 != 0 {
        return None;
    }
    let is_64bit = (low >> 1) & 3 == 2;
    let base = if is_64bit {
        if bar == 5 {
            return None;
        }
        (u64::from(cfg_u32(f, reg + 4)) << 32) | u64::from(low & !0xf)
    } else {
        u64::from(low & !0xf)
    };
    (base != 0).then_some(base)
}

/// Where a function's MSI-X table is, from its capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Offset of the capability (Message Control is at +2).
    pub cap: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u64,
    /// Number of vectors.
    pub vectors: u16,
}

/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message Control: MSI-X Enable.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// Message Control: Function Mask.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;

impl MsixLayout {
    /// The function's MSI-X capability, if it has one.
    pub fn read(f: &dyn PciFunction) -> Option<MsixLayout> {
        let (cap, _) = capabilities(f)
            .into_iter()
            .find(|(_, id)| *id == CAP_ID_MSIX)?;
        let control = cfg_u16(f, cap + 2);
        let table = cfg_u32(f, cap + 4);
        Some(MsixLayout {
            cap,
            table_bar: (table & 7) as u8,
            table_offset: u64::from(table & !7),
            vectors: (control & 0x7ff) + 1,
        })
    }

    /// Message Control as the guest last wrote it.
    pub fn control(&self, f: &dyn PciFunction) -> u16 {
        cfg_u16(f, self.cap + 2)
    }

    /// True if `offset` in `bar` falls inside the table.
    pub fn in_table(&self, bar: u8, offset: u64) -> bool {
        let end = self.table_offset + u64::from(self.vectors) * MSIX_ENTRY_SIZE;
        bar == self.table_bar && (self.table_offset..end).contains(&offset)
    }

    /// Entry `vector` as `(address, data, masked)`, read through the BAR (table reads have no
    /// side effects).
    pub fn entry(&self, f: &dyn PciFunction, vector: u16) -> (u64, u32, bool) {
        let mut e = [0u8; 16];
        let at = self.table_offset + u64::from(vector) * MSIX_ENTRY_SIZE;
        for (i, word) in e.chunks_mut(4).enumerate() {
            f.bar_read(self.table_bar, at + 4 * i as u64, word);
        }
        let dword = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        let address = (u64::from(dword(4)) << 32) | u64::from(dword(0));
        (address, dword(8), dword(12) & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::virtio_blk;

    #[test]
    fn capability_walk_and_msix_layout_of_a_virtio_function() {
        let (f, dir) = virtio_blk("caps", 4);
        let caps = capabilities(f.as_ref());
        let vendor = caps.iter().filter(|(_, id)| *id == CAP_ID_VENDOR).count();
        assert_eq!(vendor, 5, "five virtio structures: {caps:?}");
        let m = MsixLayout::read(f.as_ref()).unwrap();
        assert_eq!((m.table_bar, m.table_offset, m.vectors), (1, 0, 4));
        assert!(m.in_table(1, 0x3c) && !m.in_table(1, 0x40) && !m.in_table(0, 0));
        // Reset state: every vector masked, MSI-X off.
        assert_eq!(m.entry(f.as_ref(), 0), (0, 0, true));
        assert_eq!(m.control(f.as_ref()) & MSIX_CTRL_ENABLE, 0);
        f.bar_write(1, 0x10, &0xfee0_1000u32.to_le_bytes());
        f.bar_write(1, 0x18, &0x41u32.to_le_bytes());
        f.bar_write(1, 0x1c, &0u32.to_le_bytes());
        assert_eq!(m.entry(f.as_ref(), 1), (0xfee0_1000, 0x41, false));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bar_base_follows_the_command_register_and_bar_value() {
        let (f, dir) = virtio_blk("bar", 4);
        assert_eq!(memory_bar_base(f.as_ref(), 0), None, "decoding off");
        f.config_write(0x10, &0xc000_4000u32.to_le_bytes());
        assert_eq!(memory_bar_base(f.as_ref(), 0), None, "decoding still off");
        f.config_write(0x04, &CMD_MEMORY.to_le_bytes());
        assert_eq!(memory_bar_base(f.as_ref(), 0), Some(0xc000_4000));
        assert_eq!(memory_bar_base(f.as_ref(), 2), None, "no BAR 2");
        assert_eq!(memory_bar_base(f.as_ref(), 7), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
