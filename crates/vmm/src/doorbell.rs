//! ioeventfd doorbells: KVM absorbs a virtio function's queue-notify writes (`KVM_IOEVENTFD`)
//! and one event-loop thread serves them by calling the function's `bar_write`, the same
//! handler the MMIO-exit path calls. The vCPU that rang does not leave the guest.
//!
//! Registration follows the guest's programming, re-read (side-effect-free config and BAR
//! reads) after every config write and every write to the function's common configuration:
//! the doorbells are registered while the function decodes memory, its BAR is placed and its
//! device status has DRIVER_OK without NEEDS_RESET or FAILED. They move with the BAR and are
//! unregistered on reset (status 0) and when decoding is turned off. Every doorbell KVM does
//! not absorb (before DRIVER_OK, after a refused registration, on a device left out because
//! the injection plan stalls its doorbell) still arrives as an MMIO exit and is counted.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use sluice_devapi::Bdf;
use sluice_pci::PciFunction;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::pci_caps::{CAP_ID_VENDOR, capabilities, cfg_u8, cfg_u16, cfg_u32, memory_bar_base};
use crate::stats::{VmmStats, bump};

const VIRTIO_VENDOR: u16 = 0x1af4;
const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const COMMON_NUM_QUEUES: u64 = 0x12;
const COMMON_DEVICE_STATUS: u64 = 0x14;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
/// Doorbells asked of KVM per function at most: KVM's MMIO bus holds about 1000 devices for
/// the whole VM, and no Sluice device has more queues.
const MAX_QUEUES: u16 = 64;
/// epoll data of the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

/// Where a virtio function's doorbells and common configuration are (virtio 1.x §4.1.4),
/// read from its vendor capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyLayout {
    /// BAR of the notification area.
    pub notify_bar: u8,
    /// Offset of the notification area in that BAR.
    pub notify_offset: u64,
    /// Its length.
    pub notify_length: u64,
    /// `notify_off_multiplier`: bytes between two queues' doorbells (0: one shared address).
    pub multiplier: u32,
    /// BAR of the common configuration.
    pub common_bar: u8,
    /// Offset of the common configuration.
    pub common_offset: u64,
    /// Its length.
    pub common_length: u64,
    /// `num_queues`, capped at [`MAX_QUEUES`].
    pub queues: u16,
}

impl NotifyLayout {
    /// The layout of a virtio function, or `None` for anything else.
    pub fn read(f: &dyn PciFunction) -> Option<NotifyLayout> {
        if cfg_u16(f, 0) != VIRTIO_VENDOR {
            return None;
        }
        let mut notify = None;
        let mut common = None;
        for (cap, _) in capabilities(f)
            .into_iter()
            .filter(|(_, id)| *id == CAP_ID_VENDOR)
        {
            let cap_len = cfg_u8(f, cap + 2);
            let structure = (
                cfg_u8(f, cap + 4),
                u64::from(cfg_u32(f, cap + 8)),
                u64::from(cfg_u32(f, cap + 12)),
            );
            // The first capability of each type is the one a driver uses.
            match cfg_u8(f, cap + 3) {
                CFG_TYPE_NOTIFY if notify.is_none() && cap_len >= 20 => {
                    notify = Some((structure, cfg_u32(f, cap + 16)));
                }
                CFG_TYPE_COMMON if common.is_none() => common = Some(structure),
                _ => {}
            }
        }
        let ((notify_bar, notify_offset, notify_length), multiplier) = notify?;
        let (common_bar, common_offset, common_length) = common?;
        let mut n = [0u8; 2];
        f.bar_read(common_bar, common_offset + COMMON_NUM_QUEUES, &mut n);
        Some(NotifyLayout {
            notify_bar,
            notify_offset,
            notify_length,
            multiplier,
            common_bar,
            common_offset,
            common_length,
            queues: u16::from_le_bytes(n).min(MAX_QUEUES),
        })
    }

