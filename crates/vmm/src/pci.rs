//! The PCI host bridge: configuration mechanism #1 (0xCF8/0xCFC), ECAM, BAR assignment the way
//! firmware would do it, and MMIO/PIO dispatch to the functions' BARs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use sluice_devapi::Bdf;
use sluice_pci::{ConfigSpace, PciFunction, PciIds, le_value, put_le};
use thiserror::Error;

use crate::layout::{ECAM_BASE, ECAM_SIZE, MMIO32_BAR_END, MMIO32_START, PCI_INTX_GSI_BASE};
use crate::pci_caps::{cfg_u8, cfg_u16, cfg_u32};

/// Legacy configuration address port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// Legacy configuration data ports (0xcfc..=0xcff).
pub const CONFIG_DATA: u16 = 0xcfc;
/// First port of the I/O BAR window.
const IO_BAR_START: u64 = 0xc000;
const IO_BAR_END: u64 = 0x1_0000;

/// Building the bus failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciBusError {
    /// Two functions at one address, or a function outside bus 0.
    #[error("PCI address {0} is taken or not on bus 0")]
    Address(Bdf),
    /// BARs do not fit the window.
    #[error("BAR {bar} of {bdf} ({size:#x} bytes) does not fit the {space} window")]
    Window {
        /// Function.
        bdf: Bdf,
        /// BAR index.
        bar: u8,
        /// Size.
        size: u64,
        /// "memory" or "I/O".
        space: &'static str,
    },
}

/// The host bridge itself at 00:00.0 (no BARs).
pub struct HostBridge {
    cfg: std::sync::Mutex<ConfigSpace>,
}

impl Default for HostBridge {
    fn default() -> Self {
        let ids = PciIds {
            vendor: 0x1b36, // Red Hat, as QEMU's generic PCIe host bridge
            device: 0x0008,
            subsystem_vendor: 0x1b36,
            subsystem_id: 0x0008,
            class_code: 0x06_00_00,
            revision: 0,
        };
        HostBridge {
            cfg: std::sync::Mutex::new(ConfigSpace::new(ids, 0)),
        }
    }
}

impl PciFunction for HostBridge {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.cfg
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        let _ = self
            .cfg
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(offset, data);
    }
    fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
    fn decode_bar(&self, _addr: u64, _memory: bool) -> Option<(u8, u64)> {
        None
    }
    fn reset(&self) {}
}

struct Slot {
    bdf: Bdf,
    function: Arc<dyn PciFunction>,
}

/// Told about guest writes after the function has seen them, so that KVM state derived from a
/// function's registers (ioeventfd doorbells, MSI routes) can follow them. Called on the vCPU
/// thread that made the access, with no function lock held.
pub trait BusObserver: Send + Sync {
    /// The guest wrote configuration space of `bdf`.
    fn config_written(&self, bdf: Bdf);
    /// The guest wrote BAR `bar` of `bdf` at `offset` (an MMIO or port exit).
    fn bar_written(&self, bdf: Bdf, bar: u8, offset: u64);
}

/// Bus 0 with its functions.
pub struct PciBus {
    slots: Vec<Slot>,
    address: AtomicU32,
    observer: Option<Arc<dyn BusObserver>>,
}

impl Default for PciBus {
    fn default() -> Self {
        PciBus {
            slots: vec![Slot {
                bdf: Bdf::new(0, 0, 0),
                function: Arc::new(HostBridge::default()),
            }],
            address: AtomicU32::new(0),
            observer: None,
        }
    }
}

/// The IOAPIC pin a device's INTA# is routed to (and what the DSDT's `_PRT` says).
pub fn intx_gsi(bdf: Bdf) -> u32 {
    PCI_INTX_GSI_BASE + u32::from(bdf.dev()) % 8
}

