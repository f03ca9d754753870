//! Wiring of the two KVM fast paths for devices, ioeventfd doorbells ([`crate::doorbell`]) and
//! irqfd MSI routes ([`crate::msi_routes`]): which functions get them, the bus observer that
//! keeps them in step with the guest's programming, and the doorbell loop thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use sluice_devapi::Bdf;
use sluice_host::HostedDevice;
use sluice_inject::Injector;
use vmm_sys_util::eventfd::EventFd;

use crate::doorbell::DoorbellSet;
use crate::msi_routes::MsiRouter;
use crate::pci::BusObserver;

/// Points a device reaches synchronously inside a doorbell write, on the thread that wrote it:
/// its `virtio.<dev>.notify`, and for virtio-iommu (requests answered inline, the default) the
/// completion of every request type.
pub fn doorbell_points(device: &HostedDevice) -> Vec<String> {
    let mut v = vec![sluice_virtio_pci::points::notify(&device.name)];
    if device.kind == "virtio-iommu" {
        v.extend(
            [
                sluice_virtio_iommu::POINT_ATTACH,
                sluice_virtio_iommu::POINT_DETACH,
                sluice_virtio_iommu::POINT_MAP,
                sluice_virtio_iommu::POINT_UNMAP,
                sluice_virtio_iommu::POINT_PROBE,
            ]
            .map(String::from),
        );
    }
    v
}

/// The injection rules that need `device`'s doorbells to stay MMIO exits: a stall at one of
/// its [`doorbell_points`] must hold the vCPU that rang, which only an exit can do (with an
/// ioeventfd the vCPU runs on and the doorbell loop would stall instead, holding every other
/// device's doorbells too). Defer rules are included: deciding them on the loop thread would
/// be harmless, but keeping one rule of a point on one path keeps the plan's semantics simple.
pub fn rules_needing_exits(injector: &Injector, device: &HostedDevice) -> Vec<String> {
    let points = doorbell_points(device);
    injector
        .rules()
        .filter(|r| points.contains(&r.spec.point))
        .map(|r| r.spec.text.clone())
        .collect()
}

/// Follows guest writes into the doorbell registrations and MSI routes.
pub struct Followers {
    /// ioeventfd doorbells.
    pub doorbells: Arc<DoorbellSet>,
    /// MSI routes.
    pub msi: Arc<MsiRouter>,
}

impl BusObserver for Followers {
    fn config_written(&self, bdf: Bdf) {
        self.doorbells.config_written(bdf);
        self.msi.config_written(bdf);
    }

    fn bar_written(&self, bdf: Bdf, bar: u8, offset: u64) {
        self.doorbells.bar_written(bdf, bar, offset);
        self.msi.bar_written(bdf, bar, offset);
    }
}

/// The thread serving absorbed doorbells.
pub struct DoorbellLoop {
    stop: EventFd,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DoorbellLoop {
    /// Starts serving `set` (no thread when it has no doorbells).
    pub fn start(set: Arc<DoorbellSet>) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let running = Arc::new(AtomicBool::new(true));
        let thread = if set.len() == 0 {
            None
        } else {
            let (s, r) = (stop.try_clone()?, running.clone());
            Some(
                std::thread::Builder::new()
                    .name("doorbells".into())
                    .spawn(move || {
                        if let Err(e) = set.serve(&s, &r) {
                            log::error!("doorbell loop ended: {e}; doorbells are lost");
                        }
                    })?,
            )
        };
        Ok(DoorbellLoop {
            stop,
            running,
            thread,
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.running.store(false, Ordering::Release);
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
