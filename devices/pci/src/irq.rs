//! Interrupt routing of one PCI function: MSI-X when enabled, INTx otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sluice_devapi::InterruptSink;

use crate::msix::MsixTable;

/// INTx is wired line 0 of the function's sink.
pub const INTX_LINE: u32 = 0;

/// Delivers MSI-X vectors for a function whose MSI-X table is emulated outside it (QEMU's
/// patched proxy keeps the table and PBA and applies the guest's masking; the function only
/// says which vector fired).
pub trait VectorRelay: Send + Sync {
    /// Fires `vector`. False if the relay has no such vector (nothing is delivered).
    fn signal(&self, vector: u16) -> bool;
}

/// Routes a function's interrupt requests. Devices call [`PciInterrupt::signal`] with a vector
/// and never learn whether it became a message or a level.
pub struct PciInterrupt {
    sink: Arc<dyn InterruptSink>,
    msix: Option<Arc<Mutex<MsixTable>>>,
    relay: RwLock<Option<Arc<dyn VectorRelay>>>,
    relay_refused: AtomicU64,
    intx_asserted: AtomicBool,
    intx_disabled: AtomicBool,
}

impl PciInterrupt {
    /// A router delivering to `sink`, with an optional MSI-X table.
    pub fn new(sink: Arc<dyn InterruptSink>, msix: Option<Arc<Mutex<MsixTable>>>) -> Self {
        PciInterrupt {
            sink,
            msix,
            relay: RwLock::new(None),
            relay_refused: AtomicU64::new(0),
            intx_asserted: AtomicBool::new(false),
            intx_disabled: AtomicBool::new(false),
        }
    }

    /// The sink, for MSI-X table writes that may deliver pending messages.
    pub fn sink(&self) -> &dyn InterruptSink {
        self.sink.as_ref()
    }

    /// Hands MSI-X delivery to `relay` (or takes it back with `None`). Only a function with an
    /// MSI-X capability takes one; returns whether it did. While a relay is set and the guest
    /// has MSI-X enabled, vectors go to the relay and this function's own table is not used
    /// (the guest programs the relay owner's table instead).
    pub fn set_relay(&self, relay: Option<Arc<dyn VectorRelay>>) -> bool {
        if self.msix.is_none() {
            return false;
        }
        *self.relay.write().unwrap_or_else(|p| p.into_inner()) = relay;
        true
    }

    /// Vectors the relay had no eventfd for (dropped: with MSI-X enabled there is no INTx).
    pub fn relay_refused(&self) -> u64 {
        self.relay_refused.load(Ordering::Relaxed)
    }

    /// Requests interrupt `vector`: an MSI-X message if the guest enabled MSI-X, else INTx.
    pub fn signal(&self, vector: u16) {
        let relay = self.relay.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(relay) = relay
            && self.msix_enabled()
        {
            if !relay.signal(vector) {
                self.relay_refused.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
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

    struct Relay(Mutex<Vec<u16>>, u16);

    impl VectorRelay for Relay {
        fn signal(&self, vector: u16) -> bool {
            if vector >= self.1 {
                return false;
            }
            self.0.lock().unwrap().push(vector);
            true
        }
    }

    #[test]
    fn relay_takes_vectors_while_msix_is_enabled_and_refuses_unknown_ones() {
        let rec = Arc::new(RecordingInterrupts::default());
        let table = Arc::new(Mutex::new(MsixTable::new(2, 1, 0, 0x800)));
        let irq = PciInterrupt::new(rec.clone(), Some(table.clone()));
        let relay = Arc::new(Relay(Mutex::new(Vec::new()), 2));
        assert!(irq.set_relay(Some(relay.clone())));
        // MSI-X off (pci=nomsi, or before the driver enables it): INTx as before.
        irq.signal(0);
        assert_eq!(rec.take().len(), 1);
        irq.set_intx(false);
        rec.take();
        // Enabled: the relay gets it, even though this function's own table is all masked.
        table.lock().unwrap().set_control(1 << 15, rec.as_ref());
        irq.signal(1);
        assert_eq!(*relay.0.lock().unwrap(), vec![1]);
        assert!(rec.take().is_empty());
        // A garbage vector is dropped and counted, never an INTx behind MSI-X's back.
        irq.signal(0xfffe);
        assert!(rec.take().is_empty());
        assert_eq!(irq.relay_refused(), 1);
        // Without MSI-X a function takes no relay.
        let plain = PciInterrupt::new(rec.clone(), None);
        assert!(!plain.set_relay(Some(relay)));
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
