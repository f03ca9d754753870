//! Type-0 configuration space: masked writes, BARs, capabilities, command register tracking.

use thiserror::Error;

/// Size of conventional PCI configuration space.
pub const CONFIG_SIZE: usize = 256;

/// Command register bits.
pub const CMD_IO: u16 = 1 << 0;
/// Memory space decode enable.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Bus Master Enable: without it a function must not issue DMA.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// INTx disable.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

const OFF_VENDOR: usize = 0x00;
const OFF_DEVICE: usize = 0x02;
const OFF_COMMAND: usize = 0x04;
const OFF_STATUS: usize = 0x06;
const OFF_REVISION: usize = 0x08;
const OFF_CLASS: usize = 0x09;
const OFF_CACHE_LINE: usize = 0x0c;
const OFF_LATENCY: usize = 0x0d;
const OFF_HEADER_TYPE: usize = 0x0e;
const OFF_BAR0: usize = 0x10;
const OFF_SUBSYS_VENDOR: usize = 0x2c;
const OFF_SUBSYS_ID: usize = 0x2e;
const OFF_CAP_PTR: usize = 0x34;
const OFF_INT_LINE: usize = 0x3c;
const OFF_INT_PIN: usize = 0x3d;
const FIRST_CAP: usize = 0x40;
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status bits that are write-1-to-clear (parity, signalled/received aborts, SERR).
const STATUS_W1C: u16 = 0xf900;
/// Command bits a guest may change (I/O, memory, bus master, parity, SERR, INTx disable).
const COMMAND_WRITABLE: u16 = 0x0547;

/// Identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// 24-bit class code (base class, subclass, programming interface).
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
}

/// Kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// 64-bit memory BAR; occupies two BAR slots.
    Mem64 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// I/O space BAR.
    Io,
}

/// A BAR a function exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// Slot 0..=5 (a 64-bit BAR also uses the next slot).
    pub index: u8,
    /// Size in bytes, a power of two (>= 16 for memory, >= 4 for I/O).
    pub size: u64,
    /// Kind.
    pub kind: BarKind,
}

/// Building a configuration space went wrong (host-side programming errors, not guest input).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR slot out of range or already used.
    #[error("BAR slot {0} is out of range or already taken")]
    BarSlot(u8),
    /// BAR size not a power of two or too small.
    #[error("BAR size {0:#x} is not a power of two of at least the minimum")]
    BarSize(u64),
    /// No room left for a capability.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// What a configuration write changed that the owner may care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigWriteEffect {
    /// Command register before and after, when the write touched it.
    pub command: Option<(u16, u16)>,
}

impl ConfigWriteEffect {
    /// True when Bus Master Enable changed; returns the new state.
    pub fn bus_master_change(&self) -> Option<bool> {
        self.command.and_then(|(old, new)| {
            ((old ^ new) & CMD_BUS_MASTER != 0).then_some(new & CMD_BUS_MASTER != 0)
        })
    }
}

