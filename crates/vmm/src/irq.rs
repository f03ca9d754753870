//! Interrupt plumbing: MSI through `KVM_SIGNAL_MSI`, INTx through irqfds with resamplefds
//! (the contract [`sluice_host::IntxRelay`] was written for).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use sluice_host::{IntxRelay, MsiDelivery};
use vmm_sys_util::eventfd::EventFd;

/// Delivers MSI messages with `KVM_SIGNAL_MSI` (the in-kernel LAPICs decode address/data).
pub struct KvmMsi {
    vm: Arc<VmFd>,
    failed: AtomicU64,
}

impl KvmMsi {
    /// For `vm`, which must already have its in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmMsi {
            vm,
            failed: AtomicU64::new(0),
        }
    }

    /// Messages KVM refused.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl MsiDelivery for KvmMsi {
    fn deliver(&self, address: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            let n = self.failed.fetch_add(1, Ordering::Relaxed);
            if n < 8 {
                log::warn!("KVM_SIGNAL_MSI {address:#x}={data:#x} failed: {e}");
            }
        }
    }
}

/// Resample eventfds of level-triggered INTx lines and the relays to re-assert.
pub struct ResampleSet {
    lines: Vec<(EventFd, Arc<IntxRelay>)>,
    stop: EventFd,
}

impl ResampleSet {
    /// An empty set; `stop()` ends [`ResampleSet::run`].
    pub fn new() -> std::io::Result<Self> {
        Ok(ResampleSet {
            lines: Vec::new(),
            stop: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Wires `relay` to GSI `gsi` of `vm`: irqfd + resamplefd.
    pub fn connect(
        &mut self,
        vm: &VmFd,
        relay: Arc<IntxRelay>,
        gsi: u32,
    ) -> Result<(), crate::VmmError> {
        let io = |e: std::io::Error| crate::VmmError::Io("INTx eventfd", e);
        let intr = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        vm.register_irqfd_with_resample(&intr, &resample, gsi)
            .map_err(|e| crate::VmmError::Kvm("KVM_IRQFD (resample)", e))?;
        relay.connect(intr.try_clone().map_err(io)?);
        // The irqfd keeps its own reference to the eventfd; ours can go.
        drop(intr);
        self.lines.push((resample, relay));
        Ok(())
    }

    /// A handle that ends `run`.
    pub fn stopper(&self) -> std::io::Result<EventFd> {
        self.stop.try_clone()
    }

    /// Waits for resample events until stopped: after the guest's EOI, re-asserts lines the
    /// device still holds high.
    pub fn run(self) {
        let mut fds: Vec<libc::pollfd> = self
            .lines
            .iter()
            .map(|(fd, _)| fd.as_raw_fd())
            .chain(std::iter::once(self.stop.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            // SAFETY: `fds` is a valid array of pollfd for its whole length, and every
            // descriptor in it is owned by `self`, which outlives the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            for (i, p) in fds.iter_mut().enumerate() {
                if p.revents == 0 {
                    continue;
                }
                p.revents = 0;
                match self.lines.get(i) {
                    Some((fd, relay)) => {
                        let _ = fd.read();
                        relay.resample();
                    }
                    None => return,
                }
            }
        }
    }
}
