//! `sluice run`: assemble devices, pick the backend, boot, verify, report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use sluice_host::{DeviceSet, DiskSpec, DmaStats, GuestExit, HostOptions, IommuChoice};
use sluice_qemu::{Accel, QemuConfig};
use sluice_virtio_iommu::ViommuConfig;

use crate::report::{self, DiskVerdict};
use crate::{image, verify};

/// IOMMU in front of the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IommuArg {
    /// No IOMMU.
    None,
    /// virtio-iommu on PCI (00:02.0), described by a VIOT table.
    Virtio,
}

/// CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// QEMU runs the CPU (TCG, or KVM on hardware-virtualization hosts).
    Qemu,
    /// Sluice's own rust-vmm VMM (hardware virtualization hosts).
    Kvm,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// CPU backend (default: qemu where /dev/kvm is absent or nested PVM).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Guest variant to build or find (guest-images/variants/<name>).
    #[arg(long, default_value = image::DEFAULT_VARIANT, conflicts_with_all = ["kernel"])]
    guest: String,
    /// Kernel image (instead of --guest).
    #[arg(long, requires = "initrd")]
    kernel: Option<PathBuf>,
    /// Initramfs (with --kernel).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest RAM, e.g. 512M or 1G.
    #[arg(long, default_value = "512M", value_parser = parse_size_mib)]
    mem: u64,
    /// A raw disk image: PATH[,ro][,iommu=on|off]. Repeat for several disks. Default: a fresh
    /// 64 MiB scratch disk. With an IOMMU, disks sit behind it unless `iommu=off`.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Put an IOMMU in front of the disks.
    #[arg(long, value_enum, default_value = "none")]
    iommu: IommuArg,
    /// virtio-iommu boot bypass (unattached endpoints bypass until the driver clears it).
    #[arg(long, default_value = "on", value_parser = parse_on_off)]
    iommu_boot_bypass: bool,
    /// Extra kernel command line (appended).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest workload (/init's sluice.workload).
    #[arg(long, default_value = "disk")]
    workload: String,
    /// Seed for the guest's disk pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Serial console log (host-timestamped).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Write a JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Kill the guest after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// QEMU binary (default: the project's patched build under TCG, stock QEMU under KVM).
    #[arg(long, env = "SLUICE_QEMU")]
    qemu: Option<PathBuf>,
    /// Directory for scratch disks and logs.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?} (use e.g. 512M or 1G)"))?;
    match n.checked_mul(mul) {
        Some(v) if (64..=65536).contains(&v) => Ok(v),
        _ => Err(format!("size {s:?} out of range (64M..64G)")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

fn parse_disk(spec: &str, have_iommu: bool) -> Result<DiskSpec> {
    let mut parts = spec.split(',');
    let path = PathBuf::from(parts.next().unwrap_or(""));
    let mut read_only = false;
    let mut iommu = have_iommu;
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => read_only = true,
            None if opt == "rw" => read_only = false,
            Some(("iommu", v)) => {
                iommu = parse_on_off(v).map_err(|e| anyhow::anyhow!("{e} in {spec:?}"))?
            }
            _ => bail!("unknown disk option {opt:?} in {spec:?} (known: ro, rw, iommu=on|off)"),
        }
    }
    if path.as_os_str().is_empty() {
        bail!("empty disk path in {spec:?}");
    }
    if iommu && !have_iommu {
        bail!("{spec:?} asks for iommu=on but the run has no IOMMU (add --iommu virtio)");
    }
    Ok(DiskSpec {
        path,
        read_only,
        iommu,
    })
}

