//! Transport tests driven the way Linux's virtio_pci_modern drives a device.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sluice_devapi::{Bdf, Hooks, NoHooks, RecordedInterrupt, RecordingHooks, RecordingInterrupts};
use sluice_pci::PciFunction;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::common::reg;
use crate::status::*;
use crate::*;

#[derive(Default)]
struct Probe {
    activated: Mutex<Option<(u64, Vec<u16>)>>,
    notified: AtomicU32,
    resets: AtomicU32,
    /// Whether the device waits on its doorbell eventfds itself.
    waits: AtomicBool,
    /// The doorbell eventfds of the last activation.
    queue_events: Mutex<Vec<QueueEvent>>,
}

struct Dummy(Arc<Probe>, Option<Arc<VirtioInterrupt>>);

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u16 {
        2
    }
    fn name(&self) -> &str {
        "dummy0"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        1 << 9
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (offset as u8).wrapping_add(i as u8));
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        *self.0.activated.lock().unwrap() = Some((
            ctx.acked_features,
            ctx.queues.iter().map(|(i, _)| *i).collect(),
        ));
        self.1 = Some(ctx.interrupt);
        *self.0.queue_events.lock().unwrap() = ctx.queue_events;
        Ok(())
    }
    fn waits_on_queue_events(&self) -> bool {
        self.0.waits.load(Ordering::SeqCst)
    }
    fn queue_notify(&self, _queue: u16) {
        self.0.notified.fetch_add(1, Ordering::SeqCst);
        if let Some(i) = &self.1 {
            i.signal_queue(0);
        }
    }
    fn reset(&mut self) {
        self.1 = None;
        self.0.resets.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    f: VirtioPciFunction,
    probe: Arc<Probe>,
    irq: Arc<RecordingInterrupts>,
}

fn rig(access_platform: bool) -> Rig {
    rig_with_hooks(access_platform, Arc::new(NoHooks))
}

fn rig_with_hooks(access_platform: bool, hooks: Arc<dyn Hooks>) -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let probe = Arc::new(Probe::default());
    let irq = Arc::new(RecordingInterrupts::default());
    let f = VirtioPciFunction::new(
        Box::new(Dummy(probe.clone(), None)),
        TransportOptions {
            bdf: Bdf::new(0, 2, 0),
            access_platform,
            msix_vectors: 0,
            class_code: 0x010000,
            iommu: None,
        },
        SharedMemory::new(mem),
        irq.clone(),
        hooks,
    )
    .unwrap();
    f.config_write(0x10, &0xfe00_0000u32.to_le_bytes());
    f.config_write(0x04, &0x6u16.to_le_bytes());
    Rig { f, probe, irq }
}

fn w(f: &VirtioPciFunction, off: u64, size: usize, v: u64) {
    f.bar_write(0, off, &v.to_le_bytes()[..size]);
}

fn r(f: &VirtioPciFunction, off: u64, size: usize) -> u64 {
    let mut b = vec![0u8; size];
    f.bar_read(0, off, &mut b);
    sluice_pci::le_value(&b)
}

fn negotiate(f: &VirtioPciFunction, features: u64) -> u8 {
    w(f, reg::DEVICE_STATUS, 1, 0);
    w(f, reg::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE));
    w(f, reg::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
    w(f, reg::DRIVER_FEATURE_SELECT, 4, 0);
    w(f, reg::DRIVER_FEATURE, 4, features & 0xffff_ffff);
    w(f, reg::DRIVER_FEATURE_SELECT, 4, 1);
    w(f, reg::DRIVER_FEATURE, 4, features >> 32);
    w(
        f,
        reg::DEVICE_STATUS,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
    );
    r(f, reg::DEVICE_STATUS, 1) as u8
}

fn setup_queue(f: &VirtioPciFunction, q: u16, base: u64) {
    w(f, reg::QUEUE_SELECT, 2, u64::from(q));
    w(f, reg::QUEUE_SIZE, 2, 8);
    w(f, reg::QUEUE_DESC, 8, base);
    w(f, reg::QUEUE_DRIVER, 8, base + 0x1000);
    w(f, reg::QUEUE_DEVICE, 8, base + 0x2000);
    w(f, reg::QUEUE_ENABLE, 2, 1);
}