impl PciBus {
    /// Adds a function.
    pub fn add(&mut self, bdf: Bdf, function: Arc<dyn PciFunction>) -> Result<(), PciBusError> {
        if bdf.bus() != 0 || self.slots.iter().any(|s| s.bdf == bdf) {
            return Err(PciBusError::Address(bdf));
        }
        self.slots.push(Slot { bdf, function });
        self.slots.sort_by_key(|s| s.bdf.0);
        Ok(())
    }

    /// Tells `observer` about every guest write from now on.
    pub fn set_observer(&mut self, observer: Arc<dyn BusObserver>) {
        self.observer = Some(observer);
    }

    /// The functions on the bus, host bridge first.
    pub fn functions(&self) -> impl Iterator<Item = (Bdf, &Arc<dyn PciFunction>)> {
        self.slots.iter().map(|s| (s.bdf, &s.function))
    }

    fn find(&self, bus: u8, dev: u8, func: u8) -> Option<&Slot> {
        self.slots
            .iter()
            .find(|s| s.bdf.bus() == bus && s.bdf.dev() == dev && s.bdf.func() == func)
    }

    fn bar_write_observed(&self, slot: &Slot, bar: u8, offset: u64, data: &[u8]) {
        slot.function.bar_write(bar, offset, data);
        if let Some(o) = &self.observer {
            o.bar_written(slot.bdf, bar, offset);
        }
    }

    fn cfg_read(&self, bus: u8, dev: u8, func: u8, reg: u16, data: &mut [u8]) {
        match self.find(bus, dev, func).map(|s| &s.function) {
            Some(f) if usize::from(reg) + data.len() <= 256 => f.config_read(reg, data),
            Some(_) => data.fill(0),
            None => data.fill(0xff),
        }
    }

    fn cfg_write(&self, bus: u8, dev: u8, func: u8, reg: u16, data: &[u8]) {
        if let Some(slot) = self.find(bus, dev, func)
            && usize::from(reg) + data.len() <= 256
        {
            slot.function.config_write(reg, data);
            if let Some(o) = &self.observer {
                o.config_written(slot.bdf);
            }
        }
    }

