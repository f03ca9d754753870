//! The bare-metal test guest (`firmware/testguest`) under the kvm backend: serial output, PCI
//! enumeration through 0xCF8, a BAR read of a device-host virtio-blk, and an MSI-X interrupt
//! from a doorbell on a purpose-built test function, delivered through `KVM_SIGNAL_MSI`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_devapi::{Bdf, NoHooks};
use sluice_host::{DeviceSet, DiskSpec, GuestExit, IntxRelay};
use sluice_pci::msix::{CAP_ID_MSIX, MsixTable};
use sluice_pci::{BarKind, BarSpec, ConfigSpace, PciFunction, PciIds, PciInterrupt};
use sluice_vmm::{KvmStatus, Vmm, VmmConfig, kvm_status};

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

/// Runs the test guest with a virtio-blk from the device set and the doorbell device at 00:02.0.
fn run_guest(
    name: &str,
    mute: bool,
    timeout: Duration,
) -> Option<(sluice_host::RunOutcome, Arc<IntxRelay>, std::path::PathBuf)> {
    if kvm_status() == KvmStatus::Absent {
        println!("SKIPPED: no /dev/kvm");
        return None;
    }
    let guest = env!("SLUICE_TESTGUEST");
    if guest.is_empty() {
        println!("SKIPPED: the test guest was not built (binutils `as`/`ld` missing)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("sluice-vmm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let cfg = VmmConfig {
        kernel: guest.into(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        mem_mib: 64,
        timeout,
        serial_log: dir.join("serial.log"),
        cpuid_mask: Vec::new(),
        acpi_tables: Vec::new(),
    };
    let mut vmm = Vmm::new(&cfg).expect("VM");
    let opts = vmm.host_options();
    let devices = DeviceSet::with_options(
        &[DiskSpec {
            path: disk,
            read_only: false,
            iommu: false,
        }],
        Arc::new(NoHooks),
        &opts,
    )
    .expect("device set");
    let relay = Arc::new(IntxRelay::with_msi(opts.msi.clone().expect("MSI path")));
    let dev = Arc::new(DoorbellDevice::new(relay.clone(), mute));
    vmm.add_function(Bdf::new(0, 2, 0), dev, Some(relay.clone()));
    let out = vmm.run(&devices).expect("run");
    for l in &out.console {
        println!("guest: {l}");
    }
    println!(
        "exit {:?} after {:?}; MSI sent {}, INTx raised {}",
        out.exit,
        out.wall,
        relay.msi_sent(),
        relay.raised()
    );
    Some((out, relay, dir))
}

#[test]
fn bare_metal_guest_enumerates_reads_a_bar_and_gets_an_msix() {
    let Some((out, relay, dir)) = run_guest("bm", false, Duration::from_secs(120)) else {
        return;
    };

    let has = |s: &str| out.console.iter().any(|l| l.contains(s));
    assert!(has("SLUICE-TG: hello"), "serial output");
    assert!(has("SLUICE-TG: pci 00:00.0 id=00081b36"), "host bridge");
    assert!(has("SLUICE-TG: pci 00:02.0 id=7e575105"), "test device");
    assert!(has("SLUICE-TG: pci 00:03.0 id=10421af4"), "virtio-blk");
    assert!(has("num_queues=0001"), "virtio-blk BAR read");
    assert!(
        has("SLUICE-TG: msi-x vector 0x40 received, count=00000001 doorbells=00000001"),
        "MSI-X delivered"
    );
    assert!(has("SLUICE-TG: done"));
    assert!(!has("FAIL"));
    assert_eq!(out.exit, GuestExit::PoweredOff);
    assert_eq!(relay.msi_sent(), 1);
    assert_eq!(relay.raised(), 0, "no INTx fallback");
    let log = std::fs::read_to_string(dir.join("serial.log")).unwrap();
    assert!(log.contains("SLUICE-TG: done"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The guest waits in HLT for an interrupt that never comes: the timeout ends the run and the
/// vCPU thread is kicked out of KVM_RUN.
#[test]
fn a_hung_guest_times_out_and_the_vcpu_is_stopped() {
    let Some((out, relay, dir)) = run_guest("hang", true, Duration::from_secs(3)) else {
        return;
    };
    assert_eq!(out.exit, GuestExit::Timeout);
    assert!(out.wall < Duration::from_secs(10), "{:?}", out.wall);
    assert!(out.console.iter().any(|l| l.contains("ringing doorbell")));
    assert_eq!(relay.msi_sent(), 0);
    let log = std::fs::read_to_string(dir.join("serial.log")).unwrap();
    assert!(log.contains("vCPU 0 ended: stopped at rip 0x"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_kernel_and_bad_mask_are_clear_errors() {
    if kvm_status() == KvmStatus::Absent {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let cfg = VmmConfig {
        kernel: "/nonexistent/vmlinux".into(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        mem_mib: 32,
        timeout: Duration::from_secs(5),
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
