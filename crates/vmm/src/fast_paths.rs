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

/// The injection rules that need `device`'s doorbells to stay MMIO exits: a stall at one of its
/// doorbell points (`sluice_host::points::doorbell_points`, as its models declare them) must
/// hold the vCPU that rang, which only an exit can do (with an
/// ioeventfd the vCPU runs on and the doorbell loop would stall instead, holding every other
/// device's doorbells too). Defer rules are included: deciding them on the loop thread would
/// be harmless, but keeping one rule of a point on one path keeps the plan's semantics simple.
pub fn rules_needing_exits(injector: &Injector, device: &HostedDevice) -> Vec<String> {
    let points = sluice_host::points::doorbell_points(device);
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

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_host::{DeviceSet, DiskSpec, HostOptions, IommuChoice};
    use sluice_inject::Plan;

    fn injector(rules: &str) -> Injector {
        let reg = sluice_host::points::with_run_devices(sluice_host::points::all_models(), 1, true);
        Injector::new(reg.validate(&Plan::parse_cli(rules).unwrap()).unwrap())
    }

    #[test]
    fn rules_inside_a_doorbell_write_keep_that_device_on_exits() {
        let (_, dir) = crate::testing::blk_set("rules", 0);
        let disk = DiskSpec {
            path: dir.join("d.img"),
            read_only: false,
            iommu: true,
        };
        let disks = [disk];
        let opts =
            HostOptions::default().with_iommu(&IommuChoice::Virtio(Default::default()), &disks);
        let set = DeviceSet::with_options(&disks, Arc::new(sluice_devapi::NoHooks), &opts).unwrap();
        let (viommu, blk) = (&set.devices[0], &set.devices[1]);
        assert_eq!((viommu.kind, blk.name.as_str()), ("virtio-iommu", "blk0"));

        let notify = injector("virtio.blk0.notify:delay=1ms,count=1");
        assert_eq!(rules_needing_exits(&notify, blk).len(), 1);
        assert!(rules_needing_exits(&notify, viommu).is_empty());

        // virtio-iommu answers requests inside the doorbell write (stall or defer alike).
        let attach = injector(
            "virtio-iommu.req.attach:delay=1ms,count=1;\
             virtio-iommu.req.map:delay=1ms,count=1,mode=defer",
        );
        assert_eq!(rules_needing_exits(&attach, viommu).len(), 2);
        assert!(rules_needing_exits(&attach, blk).is_empty());

        // Points reached elsewhere leave the fast path alone.
        let elsewhere = injector(
            "virtio.blk0.complete:delay=1ms,count=1,mode=defer;\
             virtio.blk0.status:delay=1ms,count=1;virtio-iommu.config.write:delay=1ms,count=1",
        );
        assert!(rules_needing_exits(&elsewhere, blk).is_empty());
        assert!(rules_needing_exits(&elsewhere, viommu).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
