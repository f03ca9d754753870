//! The guest marker channel: a tiny PCI function through which guest programs write text lines
//! ("phase vfio-claim 0000:00:05.0") into Sluice's event timeline.
//!
//! Register interface (the same on both BARs; see `docs/escape-oracle.md`):
//!
//! - **BAR 0**: 256-byte I/O BAR, **BAR 1**: 4 KiB 32-bit memory BAR.
//! - **Write, any offset, any width:** each byte of the access, in address order, is appended to
//!   the line being assembled; NUL bytes are skipped (so a 32-bit `devmem` write of a short
//!   word appends only its non-NUL bytes); `\n` commits the line; `\r` is dropped.
//! - **Read offset 0 (u32):** magic `0x4b4d4c53` ("SLMK" little-endian); **offset 4:** lines
//!   committed so far; **offset 8:** lines truncated (longer than [`MAX_LINE`]); other offsets
//!   read 0.
//!
//! A line longer than [`MAX_LINE`] bytes is cut there (the rest up to the newline is dropped and
//! counted). Bytes that are not valid UTF-8 are replaced. The committed line goes to the sink
//! the host gave at construction (`Oracle::marker` in a run). Guest input can never panic the
//! device: every access is bounded and the sink is called with no lock held.
//!
//! From busybox sh in the guest (`BDF` is the marker function; find it with `grep -l 0x5c1c /sys/bus/pci/devices/*/vendor`):
//!
//! ```sh
//! echo 1 > /sys/bus/pci/devices/$BDF/enable          # decode on (no driver binds it)
//! printf '%s\n' "phase vfio-claim 0000:00:05.0" | dd of=/sys/bus/pci/devices/$BDF/resource0 bs=1 2>/dev/null
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::sync::{Arc, Mutex};

#[doc(hidden)]
pub mod fuzzing;

use sluice_pci::{BarKind, BarSpec, ConfigError, ConfigSpace, PciFunction, PciIds};

/// Vendor ID of the marker function (not a PCI-SIG assignment: no guest driver matches it).
pub const MARKER_VENDOR: u16 = 0x5c1c;
/// Device ID of the marker function.
pub const MARKER_DEVICE: u16 = 0x0001;
/// Class code: 0xff (device does not fit any defined class).
pub const MARKER_CLASS: u32 = 0xff_00_00;
/// Value read at offset 0 of either BAR: "SLMK".
pub const MARKER_MAGIC: u32 = 0x4b4d_4c53;
/// Longest line kept, in bytes; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 1024;
/// Size of the I/O BAR (BAR 0).
pub const IO_BAR_SIZE: u64 = 256;
/// Size of the memory BAR (BAR 1).
pub const MEM_BAR_SIZE: u64 = 4096;

/// Where committed lines go.
pub type MarkerSink = Arc<dyn Fn(&str) + Send + Sync>;

struct Inner {
    cfg: ConfigSpace,
    line: Vec<u8>,
    overflow: bool,
    committed: u32,
    truncated: u32,
}

/// The marker PCI function.
pub struct MarkerDevice {
    inner: Mutex<Inner>,
    sink: MarkerSink,
}

impl std::fmt::Debug for MarkerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkerDevice").finish_non_exhaustive()
    }
}

impl MarkerDevice {
    /// A marker function that hands every committed line to `sink`.
    pub fn new(sink: MarkerSink) -> Result<Self, ConfigError> {
        let ids = PciIds {
            vendor: MARKER_VENDOR,
            device: MARKER_DEVICE,
            subsystem_vendor: MARKER_VENDOR,
            subsystem_id: MARKER_DEVICE,
            class_code: MARKER_CLASS,
            revision: 1,
        };
        let mut cfg = ConfigSpace::new(ids, 0);
        cfg.add_bar(BarSpec {
            index: 0,
            size: IO_BAR_SIZE,
            kind: BarKind::Io,
        })?;
        cfg.add_bar(BarSpec {
            index: 1,
            size: MEM_BAR_SIZE,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        })?;
        Ok(MarkerDevice {
            inner: Mutex::new(Inner {
                cfg,
                line: Vec::new(),
                overflow: false,
                committed: 0,
                truncated: 0,
            }),
            sink,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lines committed so far.
    pub fn committed(&self) -> u32 {
        self.lock().committed
    }
}

impl Inner {
    /// Appends `data`; returns the lines it completed.
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for &b in data {
            match b {
                0 | b'\r' => {}
                b'\n' => {
                    done.push(String::from_utf8_lossy(&self.line).into_owned());
                    self.line.clear();
                    if self.overflow {
                        self.truncated = self.truncated.wrapping_add(1);
                    }
                    self.overflow = false;
                    self.committed = self.committed.wrapping_add(1);
                }
                _ if self.line.len() >= MAX_LINE => self.overflow = true,
                _ => self.line.push(b),
            }
        }
        done
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            0 => MARKER_MAGIC,
            4 => self.committed,
            8 => self.truncated,
            _ => 0,
        }
    }
}

impl PciFunction for MarkerDevice {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.lock().cfg.read(offset, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let _ = self.lock().cfg.write(offset, data);
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar > 1 {
            data.fill(0);
            return;
        }
        let inner = self.lock();
        // Assemble the bytes of the aligned 32-bit registers the access overlaps.
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            let reg = inner.read_reg(at & !3);
            *b = (reg >> (8 * (at & 3))) as u8;
        }
    }