    /// Doorbell of `queue`: its offset in the notify BAR and the value KVM must match, needed
    /// only when every queue shares one address (multiplier 0). Assumes `queue_notify_off` =
    /// queue index, which is what Sluice's transport reports (tested below).
    pub fn doorbell(&self, queue: u16) -> Option<(u64, Option<u16>)> {
        if self.multiplier == 0 {
            return Some((self.notify_offset, Some(queue)));
        }
        let rel = u64::from(queue) * u64::from(self.multiplier);
        // The driver writes the 16-bit queue index.
        (rel + 2 <= self.notify_length).then_some((self.notify_offset + rel, None))
    }

    /// True if a write at `offset` of `bar` is a doorbell.
    pub fn in_notify(&self, bar: u8, offset: u64) -> bool {
        bar == self.notify_bar
            && (self.notify_offset..self.notify_offset + self.notify_length).contains(&offset)
    }

    /// True if a write at `offset` of `bar` went to the common configuration.
    pub fn in_common(&self, bar: u8, offset: u64) -> bool {
        bar == self.common_bar
            && (self.common_offset..self.common_offset + self.common_length).contains(&offset)
    }

    /// The device status byte (a plain register read).
    pub fn status(&self, f: &dyn PciFunction) -> u8 {
        let mut s = [0u8; 1];
        f.bar_read(
            self.common_bar,
            self.common_offset + COMMON_DEVICE_STATUS,
            &mut s,
        );
        s[0]
    }

    /// Where the doorbells should be registered now: the BAR base, while the driver runs the
    /// device and the function decodes memory.
    pub fn wanted_base(&self, f: &dyn PciFunction) -> Option<u64> {
        let status = self.status(f);
        let running =
            status & STATUS_DRIVER_OK != 0 && status & (STATUS_NEEDS_RESET | STATUS_FAILED) == 0;
        if running {
            memory_bar_base(f, self.notify_bar)
        } else {
            None
        }
    }
}

/// One queue's doorbell.
struct Doorbell {
    queue: u16,
    offset: u64,
    datamatch: Option<u16>,
    fd: EventFd,
}

/// A function whose doorbells may be absorbed by KVM.
struct Tracked {
    bdf: Bdf,
    function: Arc<dyn PciFunction>,
    layout: NotifyLayout,
    doorbells: Vec<Doorbell>,
    /// BAR base the doorbells are registered at. Held across the re-read and the ioctls so
    /// two vCPUs resyncing one function cannot apply stale readings out of order.
    registered_at: Mutex<Option<u64>>,
}

/// Every virtio function's doorbells, their KVM registrations and the serving loop's fds.
pub struct DoorbellSet {
    vm: Arc<VmFd>,
    tracked: Vec<Tracked>,
    stats: Arc<VmmStats>,
}

impl DoorbellSet {
    /// An empty set registering with `vm`.
    pub fn new(vm: Arc<VmFd>, stats: Arc<VmmStats>) -> Self {
        DoorbellSet {
            vm,
            tracked: Vec::new(),
            stats,
        }
    }

    /// Tracks `function` if it is a virtio function; `absorb` false keeps all its doorbells on
    /// the MMIO-exit path (only counted). Returns whether its doorbells may be absorbed.
    pub fn track(
        &mut self,
        bdf: Bdf,
        function: Arc<dyn PciFunction>,
        absorb: bool,
    ) -> std::io::Result<bool> {
        let Some(layout) = NotifyLayout::read(function.as_ref()) else {
            return Ok(false);
        };
        let mut doorbells = Vec::new();
        if absorb {
            for queue in 0..layout.queues {
                if let Some((offset, datamatch)) = layout.doorbell(queue) {
                    doorbells.push(Doorbell {
                        queue,
                        offset,
                        datamatch,
                        fd: EventFd::new(libc::EFD_NONBLOCK)?,
                    });
                }
            }
        }
        self.tracked.push(Tracked {
            bdf,
            function,
            layout,
            doorbells,
            registered_at: Mutex::new(None),
        });
        Ok(absorb)
    }