/// A conventional PCI function's 256-byte configuration space.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    write_mask: [u8; CONFIG_SIZE],
    w1c_mask: [u8; CONFIG_SIZE],
    reset_image: [u8; CONFIG_SIZE],
    bars: [Option<BarSpec>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    /// A header for `ids` with INTx pin `interrupt_pin` (1 = INTA, 0 = none).
    pub fn new(ids: PciIds, interrupt_pin: u8) -> Self {
        let mut s = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            write_mask: [0; CONFIG_SIZE],
            w1c_mask: [0; CONFIG_SIZE],
            reset_image: [0; CONFIG_SIZE],
            bars: [None; 6],
            next_cap: FIRST_CAP,
            last_cap: None,
        };
        s.put(OFF_VENDOR, &ids.vendor.to_le_bytes());
        s.put(OFF_DEVICE, &ids.device.to_le_bytes());
        s.put(OFF_REVISION, &[ids.revision]);
        s.put(OFF_CLASS, &ids.class_code.to_le_bytes()[..3]);
        s.put(OFF_HEADER_TYPE, &[0]);
        s.put(OFF_SUBSYS_VENDOR, &ids.subsystem_vendor.to_le_bytes());
        s.put(OFF_SUBSYS_ID, &ids.subsystem_id.to_le_bytes());
        s.put(OFF_INT_PIN, &[interrupt_pin]);
        s.mask(OFF_COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        s.w1c(OFF_STATUS, &STATUS_W1C.to_le_bytes());
        s.mask(OFF_CACHE_LINE, &[0xff]);
        s.mask(OFF_LATENCY, &[0xff]);
        s.mask(OFF_INT_LINE, &[0xff]);
        s.reset_image = s.bytes;
        s
    }

    fn put(&mut self, off: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(off..off + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    fn mask(&mut self, off: usize, mask: &[u8]) {
        if let Some(dst) = self.write_mask.get_mut(off..off + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    fn w1c(&mut self, off: usize, mask: &[u8]) {
        if let Some(dst) = self.w1c_mask.get_mut(off..off + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Declares a BAR.
    pub fn add_bar(&mut self, spec: BarSpec) -> Result<(), ConfigError> {
        let idx = usize::from(spec.index);
        let slots = if matches!(spec.kind, BarKind::Mem64 { .. }) {
            2
        } else {
            1
        };
        if idx + slots > 6
            || self
                .bars
                .iter()
                .flatten()
                .any(|b| Self::overlaps(b, idx, slots))
        {
            return Err(ConfigError::BarSlot(spec.index));
        }
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        if !spec.size.is_power_of_two() || spec.size < min {
            return Err(ConfigError::BarSize(spec.size));
        }
        let off = OFF_BAR0 + 4 * idx;
        let size_mask = !(spec.size - 1);
        let (type_bits, low_mask) = match spec.kind {
            BarKind::Io => (0x1u32, (size_mask as u32) & 0xffff_fffc),
            BarKind::Mem32 { prefetchable } => (
                if prefetchable { 0x8 } else { 0 },
                (size_mask as u32) & 0xffff_fff0,
            ),
            BarKind::Mem64 { prefetchable } => (
                0x4 | if prefetchable { 0x8 } else { 0 },
                (size_mask as u32) & 0xffff_fff0,
            ),
        };
        self.put(off, &type_bits.to_le_bytes());
        self.mask(off, &low_mask.to_le_bytes());
        if slots == 2 {
            self.mask(off + 4, &((size_mask >> 32) as u32).to_le_bytes());
        }
        if let Some(slot) = self.bars.get_mut(idx) {
            *slot = Some(spec);
        }
        self.reset_image = self.bytes;
        Ok(())
    }

    fn overlaps(b: &BarSpec, idx: usize, slots: usize) -> bool {
        let b_idx = usize::from(b.index);
        let b_slots = if matches!(b.kind, BarKind::Mem64 { .. }) {
            2
        } else {
            1
        };
        b_idx < idx + slots && idx < b_idx + b_slots
    }

    /// Appends a capability with ID `id`. `body` is everything after the 2-byte (ID, next)
    /// header; `writable` (same length as `body`, or shorter) marks guest-writable bits.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u8, ConfigError> {
        let len = 2 + body.len();
        let off = self.next_cap;
        if off + len > CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.put(off, &[id, 0]);
        self.put(off + 2, body);
        self.mask(off + 2, writable);
        match self.last_cap {
            None => self.put(OFF_CAP_PTR, &[off as u8]),
            Some(prev) => self.put(prev + 1, &[off as u8]),
        }
        let status = self.read_u16(OFF_STATUS as u16) | STATUS_CAP_LIST;
        self.put(OFF_STATUS, &status.to_le_bytes());
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        self.reset_image = self.bytes;
        Ok(off as u8)
    }

    /// Device-side update of read-only contents (e.g. a capability field the device owns).
    pub fn set_bytes(&mut self, offset: u8, data: &[u8]) {
        self.put(usize::from(offset), data);
    }

    /// Guest read. Bytes past the 256-byte space read as zero.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self
                .bytes
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0);
        }
    }

    /// Little-endian 16-bit read helper.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Little-endian 32-bit read helper.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Guest write: only writable bits change, write-1-to-clear bits clear, the rest is ignored.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteEffect {
        let old_cmd = self.command();
        for (i, v) in data.iter().enumerate() {
            let at = usize::from(offset) + i;
            let (Some(cur), Some(m), Some(w1c)) = (
                self.bytes.get(at).copied(),
                self.write_mask.get(at),
                self.w1c_mask.get(at),
            ) else {
                continue;
            };
            let next = ((cur & !m) | (v & m)) & !(v & w1c);
            if let Some(b) = self.bytes.get_mut(at) {
                *b = next;
            }
        }
        let new_cmd = self.command();
        let touches_cmd =
            usize::from(offset) < OFF_COMMAND + 2 && usize::from(offset) + data.len() > OFF_COMMAND;
        ConfigWriteEffect {
            command: touches_cmd.then_some((old_cmd, new_cmd)),
        }
    }

    /// Command register.
    pub fn command(&self) -> u16 {
        self.read_u16(OFF_COMMAND as u16)
    }

    /// Bus Master Enable.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & CMD_BUS_MASTER != 0
    }

    /// INTx Disable.
    pub fn intx_disabled(&self) -> bool {
        self.command() & CMD_INTX_DISABLE != 0
    }

    /// Declared BAR in `index`, if any.
    pub fn bar(&self, index: u8) -> Option<BarSpec> {
        self.bars.get(usize::from(index)).copied().flatten()
    }

    /// Current guest-programmed base address of BAR `index`.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let spec = self.bar(index)?;
        let off = (OFF_BAR0 + 4 * usize::from(index)) as u16;
        let low = u64::from(self.read_u32(off));
        Some(match spec.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 { .. } => low & !0xf,
            BarKind::Mem64 { .. } => (u64::from(self.read_u32(off + 4)) << 32) | (low & !0xf),
        })
    }

    /// Finds which BAR decodes `addr`, honouring the memory/I-O enable bits.
    pub fn decode(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
        let enable = if memory { CMD_MEMORY } else { CMD_IO };
        if self.command() & enable == 0 {
            return None;
        }
        self.bars.iter().flatten().find_map(|spec| {
            if (spec.kind == BarKind::Io) == memory {
                return None;
            }
            let base = self.bar_address(spec.index)?;
            let off = addr.checked_sub(base)?;
            (off < spec.size).then_some((spec.index, off))
        })
    }

    /// Back to power-on contents (BAR types and capabilities stay, guest-written values go).
    pub fn reset(&mut self) {
        self.bytes = self.reset_image;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            subsystem_vendor: 0x1af4,
            subsystem_id: 0x40,
            class_code: 0x01_00_00,
            revision: 1,
        }
    }

    #[test]
    fn header_identity_and_pin() {
        let c = ConfigSpace::new(ids(), 1);
        assert_eq!(c.read_u16(0), 0x1af4);
        assert_eq!(c.read_u16(2), 0x1042);
        assert_eq!(c.read_u32(8) >> 8, 0x01_00_00);
        assert_eq!(c.read_u32(8) & 0xff, 1);
        let mut pin = [0u8];
        c.read(0x3d, &mut pin);
        assert_eq!(pin[0], 1);
        // Vendor ID is read-only.
        let mut c = c;
        c.write(0, &[0, 0]);
        assert_eq!(c.read_u16(0), 0x1af4);
    }

    #[test]
    fn bar32_sizing_like_a_bios() {
        let mut c = ConfigSpace::new(ids(), 1);
        c.add_bar(BarSpec {
            index: 0,
            size: 0x4000,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        })
        .unwrap();
        c.write(0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_u32(0x10), 0xffff_c000);
        let size = !(c.read_u32(0x10) & 0xffff_fff0) + 1;
        assert_eq!(size, 0x4000);
        c.write(0x10, &0xfebf_8000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xfebf_8000));
        // Unused BARs size to zero, so QEMU's proxy registers nothing for them.
        c.write(0x14, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_u32(0x14), 0);
    }

    #[test]
    fn bar64_and_io_sizing() {
        let mut c = ConfigSpace::new(ids(), 1);
        c.add_bar(BarSpec {
            index: 2,
            size: 0x10_0000,
            kind: BarKind::Mem64 { prefetchable: true },
        })
        .unwrap();
        c.add_bar(BarSpec {
            index: 4,
            size: 0x20,
            kind: BarKind::Io,
        })
        .unwrap();
        c.write(0x18, &0xffff_ffffu32.to_le_bytes());
        c.write(0x1c, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_u32(0x18), 0xfff0_000c);
        assert_eq!(c.read_u32(0x1c), 0xffff_ffff);
        c.write(0x18, &0x8000_0000u32.to_le_bytes());
        c.write(0x1c, &0x1u32.to_le_bytes());
        assert_eq!(c.bar_address(2), Some(0x1_8000_0000));
        c.write(0x20, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_u32(0x20), 0xffff_ffe1);
        assert_eq!(
            c.add_bar(BarSpec {
                index: 3,
                size: 0x1000,
                kind: BarKind::Mem32 {
                    prefetchable: false
                }
            }),
            Err(ConfigError::BarSlot(3))
        );
        assert_eq!(
            c.add_bar(BarSpec {
                index: 5,
                size: 0x1001,
                kind: BarKind::Mem32 {
                    prefetchable: false
                }
            }),
            Err(ConfigError::BarSize(0x1001))
        );
    }

    #[test]
    fn decode_honours_enable_bits() {
        let mut c = ConfigSpace::new(ids(), 1);
        c.add_bar(BarSpec {
            index: 0,
            size: 0x1000,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        })
        .unwrap();
        c.write(0x10, &0xfe00_0000u32.to_le_bytes());
        assert_eq!(c.decode(0xfe00_0010, true), None);
        c.write(0x04, &CMD_MEMORY.to_le_bytes());
        assert_eq!(c.decode(0xfe00_0010, true), Some((0, 0x10)));
        assert_eq!(c.decode(0xfe00_1000, true), None);
        assert_eq!(c.decode(0xfe00_0010, false), None);
    }

    #[test]
    fn capability_list_links() {
        let mut c = ConfigSpace::new(ids(), 1);
        let a = c
            .add_capability(0x09, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x50);
        assert_ne!(c.read_u16(0x06) & STATUS_CAP_LIST, 0);
        let mut p = [0u8];
        c.read(0x34, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(0x41, &mut p);
        assert_eq!(p[0], 0x50);
        c.read(0x51, &mut p);
        assert_eq!(p[0], 0);
        // Only the masked bits of the second body byte are writable.
        c.write(0x53, &[0xff]);
        c.read(0x53, &mut p);
        assert_eq!(p[0], 0xc0);
        assert!(c.add_capability(0x10, &[0; 200], &[]).is_err());
    }

    #[test]
    fn command_bus_master_is_observable_and_status_w1c() {
        let mut c = ConfigSpace::new(ids(), 1);
        let e = c.write(0x04, &(CMD_MEMORY | CMD_BUS_MASTER).to_le_bytes());
        assert_eq!(e.bus_master_change(), Some(true));
        assert!(c.bus_master_enabled());
        let e = c.write(0x04, &CMD_MEMORY.to_le_bytes());
        assert_eq!(e.bus_master_change(), Some(false));
        let e = c.write(0x3c, &[11]);
        assert_eq!(e.command, None);
        // A 4-byte write at 0x04 touches command and status; status W1C bits clear only.
        c.set_bytes(0x06, &0x8000u16.to_le_bytes());
        c.write(0x04, &0x8000_0000u32.to_le_bytes());
        assert_eq!(c.read_u16(0x06) & 0x8000, 0);
        c.reset();
        assert_eq!(c.command(), 0);
    }
}
