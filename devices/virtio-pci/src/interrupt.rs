//! Used-buffer and configuration-change notifications, and the ISR status they set.

use std::sync::Mutex;

use sluice_pci::PciInterrupt;

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 0x1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 0x2;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Interrupt side of the transport, shared with device workers.
pub struct VirtioInterrupt {
    irq: PciInterrupt,
    /// ISR bits, guarded together with the INTx level so a completion racing with the guest's
    /// ISR read can never be lost.
    isr: Mutex<u8>,
    vectors: Mutex<Vec<u16>>,
    config_vector: Mutex<u16>,
}

impl VirtioInterrupt {
    /// Wraps a PCI function's interrupt router for `queues` queues.
    pub fn new(irq: PciInterrupt, queues: usize) -> Self {
        VirtioInterrupt {
            irq,
            isr: Mutex::new(0),
            vectors: Mutex::new(vec![NO_VECTOR; queues]),
            config_vector: Mutex::new(NO_VECTOR),
        }
    }

    fn raise(&self, bit: u8, vector: u16) {
        let mut isr = self.isr.lock().unwrap_or_else(|p| p.into_inner());
        if self.irq.msix_enabled() && vector != NO_VECTOR {
            drop(isr);
            self.irq.signal(vector);
            return;
        }
        *isr |= bit;
        self.irq.set_intx(true);
    }

    /// Signals used buffers on `queue`.
    pub fn signal_queue(&self, queue: u16) {
        let vector = self
            .vectors
            .lock()
            .map(|v| v.get(usize::from(queue)).copied().unwrap_or(NO_VECTOR))
            .unwrap_or(NO_VECTOR);
        self.raise(ISR_QUEUE, vector);
    }

    /// Signals a configuration change.
    pub fn signal_config(&self) {
        let vector = self.config_vector.lock().map(|v| *v).unwrap_or(NO_VECTOR);
        self.raise(ISR_CONFIG, vector);
    }

    /// The guest read the ISR: returns and clears it, and drops INTx.
    pub fn read_isr(&self) -> u8 {
        let mut isr = self.isr.lock().unwrap_or_else(|p| p.into_inner());
        let v = *isr;
        *isr = 0;
        self.irq.set_intx(false);
        v
    }

    /// Current INTx request (for a backend's resample: re-signal while still asserted).
    pub fn intx_pending(&self) -> bool {
        self.irq.intx_asserted()
    }

    /// The PCI interrupt router.
    pub fn pci(&self) -> &PciInterrupt {
        &self.irq
    }

    pub(crate) fn set_queue_vector(&self, queue: u16, vector: u16) {
        if let Ok(mut v) = self.vectors.lock()
            && let Some(slot) = v.get_mut(usize::from(queue))
        {
            *slot = vector;
        }
    }

    pub(crate) fn set_config_vector(&self, vector: u16) {
        if let Ok(mut v) = self.config_vector.lock() {
            *v = vector;
        }
    }

    pub(crate) fn reset(&self) {
        *self.isr.lock().unwrap_or_else(|p| p.into_inner()) = 0;
        self.irq.set_intx(false);
        if let Ok(mut v) = self.vectors.lock() {
            v.iter_mut().for_each(|x| *x = NO_VECTOR);
        }
        self.set_config_vector(NO_VECTOR);
    }
}