    /// Number of doorbells that can be absorbed.
    pub fn len(&self) -> usize {
        self.tracked.iter().map(|t| t.doorbells.len()).sum()
    }

    /// The guest wrote configuration space of `bdf`: decoding or the BAR may have changed.
    pub fn config_written(&self, bdf: Bdf) {
        if let Some(t) = self.tracked.iter().find(|t| t.bdf == bdf) {
            self.resync(t);
        }
    }

    /// The guest wrote a BAR of `bdf` through an exit: counts doorbells that were not absorbed
    /// and follows status changes.
    pub fn bar_written(&self, bdf: Bdf, bar: u8, offset: u64) {
        let Some(t) = self.tracked.iter().find(|t| t.bdf == bdf) else {
            return;
        };
        if t.layout.in_notify(bar, offset) {
            bump(&self.stats.doorbell_exits);
        } else if t.layout.in_common(bar, offset) {
            self.resync(t);
        }
    }

    /// Where `bdf`'s doorbells are registered (their BAR base), if they are.
    #[cfg(test)]
    pub fn registered_at(&self, bdf: Bdf) -> Option<u64> {
        let t = self.tracked.iter().find(|t| t.bdf == bdf)?;
        *t.registered_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads every function (after the VMM placed the BARs itself).
    pub fn resync_all(&self) {
        self.tracked.iter().for_each(|t| self.resync(t));
    }

    fn resync(&self, t: &Tracked) {
        if t.doorbells.is_empty() {
            return;
        }
        let mut at = t.registered_at.lock().unwrap_or_else(|p| p.into_inner());
        let want = t.layout.wanted_base(t.function.as_ref());
        if *at == want {
            return;
        }
        if let Some(old) = at.take() {
            for d in &t.doorbells {
                if let Err(e) = self.unregister(d, old) {
                    self.refused(|| {
                        format!("{}: KVM_IOEVENTFD unregister of q{}: {e}", t.bdf, d.queue)
                    });
                }
            }
            log::debug!("{}: doorbells unregistered from {old:#x}", t.bdf);
        }
        let Some(base) = want else { return };
        for (i, d) in t.doorbells.iter().enumerate() {
            if let Err(e) = self.register(d, base) {
                self.refused(|| {
                    format!(
                        "{}: KVM_IOEVENTFD for q{} at {:#x} refused ({e}); its doorbells stay \
                         MMIO exits",
                        t.bdf,
                        d.queue,
                        base + d.offset
                    )
                });
                for done in t.doorbells.iter().take(i) {
                    let _ = self.unregister(done, base);
                }
                return;
            }
        }
        bump(&self.stats.ioeventfd_registrations);
        log::debug!(
            "{}: {} doorbells registered at {:#x}",
            t.bdf,
            t.doorbells.len(),
            base + t.layout.notify_offset
        );
        *at = Some(base);
    }

    /// Counts a refused ioctl; logs only the first few (the guest decides how often it
    /// moves BARs, e.g. onto another function's doorbells).
    fn refused(&self, what: impl FnOnce() -> String) {
        const LOGGED: u64 = 8;
        if self
            .stats
            .ioeventfd_failures
            .fetch_add(1, Ordering::Relaxed)
            < LOGGED
        {
            log::warn!("{}", what());
        }
    }

    fn register(&self, d: &Doorbell, base: u64) -> Result<(), kvm_ioctls::Error> {
        let addr = IoEventAddress::Mmio(base + d.offset);
        match d.datamatch {
            Some(v) => self.vm.register_ioevent(&d.fd, &addr, v),
            None => self.vm.register_ioevent(&d.fd, &addr, NoDatamatch),
        }
    }

    fn unregister(&self, d: &Doorbell, base: u64) -> Result<(), kvm_ioctls::Error> {
        let addr = IoEventAddress::Mmio(base + d.offset);
        match d.datamatch {
            Some(v) => self.vm.unregister_ioevent(&d.fd, &addr, v),
            None => self.vm.unregister_ioevent(&d.fd, &addr, NoDatamatch),
        }
    }

    /// Serves every absorbed doorbell until `stop` is signalled: each eventfd wake-up becomes
    /// one `bar_write` of the queue index to the doorbell, exactly what the exit path does.
    pub fn serve(&self, stop: &EventFd, running: &AtomicBool) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        let mut flat = Vec::new();
        for t in &self.tracked {
            for d in &t.doorbells {
                epoll.ctl(
                    ControlOperation::Add,
                    d.fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, flat.len() as u64),
                )?;
                flat.push((t, d));
            }
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let mut events = vec![EpollEvent::default(); flat.len() + 1];
        while running.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in events.iter().take(n) {
                let Some((t, d)) = usize::try_from(ev.data()).ok().and_then(|i| flat.get(i)) else {
                    return Ok(()); // the stop eventfd
                };
                if d.fd.read().is_err() {
                    continue; // already drained
                }
                bump(&self.stats.doorbell_eventfds);
                t.function
                    .bar_write(t.layout.notify_bar, d.offset, &d.queue.to_le_bytes());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::virtio_blk;

    #[test]
    fn layout_of_the_device_host_transport() {
        let (f, dir) = virtio_blk("layout", 4);
        let l = NotifyLayout::read(f.as_ref()).unwrap();
        assert_eq!(
            (l.notify_bar, l.notify_offset, l.multiplier),
            (0, 0x3000, 4)
        );
        assert_eq!((l.common_bar, l.common_offset), (0, 0));
        assert_eq!(l.queues, 1, "virtio-blk has one request queue");
        assert_eq!(l.doorbell(0), Some((0x3000, None)));
        assert!(l.in_notify(0, 0x3000) && !l.in_notify(1, 0x3000) && !l.in_notify(0, 0x2fff));
        assert!(l.in_common(0, 0x14) && !l.in_common(0, 0x3000));
        // The doorbell address assumes queue_notify_off = queue index: check the transport.
        f.bar_write(0, 0x16, &0u16.to_le_bytes()); // queue_select
        let mut off = [0u8; 2];
        f.bar_read(0, 0x1e, &mut off); // queue_notify_off
        assert_eq!(u16::from_le_bytes(off), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn doorbell_addresses_and_datamatch() {
        let mut l = NotifyLayout {
            notify_bar: 0,
            notify_offset: 0x3000,
            notify_length: 0x10,
            multiplier: 4,
            common_bar: 0,
            common_offset: 0,
            common_length: 0x1000,
            queues: 8,
        };
        assert_eq!(l.doorbell(3), Some((0x300c, None)));
        assert_eq!(l.doorbell(4), None, "beyond the notify area");
        l.multiplier = 0;
        assert_eq!(l.doorbell(3), Some((0x3000, Some(3))), "shared address");
    }

    #[test]
    fn registration_wants_decoding_a_placed_bar_and_driver_ok() {
        let (f, dir) = virtio_blk("wanted", 4);
        let l = NotifyLayout::read(f.as_ref()).unwrap();
        crate::testing::drive_to_driver_ok(f.as_ref());
        assert_eq!(l.status(f.as_ref()), 0x0f);
        assert_eq!(
            l.wanted_base(f.as_ref()),
            None,
            "BAR not placed, decoding off"
        );
        f.config_write(0x10, &0xc000_4000u32.to_le_bytes());
        assert_eq!(l.wanted_base(f.as_ref()), None, "decoding off");
        f.config_write(0x04, &sluice_pci::config::CMD_MEMORY.to_le_bytes());
        assert_eq!(l.wanted_base(f.as_ref()), Some(0xc000_4000));
        f.config_write(0x10, &0xc000_8000u32.to_le_bytes());
        assert_eq!(l.wanted_base(f.as_ref()), Some(0xc000_8000), "BAR moved");
        f.bar_write(0, COMMON_DEVICE_STATUS, &[0]);
        assert_eq!(l.wanted_base(f.as_ref()), None, "reset");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Against a real VM: registration follows BAR placement, moves and reset (re-registering
    /// an address proves the unregistration reached KVM, which refuses duplicates), and an
    /// eventfd signal becomes a doorbell on the serving thread.
    #[test]
    fn registrations_follow_the_guest_and_eventfds_are_served() {
        let Some(vm) = crate::testing::vm_or_skip() else {
            return;
        };
        let (f, dir) = virtio_blk("kvm-doorbells", 4);
        let stats = Arc::new(VmmStats::default());
        let bdf = Bdf::new(0, 3, 0);
        let mut set = DoorbellSet::new(vm, stats.clone());
        assert!(set.track(bdf, f.clone(), true).unwrap());
        assert_eq!(set.len(), 1);
        let set = Arc::new(set);
        let place = |base: u32| {
            f.config_write(0x10, &base.to_le_bytes());
            set.config_written(bdf);
        };
        f.config_write(0x04, &sluice_pci::config::CMD_MEMORY.to_le_bytes());
        place(0xc000_0000);
        assert_eq!(set.registered_at(bdf), None, "driver not ready");
        crate::testing::drive_to_driver_ok(f.as_ref());
        set.bar_written(bdf, 0, COMMON_DEVICE_STATUS);
        assert_eq!(set.registered_at(bdf), Some(0xc000_0000));
        place(0xc000_4000);
        assert_eq!(set.registered_at(bdf), Some(0xc000_4000), "moved");
        place(0xc000_0000);
        assert_eq!(
            set.registered_at(bdf),
            Some(0xc000_0000),
            "back: old one was removed"
        );
        set.bar_written(bdf, 0, 0x3000);
        assert_eq!(
            stats.snapshot().doorbell_exits,
            1,
            "an exit doorbell is counted"
        );

        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let server = {
            let (set, stop, running) = (set.clone(), stop.try_clone().unwrap(), running.clone());
            std::thread::spawn(move || set.serve(&stop, &running))
        };
        set.tracked[0].doorbells[0].fd.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while stats.snapshot().doorbell_eventfds == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        running.store(false, Ordering::Release);
        stop.write(1).unwrap();
        server.join().unwrap().unwrap();
        assert_eq!(stats.snapshot().doorbell_eventfds, 1);

        f.bar_write(0, COMMON_DEVICE_STATUS, &[0]);
        set.bar_written(bdf, 0, COMMON_DEVICE_STATUS);
        assert_eq!(set.registered_at(bdf), None, "reset unregisters");
        let s = stats.snapshot();
        assert_eq!((s.ioeventfd_registrations, s.ioeventfd_failures), (3, 0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Two functions whose BARs the guest put at one address: KVM refuses the second set of
    /// doorbells (the address is taken), which then stays on the exit path.
    #[test]
    fn a_refused_registration_leaves_the_exit_path() {
        let Some(vm) = crate::testing::vm_or_skip() else {
            return;
        };
        let (a, dir_a) = virtio_blk("kvm-clash-a", 0);
        let (b, dir_b) = virtio_blk("kvm-clash-b", 0);
        let stats = Arc::new(VmmStats::default());
        let mut set = DoorbellSet::new(vm, stats.clone());
        let (bdf_a, bdf_b) = (Bdf::new(0, 3, 0), Bdf::new(0, 4, 0));
        set.track(bdf_a, a.clone(), true).unwrap();
        set.track(bdf_b, b.clone(), true).unwrap();
        for f in [&a, &b] {
            f.config_write(0x10, &0xc000_0000u32.to_le_bytes());
            f.config_write(0x04, &sluice_pci::config::CMD_MEMORY.to_le_bytes());
            crate::testing::drive_to_driver_ok(f.as_ref());
        }
        set.resync_all();
        assert_eq!(set.registered_at(bdf_a), Some(0xc000_0000));
        assert_eq!(set.registered_at(bdf_b), None, "refused: exits");
        let s = stats.snapshot();
        assert_eq!((s.ioeventfd_registrations, s.ioeventfd_failures), (1, 1));
        std::fs::remove_dir_all(dir_a).unwrap();
        std::fs::remove_dir_all(dir_b).unwrap();
    }
}