    fn bar_write(&self, bar: u8, _offset: u64, data: &[u8]) {
        if bar > 1 {
            return;
        }
        let lines = self.lock().push(data);
        // The sink runs without the device lock: it may take its own locks or block briefly.
        for l in &lines {
            (self.sink)(l);
        }
    }

    fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
        self.lock().cfg.decode(addr, memory)
    }

    fn reset(&self) {
        let mut inner = self.lock();
        inner.cfg.reset();
        inner.line.clear();
        inner.overflow = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (MarkerDevice, Arc<Mutex<Vec<String>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let dev =
            MarkerDevice::new(Arc::new(move |l: &str| g.lock().unwrap().push(l.into()))).unwrap();
        (dev, got)
    }

    #[test]
    fn ids_and_bars_as_documented() {
        let (dev, _) = device();
        let mut id = [0u8; 4];
        dev.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0001_5c1c);
        // BAR sizing: write all ones, read back the size mask.
        dev.config_write(0x10, &[0xff; 4]);
        let mut b0 = [0u8; 4];
        dev.config_read(0x10, &mut b0);
        assert_eq!(
            u32::from_le_bytes(b0) & !0x3,
            !(IO_BAR_SIZE as u32 - 1) & !0x3
        );
        assert_eq!(u32::from_le_bytes(b0) & 1, 1, "BAR 0 is I/O");
        dev.config_write(0x14, &[0xff; 4]);
        let mut b1 = [0u8; 4];
        dev.config_read(0x14, &mut b1);
        assert_eq!(u32::from_le_bytes(b1) & !0xf, !(MEM_BAR_SIZE as u32 - 1));
    }

    #[test]
    fn dd_style_byte_writes_make_a_line() {
        let (dev, got) = device();
        // What `printf 'phase x\n' | dd of=resource0 bs=1` does: one byte per offset.
        for (i, b) in b"phase vfio-claim 0000:00:05.0\n".iter().enumerate() {
            dev.bar_write(0, i as u64, &[*b]);
        }
        assert_eq!(*got.lock().unwrap(), vec!["phase vfio-claim 0000:00:05.0"]);
        let mut r = [0u8; 4];
        dev.bar_read(0, 4, &mut r);
        assert_eq!(u32::from_le_bytes(r), 1);
        dev.bar_read(1, 0, &mut r);
        assert_eq!(u32::from_le_bytes(r), MARKER_MAGIC);
    }

    #[test]
    fn devmem_words_skip_nul_and_split_lines() {
        let (dev, got) = device();
        // `devmem ADDR 32 0x0a6e776f` style: little-endian words, NULs ignored.
        dev.bar_write(1, 0, &u32::from_le_bytes(*b"ab\nc").to_le_bytes());
        dev.bar_write(1, 0, &[b'd', 0, 0, 0]);
        dev.bar_write(1, 0, b"\r\n");
        assert_eq!(*got.lock().unwrap(), vec!["ab", "cd"]);
    }

    #[test]
    fn long_lines_are_cut_and_counted_hostile_bytes_are_safe() {
        let (dev, got) = device();
        let long = vec![b'x'; MAX_LINE + 100];
        dev.bar_write(0, 0, &long);
        dev.bar_write(0, 0, &[0xff, 0xfe, b'\n']);
        let lines = got.lock().unwrap().clone();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        let mut r = [0u8; 4];
        dev.bar_read(0, 8, &mut r);
        assert_eq!(u32::from_le_bytes(r), 1);
        // Invalid UTF-8 is replaced, not refused.
        dev.bar_write(0, 0, &[0xff, b'\n']);
        assert_eq!(got.lock().unwrap()[1], "\u{fffd}");
        // Unknown BARs and odd reads are harmless.
        dev.bar_write(5, 0, b"zz\n");
        let mut odd = [0u8; 3];
        dev.bar_read(0, 0xfff_ffff_ffff, &mut odd);
        assert_eq!(got.lock().unwrap().len(), 2);
    }

    #[test]
    fn decode_follows_the_command_register_and_reset_drops_a_partial_line() {
        let (dev, got) = device();
        dev.config_write(0x10, &0xc000u32.to_le_bytes());
        assert_eq!(dev.decode_bar(0xc004, false), None, "I/O decode off");
        dev.config_write(0x04, &1u16.to_le_bytes());
        assert_eq!(dev.decode_bar(0xc004, false), Some((0, 4)));
        dev.bar_write(0, 0, b"half");
        dev.reset();
        dev.bar_write(0, 0, b"whole\n");
        assert_eq!(*got.lock().unwrap(), vec!["whole"]);
    }
}
