//! The one check every BAR access passes on its way from a CPU backend to a device.
//!
//! Backends decode a guest address with [`PciFunction::decode_bar`], which looks only at the
//! first byte, and then hand the whole access to the device. An access that starts inside a BAR
//! but runs past its end (a 4-byte read at the last byte, or an 8-byte access at `size - 4`)
//! would reach the device with `offset + len > size`, and every device would have to defend
//! itself. [`BarGuard`] wraps a function once, where the host builds it, so every device behind
//! either backend gets the same rule: an access must be 1, 2, 4 or 8 bytes and lie entirely in
//! one BAR. Anything else is refused at the bus, as an unsupported request: a read returns
//! all-ones, a write is dropped, and the device never sees it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::PciFunction;

/// Offset of BAR 0 in configuration space.
const OFF_BAR0: u16 = 0x10;
/// Number of BAR registers of a type-0 header.
const BARS: u8 = 6;

/// A [`PciFunction`] whose BAR accesses are checked against the BAR they start in.
pub struct BarGuard {
    inner: Arc<dyn PciFunction>,
    rejected: AtomicU64,
}

impl std::fmt::Debug for BarGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarGuard")
            .field("rejected", &self.rejected())
            .finish_non_exhaustive()
    }
}

/// Whether a BAR access may reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarAccess {
    /// Inside one BAR, of a size the bus carries.
    Fits,
    /// Not 1, 2, 4 or 8 bytes.
    BadSize,
    /// Runs past the end of the BAR (or the BAR is not decoded any more).
    Straddles,
}

impl BarGuard {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn PciFunction>) -> Self {
        BarGuard {
            inner,
            rejected: AtomicU64::new(0),
        }
    }

    /// Wraps `inner` for the backends.
    pub fn wrap(inner: Arc<dyn PciFunction>) -> Arc<dyn PciFunction> {
        Arc::new(Self::new(inner))
    }

    /// Accesses refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Classifies an access of `len` bytes at `offset` in BAR `bar`: against
    /// [`PciFunction::bar_size`] when the function states it; otherwise the BAR's current base
    /// comes from the function's own BAR register and the last byte of the access must decode
    /// to the same BAR at the matching offset (no knowledge of BAR sizes needed).
    pub fn check(&self, bar: u8, offset: u64, len: usize) -> BarAccess {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return BarAccess::BadSize;
        }
        // A function that states its BAR sizes is checked against them, whatever the BAR's
        // placement and decode state (host-side users, e.g. the KVM backend reading the MSI-X
        // table, access BARs directly).
        if let Some(size) = self.inner.bar_size(bar) {
            return match offset.checked_add(len as u64) {
                Some(end) if end <= size => BarAccess::Fits,
                _ => BarAccess::Straddles,
            };
        }
        let Some((base, memory)) = self.bar_base(bar) else {
            return BarAccess::Straddles;
        };
        // `len - 1` cannot underflow: `len` is at least 1.
        let last = offset.checked_add(len as u64 - 1);
        let decoded = last
            .and_then(|l| base.checked_add(l))
            .and_then(|a| self.inner.decode_bar(a, memory));
        match (decoded, last) {
            (Some((b, o)), Some(l)) if b == bar && o == l => BarAccess::Fits,
            _ => BarAccess::Straddles,
        }
    }

    /// Base address and space (memory or I/O) of BAR `bar` as the guest programmed it.
    fn bar_base(&self, bar: u8) -> Option<(u64, bool)> {
        if bar >= BARS {
            return None;
        }
        let reg = OFF_BAR0 + 4 * u16::from(bar);
        let mut lo = [0u8; 4];
        self.inner.config_read(reg, &mut lo);
        let lo = u64::from(u32::from_le_bytes(lo));
        if lo & 1 != 0 {
            return Some((lo & !0x3, false));
        }
        let mut base = lo & !0xf;
        // Memory type 0b10: a 64-bit BAR, whose upper half is the next register.
        if (lo >> 1) & 3 == 2 && bar + 1 < BARS {
            let mut hi = [0u8; 4];
            self.inner.config_read(reg + 4, &mut hi);
            base |= u64::from(u32::from_le_bytes(hi)) << 32;
        }
        Some((base, true))
    }

    fn refuse(&self, bar: u8, offset: u64, len: usize, why: BarAccess) {
        let n = self.rejected.fetch_add(1, Ordering::Relaxed);
        // Guest-triggerable: only the first few are logged.
        if n < 8 {
            log::debug!("BAR {bar} access of {len} bytes at {offset:#x} refused: {why:?}");
        }
    }
}

