//! Everything a vCPU exit can reach: the 16550 at 0x3f8 (vm-superio), the ACPI PM1a blocks,
//! the reset register and i8042 reset, CMOS/POST stubs, and the PCI host bridge.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::time::Instant;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{PM1A_CNT_PORT, PM1A_EVT_PORT, RESET_PORT, S5_SLP_TYP};
use crate::pci::PciBus;

const COM1: u16 = 0x3f8;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const SLP_EN: u16 = 1 << 13;
const SCI_EN: u16 = 1;

/// Something the supervisor must learn about.
#[derive(Debug)]
pub enum Event {
    /// One console line and when it was completed (since VM start).
    Console(String, std::time::Duration),
    /// A vCPU thread ended.
    VcpuEnded(u8, VcpuStop),
}

/// Why a vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// ACPI S5.
    PowerOff,
    /// i8042/0xCF9 reset or a triple fault.
    Reset(&'static str),
    /// The supervisor asked; where the vCPU was.
    Stopped {
        /// Guest RIP when it stopped.
        rip: u64,
    },
    /// KVM reported something the VMM cannot continue from.
    Error(String),
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::PowerOff => write!(f, "powered off (ACPI S5)"),
            VcpuStop::Reset(why) => write!(f, "reset ({why})"),
            VcpuStop::Stopped { rip } => write!(f, "stopped at rip {rip:#x}"),
            VcpuStop::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// What a port write asks the VMM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing more.
    None,
    /// Power off.
    PowerOff,
    /// Reset (ends the run, like QEMU's -no-reboot).
    Reset(&'static str),
}

/// The serial IRQ: an eventfd registered as a KVM irqfd on GSI 4.
pub struct IrqEvt(pub EventFd);

impl Trigger for IrqEvt {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Collects serial output into lines for the supervisor.
pub struct ConsoleSink {
    buf: Vec<u8>,
    tx: Sender<Event>,
    start: Instant,
}

impl ConsoleSink {
    /// Lines go to `tx`, timestamped from `start`.
    pub fn new(tx: Sender<Event>, start: Instant) -> Self {
        ConsoleSink {
            buf: Vec::new(),
            tx,
            start,
        }
    }

    /// Emits a partial last line.
    pub fn finish(&mut self) {
        if !self.buf.is_empty() {
            self.emit();
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.buf)
            .trim_end_matches('\r')
            .to_string();
        self.buf.clear();
        let _ = self.tx.send(Event::Console(line, self.start.elapsed()));
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for b in data {
            if *b == b'\n' {
                self.emit();
            } else if self.buf.len() < 64 * 1024 {
                self.buf.push(*b);
            }
        }
        Ok(data.len())
    }
    /// vm-superio flushes after every byte; lines end only at `\n` (or [`ConsoleSink::finish`]).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Devices shared by all vCPUs.
pub struct Platform {
    serial: Mutex<Serial<IrqEvt, NoEvents, ConsoleSink>>,
    /// PCI bus 0.
    pub pci: PciBus,
    pm1_enable: AtomicU16,
    unclaimed: AtomicU64,
}

impl Platform {
    /// A platform with a serial port raising `irq` and writing lines to `sink`.
    pub fn new(irq: IrqEvt, sink: ConsoleSink, pci: PciBus) -> Self {
        Platform {
            serial: Mutex::new(Serial::new(irq, sink)),
            pci,
            pm1_enable: AtomicU16::new(0),
            unclaimed: AtomicU64::new(0),
        }
    }

    /// Flushes a partial console line.
    pub fn flush_console(&self) {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .writer_mut()
            .finish();
    }

    /// Accesses nobody claimed (reads returned all-ones).
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }

    fn note_unclaimed(&self, what: &str, addr: u64) {
        let n = self.unclaimed.fetch_add(1, Ordering::Relaxed);
        if n < 16 {
            log::debug!("unclaimed {what} access at {addr:#x}");
        }
    }

    /// Port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0);
        match port {
            COM1..=0x3ff => {
                let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(b) = data.first_mut() {
                    *b = s.read((port - COM1) as u8);
                }
            }
            I8042_CMD | I8042_DATA => {}
            0x70 | 0x71 | 0x80 => {}
            p if (PM1A_EVT_PORT..PM1A_EVT_PORT + 4).contains(&p) => {
                if p == PM1A_EVT_PORT + 2 {
                    sluice_pci::put_le(data, u64::from(self.pm1_enable.load(Ordering::Relaxed)));
                }
            }
            PM1A_CNT_PORT => sluice_pci::put_le(data, u64::from(SCI_EN)),
            RESET_PORT => {}
            p if self.pci.pio_read(p, data) => {}
            p if self.pci.io_bar_read(p, data) => {}
            p => {
                data.fill(0xff);
                self.note_unclaimed("port", u64::from(p));
            }
        }
    }

    /// Port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        let v = sluice_pci::le_value(data);
        match port {
            COM1..=0x3ff => {
                let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(b) = data.first()
                    && let Err(e) = s.write((port - COM1) as u8, *b)
                {
                    log::warn!("serial write failed: {e:?}");
                }
            }
            I8042_CMD if v as u8 == I8042_RESET => return PioAction::Reset("i8042"),
            I8042_CMD | I8042_DATA | 0x70 | 0x71 | 0x80 => {}
            p if p == PM1A_EVT_PORT + 2 => self.pm1_enable.store(v as u16, Ordering::Relaxed),
            p if (PM1A_EVT_PORT..PM1A_EVT_PORT + 4).contains(&p) => {}
            PM1A_CNT_PORT => {
                let v = v as u16;
                if v & SLP_EN != 0 && (v >> 10) & 7 == S5_SLP_TYP {
                    return PioAction::PowerOff;
                }
            }
            RESET_PORT if v & 0x4 != 0 => return PioAction::Reset("0xcf9"),
            RESET_PORT => {}
            p if self.pci.pio_write(p, data) => {}
            p if self.pci.io_bar_write(p, data) => {}
            p => self.note_unclaimed("port", u64::from(p)),
        }
        PioAction::None
    }

    /// One port-I/O exit of `data.len()` bytes to `port`, `size` bytes per element. A string
    /// instruction (`rep ins`/`rep outs`) exits once with `count` elements in one buffer; each
    /// element is its own access, as on the bus, so no device sees `count × size` bytes as one
    /// access (a 4-byte `rep outsb` to 0xCF8 must not program CONFIG_ADDRESS). An element size
    /// other than 1, 2 or 4, or a buffer that is not whole elements, is not performed (reads
    /// return all-ones). Stops at the first write that ends the run.
    pub fn port_io(&self, port: u16, size: usize, data: &mut [u8], write: bool) -> PioAction {
        if !matches!(size, 1 | 2 | 4) || !data.len().is_multiple_of(size) {
            if !write {
                data.fill(0xff);
            }
            self.note_unclaimed("malformed port", u64::from(port));
            return PioAction::None;
        }
        for element in data.chunks_exact_mut(size) {
            if write {
                match self.pio_write(port, element) {
                    PioAction::None => {}
                    stop => return stop,
                }
            } else {
                self.pio_read(port, element);
            }
        }
        PioAction::None
    }

    /// MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
            self.note_unclaimed("MMIO", addr);
        }
    }

    /// MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.pci.mmio_write(addr, data) {
            self.note_unclaimed("MMIO", addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn platform() -> (Platform, std::sync::mpsc::Receiver<Event>, EventFd) {
        let (tx, rx) = std::sync::mpsc::channel();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let p = Platform::new(
            IrqEvt(evt.try_clone().unwrap()),
            ConsoleSink::new(tx, Instant::now()),
            PciBus::default(),
        );
        (p, rx, evt)
    }

    #[test]
    fn serial_lines_reach_the_supervisor() {
        let (p, rx, _evt) = platform();
        for b in b"hello\r\nwor" {
            p.pio_write(COM1, &[*b]);
        }
        p.flush_console();
        let lines: Vec<String> = rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Console(l, _) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(lines, ["hello", "wor"]);
        let mut lsr = [0u8];
        p.pio_read(COM1 + 5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR empty");
    }

    #[test]
    fn string_port_io_is_one_access_per_element() {
        let (p, rx, _evt) = platform();
        // rep outsb of four bytes to COM1: four characters, not the first one only.
        let mut s = *b"hi\r\n";
        assert_eq!(p.port_io(COM1, 1, &mut s, true), PioAction::None);
        p.flush_console();
        let lines: Vec<String> = rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Console(l, _) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(lines, ["hi"]);
        // rep outsb of four bytes to CONFIG_ADDRESS programs nothing; an outl does.
        let mut a = 0x8000_0000u32.to_le_bytes();
        p.port_io(0xcf8, 1, &mut a, true);
        let mut r = [0u8; 4];
        p.port_io(0xcf8, 4, &mut r, false);
        assert_eq!(
            u32::from_le_bytes(r),
            0,
            "four byte accesses, none of them 4 bytes"
        );
        p.port_io(0xcf8, 4, &mut a, true);
        p.port_io(0xcf8, 4, &mut r, false);
        assert_eq!(u32::from_le_bytes(r), 0x8000_0000);
        // rep insw from CONFIG_DATA: two 2-byte reads of the host bridge's vendor/device IDs.
        let mut ids = [0u8; 4];
        p.port_io(0xcf8, 4, &mut 0x8000_0000u32.to_le_bytes(), true);
        p.port_io(0xcfc, 2, &mut ids, false);
        assert_eq!(ids[..2], ids[2..], "the same register twice");
        // A malformed exit is not performed.
        let mut odd = [0u8; 3];
        p.port_io(0xcfc, 2, &mut odd, false);
        assert_eq!(odd, [0xff; 3]);
        let mut bad = [0u8; 8];
        p.port_io(0xcfc, 8, &mut bad, false);
        assert_eq!(bad, [0xff; 8]);
        // A write that ends the run stops the string.
        let mut off = [0x00, 0x34, 0x00, 0x34];
        assert_eq!(
            p.port_io(PM1A_CNT_PORT, 2, &mut off, true),
            PioAction::PowerOff
        );
    }

    #[test]
    fn shutdown_and_reset_ports() {
        let (p, _rx, _evt) = platform();
        assert_eq!(
            p.pio_write(PM1A_CNT_PORT, &0x3400u16.to_le_bytes()),
            PioAction::PowerOff
        );
        assert_eq!(
            p.pio_write(PM1A_CNT_PORT, &0x0001u16.to_le_bytes()),
            PioAction::None
        );
        assert_eq!(p.pio_write(I8042_CMD, &[0xfe]), PioAction::Reset("i8042"));
        assert_eq!(p.pio_write(RESET_PORT, &[0x06]), PioAction::Reset("0xcf9"));
        assert_eq!(p.pio_write(RESET_PORT, &[0x02]), PioAction::None);
        let mut cnt = [0u8; 2];
        p.pio_read(PM1A_CNT_PORT, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & SCI_EN, SCI_EN);
        let mut d = [0u8; 4];
        p.pio_read(0x1234, &mut d);
        assert_eq!(d, [0xff; 4]);
        p.mmio_read(0xd000_0000, &mut d);
        assert_eq!((d, p.unclaimed()), ([0xff; 4], 2));
    }
}
