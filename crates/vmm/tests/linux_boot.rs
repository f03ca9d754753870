//! Linux under the kvm backend.
//!
//! - Hardware KVM: boots the default 6.12 guest (bzImage) with 2 vCPUs, virtio-iommu and one
//!   disk behind it, runs the `disk` workload, and expects what the qemu backend gets: `/init`
//!   reached, `RESULT PASS`, the disk in an IOMMU group, power-off, the pattern on the image.
//! - Nested PVM (`/sys/module/kvm_pvm`): skipped loudly, unless `SLUICE_SLOW_KVM=1`, which boots
//!   the `6.12-pvm` variant's PVH `vmlinux` (virtio-iommu and virtio-blk built in: PVM runs no
//!   user space, so /init could not load them) with 1 vCPU and the PVM CPUID mask, and reports
//!   how far it got and when (see `docs/kvm-backend.md`).
//! - No `/dev/kvm`: `SKIPPED: no /dev/kvm`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sluice_host::machine::{BackendKind, MachineSpec};
use sluice_host::{DeviceSet, DiskSpec, GuestExit, IommuChoice};
use sluice_vmm::{KvmStatus, PVM_CPUID_MASK, Vmm, VmmConfig, kvm_status};

struct Images {
    bzimage: PathBuf,
    vmlinux: PathBuf,
    initrd: PathBuf,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `guest-images/build.sh VARIANT` under the shared build lock (cached after the first build).
fn images(variant: &str) -> Images {
    let cache = std::env::var("SLUICE_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/sluice",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    std::fs::create_dir_all(&cache).unwrap();
    let out = Command::new("flock")
        .arg(format!("{cache}/.build.lock"))
        .arg("bash")
        .arg(root().join("guest-images/build.sh"))
        .arg(variant)
        .output()
        .expect("run guest-images/build.sh");
    assert!(
        out.status.success(),
        "guest image build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let kv = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{k}= missing from build.sh output:\n{text}"))
    };
    Images {
        bzimage: kv("KERNEL"),
        vmlinux: kv("VMLINUX"),
        initrd: kv("INITRD"),
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-vmm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One boot with virtio-iommu and one disk behind it.
struct Boot<'a> {
    kernel: &'a Path,
    initrd: &'a Path,
    cpus: u32,
    cmdline: &'a str,
    timeout: Duration,
    cpuid_mask: &'a [&'a str],
    elf_64bit: bool,
}

/// What a boot left behind.
struct Booted {
    out: sluice_host::RunOutcome,
    disk: PathBuf,
    /// The virtio-iommu's counters.
    iommu: Vec<(&'static str, u64)>,
    /// The VMM's doorbell/MSI paths.
    vmm: sluice_vmm::VmmCounters,
}

fn boot(b: &Boot<'_>, dir: &Path) -> Booted {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cfg = VmmConfig {
        machine: MachineSpec::x86_q35(),
        kernel: b.kernel.to_path_buf(),
        initrd: Some(b.initrd.to_path_buf()),
        cmdline: b.cmdline.to_string(),
        cpus: b.cpus,
        mem_mib: 512,
        timeout: b.timeout,
        serial_log: dir.join("serial.log"),
        cpuid_mask: b.cpuid_mask.iter().map(|s| s.to_string()).collect(),
        acpi_tables: Vec::new(),
    };
    let mut vmm = Vmm::new(&cfg).expect("VM");
    vmm.prefer_64bit_elf_entry(b.elf_64bit);
    let disks = [DiskSpec {
        path: disk.clone(),
        read_only: false,
        iommu: true,
    }];
    let opts = vmm
        .host_options()
        .with_iommu(&IommuChoice::Virtio(Default::default()), &disks);
    let devices = DeviceSet::with_options(&disks, Arc::new(sluice_devapi::NoHooks), &opts)
        .expect("device set");
    let stats = vmm.stats();
    let out = vmm.run(&devices).expect("run");
    let iommu = devices
        .devices
        .iter()
        .find(|d| d.kind == "virtio-iommu")
        .and_then(|d| d.virtio.as_ref().map(|v| v.counters()))
        .unwrap_or_default();
    Booted {
        out,
        disk,
        iommu,
        vmm: stats.snapshot(),
    }
}

