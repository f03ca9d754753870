//! INTx plumbing: irqfds with resamplefds (the contract [`sluice_host::IntxRelay`] was written
//! for). MSI-X is in [`crate::msi_routes`].

use kvm_ioctls::VmFd;
use sluice_host::IntxRelay;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

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
