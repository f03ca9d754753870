//! Platform devices: one register window at a fixed guest-physical address, with no
//! configuration space (an SMMU's registers). The counterpart of [`crate::PciFunction`] for
//! devices firmware places by address rather than by bus enumeration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A device reached through one MMIO register window.
pub trait MmioDevice: Send + Sync {
    /// Size of the register window in bytes.
    fn window_size(&self) -> u64;
    /// Reads `data.len()` bytes at `offset` in the window.
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` in the window.
    fn mmio_write(&self, offset: u64, data: &[u8]);
    /// Back to the state after power-on (machine reset).
    fn reset(&self);
}

/// Checks every access against the window before the device sees it: only 1, 2, 4 and 8-byte
/// accesses that end inside the window pass. A refused read returns all ones and a refused
/// write is dropped, which is what an access to unclaimed bus space does.
pub struct MmioGuard {
    inner: Arc<dyn MmioDevice>,
    refused: AtomicU64,
}

impl MmioGuard {
    /// `device` behind a guard.
    pub fn wrap(device: Arc<dyn MmioDevice>) -> Arc<MmioGuard> {
        Arc::new(MmioGuard {
            inner: device,
            refused: AtomicU64::new(0),
        })
    }

    /// Accesses refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn fits(&self, offset: u64, len: usize) -> bool {
        let ok = matches!(len, 1 | 2 | 4 | 8)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.inner.window_size());
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

impl MmioDevice for MmioGuard {
    fn window_size(&self) -> u64 {
        self.inner.window_size()
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if self.fits(offset, data.len()) {
            self.inner.mmio_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        if self.fits(offset, data.len()) {
            self.inner.mmio_write(offset, data);
        }
    }

    fn reset(&self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// 16 bytes of registers that remember the last write.
    #[derive(Default)]
    struct Regs(Mutex<[u8; 16]>);

    impl MmioDevice for Regs {
        fn window_size(&self) -> u64 {
            16
        }
        fn mmio_read(&self, offset: u64, data: &mut [u8]) {
            let r = self.0.lock().unwrap();
            let o = offset as usize;
            data.copy_from_slice(&r[o..o + data.len()]);
        }
        fn mmio_write(&self, offset: u64, data: &[u8]) {
            let mut r = self.0.lock().unwrap();
            let o = offset as usize;
            r[o..o + data.len()].copy_from_slice(data);
        }
        fn reset(&self) {
            *self.0.lock().unwrap() = [0; 16];
        }
    }

    #[test]
    fn only_whole_accesses_inside_the_window_reach_the_device() {
        let g = MmioGuard::wrap(Arc::new(Regs::default()));
        g.mmio_write(8, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b = [0u8; 8];
        g.mmio_read(8, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Straddles the end, odd size, offset overflow: refused, the device never sees them
        // (it would index out of its array).
        g.mmio_write(12, &[9; 8]);
        g.mmio_write(0, &[9; 3]);
        g.mmio_write(u64::MAX - 1, &[9; 4]);
        let mut c = [0u8; 8];
        g.mmio_read(12, &mut c);
        assert_eq!(c, [0xff; 8]);
        g.mmio_read(8, &mut b);
        assert_eq!(
            b,
            [1, 2, 3, 4, 5, 6, 7, 8],
            "refused writes changed nothing"
        );
        assert_eq!(g.refused(), 4);
        g.reset();
        g.mmio_read(8, &mut b);
        assert_eq!(b, [0; 8]);
    }
}
