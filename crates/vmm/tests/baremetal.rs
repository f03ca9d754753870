//! The bare-metal test guest (`firmware/testguest`) under the kvm backend: serial output, PCI
//! enumeration through 0xCF8, a BAR read of a device-host virtio-blk, an MSI-X interrupt from a
//! doorbell on a purpose-built test function, and a real virtio-blk read through a virtqueue:
//! its doorbell absorbed by an ioeventfd, its completion delivered through an irqfd MSI route.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_devapi::{Bdf, Hooks, NoHooks};
use sluice_host::machine::MachineSpec;
use sluice_host::{DeviceSet, DiskSpec, GuestExit, IntxRelay};
use sluice_inject::{Injector, Plan};
use sluice_pci::msix::{CAP_ID_MSIX, MsixTable};
use sluice_pci::{BarKind, BarSpec, ConfigSpace, PciFunction, PciIds, PciInterrupt};
use sluice_vmm::{
    GuestDebugError, KvmStatus, StepOver, Vmm, VmmConfig, VmmCounters, VmmError, kvm_status,
};

const TABLE_OFFSET: u32 = 0x800;
const PBA_OFFSET: u32 = 0xc00;

/// A function whose BAR 0 offset 0 is a doorbell: each write raises vector 0 (MSI-X when the
/// guest enabled it, INTx otherwise). BAR0+4 reads the number of doorbells rung.
struct DoorbellDevice {
    cfg: Mutex<ConfigSpace>,
    msix: Arc<Mutex<MsixTable>>,
    msix_cap: u16,
    irq: PciInterrupt,
    rings: AtomicU32,
    /// Never raise the interrupt (the guest then waits in HLT until the VMM's timeout).
    mute: bool,
}

impl DoorbellDevice {
    fn new(sink: Arc<IntxRelay>, mute: bool) -> Self {
        let ids = PciIds {
            vendor: 0x5105,
            device: 0x7e57,
            subsystem_vendor: 0x5105,
            subsystem_id: 0,
            class_code: 0xff_00_00,
            revision: 0,
        };
        let mut cfg = ConfigSpace::new(ids, 1);
        cfg.add_bar(BarSpec {
            index: 0,
            size: 0x1000,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        })
        .unwrap();
        let table = MsixTable::new(1, 0, TABLE_OFFSET, PBA_OFFSET);
        let (body, mask) = table.capability();
        let cap = cfg.add_capability(CAP_ID_MSIX, &body, &mask).unwrap();
        let msix = Arc::new(Mutex::new(table));
        DoorbellDevice {
            cfg: Mutex::new(cfg),
            irq: PciInterrupt::new(sink, Some(msix.clone())),
            msix,
            msix_cap: u16::from(cap),
            rings: AtomicU32::new(0),
            mute,
        }
    }
}

impl PciFunction for DoorbellDevice {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.cfg.lock().unwrap().read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut cfg = self.cfg.lock().unwrap();
        cfg.write(offset, data);
        let ctrl = self.msix_cap + 2;
        if offset < ctrl + 2 && offset + data.len() as u16 > ctrl {
            let v = cfg.read_u16(ctrl);
            self.msix.lock().unwrap().set_control(v, self.irq.sink());
        }
    }
    fn bar_read(&self, _bar: u8, offset: u64, data: &mut [u8]) {
        let t = self.msix.lock().unwrap();
        if t.claims(offset) {
            t.read(offset, data);
        } else if offset == 4 {
            sluice_pci::put_le(data, u64::from(self.rings.load(Ordering::SeqCst)));
        } else {
            data.fill(0);
        }
    }
    fn bar_write(&self, _bar: u8, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.rings.fetch_add(1, Ordering::SeqCst);
            if !self.mute {
                self.irq.signal(0);
            }
            return;
        }
        let mut t = self.msix.lock().unwrap();
        if t.claims(offset) {
            t.write(offset, data, self.irq.sink());
        }
    }
    fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
        self.cfg.lock().unwrap().decode(addr, memory)
    }
    fn reset(&self) {}
}

/// How to run the test guest.
struct GuestRun {
    name: &'static str,
    /// The test device never raises its interrupt.
    mute: bool,
    timeout: Duration,
    ioeventfd: bool,
    /// A race-injection plan (one-line form) for the device set and the VMM.
    inject: Option<&'static str>,
    /// How vCPUs get past `guest.sym` breakpoints (the VMM's default when `None`).
    step: Option<StepOver>,
}