fn default_backend() -> Backend {
    // The kvm backend is a separate issue; until it lands every host uses qemu.
    Backend::Qemu
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let backend = args.backend.unwrap_or_else(default_backend);
    if backend == Backend::Kvm {
        bail!("the kvm backend is not available yet; use --backend qemu");
    }
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        image::repo_root()
            .join("target/sluice-runs")
            .join(format!("run-{stamp}-{}", std::process::id()))
    });
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;

    let have_iommu = args.iommu != IommuArg::None;
    let mut disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d, have_iommu))
        .collect::<Result<Vec<_>>>()?;
    if disks.is_empty() {
        let path = run_dir.join("disk0.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(64 << 20))
            .with_context(|| format!("cannot create scratch disk {}", path.display()))?;
        disks.push(DiskSpec {
            path,
            read_only: false,
            iommu: have_iommu,
        });
    }

    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => {
            eprintln!(
                "sluice: guest image {} (built once, then cached)",
                args.guest
            );
            let img = image::build_guest(&args.guest)?;
            (img.kernel, img.initrd)
        }
    };
    let accel = Accel::detect();
    let qemu = match (&args.qemu, accel) {
        (Some(q), _) => q.clone(),
        (None, Accel::Kvm) => PathBuf::from("/usr/bin/qemu-system-x86_64"),
        (None, Accel::Tcg) => {
            eprintln!("sluice: QEMU with the proxy INTx patch (built once, then cached)");
            image::build_qemu()?
        }
    };

    let stats = Arc::new(DmaStats::default());
    let host_opts = HostOptions {
        iommu: match args.iommu {
            IommuArg::None => None,
            IommuArg::Virtio => Some(IommuChoice::Virtio(ViommuConfig {
                boot_bypass: args.iommu_boot_bypass,
                ..Default::default()
            })),
        },
        ..Default::default()
    };
    let devices = DeviceSet::with_options(&disks, stats.clone(), &host_opts)?;
    let mut acpi_tables = Vec::new();
    if let Some(p) = &devices.iommu {
        let path = run_dir.join("viot.aml");
        std::fs::write(&path, sluice_acpi::viot_virtio_pci(p.bdf, &p.endpoints))
            .with_context(|| format!("cannot write {}", path.display()))?;
        acpi_tables.push(path);
    }
    let cmdline = format!(
        // tsc=unstable: under a busy TCG host the guest sometimes miscalibrates the TSC against the
        // PIT and its clock runs ~10x fast, which breaks timings and /init watchdogs.
        "console=ttyS0 panic=-1 nokaslr tsc=unstable sluice.workload={} sluice.seed={} {}",
        args.workload, args.seed, args.cmdline
    );
    let serial_log = args
        .serial_log
        .clone()
        .unwrap_or_else(|| run_dir.join("serial.log"));
    let cfg = QemuConfig {
        qemu,
        accel,
        cpus: args.cpus,
        mem_mib: args.mem,
        kernel,
        initrd,
        cmdline: cmdline.trim().to_string(),
        serial_log: serial_log.clone(),
        timeout: Duration::from_secs(args.timeout),
        acpi_tables,
        extra_args: vec![],
    };
    eprintln!(
        "sluice: booting ({} vCPUs, {:?}, {} disk(s)); console in {}",
        cfg.cpus,
        accel,
        disks.len(),
        serial_log.display()
    );
    let outcome = sluice_qemu::run(&cfg, &devices)?;
    let guest = verify::parse_console(&outcome.console);

    let mut disk_verdicts = Vec::new();
    for d in devices.devices.iter().filter(|d| d.disk.is_some()) {
        let bdf = d.bdf.to_string();
        let vd = guest
            .disks
            .iter()
            .find(|(_, b, _)| *b == bdf)
            .map(|(v, _, _)| v.clone());
        let guest_result = vd
            .as_ref()
            .and_then(|v| guest.disk_results.iter().find(|(n, _)| n == v))
            .map(|(_, r)| r.clone());
        let host = match (&vd, &d.disk, args.workload.as_str()) {
            (Some(v), Some(path), "disk") => Some(verify::check_disk(path, args.seed, v)),
            _ => None,
        };
        let iommu_group = vd
            .as_ref()
            .and_then(|v| guest.disks.iter().find(|(n, _, _)| n == v))
            .map(|(_, _, g)| g.clone());
        disk_verdicts.push(DiskVerdict {
            name: d.name.clone(),
            bdf,
            guest_name: vd,
            guest_result,
            host,
            behind_iommu: d.behind_iommu,
            iommu_group,
        });
    }
    let verdict = report::verdict(&outcome, &guest, &disk_verdicts, &args.workload, args.cpus);
    report::print_summary(&outcome, &guest, &disk_verdicts, &verdict);
    if let Some(path) = &args.report {
        report::write_json(
            path,
            &outcome,
            &guest,
            &disk_verdicts,
            &devices,
            &stats,
            &verdict,
            &cfg,
        )?;
    }
    Ok(if verdict.pass {
        ExitCode::SUCCESS
    } else if matches!(outcome.exit, GuestExit::PoweredOff) {
        ExitCode::from(1)
    } else {
        ExitCode::from(3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_disk_specs() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert!(parse_size_mib("1T").is_err());
        assert!(parse_size_mib("3M").is_err());
        let d = parse_disk("/tmp/a.img,ro", false).unwrap();
        assert!(d.read_only && !d.iommu);
        assert!(parse_disk("/tmp/a.img,bogus", false).is_err());
        assert!(parse_disk(",ro", false).is_err());
        assert!(parse_disk("/tmp/a.img", true).unwrap().iommu);
        assert!(!parse_disk("/tmp/a.img,iommu=off", true).unwrap().iommu);
        assert!(
            parse_disk("/tmp/a.img,iommu=on", false).is_err(),
            "no IOMMU to sit behind"
        );
        assert!(parse_disk("/tmp/a.img,iommu=maybe", true).is_err());
    }
}