#[test]
fn ids_and_capabilities_are_modern_virtio() {
    let rig = rig(false);
    let mut b = [0u8; 4];
    rig.f.config_read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
    // Walk the capability list and collect virtio cfg_types.
    let mut p = [0u8];
    rig.f.config_read(0x34, &mut p);
    let mut types = vec![];
    while p[0] != 0 {
        let mut hdr = [0u8; 4];
        rig.f.config_read(u16::from(p[0]), &mut hdr);
        assert_eq!(hdr[0], 0x09);
        types.push(hdr[3]);
        p[0] = hdr[1];
    }
    assert_eq!(types, vec![1, 2, 3, 4, 5]);
    // BAR 0 sizes to 16 KiB; no other BAR (no MSI-X through the proxy).
    rig.f.config_write(0x14, &0xffff_ffffu32.to_le_bytes());
    rig.f.config_read(0x14, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0);
}

#[test]
fn feature_negotiation_requires_version_1_and_known_bits() {
    let rig = rig(false);
    let offered = r(&rig.f, reg::DEVICE_FEATURE, 4)
        | (({
            w(&rig.f, reg::DEVICE_FEATURE_SELECT, 4, 1);
            r(&rig.f, reg::DEVICE_FEATURE, 4)
        }) << 32);
    assert_eq!(offered, (1 << 32) | (1 << 9));
    assert_eq!(
        negotiate(&rig.f, 1 << 9),
        ACKNOWLEDGE | DRIVER,
        "no VERSION_1: refused"
    );
    assert_eq!(
        negotiate(&rig.f, (1 << 32) | (1 << 9) | (1 << 5)),
        ACKNOWLEDGE | DRIVER,
        "unknown bit"
    );
    assert_eq!(
        negotiate(&rig.f, 1 << 32),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
}

#[test]
fn access_platform_must_be_accepted_when_offered() {
    let rig = rig(true);
    assert_eq!(
        negotiate(&rig.f, 1 << 32),
        ACKNOWLEDGE | DRIVER,
        "ACCESS_PLATFORM dropped"
    );
    assert_eq!(
        negotiate(&rig.f, (1 << 32) | (1 << 33)),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
}

#[test]
fn queue_setup_activation_notify_and_isr() {
    let rig = rig(false);
    negotiate(&rig.f, (1 << 32) | (1 << 9));
    setup_queue(&rig.f, 0, 0x1_0000);
    w(&rig.f, reg::DEVICE_STATUS, 1, 0xf);
    assert_eq!(r(&rig.f, reg::DEVICE_STATUS, 1), 0xf);
    let act = rig.probe.activated.lock().unwrap().clone().unwrap();
    assert_eq!(act, ((1 << 32) | (1 << 9), vec![0]));
    rig.irq.take();
    // Doorbell for queue 0 at the notify area.
    w(&rig.f, 0x3000, 2, 0);
    assert_eq!(rig.probe.notified.load(Ordering::SeqCst), 1);
    assert_eq!(
        rig.irq.take(),
        vec![RecordedInterrupt::Level {
            line: 0,
            asserted: true
        }]
    );
    assert_eq!(r(&rig.f, 0x1000, 1), 1, "ISR reports the queue interrupt");
    assert_eq!(
        rig.irq.take(),
        vec![RecordedInterrupt::Level {
            line: 0,
            asserted: false
        }]
    );
    assert_eq!(r(&rig.f, 0x1000, 1), 0, "reading ISR cleared it");
    // Device config window goes to the device.
    assert_eq!(r(&rig.f, 0x2004, 1), 4);
}

#[test]
fn invalid_queue_sets_needs_reset_and_reset_recovers() {
    let rig = rig(false);
    negotiate(&rig.f, 1 << 32);
    // A descriptor table outside guest memory: virtio-queue rejects it at activation.
    w(&rig.f, reg::QUEUE_SELECT, 2, 0);
    w(&rig.f, reg::QUEUE_DESC, 8, 0x1000_0000);
    w(&rig.f, reg::QUEUE_ENABLE, 2, 1);
    w(&rig.f, reg::DEVICE_STATUS, 1, 0xf);
    assert_eq!(
        r(&rig.f, reg::DEVICE_STATUS, 1) as u8 & DEVICE_NEEDS_RESET,
        DEVICE_NEEDS_RESET
    );
    assert!(rig.probe.activated.lock().unwrap().is_none());
    // Doorbells on a broken device go nowhere.
    w(&rig.f, 0x3000, 2, 0);
    assert_eq!(rig.probe.notified.load(Ordering::SeqCst), 0);
    w(&rig.f, reg::DEVICE_STATUS, 1, 0);
    assert_eq!(r(&rig.f, reg::DEVICE_STATUS, 1), 0);
    assert_eq!(r(&rig.f, reg::QUEUE_ENABLE, 2), 0);
    assert!(rig.probe.resets.load(Ordering::SeqCst) >= 2);
}

#[test]
fn illegal_status_jump_is_ignored() {
    let rig = rig(false);
    w(&rig.f, reg::DEVICE_STATUS, 1, u64::from(DRIVER_OK));
    assert_eq!(r(&rig.f, reg::DEVICE_STATUS, 1), 0);
}

#[test]
fn pci_cfg_capability_window_reaches_the_bar() {
    let rig = rig(false);
    // Find the type-5 capability.
    let mut p = [0u8];
    rig.f.config_read(0x34, &mut p);
    let mut cap = 0u16;
    while p[0] != 0 {
        let mut hdr = [0u8; 4];
        rig.f.config_read(u16::from(p[0]), &mut hdr);
        if hdr[3] == 5 {
            cap = u16::from(p[0]);
        }
        p[0] = hdr[1];
    }
    assert_ne!(cap, 0);
    rig.f.config_write(cap + 4, &[0]);
    rig.f.config_write(cap + 8, &0x12u32.to_le_bytes());
    rig.f.config_write(cap + 12, &2u32.to_le_bytes());
    let mut d = [0u8; 4];
    rig.f.config_read(cap + 16, &mut d);
    assert_eq!(
        u16::from_le_bytes([d[0], d[1]]),
        2,
        "num_queues through the window"
    );
}

#[test]
fn pci_cfg_capability_window_stays_inside_the_bar() {
    let rig = rig(false);
    let mut p = [0u8];
    rig.f.config_read(0x34, &mut p);
    let mut cap = 0u16;
    while p[0] != 0 {
        let mut hdr = [0u8; 4];
        rig.f.config_read(u16::from(p[0]), &mut hdr);
        if hdr[3] == 5 {
            cap = u16::from(p[0]);
        }
        p[0] = hdr[1];
    }
    assert_ne!(cap, 0);
    // A 4-byte window access at the last two bytes of the BAR, and one at a huge offset.
    for offset in [BAR_SIZE - 2, u64::from(u32::MAX)] {
        rig.f.config_write(cap + 4, &[0]);
        rig.f.config_write(cap + 8, &(offset as u32).to_le_bytes());
        rig.f.config_write(cap + 12, &4u32.to_le_bytes());
        rig.f.config_write(cap + 16, &0xdead_beefu32.to_le_bytes());
        let mut d = [0x11u8; 4];
        rig.f.config_read(cap + 16, &mut d);
        assert_eq!(d, [0x11; 4], "offset {offset:#x}: not performed");
    }
    // MSI-X BAR named but the function has no MSI-X: nothing either.
    rig.f.config_write(cap + 4, &[1]);
    rig.f.config_write(cap + 8, &0u32.to_le_bytes());
    let mut d = [0x11u8; 4];
    rig.f.config_read(cap + 16, &mut d);
    assert_eq!(d, [0x11; 4]);
}

#[test]
fn the_bar_guard_refuses_straddling_accesses_to_both_bars() {
    use sluice_pci::BarGuard;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let f = Arc::new(
        VirtioPciFunction::new(
            Box::new(Dummy(Arc::new(Probe::default()), None)),
            TransportOptions {
                bdf: Bdf::new(0, 2, 0),
                access_platform: false,
                msix_vectors: 2,
                class_code: 0x010000,
                iommu: None,
            },
            SharedMemory::new(mem),
            Arc::new(RecordingInterrupts::default()),
            Arc::new(NoHooks),
        )
        .unwrap(),
    );
    let g = BarGuard::new(f);
    g.config_write(0x10, &0xfe00_0000u32.to_le_bytes());
    g.config_write(0x14, &0xfe10_0000u32.to_le_bytes());
    g.config_write(0x04, &0x6u16.to_le_bytes());
    let read = |addr: u64, len: usize| {
        let (bar, off) = g.decode_bar(addr, true).unwrap();
        let mut b = vec![0u8; len];
        g.bar_read(bar, off, &mut b);
        b
    };
    assert_eq!(read(0xfe00_0000 + BAR_SIZE - 4, 8), vec![0xff; 8]);
    assert_eq!(read(0xfe10_0000 + 0x1000 - 2, 4), vec![0xff; 4]);
    // MSI-X entry 0 vector control (masked at reset), a QWORD inside the BAR: passes.
    assert_eq!(read(0xfe10_0008, 8), vec![0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(g.rejected(), 2);
}

/// The doorbells a backend may absorb: one 2-byte notify address per queue, replayed with the
/// queue index; replaying one is exactly the notify write it stands for.
#[test]
fn doorbells_name_each_queue_notify_address() {
    let rg = rig(false);
    let bells = rg.f.doorbells();
    assert_eq!(bells.len(), 2, "the dummy device has two queues");
    for (q, b) in bells.iter().enumerate() {
        assert_eq!(
            (b.bar, b.offset, b.size, b.datamatch, b.value),
            (0, 0x3000 + 4 * q as u64, 2, None, q as u64)
        );
    }
    // No MSI-X on this function: no relay taken, no vectors.
    assert_eq!(rg.f.msix_vectors(), 0);
    struct Never;
    impl sluice_pci::VectorRelay for Never {
        fn signal(&self, _: u16) -> bool {
            false
        }
    }
    assert!(!rg.f.set_vector_relay(Some(Arc::new(Never))));
}

/// Doorbell eventfds go to a device that waits on them itself, never to one that does not or
/// one already running; each activation gets copies whose `rung` announces the transport's
/// doorbell point (as a replayed notify write would) before the backend's own.
#[test]
fn doorbell_eventfds_reach_only_a_device_that_waits_on_them() {
    use vmm_sys_util::eventfd::EventFd;
    let hooks = Arc::new(RecordingHooks::default());
    let rg = rig_with_hooks(false, hooks.clone());
    let backend_rung = Arc::new(AtomicU32::new(0));
    let events = || {
        let count = backend_rung.clone();
        vec![QueueEvent {
            queue: 1,
            fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            rung: Arc::new(move || {
                count.fetch_add(1, Ordering::SeqCst);
            }),
        }]
    };
    assert!(
        !rg.f.hand_queue_doorbells(events()),
        "the device does not wait on eventfds"
    );
    rg.probe.waits.store(true, Ordering::SeqCst);
    assert!(rg.f.hand_queue_doorbells(events()));
    negotiate(&rg.f, 1 << 32);
    setup_queue(&rg.f, 0, 0x1_0000);
    w(&rg.f, reg::DEVICE_STATUS, 1, 0xf);
    assert_eq!(r(&rg.f, reg::DEVICE_STATUS, 1), 0xf);
    {
        let got = rg.probe.queue_events.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].queue, 1);
        (got[0].rung)();
    }
    assert_eq!(backend_rung.load(Ordering::SeqCst), 1);
    let doorbell_points: Vec<_> = hooks
        .point_values()
        .into_iter()
        .filter(|(p, _)| p.ends_with(".notify"))
        .collect();
    assert_eq!(
        doorbell_points,
        vec![("virtio.dummy0.notify".to_string(), 1)],
        "the doorbell point, with the queue index"
    );
    // Running: refused, and nothing kept for the next activation.
    assert!(!rg.f.hand_queue_doorbells(events()));
    w(&rg.f, reg::DEVICE_STATUS, 1, 0);
    negotiate(&rg.f, 1 << 32);
    setup_queue(&rg.f, 0, 0x1_0000);
    w(&rg.f, reg::DEVICE_STATUS, 1, 0xf);
    assert!(rg.probe.queue_events.lock().unwrap().is_empty());
}