/// The x86 platform's pieces with tsc=unstable (MachineSpec::x86_q35 as the qemu backend
/// boots it), and the disk workload.
fn cmdline() -> String {
    format!(
        "{} sluice.workload=disk sluice.seed=42",
        MachineSpec::x86_q35().base_cmdline(BackendKind::Qemu)
    )
}

#[test]
fn linux_boots_with_virtio_iommu_and_the_disk_workload() {
    match kvm_status() {
        KvmStatus::Absent => {
            println!("SKIPPED: no /dev/kvm");
            return;
        }
        KvmStatus::Pvm => {
            eprintln!(
                "\n*** SKIPPED: /dev/kvm is nested PVM (kvm_pvm): a Linux guest cannot boot at \
                 usable speed or reach user space here. This test needs hardware KVM \
                 (VT-x/SVM). The opt-in PVM run is `SLUICE_SLOW_KVM=1 cargo test -p sluice-vmm \
                 --test linux_boot -- --nocapture pvm` (minutes). ***\n"
            );
            println!("SKIPPED: /dev/kvm is nested PVM (kvm_pvm); needs hardware KVM");
            return;
        }
        KvmStatus::Hardware => {}
    }
    let img = images("6.12");
    let dir = scratch("linux");
    let Booted { out, disk, vmm, .. } = boot(
        &Boot {
            kernel: &img.bzimage,
            initrd: &img.initrd,
            cpus: 2,
            cmdline: &cmdline(),
            timeout: Duration::from_secs(240),
            cpuid_mask: &[],
            elf_64bit: false,
        },
        &dir,
    );
    for l in &out.console {
        println!("guest: {l}");
    }
    println!("{vmm:?}");
    let has = |s: &str| out.console.iter().any(|l| l.contains(s));
    assert_eq!(out.exit, GuestExit::PoweredOff, "{:?}", out.exit);
    assert!(out.boot_to_init.is_some(), "/init reached");
    assert!(has("SLUICE: RESULT PASS"));
    assert!(has("iommu_group="), "disk behind the virtio-iommu");
    let check = Command::new("bash")
        .arg(root().join("guest-images/check-pattern.sh"))
        .arg(&disk)
        .arg("42")
        .arg("vda")
        .status()
        .expect("check-pattern.sh");
    assert!(check.success(), "host finds the guest's pattern");
    // Linux's virtio-pci uses MSI-X and notifies through the notify area: on hardware KVM both
    // take the fast paths.
    assert!(vmm.doorbell_eventfds > 0 && vmm.msi_irqfd > 0, "{vmm:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Milestones of a PVM boot, in order.
const MILESTONES: &[(&str, &str)] = &[
    ("first printk", "Linux version"),
    ("ACPI VIOT parsed", "ACPI: VIOT"),
    ("PCI host bridge", "PCI host bridge to bus 0000:00"),
    ("virtio-iommu function enumerated", "[1af4:1057]"),
    ("virtio-blk function enumerated", "[1af4:1042]"),
    ("virtio-iommu probed", "virtio_iommu"),
    ("endpoint attached (iommu group)", "Adding to iommu group"),
    ("vda", "[vda]"),
    ("Run /init", "Run /init"),
    ("init started", "SLUICE: init started"),
];

#[test]
fn pvm_opt_in_linux_progress() {
    if kvm_status() != KvmStatus::Pvm || std::env::var("SLUICE_SLOW_KVM").as_deref() != Ok("1") {
        println!("SKIPPED: opt-in PVM run (needs kvm_pvm and SLUICE_SLOW_KVM=1)");
        return;
    }
    // SLUICE_KVM_VMLINUX / SLUICE_KVM_INITRD: another guest (e.g. the default 6.12 image,
    // whose drivers are modules /init never gets to load); SLUICE_KVM_ENTRY64=1: enter the
    // vmlinux through the 64-bit boot protocol instead of PVH.
    let (vmlinux, initrd, own_image) = match (
        std::env::var_os("SLUICE_KVM_VMLINUX"),
        std::env::var_os("SLUICE_KVM_INITRD"),
    ) {
        (Some(k), Some(i)) => (PathBuf::from(k), PathBuf::from(i), false),
        _ => {
            let img = images("6.12-pvm");
            (img.vmlinux, img.initrd, true)
        }
    };
    let dir = scratch("pvm");
    // gunzip under PVM's instruction emulator is the slowest step of the boot (89 s for the
    // 1 MiB initramfs on a loaded host, 25-28 s to copy it uncompressed): hand Linux the plain
    // cpio archive, which it accepts as well.
    let initrd = if initrd.extension().is_some_and(|e| e == "gz") {
        let plain = dir.join("initramfs.cpio");
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&initrd)
            .output()
            .expect("run gzip");
        assert!(out.status.success(), "gzip -dc {}", initrd.display());
        std::fs::write(&plain, out.stdout).unwrap();
        plain
    } else {
        initrd
    };
    let entry64 = std::env::var("SLUICE_KVM_ENTRY64").as_deref() == Ok("1");
    // SLUICE_KVM_CPUS: vCPUs (default 1; 2 shows PVM's AP bring-up problem).
    let cpus = std::env::var("SLUICE_KVM_CPUS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let timeout = std::env::var("SLUICE_SLOW_KVM_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    // PVM's emulator lacks XRSTOR, CLAC/STAC, POPCNT, ... (guest-baseline README): hide them.
    let cmdline = format!(
        "{} noxsave clearcpuid=smap,smep,popcnt,xsave,pku,fsgsbase,rdpid earlyprintk=serial,ttyS0,115200",
        cmdline()
    );
    let Booted {
        out,
        iommu: counters,
        vmm,
        ..
    } = boot(
        &Boot {
            kernel: &vmlinux,
            initrd: &initrd,
            cpus,
            cmdline: &cmdline,
            timeout: Duration::from_secs(timeout),
            cpuid_mask: PVM_CPUID_MASK,
            elf_64bit: entry64,
        },
        &dir,
    );
    let log = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    println!("--- serial log (host seconds) ---\n{log}--- end ---");
    println!("exit: {:?} after {:.1} s", out.exit, out.wall.as_secs_f64());
    println!("VMM paths: {vmm:?}");
    let mut reached = 0;
    for (i, (name, needle)) in MILESTONES.iter().enumerate() {
        let at = log
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.get(1..10))
            .map(|t| t.trim().to_string());
        match at {
            Some(t) => {
                println!("PVM milestone: {name}: host {t} s");
                reached = i + 1;
            }
            None => println!("PVM milestone: {name}: not reached"),
        }
    }
    let count = |name: &str| counters.iter().find(|c| c.0 == name).map_or(0, |c| c.1);
    println!(
        "virtio-iommu requests: attach {} map {} unmap {}",
        count("requests_attach"),
        count("requests_map"),
        count("requests_unmap")
    );
    let probed = MILESTONES.iter().position(|m| m.0 == "virtio-iommu probed");
    if probed.is_some_and(|i| reached > i + 1) {
        assert!(
            count("requests_attach") > 0,
            "endpoint attached: {counters:?}"
        );
    }
    // Measured here (docs/kvm-backend.md): the default image (virtio_iommu/virtio_blk as
    // modules, loaded by /init, and PVM runs no user space) gets through PCI enumeration to
    // `Run /init`; the 6.12-pvm variant (both built in) through probe, ATTACH and `vda`.
    assert!(
        reached >= 5,
        "PVM boot stopped before enumerating the virtio functions (reached {reached} milestones)"
    );
    if own_image {
        let attached = MILESTONES
            .iter()
            .position(|m| m.0 == "endpoint attached (iommu group)")
            .unwrap_or(0);
        assert!(
            reached > attached,
            "6.12-pvm did not get through the virtio-iommu probe and the endpoint's ATTACH \
             (reached {reached} milestones)"
        );
    }
}
