//! A level-triggered INTx line carried over an eventfd pair, the way both QEMU's proxy
//! (`SET_IRQFD`) and KVM's irqfd with resamplefd deliver it: a write to `intr` asserts the
//! line; after the guest's EOI the other side deasserts it and signals `resample`, and we
//! re-assert if the device still holds the level high.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sluice_devapi::InterruptSink;
use vmm_sys_util::eventfd::EventFd;

/// Where a backend delivers message-signalled interrupts (the kvm backend: KVM_SIGNAL_MSI or an
/// irqfd route). The qemu backend has none: QEMU's proxy carries INTx only.
pub trait MsiDelivery: Send + Sync {
    /// Delivers one message.
    fn deliver(&self, address: u64, data: u32);
}

/// The interrupt lines of one function: INTx over an eventfd pair, and MSI through the
/// backend's [`MsiDelivery`] when it has one.
#[derive(Default)]
pub struct IntxRelay {
    level: AtomicBool,
    intr: Mutex<Option<EventFd>>,
    raised: AtomicU64,
    msi_sent: AtomicU64,
    dropped_msi: AtomicU64,
    msi: Option<std::sync::Arc<dyn MsiDelivery>>,
}

impl IntxRelay {
    /// A relay that also delivers MSI messages through `msi`.
    pub fn with_msi(msi: std::sync::Arc<dyn MsiDelivery>) -> Self {
        IntxRelay {
            msi: Some(msi),
            ..Default::default()
        }
    }

    /// MSI messages delivered.
    pub fn msi_sent(&self) -> u64 {
        self.msi_sent.load(Ordering::Relaxed)
    }

    /// Connects the raise eventfd (replacing an earlier one). If the line is already high the
    /// new eventfd is signalled at once so no interrupt is lost across a reconnect.
    pub fn connect(&self, intr: EventFd) {
        let mut slot = self.intr.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(intr);
        if self.level.load(Ordering::Acquire) {
            Self::kick(slot.as_ref());
        }
    }

    /// The guest acknowledged the interrupt: re-assert while the device still wants it.
    pub fn resample(&self) {
        if self.level.load(Ordering::Acquire) {
            let slot = self.intr.lock().unwrap_or_else(|p| p.into_inner());
            Self::kick(slot.as_ref());
        }
    }

    fn kick(fd: Option<&EventFd>) {
        if let Some(fd) = fd
            && let Err(e) = fd.write(1)
        {
            log::error!("INTx eventfd write failed: {e}");
        }
    }

    /// Times the line was raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// Current level.
    pub fn level(&self) -> bool {
        self.level.load(Ordering::Acquire)
    }

    /// MSI messages this INTx-only path could not deliver.
    pub fn dropped_msi(&self) -> u64 {
        self.dropped_msi.load(Ordering::Relaxed)
    }
}

impl InterruptSink for IntxRelay {
    fn set_level(&self, _line: u32, asserted: bool) {
        self.level.store(asserted, Ordering::Release);
        if asserted {
            self.raised.fetch_add(1, Ordering::Relaxed);
            let slot = self.intr.lock().unwrap_or_else(|p| p.into_inner());
            Self::kick(slot.as_ref());
        }
    }

    fn msi(&self, address: u64, data: u32) {
        match &self.msi {
            Some(m) => {
                self.msi_sent.fetch_add(1, Ordering::Relaxed);
                m.deliver(address, data);
            }
            None => {
                self.dropped_msi.fetch_add(1, Ordering::Relaxed);
                log::warn!("INTx-only function asked for MSI {address:#x}={data:#x}; dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn raise_resample_and_reconnect() {
        let relay = IntxRelay::default();
        relay.set_level(0, true);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        relay.connect(fd.try_clone().unwrap());
        assert_eq!(fd.read().unwrap(), 1, "level was high before connect");
        relay.resample();
        assert_eq!(fd.read().unwrap(), 1, "still high: re-asserted");
        relay.set_level(0, false);
        relay.resample();
        assert!(fd.read().is_err(), "low: nothing to re-assert");
        relay.set_level(0, true);
        assert_eq!(fd.read().unwrap(), 1);
        assert_eq!(relay.raised(), 2);
        relay.msi(0xfee0_0000, 1);
        assert_eq!(relay.dropped_msi(), 1);
    }

    #[test]
    fn msi_goes_to_the_backend_when_it_has_a_path() {
        #[derive(Default)]
        struct Rec(Mutex<Vec<(u64, u32)>>);
        impl MsiDelivery for Rec {
            fn deliver(&self, address: u64, data: u32) {
                self.0.lock().unwrap().push((address, data));
            }
        }
        let rec = std::sync::Arc::new(Rec::default());
        let relay = IntxRelay::with_msi(rec.clone());
        relay.msi(0xfee0_1000, 0x41);
        assert_eq!(*rec.0.lock().unwrap(), vec![(0xfee0_1000, 0x41)]);
        assert_eq!((relay.msi_sent(), relay.dropped_msi()), (1, 0));
    }
}