impl PciFunction for BarGuard {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.inner.config_read(offset, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        self.inner.config_write(offset, data);
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        match self.check(bar, offset, data.len()) {
            BarAccess::Fits => self.inner.bar_read(bar, offset, data),
            why => {
                self.refuse(bar, offset, data.len(), why);
                data.fill(0xff);
            }
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        match self.check(bar, offset, data.len()) {
            BarAccess::Fits => self.inner.bar_write(bar, offset, data),
            why => self.refuse(bar, offset, data.len(), why),
        }
    }

    fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
        self.inner.decode_bar(addr, memory)
    }

    fn reset(&self) {
        self.inner.reset();
    }

    fn bar_size(&self, bar: u8) -> Option<u64> {
        self.inner.bar_size(bar)
    }

    // A doorbell is the backend's own description of a BAR write, not a guest access.
    fn poll_doorbell(&self, doorbell: &crate::Doorbell, quiet: bool) -> Option<bool> {
        self.inner.poll_doorbell(doorbell, quiet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, BarSpec, CMD_IO, CMD_MEMORY, ConfigSpace, PciIds};
    use std::sync::Mutex;

    /// A function with a 4 KiB 64-bit memory BAR 0, a 16-byte 32-bit memory BAR 2 and a
    /// 32-byte I/O BAR 3, recording what reaches it.
    struct Recorder {
        cfg: Mutex<ConfigSpace>,
        seen: Mutex<Vec<(u8, u64, usize, bool)>>,
    }

    impl PciFunction for Recorder {
        fn config_read(&self, offset: u16, data: &mut [u8]) {
            self.cfg.lock().unwrap().read(offset, data);
        }
        fn config_write(&self, offset: u16, data: &[u8]) {
            let _ = self.cfg.lock().unwrap().write(offset, data);
        }
        fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
            self.seen
                .lock()
                .unwrap()
                .push((bar, offset, data.len(), false));
            data.fill(0x5a);
        }
        fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
            self.seen
                .lock()
                .unwrap()
                .push((bar, offset, data.len(), true));
        }
        fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
            self.cfg.lock().unwrap().decode(addr, memory)
        }
        fn reset(&self) {}
    }

    const BAR0: u64 = 0x1_2000_0000;
    const BAR2: u64 = 0xfe00_0000;
    const BAR3: u64 = 0xc000;

    fn guarded() -> (Arc<Recorder>, BarGuard) {
        let ids = PciIds {
            vendor: 1,
            device: 2,
            subsystem_vendor: 0,
            subsystem_id: 0,
            class_code: 0,
            revision: 0,
        };
        let mut cfg = ConfigSpace::new(ids, 0);
        let bar = |index, kind, size| BarSpec { index, kind, size };
        let mem64 = BarKind::Mem64 {
            prefetchable: false,
        };
        let mem32 = BarKind::Mem32 {
            prefetchable: false,
        };
        cfg.add_bar(bar(0, mem64, 0x1000)).unwrap();
        cfg.add_bar(bar(2, mem32, 0x10)).unwrap();
        cfg.add_bar(bar(3, BarKind::Io, 0x20)).unwrap();
        let _ = cfg.write(0x10, &(BAR0 as u32).to_le_bytes());
        let _ = cfg.write(0x14, &((BAR0 >> 32) as u32).to_le_bytes());
        let _ = cfg.write(0x18, &(BAR2 as u32).to_le_bytes());
        let _ = cfg.write(0x1c, &(BAR3 as u32).to_le_bytes());
        let _ = cfg.write(0x04, &(CMD_MEMORY | CMD_IO).to_le_bytes());
        let f = Arc::new(Recorder {
            cfg: Mutex::new(cfg),
            seen: Mutex::new(Vec::new()),
        });
        let g = BarGuard::new(f.clone());
        (f, g)
    }

    /// What a backend does: decode the first byte, hand over the access.
    fn read(g: &BarGuard, addr: u64, memory: bool, len: usize) -> Option<Vec<u8>> {
        let (bar, off) = g.decode_bar(addr, memory)?;
        let mut b = vec![0u8; len];
        g.bar_read(bar, off, &mut b);
        Some(b)
    }

    fn write(g: &BarGuard, addr: u64, memory: bool, len: usize) {
        if let Some((bar, off)) = g.decode_bar(addr, memory) {
            g.bar_write(bar, off, &vec![0u8; len]);
        }
    }

    #[test]
    fn accesses_inside_a_bar_reach_the_device() {
        let (f, g) = guarded();
        assert_eq!(read(&g, BAR0 + 0xff8, true, 8), Some(vec![0x5a; 8]));
        write(&g, BAR2 + 0xc, true, 4);
        assert_eq!(read(&g, BAR3 + 0x1f, false, 1), Some(vec![0x5a]));
        assert_eq!(
            *f.seen.lock().unwrap(),
            vec![(0, 0xff8, 8, false), (2, 0xc, 4, true), (3, 0x1f, 1, false)]
        );
        assert_eq!(g.rejected(), 0);
    }

    #[test]
    fn accesses_straddling_the_end_of_a_bar_are_refused() {
        let (f, g) = guarded();
        assert_eq!(read(&g, BAR0 + 0xffc, true, 8), Some(vec![0xff; 8]));
        assert_eq!(read(&g, BAR0 + 0xfff, true, 2), Some(vec![0xff; 2]));
        write(&g, BAR2 + 0xe, true, 4);
        write(&g, BAR2 + 0x9, true, 8);
        assert_eq!(read(&g, BAR3 + 0x1e, false, 4), Some(vec![0xff; 4]));
        assert!(
            f.seen.lock().unwrap().is_empty(),
            "nothing reached the device"
        );
        assert_eq!(g.rejected(), 5);
    }

    #[test]
    fn sizes_the_bus_does_not_carry_are_refused() {
        let (f, g) = guarded();
        for len in [0, 3, 5, 16, 4096] {
            assert_eq!(read(&g, BAR0, true, len), Some(vec![0xff; len]), "{len}");
            write(&g, BAR0, true, len);
        }
        assert!(f.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn offsets_that_overflow_or_name_no_bar_are_refused() {
        let (f, g) = guarded();
        let mut b = [0u8; 8];
        g.bar_read(0, u64::MAX - 2, &mut b);
        g.bar_read(7, 0, &mut b);
        g.bar_write(1, 0, &b);
        assert!(f.seen.lock().unwrap().is_empty());
        assert_eq!(b, [0xff; 8]);
    }

    /// The recorder stating its BAR sizes.
    struct Sized(Arc<Recorder>);

    impl PciFunction for Sized {
        fn config_read(&self, offset: u16, data: &mut [u8]) {
            self.0.config_read(offset, data)
        }
        fn config_write(&self, offset: u16, data: &[u8]) {
            self.0.config_write(offset, data)
        }
        fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
            self.0.bar_read(bar, offset, data)
        }
        fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
            self.0.bar_write(bar, offset, data)
        }
        fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
            self.0.decode_bar(addr, memory)
        }
        fn reset(&self) {}
        fn bar_size(&self, bar: u8) -> Option<u64> {
            self.0.cfg.lock().unwrap().bar(bar).map(|b| b.size)
        }
        fn poll_doorbell(&self, doorbell: &crate::Doorbell, quiet: bool) -> Option<bool> {
            Some(doorbell.value == 7 && quiet)
        }
    }

    /// Polling a doorbell reaches the function behind the guard (a function that cannot be
    /// polled answers `None` through it too).
    #[test]
    fn doorbell_polls_pass_the_guard() {
        let (f, g) = guarded();
        let bell = crate::Doorbell {
            bar: 0,
            offset: 0x40,
            size: 2,
            datamatch: None,
            value: 7,
        };
        assert_eq!(g.poll_doorbell(&bell, true), None);
        let g = BarGuard::new(Arc::new(Sized(f)));
        assert_eq!(g.poll_doorbell(&bell, true), Some(true));
        assert_eq!(g.poll_doorbell(&bell, false), Some(false));
    }

    #[test]
    fn stated_bar_sizes_are_used_whatever_the_decode_state() {
        let (f, _) = guarded();
        let g = BarGuard::new(Arc::new(Sized(f.clone())));
        // Memory decoding off: the host still reaches the BAR inside its size.
        g.config_write(0x04, &0u16.to_le_bytes());
        let mut b = [0u8; 4];
        g.bar_read(2, 0xc, &mut b);
        assert_eq!(b, [0x5a; 4]);
        g.bar_read(2, 0xe, &mut b);
        assert_eq!(b, [0xff; 4]);
        g.bar_write(0, 0xffc, &[0; 8]);
        g.bar_write(1, 0, &[0; 4]);
        assert_eq!(f.seen.lock().unwrap().len(), 1);
        assert_eq!(g.rejected(), 3);
    }

    #[test]
    fn a_reprogrammed_bar_is_checked_at_its_new_place() {
        let (f, g) = guarded();
        g.config_write(0x18, &0xfd00_0000u32.to_le_bytes());
        assert_eq!(read(&g, 0xfd00_000c, true, 4), Some(vec![0x5a; 4]));
        assert_eq!(read(&g, 0xfd00_000e, true, 4), Some(vec![0xff; 4]));
        assert_eq!(f.seen.lock().unwrap().len(), 1);
    }
}
