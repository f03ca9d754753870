//! A real Linux guest boots under QEMU TCG with 2 vCPUs against Sluice's own virtio-blk
//! (served through x-pci-proxy-dev), writes a pattern, reads it back, powers off, and the host
//! finds the pattern in the image.

mod common;

use common::*;

fn boot_and_verify(variant: &str) {
    let (kernel, initrd) = guest(variant);
    let qemu = qemu();
    let dir = scratch(&format!("boot-{variant}"));
    let (out, report) = run_guest(
        &kernel,
        &initrd,
        &qemu,
        &dir,
        &["--cpus", "2", "--seed", "42", "--timeout", "240"],
    );
    let log = text(&out);
    assert!(
        out.status.success(),
        "sluice run failed for {variant}:\n{log}"
    );
    assert!(log.contains("VERDICT: PASS"), "{log}");
    let r = report.expect("report written");
    assert_eq!(r["exit_reason"], "powered-off");
    assert_eq!(r["guest"]["nproc"], 2, "guest saw both vCPUs");
    assert_eq!(
        r["disks"][0]["host_check"], "Match",
        "host found the guest's pattern"
    );
    assert!(r["guest"]["result"].as_str() == Some("PASS"));
    let irq_lines = r["guest"]["virtio_interrupts"]
        .as_array()
        .expect("interrupt lines");
    let counted: u64 = irq_lines
        .iter()
        .filter_map(|l| l.as_str())
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(2)
                .filter_map(|n| n.parse::<u64>().ok())
        })
        .sum();
    assert!(
        counted > 0,
        "the disk's interrupts show in /proc/interrupts: {irq_lines:?}"
    );
    let dev = &r["devices"][0];
    assert!(
        dev["counters"]["write_bytes"].as_u64().unwrap() >= 4 << 20,
        "{dev}"
    );
    assert!(
        dev["counters"]["read_bytes"].as_u64().unwrap() >= 4 << 20,
        "{dev}"
    );
    assert_eq!(dev["counters"]["errors"], 0);
    assert!(dev["intx_raised"].as_u64().unwrap() > 0);
    assert!(r["boot_to_init_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn linux_6_12_boots_and_round_trips_the_disk() {
    boot_and_verify("6.12");
}

#[test]
fn linux_6_1_boots_and_round_trips_the_disk() {
    boot_and_verify("6.1");
}

#[test]
fn two_disks_each_verified() {
    let (kernel, initrd) = guest("6.12");
    let dir = scratch("two-disks");
    for n in ["a.img", "b.img"] {
        std::fs::File::create(dir.join(n))
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
    }
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    let (out, report) = run_guest(
        &kernel,
        &initrd,
        &qemu(),
        &dir,
        &[
            "--disk",
            a.to_str().unwrap(),
            "--disk",
            b.to_str().unwrap(),
            "--seed",
            "9",
            "--timeout",
            "240",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let r = report.unwrap();
    let disks = r["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for d in disks {
        assert_eq!(d["host_check"], "Match", "{d}");
    }
    assert_ne!(disks[0]["guest_name"], disks[1]["guest_name"]);
}
