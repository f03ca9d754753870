//! End to end with Sluice's devices (qemu backend, as `sluice run --iommu virtio` wires them):
//! a 500 ms delay on the first virtio-iommu ATTACH, as a stall (the doorbell's vCPU is held in
//! QEMU) and as a deferral (the completion is published later), against a baseline boot.
//! The firing names the endpoint; the guest still passes its disk workload; the boot is
//! longer by about the delay.
//!
//! Needs the cached 6.12 guest and the patched QEMU (run here under the shared build lock).
//! Prints `SKIPPED: <why>` and passes when they are unavailable.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_devapi::{Endpoint, Fanout, Hooks};
use sluice_host::iommu::FirmwareDescription;
use sluice_host::machine::{Arch, BackendKind, MachineSpec};
use sluice_host::{DeviceSet, DiskSpec, GuestExit, HostOptions, IommuChoice};
use sluice_inject::{Firing, Injector, Plan};
use sluice_qemu::launcher::{Accel, QemuConfig};
use sluice_virtio_iommu::ViommuConfig;

mod common;
use common::built;

struct Run {
    pass: bool,
    wall: Duration,
    uptime: Option<f64>,
    firings: Vec<(Duration, Firing)>,
    console: String,
}

fn boot(qemu: &Path, kernel: &Path, initrd: &Path, dir: &Path, plan: Option<&str>) -> Run {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk0.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let disks = [DiskSpec {
        path: disk,
        read_only: false,
        iommu: true,
    }];
    let reg = sluice_host::points::with_run_devices(sluice_host::points::all_models(), 1, true);
    let plan = reg
        .validate(&Plan::parse_cli(plan.unwrap_or("")).unwrap())
        .unwrap();
    let inj = Arc::new(Injector::new(plan));
    let t0 = Instant::now();
    let firings = Arc::new(Mutex::new(Vec::new()));
    let f = firings.clone();
    inj.set_sink(Arc::new(move |x: &Firing| {
        f.lock().unwrap().push((x.at - t0, x.clone()))
    }));
    let hooks: Arc<dyn Hooks> = Arc::new(Fanout(vec![inj.clone()]));
    let opts =
        HostOptions::default().with_iommu(&IommuChoice::Virtio(ViommuConfig::default()), &disks);
    let devices = DeviceSet::with_options(&disks, hooks, &opts).unwrap();
    let p = devices.iommu.as_ref().unwrap();
    let viot = dir.join("viot.aml");
    let FirmwareDescription::AcpiTable(table) = p.firmware(Arch::X86_64).unwrap() else {
        panic!("virtio-iommu on x86 is described by an ACPI table");
    };
    std::fs::write(&viot, table).unwrap();
    let cfg = QemuConfig {
        machine: MachineSpec::x86_q35(),
        qemu: qemu.to_path_buf(),
        accel: Accel::detect(),
        cpus: 2,
        mem_mib: 512,
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        // The platform's own pieces, so this boot is the one `sluice run` makes (no PS/2 ports:
        // see MachineSpec::x86_q35).
        cmdline: format!(
            "{} sluice.workload=disk sluice.seed=1",
            MachineSpec::x86_q35().base_cmdline(BackendKind::Qemu)
        ),
        serial_log: dir.join("serial.log"),
        timeout: Duration::from_secs(150),
        acpi_tables: vec![viot],
        extra_args: vec![],
        console_sink: None,
        platform_iommu: None,
    };
    let out = sluice_qemu::run(&cfg, &devices).unwrap();
    let console = out.console.join("\n");
    let uptime = console
        .lines()
        .find_map(|l| l.split("SLUICE: done uptime=").nth(1))
        .and_then(|v| v.trim().parse().ok());
    let firings = firings.lock().unwrap().clone();
    Run {
        pass: out.exit == GuestExit::PoweredOff && console.contains("SLUICE: RESULT PASS"),
        wall: out.wall,
        uptime,
        firings,
        console,
    }
}

#[test]
fn first_attach_delayed_stall_and_defer() {
    let img = built(&["guest-images/build.sh", "6.12"], &["KERNEL", "INITRD"]);
    let q = built(&["guest-images/qemu/build-qemu.sh"], &["QEMU"]);
    let (kernel, initrd, qemu) = (img[0].as_path(), img[1].as_path(), q[0].as_path());
    let dir = std::env::temp_dir().join(format!("sluice-inject-attach-{}", std::process::id()));
    let base = boot(qemu, kernel, initrd, &dir.join("base"), None);
    let stall = boot(
        qemu,
        kernel,
        initrd,
        &dir.join("stall"),
        Some("virtio-iommu.req.attach:delay=500ms,nth=1"),
    );
    let defer = boot(
        qemu,
        kernel,
        initrd,
        &dir.join("defer"),
        Some("virtio-iommu.req.attach:delay=500ms,nth=1,mode=defer"),
    );
    for (name, r) in [("baseline", &base), ("stall", &stall), ("defer", &defer)] {
        println!(
            "{name}: pass {} wall {:?} guest uptime at done {:?}",
            r.pass, r.wall, r.uptime
        );
        for (t, f) in &r.firings {
            println!(
                "  firing at +{t:?}: rule {} `{}` {} {} delay {:?} endpoint {:?} domain {:?} arrival {}",
                f.rule,
                f.rule_text,
                f.point,
                f.mode,
                f.delay,
                f.endpoint.map(|e| e.to_string()),
                f.domain,
                f.occurrence
            );
        }
        assert!(r.pass, "{name} boot failed:\n{}", r.console);
    }
    assert!(base.firings.is_empty());
    for r in [&stall, &defer] {
        assert_eq!(r.firings.len(), 1);
        let f = &r.firings[0].1;
        assert_eq!((f.occurrence, f.delay), (1, Duration::from_millis(500)));
        assert!(matches!(f.endpoint, Some(Endpoint::Pci(_))), "{f:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