impl GuestRun {
    fn new(name: &'static str) -> Self {
        GuestRun {
            name,
            mute: false,
            timeout: Duration::from_secs(120),
            ioeventfd: true,
            inject: None,
            step: None,
        }
    }
}

/// What a run produced.
struct Ran {
    out: sluice_host::RunOutcome,
    relay: Arc<IntxRelay>,
    counters: VmmCounters,
    injector: Option<Arc<Injector>>,
    dir: std::path::PathBuf,
}

impl Ran {
    fn has(&self, s: &str) -> bool {
        self.out.console.iter().any(|l| l.contains(s))
    }
}

/// The first bytes of the disk's sector 0, as the guest prints them (a little-endian dword).
const SECTOR0: [u8; 4] = *b"SLU!";

/// Runs the test guest with a virtio-blk from the device set (00:03.0) and the doorbell device
/// at 00:02.0.
fn run_guest(run: &GuestRun) -> Option<Ran> {
    try_run_guest(run).map(|r| r.expect("run"))
}

/// As [`run_guest`], handing back the VMM's error.
fn try_run_guest(run: &GuestRun) -> Option<Result<Ran, VmmError>> {
    if kvm_status() == KvmStatus::Absent {
        println!("SKIPPED: no /dev/kvm");
        return None;
    }
    // build.rs fails the build when the guest cannot be assembled, so this is always a file.
    let guest = env!("SLUICE_TESTGUEST");
    let dir = std::env::temp_dir().join(format!("sluice-vmm-{}-{}", run.name, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..4].copy_from_slice(&SECTOR0);
    std::fs::write(&disk, &image).unwrap();
    let cfg = VmmConfig {
        machine: MachineSpec::x86_q35(),
        kernel: guest.into(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        mem_mib: 64,
        timeout: run.timeout,
        serial_log: dir.join("serial.log"),
        cpuid_mask: Vec::new(),
        acpi_tables: Vec::new(),
    };
    let mut vmm = Vmm::new(&cfg).expect("VM");
    vmm.use_ioeventfd(run.ioeventfd);
    if let Some(step) = run.step {
        vmm.breakpoint_step(step);
    }
    let injector = run.inject.map(|rules| {
        let mut reg =
            sluice_host::points::with_run_devices(sluice_host::points::all_models(), 1, false);
        let map = env!("SLUICE_TESTGUEST_MAP");
        reg.set_symbols(sluice_inject::SymbolMap::load(map.as_ref()).expect("System.map"));
        let plan = reg
            .validate(&Plan::parse_cli(rules).unwrap())
            .expect("plan");
        Arc::new(Injector::new(plan))
    });
    let hooks: Arc<dyn Hooks> = match &injector {
        Some(i) => {
            vmm.set_injector(i.clone());
            i.clone()
        }
        None => Arc::new(NoHooks),
    };
    let opts = vmm.host_options();
    let devices = DeviceSet::with_options(
        &[DiskSpec {
            path: disk,
            read_only: false,
            iommu: false,
        }],
        hooks,
        &opts,
    )
    .expect("device set");
    let relay = Arc::new(IntxRelay::with_msi(opts.msi.clone().expect("MSI path")));
    let dev = Arc::new(DoorbellDevice::new(relay.clone(), run.mute));
    vmm.add_function(Bdf::new(0, 2, 0), dev, Some(relay.clone()));
    let stats = vmm.stats();
    let out = match vmm.run(&devices) {
        Ok(out) => out,
        Err(e) => return Some(Err(e)),
    };
    for l in &out.console {
        println!("guest: {l}");
    }
    let counters = stats.snapshot();
    println!(
        "exit {:?} after {:?}; test device: MSI sent {}, INTx raised {}; {counters:?}",
        out.exit,
        out.wall,
        relay.msi_sent(),
        relay.raised()
    );
    Some(Ok(Ran {
        out,
        relay,
        counters,
        injector,
        dir,
    }))
}

/// The lines every complete run prints.
fn assert_complete(r: &Ran) {
    assert!(r.has("SLUICE-TG: hello"), "serial output");
    assert!(r.has("SLUICE-TG: pci 00:00.0 id=00081b36"), "host bridge");
    assert!(r.has("SLUICE-TG: pci 00:02.0 id=7e575105"), "test device");
    assert!(r.has("SLUICE-TG: pci 00:03.0 id=10421af4"), "virtio-blk");
    assert!(r.has("num_queues=0001"), "virtio-blk BAR read");
    assert!(
        r.has("SLUICE-TG: msi-x vector 0x40 received, count=00000001 doorbells=00000001"),
        "MSI-X delivered"
    );
    let data = format!("data={:08x}", u32::from_le_bytes(SECTOR0));
    assert!(
        r.has(&format!(
            "SLUICE-TG: virtio-blk read done, used_idx=0001 status=00 {data}"
        )),
        "virtio-blk request completed with sector 0's bytes"
    );
    assert!(r.has("SLUICE-TG: sluice_tg_probe calls=00000003"));
    assert!(r.has("SLUICE-TG: done"));
    assert!(!r.has("FAIL"));
    assert_eq!(r.out.exit, GuestExit::PoweredOff);
    assert_eq!(r.relay.msi_sent(), 1);
    assert_eq!(r.relay.raised(), 0, "no INTx fallback");
}

#[test]
fn bare_metal_guest_enumerates_reads_a_bar_and_gets_an_msix() {
    let Some(r) = run_guest(&GuestRun::new("bm")) else {
        return;
    };
    assert_complete(&r);
    let c = r.counters;
    // The virtio-blk doorbell went through the ioeventfd: no MMIO exit reached the device.
    assert_eq!(c.doorbell_exits, 0, "{c:?}");
    assert_eq!(c.doorbell_eventfds, 1, "{c:?}");
    assert_eq!((c.ioeventfd_registrations, c.ioeventfd_failures), (1, 0));
    // Both MSI-X messages (test device, virtio-blk completion) went through irqfd routes.
    assert_eq!(
        (c.msi_irqfd, c.msi_signalled, c.msi_refused),
        (2, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.msi_route_updates, 2, "one route per enabled vector");
    let log = std::fs::read_to_string(r.dir.join("serial.log")).unwrap();
    assert!(log.contains("SLUICE-TG: done"));
    std::fs::remove_dir_all(&r.dir).unwrap();
}

/// A stall rule on the virtio-blk doorbell must hold the vCPU that rang: that device keeps
/// MMIO-exit doorbells, and the stall happens inside the guest's doorbell write.
#[test]
fn a_doorbell_stall_rule_keeps_the_mmio_exit_path() {
    let mut run = GuestRun::new("bm-stall");
    run.inject = Some("virtio.blk0.notify:delay=200ms,count=1");
    let Some(r) = run_guest(&run) else {
        return;
    };
    assert_complete(&r);
    let c = r.counters;
    assert_eq!((c.doorbell_exits, c.doorbell_eventfds), (1, 0), "{c:?}");
    assert_eq!(c.ioeventfd_registrations, 0);
    assert_eq!(r.injector.as_ref().unwrap().fired(), vec![1]);
    assert!(r.out.wall >= Duration::from_millis(200), "{:?}", r.out.wall);
    std::fs::remove_dir_all(&r.dir).unwrap();
}

/// With ioeventfds off every doorbell is an exit; MSI routes are unaffected.
#[test]
fn without_ioeventfds_doorbells_are_exits() {
    let mut run = GuestRun::new("bm-exits");
    run.ioeventfd = false;
    let Some(r) = run_guest(&run) else {
        return;
    };
    assert_complete(&r);
    let c = r.counters;
    assert_eq!((c.doorbell_exits, c.doorbell_eventfds), (1, 0), "{c:?}");
    assert_eq!(c.msi_irqfd, 2, "{c:?}");
    std::fs::remove_dir_all(&r.dir).unwrap();
}

/// `guest.sym.sluice_tg_probe` through a hardware breakpoint: the function is called three
/// times, the rule stalls the first two calls by 100 ms each, and the guest runs on after
/// each hit (the third call is a hit without a stall; the function still ran three times).
fn breakpoint_stall(name: &'static str, step: StepOver) {
    let mut run = GuestRun::new(name);
    run.inject = Some("guest.sym.sluice_tg_probe:delay=100ms,count=2");
    run.step = Some(step);
    let r = match try_run_guest(&run) {
        None => return,
        Some(Err(VmmError::GuestDebug(GuestDebugError::Kvm { reason, .. }))) => {
            println!("SKIPPED: KVM_SET_GUEST_DEBUG does not work on this host: {reason}");
            return;
        }
        Some(r) => r.expect("run"),
    };
    assert_complete(&r);
    let c = r.counters;
    assert_eq!((c.breakpoint_hits, c.breakpoint_stalls), (3, 2), "{c:?}");
    assert!(c.breakpoint_stalled_us >= 200_000, "{c:?}");
    assert!(c.breakpoint_stalled_us < 1_000_000, "{c:?}");
    assert_eq!(r.injector.as_ref().unwrap().fired(), vec![2]);
    assert!(r.out.wall >= Duration::from_millis(200), "{:?}", r.out.wall);
    std::fs::remove_dir_all(&r.dir).unwrap();
}

#[test]
fn a_guest_sym_rule_stalls_at_a_hardware_breakpoint_resume_flag() {
    breakpoint_stall("bp-rf", StepOver::ResumeFlag);
}

#[test]
fn a_guest_sym_rule_stalls_at_a_hardware_breakpoint_single_step() {
    breakpoint_stall("bp-step", StepOver::SingleStep);
}

/// DR0-DR3 are four breakpoints: a fifth distinct address is refused before the guest runs.
#[test]
fn more_than_four_guest_sym_addresses_are_refused() {
    let mut run = GuestRun::new("bp-five");
    run.inject = Some(
        "guest.sym.sluice_tg_probe:delay=1ms;guest.sym.sluice_tg_probe+1:delay=1ms;\
         guest.sym.sluice_tg_probe+2:delay=1ms;guest.sym.sluice_tg_probe+3:delay=1ms;\
         guest.sym.sluice_tg_probe+4:delay=1ms",
    );
    let Some(r) = try_run_guest(&run) else {
        return;
    };
    let e = r.err().expect("refused");
    assert!(
        matches!(
            e,
            VmmError::GuestDebug(GuestDebugError::TooMany { count: 5, .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("DR0-DR3"), "{e}");
}

/// The guest waits in HLT for an interrupt that never comes: the timeout ends the run and the
/// vCPU thread is kicked out of KVM_RUN.
#[test]
fn a_hung_guest_times_out_and_the_vcpu_is_stopped() {
    let mut run = GuestRun::new("hang");
    run.mute = true;
    run.timeout = Duration::from_secs(3);
    let Some(r) = run_guest(&run) else {
        return;
    };
    assert_eq!(r.out.exit, GuestExit::Timeout);
    assert!(r.out.wall < Duration::from_secs(10), "{:?}", r.out.wall);
    assert!(r.has("ringing doorbell"));
    assert_eq!(r.relay.msi_sent(), 0);
    let log = std::fs::read_to_string(r.dir.join("serial.log")).unwrap();
    assert!(log.contains("vCPU 0 ended: stopped at rip 0x"), "{log}");
    std::fs::remove_dir_all(&r.dir).unwrap();
}

#[test]
fn missing_kernel_and_bad_mask_are_clear_errors() {
    if kvm_status() == KvmStatus::Absent {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let cfg = VmmConfig {
        machine: MachineSpec::x86_q35(),
        kernel: "/nonexistent/vmlinux".into(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        mem_mib: 32,
        timeout: Duration::from_secs(120),
        serial_log: std::env::temp_dir().join(format!("sluice-vmm-err-{}.log", std::process::id())),
        cpuid_mask: vec!["popcnt".into()],
        acpi_tables: Vec::new(),
    };
    let devices = DeviceSet::new(&[], Arc::new(NoHooks)).unwrap();
    let err = sluice_vmm::run(&cfg, &devices).unwrap_err();
    assert!(
        err.to_string().starts_with("kernel /nonexistent/vmlinux"),
        "{err}"
    );
    let bad = VmmConfig {
        cpuid_mask: vec!["warp-drive".into()],
        ..cfg.clone()
    };
    let err = Vmm::new(&bad).err().expect("refused");
    assert!(err.to_string().contains("warp-drive"), "{err}");
    let zero = VmmConfig { cpus: 0, ..cfg };
    assert!(Vmm::new(&zero).is_err());
    let _ = std::fs::remove_file(
        std::env::temp_dir().join(format!("sluice-vmm-err-{}.log", std::process::id())),
    );
}
