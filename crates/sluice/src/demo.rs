//! `sluice demo`: the registration-window escape on the stock 6.12 guest, end to end.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use sluice_host::DiskSpec;

use crate::image;
use crate::run::{self, Backend, GuestSource, IommuArg, RunSpec};

/// The endpoint behind the IOMMU (first disk slot).
const ENDPOINT: &str = "0000:00:03.0";

pub fn run() -> Result<ExitCode> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let run_dir = image::repo_root()
        .join("target/sluice-runs")
        .join(format!("demo-{stamp}"));
    std::fs::create_dir_all(&run_dir)?;
    let disk = run_dir.join("disk0.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    println!("Sluice demo: Linux 6.12 (stock Debian source) behind Sluice's virtio-iommu.");
    println!("  /init loads virtio_iommu, then virtio_blk, while re-probing the disk {ENDPOINT};");
    println!("  Sluice stalls the vCPU that enters bus_iommu_probe() for 300 ms (TCG plugin),");
    println!(
        "  widening viommu_probe()'s registration window. See scenarios/registration-window.toml."
    );
    let spec = RunSpec {
        arch: sluice_host::machine::Arch::X86_64,
        guest: GuestSource::Variant(image::DEFAULT_VARIANT.to_string()),
        qemu: std::env::var_os("SLUICE_QEMU").map(Into::into),
        cpus: 2,
        mem_mib: 512,
        disks: vec![DiskSpec {
            path: disk,
            read_only: false,
            iommu: true,
        }],
        iommu: IommuArg::Virtio,
        boot_bypass: true,
        cmdline: format!("sluice.load=virtio_iommu,virtio_blk sluice.reprobe={ENDPOINT}"),
        workload: "disk".into(),
        seed: 1,
        timeout: Duration::from_secs(180),
        run_dir: run_dir.clone(),
        serial_log: None,
        report: None,
        backend: Backend::Qemu,
        inject: vec!["guest.sym.bus_iommu_probe:delay=300ms,count=2,mode=stall".into()],
        inject_file: None,
        inject_seed: Some(1),
        system_map: None,
        cpuid_mask: vec![],
        dma_engine: None,
        rogue: vec![],
        quiet: false,
    };
    let rec = run::execute(&spec)?;
    let group = rec
        .disks
        .first()
        .and_then(|d| d.iommu_group.clone())
        .unwrap_or_else(|| "?".into());
    println!();
    println!(
        "guest exit:        {} (workload {})",
        rec.outcome.exit.name(),
        rec.guest.result.as_deref().unwrap_or("?")
    );
    println!("disk {ENDPOINT}: IOMMU group {group}");
    println!("injection firings: {:?}", rec.firings);
    let classes: Vec<String> = rec
        .escapes
        .iter()
        .map(|(c, n)| format!("{c} x{n}"))
        .collect();
    println!(
        "DMA escapes:       {} {}",
        rec.escape_count,
        classes.join(", ")
    );
    match sluice_oracle::render::render_report(&run_dir) {
        Ok((table, svgs)) => {
            println!("\n{table}");
            for s in svgs.iter().take(3) {
                println!("timeline SVG:      {}", s.display());
            }
        }
        Err(e) => println!("(no rendered report: {e})"),
    }
    println!(
        "run directory:     {} (timeline.jsonl, report.json, serial.log)",
        run_dir.display()
    );
    if rec.escape_count > 0 && group == "none" {
        println!(
            "VERDICT: ESCAPE REPRODUCED: the disk bound without an IOMMU after the IOMMU driver took over, and its DMA bypassed translation."
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "VERDICT: NOT REPRODUCED this time (escapes {}, group {group}); rerun, or see docs/results.md.",
            rec.escape_count
        );
        Ok(ExitCode::from(1))
    }
}
