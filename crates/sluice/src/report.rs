//! The verdict of a run, its one-screen summary, and the JSON report.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use sluice_host::DeviceSet;
use sluice_host::{DmaStats, GuestExit, RunOutcome};

use crate::verify::{GuestReport, HostCheck};

/// One disk's outcome.
#[derive(Debug, Clone)]
pub struct DiskVerdict {
    pub name: String,
    pub bdf: String,
    pub guest_name: Option<String>,
    pub guest_result: Option<String>,
    pub host: Option<HostCheck>,
    pub behind_iommu: bool,
    pub iommu_group: Option<String>,
}

/// Overall verdict with the reasons it failed.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub pass: bool,
    pub reasons: Vec<String>,
}

pub fn verdict(
    outcome: &RunOutcome,
    guest: &GuestReport,
    disks: &[DiskVerdict],
    workload: &str,
    cpus: u32,
) -> Verdict {
    let mut reasons = Vec::new();
    if outcome.exit != GuestExit::PoweredOff {
        reasons.push(format!(
            "guest did not power off cleanly: {}",
            outcome.exit.name()
        ));
    }
    if guest.result.as_deref() != Some("PASS") {
        reasons.push(format!(
            "guest reported {}",
            guest.result.as_deref().unwrap_or("no RESULT line")
        ));
    }
    if guest.nproc != Some(cpus) {
        reasons.push(format!(
            "guest saw nproc={:?}, expected {cpus}",
            guest.nproc
        ));
    }
    if workload == "disk" {
        for d in disks {
            match (&d.guest_name, &d.host) {
                (None, _) => reasons.push(format!(
                    "{} ({}) never appeared in the guest",
                    d.name, d.bdf
                )),
                (Some(_), Some(HostCheck::Match)) => {}
                (Some(v), other) => reasons.push(format!("{} ({v}): host check {other:?}", d.name)),
            }
        }
    }
    for d in disks {
        let grouped = d
            .iommu_group
            .as_deref()
            .is_some_and(|g| g != "none" && !g.is_empty());
        if d.guest_name.is_some() && grouped != d.behind_iommu {
            reasons.push(format!(
                "{} ({}): behind the IOMMU = {}, but the guest put it in IOMMU group {:?}",
                d.name, d.bdf, d.behind_iommu, d.iommu_group
            ));
        }
    }
    Verdict {
        pass: reasons.is_empty(),
        reasons,
    }
}

pub fn print_summary(
    outcome: &RunOutcome,
    guest: &GuestReport,
    disks: &[DiskVerdict],
    verdict: &Verdict,
) {
    println!("guest exit:     {}", outcome.exit.name());
    if let GuestExit::QemuFailed { code, stderr } = &outcome.exit {
        println!("qemu exit code: {code:?}\nqemu stderr:    {stderr}");
    }
    if let GuestExit::DeviceError(e) = &outcome.exit {
        println!("device error:   {e}");
    }
    match outcome.boot_to_init {
        Some(t) => println!("boot to /init:  {:.2} s (host wall time)", t.as_secs_f64()),
        None => println!("boot to /init:  never reached"),
    }
    println!("wall time:      {:.2} s", outcome.wall.as_secs_f64());
    println!(
        "guest:          kernel {} nproc {:?}",
        guest.kernel.as_deref().unwrap_or("?"),
        guest.nproc
    );
    for d in disks {
        println!(
            "disk {} {} -> {}{}: guest [{}] host [{}]",
            d.name,
            d.bdf,
            d.guest_name.as_deref().unwrap_or("absent"),
            if d.behind_iommu {
                format!(" (IOMMU group {})", d.iommu_group.as_deref().unwrap_or("?"))
            } else {
                String::new()
            },
            d.guest_result.as_deref().unwrap_or("-"),
            d.host
                .as_ref()
                .map_or("-".to_string(), |h| format!("{h:?}"))
        );
    }
    for l in &guest.virtio_interrupts {
        println!("interrupts:     {l}");
    }
    if verdict.pass {
        println!("VERDICT: PASS");
    } else {
        println!("VERDICT: FAIL");
        for r in &verdict.reasons {
            println!("  - {r}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn write_json(
    path: &Path,
    outcome: &RunOutcome,
    guest: &GuestReport,
    disks: &[DiskVerdict],
    devices: &DeviceSet,
    stats: &DmaStats,
    verdict: &Verdict,
    meta: serde_json::Value,
) -> Result<()> {
    let exit_detail = match &outcome.exit {
        GuestExit::QemuFailed { code, stderr } => json!({ "code": code, "stderr": stderr }),
        GuestExit::DeviceError(e) => json!({ "error": e }),
        _ => serde_json::Value::Null,
    };
    let devs: Vec<_> = devices
        .devices
        .iter()
        .map(|d| {
            let counters: serde_json::Map<String, serde_json::Value> = d
                .virtio
                .iter()
                .flat_map(|v| v.counters())
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({
                "name": d.name,
                "bdf": d.bdf.to_string(),
                "kind": d.kind,
                "behind_iommu": d.behind_iommu,
                "bus_master_enabled": d.virtio.as_ref().map(|v| v.bus_master_enabled()),
                "virtio_status": d.virtio.as_ref().map(|v| v.status()),
                "intx_raised": d.intx.raised(),
                "counters": counters,
            })
        })
        .collect();
    let disk_json: Vec<_> = disks
        .iter()
        .map(|d| json!({
            "name": d.name, "bdf": d.bdf, "guest_name": d.guest_name,
            "guest_result": d.guest_result, "host_check": d.host.as_ref().map(|h| format!("{h:?}")),
            "behind_iommu": d.behind_iommu, "iommu_group": d.iommu_group,
        }))
        .collect();
    let doc = json!({
        "verdict": if verdict.pass { "pass" } else { "fail" },
        "reasons": verdict.reasons,
        "exit_reason": outcome.exit.name(),
        "exit_detail": exit_detail,
        "boot_to_init_s": outcome.boot_to_init.map(|d| d.as_secs_f64()),
        "wall_s": outcome.wall.as_secs_f64(),
        "guest": guest,
        "disks": disk_json,
        "devices": devs,
        "iommu": devices.iommu.as_ref().map(|p| json!({
            "kind": p.kind().long_name(),
            "bdf": p.pci_address().map(|b| b.to_string()),
            "boot_bypass": p.boot_bypass().map(|on| if on { "on" } else { "off" }),
            "endpoints": p.endpoints().iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        })),
        "dma": stats.snapshot().into_iter().map(|(ep, c)| json!({
            "endpoint": ep.to_string(),
            "translated": c.translated,
            "bypassed": c.bypassed,
            "faulted": c.faulted,
            "direct": c.direct,
            "bytes": c.bytes,
        })).collect::<Vec<_>>(),
    });
    let mut doc = doc;
    if let (Some(obj), serde_json::Value::Object(extra)) = (doc.as_object_mut(), meta) {
        obj.extend(extra);
    }
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("cannot write report {}", path.display()))
}