    /// Port I/O to 0xCF8..=0xCFF. Returns false if the port is not the bridge's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                put_le(data, u64::from(self.address.load(Ordering::Acquire)));
            }
            CONFIG_ADDRESS..=0xcfb => data.fill(0xff),
            CONFIG_DATA..=0xcff => {
                let a = self.address.load(Ordering::Acquire);
                let off = port - CONFIG_DATA;
                if a & 0x8000_0000 == 0 || usize::from(off) + data.len() > 4 {
                    data.fill(0xff);
                } else {
                    let (bus, dev, func, reg) = decode_cf8(a);
                    self.cfg_read(bus, dev, func, reg + off, data);
                }
            }
            _ => return false,
        }
        true
    }

    /// Port I/O write to the bridge. Returns false if the port is not the bridge's.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                self.address.store(le_value(data) as u32, Ordering::Release);
            }
            CONFIG_ADDRESS..=0xcfb => {}
            CONFIG_DATA..=0xcff => {
                let a = self.address.load(Ordering::Acquire);
                let off = port - CONFIG_DATA;
                if a & 0x8000_0000 != 0 && usize::from(off) + data.len() <= 4 {
                    let (bus, dev, func, reg) = decode_cf8(a);
                    self.cfg_write(bus, dev, func, reg + off, data);
                }
            }
            _ => return false,
        }
        true
    }

    /// ECAM read at `offset` from [`ECAM_BASE`].
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = decode_ecam(offset);
        if reg >= 256 {
            data.fill(0); // no extended configuration space
        } else {
            self.cfg_read(bus, dev, func, reg, data);
        }
    }

    /// ECAM write.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = decode_ecam(offset);
        self.cfg_write(bus, dev, func, reg, data);
    }

    /// Guest-physical MMIO read: ECAM or a BAR. False if nothing claims `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
            self.ecam_read(addr - ECAM_BASE, data);
            return true;
        }
        for s in &self.slots {
            if let Some((bar, off)) = s.function.decode_bar(addr, true) {
                s.function.bar_read(bar, off, data);
                return true;
            }
        }
        false
    }

    /// Guest-physical MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
            self.ecam_write(addr - ECAM_BASE, data);
            return true;
        }
        for s in &self.slots {
            if let Some((bar, off)) = s.function.decode_bar(addr, true) {
                self.bar_write_observed(s, bar, off, data);
                return true;
            }
        }
        false
    }

    /// I/O BAR read (ports not owned by legacy devices).
    pub fn io_bar_read(&self, port: u16, data: &mut [u8]) -> bool {
        for s in &self.slots {
            if let Some((bar, off)) = s.function.decode_bar(u64::from(port), false) {
                s.function.bar_read(bar, off, data);
                return true;
            }
        }
        false
    }

    /// I/O BAR write.
    pub fn io_bar_write(&self, port: u16, data: &[u8]) -> bool {
        for s in &self.slots {
            if let Some((bar, off)) = s.function.decode_bar(u64::from(port), false) {
                self.bar_write_observed(s, bar, off, data);
                return true;
            }
        }
        false
    }

    /// Sizes every BAR and assigns addresses in the 32-bit window (64-bit BARs too, high
    /// dword 0), I/O BARs from 0xc000; sets the interrupt line and enables decoding, as
    /// firmware does before an OS runs.
    pub fn assign_resources(&self) -> Result<Vec<(Bdf, u8, u64, u64)>, PciBusError> {
        let mut mem_next = MMIO32_START;
        let mut io_next = IO_BAR_START;
        let mut assigned = Vec::new();
        // Largest first keeps the window dense.
        let mut bars = Vec::new();
        for s in &self.slots {
            let f = &s.function;
            let mut i = 0u8;
            while i < 6 {
                let reg = 0x10 + 4 * u16::from(i);
                let orig = cfg_u32(f.as_ref(), reg);
                f.config_write(reg, &0xffff_ffffu32.to_le_bytes());
                let probe = cfg_u32(f.as_ref(), reg);
                f.config_write(reg, &orig.to_le_bytes());
                if probe == 0 || probe == 0xffff_ffff && orig == 0xffff_ffff {
                    i += 1;
                    continue;
                }
                let io = probe & 1 == 1;
                let is64 = !io && (probe >> 1) & 3 == 2;
                let mut mask = u64::from(probe & if io { !3 } else { !0xf });
                if is64 {
                    let hreg = reg + 4;
                    let horig = cfg_u32(f.as_ref(), hreg);
                    f.config_write(hreg, &0xffff_ffffu32.to_le_bytes());
                    let hi = cfg_u32(f.as_ref(), hreg);
                    f.config_write(hreg, &horig.to_le_bytes());
                    mask |= u64::from(hi) << 32;
                } else {
                    mask |= 0xffff_ffff_0000_0000;
                }
                if io {
                    mask |= 0xffff_ffff_ffff_0000;
                }
                let size = (!mask).wrapping_add(1);
                if size != 0 {
                    bars.push((s.bdf, f.clone(), i, size, io, is64));
                }
                i += if is64 { 2 } else { 1 };
            }
        }
        bars.sort_by_key(|b| std::cmp::Reverse(b.3));
        for (bdf, f, i, size, io, is64) in bars {
            let (next, end, space) = if io {
                (&mut io_next, IO_BAR_END, "I/O")
            } else {
                (&mut mem_next, MMIO32_BAR_END, "memory")
            };
            let base = next.div_ceil(size) * size;
            if base + size > end {
                return Err(PciBusError::Window {
                    bdf,
                    bar: i,
                    size,
                    space,
                });
            }
            *next = base + size;
            let reg = 0x10 + 4 * u16::from(i);
            f.config_write(reg, &(base as u32).to_le_bytes());
            if is64 {
                f.config_write(reg + 4, &((base >> 32) as u32).to_le_bytes());
            }
            assigned.push((bdf, i, base, size));
        }
        for s in self.slots.iter().skip(1) {
            let f = &s.function;
            if cfg_u8(f.as_ref(), 0x3d) != 0 {
                f.config_write(0x3c, &[intx_gsi(s.bdf) as u8]);
            }
            let cmd = cfg_u16(f.as_ref(), 0x04)
                | sluice_pci::config::CMD_MEMORY
                | sluice_pci::config::CMD_IO;
            f.config_write(0x04, &cmd.to_le_bytes());
        }
        Ok(assigned)
    }
}

