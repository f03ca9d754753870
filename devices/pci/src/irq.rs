//! Interrupt routing of one PCI function: MSI-X when enabled, INTx otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sluice_devapi::InterruptSink;

use crate::msix::MsixTable;

/// INTx is wired line 0 of the function's sink.
pub const INTX_LINE: u32 = 0;

/// Routes a function's interrupt requests. Devices call [`PciInterrupt::signal`] with a vector
/// and never learn whether it became a message or a level.
pub struct PciInterrupt {
    sink: Arc<dyn InterruptSink>,
    msix: Option<Arc<Mutex<MsixTable>>>,
    intx_asserted: AtomicBool,
    intx_disabled: AtomicBool,
}

impl PciInterrupt {
    /// A router delivering to `sink`, with an optional MSI-X table.
    pub fn new(sink: Arc<dyn InterruptSink>, msix: Option<Arc<Mutex<MsixTable>>>) -> Self {
        PciInterrupt {
            sink,
            msix,
            intx_asserted: AtomicBool::new(false),
            intx_disabled: AtomicBool::new(false),
        }
    }

    /// The sink, for MSI-X table writes that may deliver pending messages.
    pub fn sink(&self) -> &dyn InterruptSink {
        self.sink.as_ref()
    }

    /// Requests interrupt `vector`: an MSI-X message if the guest enabled MSI-X, else INTx.
    pub fn signal(&self, vector: u16) {
        if let Some(msix) = &self.msix {
            let delivered = match msix.lock() {
                Ok(mut t) => t.notify(vector, self.sink.as_ref()),
                Err(p) => p.into_inner().notify(vector, self.sink.as_ref()),
            };
            if delivered {
                return;
            }
        }
        self.set_intx(true);
    }

    /// True if MSI-X is enabled (devices use it to decide whether ISR-style status applies).
    pub fn msix_enabled(&self) -> bool {
        self.msix
            .as_ref()
            .is_some_and(|m| m.lock().map(|t| t.enabled()).unwrap_or(false))
    }

    /// Drives the INTx level (virtio clears it when the guest reads ISR).
    pub fn set_intx(&self, asserted: bool) {
        let effective = asserted && !self.intx_disabled.load(Ordering::Acquire);
        self.intx_asserted.store(asserted, Ordering::Release);
        self.sink.set_level(INTX_LINE, effective);
    }

    /// Current requested INTx level (before the command register's INTx Disable).
    pub fn intx_asserted(&self) -> bool {
        self.intx_asserted.load(Ordering::Acquire)
    }

    /// Mirrors the command register's INTx Disable bit.
    pub fn set_intx_disabled(&self, disabled: bool) {
        let was = self.intx_disabled.swap(disabled, Ordering::AcqRel);
        if was != disabled && self.intx_asserted() {
            self.sink.set_level(INTX_LINE, !disabled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_devapi::{RecordedInterrupt, RecordingInterrupts};

    #[test]
    fn falls_back_to_intx_until_msix_enabled() {
        let rec = Arc::new(RecordingInterrupts::default());
        let table = Arc::new(Mutex::new(MsixTable::new(2, 1, 0, 0x800)));
        let irq = PciInterrupt::new(rec.clone(), Some(table.clone()));
        irq.signal(0);
        assert_eq!(
            rec.take(),
            vec![RecordedInterrupt::Level {
                line: 0,
                asserted: true
            }]
        );
        irq.set_intx(false);
        rec.take();
        {
            let mut t = table.lock().unwrap();
            t.write(0, &0xfee0_0000u32.to_le_bytes(), rec.as_ref());
            t.write(8, &0x22u32.to_le_bytes(), rec.as_ref());
            t.write(12, &0u32.to_le_bytes(), rec.as_ref());
            t.set_control(1 << 15, rec.as_ref());
        }
        assert!(irq.msix_enabled());
        irq.signal(0);
        assert_eq!(
            rec.take(),
            vec![RecordedInterrupt::Msi {
                address: 0xfee0_0000,
                data: 0x22
            }]
        );
    }

    #[test]
    fn intx_disable_gates_the_line() {
        let rec = Arc::new(RecordingInterrupts::default());
        let irq = PciInterrupt::new(rec.clone(), None);
        irq.set_intx_disabled(true);
        irq.signal(3);
        assert_eq!(
            rec.take(),
            vec![RecordedInterrupt::Level {
                line: 0,
                asserted: false
            }]
        );
        assert!(irq.intx_asserted());
        irq.set_intx_disabled(false);
        assert_eq!(
            rec.take(),
            vec![RecordedInterrupt::Level {
                line: 0,
                asserted: true
            }]
        );
    }
}