/// (bus, device, function, register) of a CONFIG_ADDRESS value.
pub fn decode_cf8(a: u32) -> (u8, u8, u8, u16) {
    (
        (a >> 16) as u8,
        ((a >> 11) & 0x1f) as u8,
        ((a >> 8) & 7) as u8,
        (a & 0xfc) as u16,
    )
}

/// (bus, device, function, register) of an ECAM offset.
pub fn decode_ecam(off: u64) -> (u8, u8, u8, u16) {
    (
        ((off >> 20) & 0xff) as u8,
        ((off >> 15) & 0x1f) as u8,
        ((off >> 12) & 7) as u8,
        (off & 0xfff) as u16,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_pci::{BarKind, BarSpec};
    use std::sync::Mutex;

    /// A function with a 4 KiB 32-bit BAR 0, a 64-bit BAR 2 and an I/O BAR 4 that records BAR
    /// accesses.
    struct Fake {
        cfg: Mutex<ConfigSpace>,
        log: Mutex<Vec<(u8, u64, bool)>>,
    }

    impl Fake {
        fn new() -> Self {
            let ids = PciIds {
                vendor: 0x1af4,
                device: 0x1042,
                subsystem_vendor: 0,
                subsystem_id: 0,
                class_code: 0x01_00_00,
                revision: 1,
            };
            let mut cfg = ConfigSpace::new(ids, 1);
            for (index, size, kind) in [
                (
                    0,
                    0x1000,
                    BarKind::Mem32 {
                        prefetchable: false,
                    },
                ),
                (2, 0x4000, BarKind::Mem64 { prefetchable: true }),
                (4, 0x20, BarKind::Io),
            ] {
                cfg.add_bar(BarSpec { index, size, kind }).unwrap();
            }
            Fake {
                cfg: Mutex::new(cfg),
                log: Mutex::default(),
            }
        }
    }

    impl PciFunction for Fake {
        fn config_read(&self, offset: u16, data: &mut [u8]) {
            self.cfg.lock().unwrap().read(offset, data);
        }
        fn config_write(&self, offset: u16, data: &[u8]) {
            self.cfg.lock().unwrap().write(offset, data);
        }
        fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
            self.log.lock().unwrap().push((bar, offset, false));
            data.fill(0xab);
        }
        fn bar_write(&self, bar: u8, offset: u64, _data: &[u8]) {
            self.log.lock().unwrap().push((bar, offset, true));
        }
        fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
            self.cfg.lock().unwrap().decode(addr, memory)
        }
        fn reset(&self) {}
    }

    fn bus() -> (PciBus, Arc<Fake>) {
        let mut b = PciBus::default();
        let f = Arc::new(Fake::new());
        b.add(Bdf::new(0, 3, 0), f.clone()).unwrap();
        (b, f)
    }

    fn cf8_read32(b: &PciBus, dev: u8, reg: u32) -> u32 {
        let a = 0x8000_0000 | (u32::from(dev) << 11) | reg;
        assert!(b.pio_write(CONFIG_ADDRESS, &a.to_le_bytes()));
        let mut d = [0u8; 4];
        assert!(b.pio_read(CONFIG_DATA, &mut d));
        u32::from_le_bytes(d)
    }

    #[test]
    fn legacy_config_cycles_reach_functions_and_absent_ones_read_ones() {
        let (b, _) = bus();
        assert_eq!(cf8_read32(&b, 0, 0), 0x0008_1b36, "host bridge");
        assert_eq!(cf8_read32(&b, 3, 0), 0x1042_1af4);
        assert_eq!(cf8_read32(&b, 4, 0), 0xffff_ffff);
        // Byte access at 0xcfe reads the device ID's low byte.
        b.pio_write(CONFIG_ADDRESS, &(0x8000_0000u32 | (3 << 11)).to_le_bytes());
        let mut one = [0u8; 1];
        b.pio_read(CONFIG_DATA + 2, &mut one);
        assert_eq!(one[0], 0x42);
        // Enable bit clear: no cycle.
        b.pio_write(CONFIG_ADDRESS, &(3u32 << 11).to_le_bytes());
        let mut d = [0u8; 4];
        b.pio_read(CONFIG_DATA, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut a = [0u8; 4];
        b.pio_read(CONFIG_ADDRESS, &mut a);
        assert_eq!(u32::from_le_bytes(a), 3 << 11);
        assert!(!b.pio_read(0x3f8, &mut d));
        // A write through 0xcfc lands in config space.
        b.pio_write(CONFIG_ADDRESS, &(0x8000_003cu32 | (3 << 11)).to_le_bytes());
        b.pio_write(CONFIG_DATA, &[0x0b]);
        assert_eq!(cf8_read32(&b, 3, 0x3c) & 0xff, 0x0b);
    }

    #[test]
    fn ecam_cycles_match_legacy_ones() {
        let (b, _) = bus();
        let mut d = [0u8; 4];
        b.mmio_read(ECAM_BASE + (3 << 15), &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        b.mmio_read(ECAM_BASE + (7 << 15), &mut d);
        assert_eq!(d, [0xff; 4]);
        b.mmio_write(ECAM_BASE + (3 << 15) + 0x3c, &[0x0a]);
        assert_eq!(cf8_read32(&b, 3, 0x3c) & 0xff, 0x0a);
        // Extended config space reads as zero.
        b.mmio_read(ECAM_BASE + (3 << 15) + 0x100, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(decode_ecam(0x0012_b044), (1, 5, 3, 0x44));
        assert_eq!(decode_cf8(0x8001_2b44), (1, 5, 3, 0x44));
    }

    #[test]
    fn resources_are_assigned_and_bar_accesses_dispatched() {
        let (mut b, f) = bus();
        let a = b.assign_resources().unwrap();
        assert_eq!(a.len(), 3);
        let bar0 = a.iter().find(|x| x.1 == 0).unwrap().2;
        let bar2 = a.iter().find(|x| x.1 == 2).unwrap().2;
        let bar4 = a.iter().find(|x| x.1 == 4).unwrap().2;
        assert_eq!(bar2, MMIO32_START, "largest first");
        assert_eq!(bar0 % 0x1000, 0);
        assert!(bar4 >= IO_BAR_START);
        assert_eq!(cf8_read32(&b, 3, 0x10) & !0xf, bar0 as u32);
        assert_eq!(cf8_read32(&b, 3, 0x04) & 3, 3, "decoding enabled");
        assert_eq!(cf8_read32(&b, 3, 0x3c) & 0xff, intx_gsi(Bdf::new(0, 3, 0)));
        let mut d = [0u8; 2];
        assert!(b.mmio_read(bar0 + 0x12, &mut d));
        assert!(b.mmio_write(bar2 + 8, &[1, 2, 3, 4]));
        assert!(b.io_bar_write(bar4 as u16 + 2, &[1]));
        assert!(!b.mmio_read(MMIO32_BAR_END - 0x1000, &mut d));
        assert_eq!(
            *f.log.lock().unwrap(),
            vec![(0, 0x12, false), (2, 8, true), (4, 2, true)]
        );
        assert!(b.add(Bdf::new(0, 3, 0), f).is_err());
    }
}
