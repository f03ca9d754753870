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
    // The disk's interrupts are MSI-X when the proxy emulates it (the patched QEMU), INTx
    // otherwise; either way the device raised them.
    let msix = irq_lines
        .iter()
        .filter_map(|l| l.as_str())
        .any(|l| l.contains("MSI"));
    assert!(
        msix || dev["intx_raised"].as_u64().unwrap() > 0,
        "{irq_lines:?}"
    );
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

/// `sluice run` of the 6.12 guest behind Sluice's virtio-iommu with `extra` arguments (disks,
/// workload) and kernel command line `cmdline`, in `dir`.
fn run_behind_viommu(
    dir: &std::path::Path,
    extra: &[&str],
    cmdline: &str,
) -> (std::process::Output, Option<serde_json::Value>) {
    let (kernel, initrd) = guest("6.12");
    let mut args = vec!["--iommu", "virtio"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", cmdline, "--timeout", "240"]);
    run_guest(&kernel, &initrd, &qemu(), dir, &args)
}

/// virtio-iommu with two disks, one behind it: the endpoint lands in an IOMMU group, the other
/// disk does not, both round-trip their data, and every DMA of the endpoint was translated.
fn virtio_iommu_two_disks(extra_cmdline: &str) -> serde_json::Value {
    let dir = scratch(&format!(
        "viommu{}",
        extra_cmdline.replace(['.', '=', ' '], "-")
    ));
    for n in ["behind.img", "direct.img"] {
        std::fs::File::create(dir.join(n))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
    }
    let behind = dir.join("behind.img");
    let direct = format!("{},iommu=off", dir.join("direct.img").display());
    let (out, report) = run_behind_viommu(
        &dir,
        &["--disk", behind.to_str().unwrap(), "--disk", &direct],
        extra_cmdline,
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let r = report.unwrap();
    let disks = r["disks"].as_array().unwrap();
    assert_eq!(disks[0]["behind_iommu"], true);
    assert_ne!(
        disks[0]["iommu_group"], "none",
        "endpoint is in an IOMMU group: {r}"
    );
    assert_eq!(
        disks[1]["iommu_group"], "none",
        "the other disk is not: {r}"
    );
    for d in disks {
        assert_eq!(d["host_check"], "Match", "{d}");
    }
    let dma = r["dma"].as_array().unwrap();
    assert_eq!(
        dma.len(),
        1,
        "only the endpoint goes through the IOMMU: {dma:?}"
    );
    assert_eq!(dma[0]["endpoint"], "pci:0000:00:03.0");
    assert!(dma[0]["translated"].as_u64().unwrap() > 1000, "{dma:?}");
    assert_eq!(dma[0]["faulted"], 0, "{dma:?}");
    let viommu = &r["devices"][0];
    assert_eq!(viommu["kind"], "virtio-iommu");
    assert!(
        viommu["counters"]["requests_attach"].as_u64().unwrap() >= 1,
        "{viommu}"
    );
    assert!(
        viommu["counters"]["requests_map"].as_u64().unwrap() > 0,
        "{viommu}"
    );
    r
}

#[test]
fn virtio_iommu_lazy() {
    let r = virtio_iommu_two_disks("");
    // 6.12's virtio-iommu really is lazy: the default domain is a flush-queue domain.
    assert_eq!(r["guest"]["iommu_groups"][0][2], "DMA-FQ", "{}", r["guest"]);
}

#[test]
fn virtio_iommu_strict() {
    let r = virtio_iommu_two_disks("iommu.strict=1");
    assert_eq!(r["guest"]["iommu_groups"][0][2], "DMA", "{}", r["guest"]);
    let c = &r["devices"][0]["counters"];
    assert!(
        c["requests_unmap"].as_u64().unwrap() > 0,
        "strict mode unmaps: {c}"
    );
}

/// One run of `variant` (architecture `arch`) with its disk behind `iommu`, `cmdline` and the
/// injection rules `inject`: the report of a run that powered off, and its directory.
fn boot_behind_iommu(
    variant: &str,
    arch: &str,
    iommu: &str,
    cmdline: &str,
    inject: &str,
) -> (serde_json::Value, std::path::PathBuf, String) {
    let (kernel, initrd) = guest(variant);
    let dir = scratch(&format!(
        "{variant}-{}",
        cmdline.replace(['.', '=', ' '], "-")
    ));
    let (out, report) = run_guest(
        &kernel,
        &initrd,
        &qemu_for(arch),
        &dir,
        &[
            "--arch",
            arch,
            "--iommu",
            iommu,
            "--cmdline",
            cmdline,
            "--inject",
            inject,
            "--timeout",
            "240",
        ],
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let r = report.expect("report written");
    assert_eq!(r["exit_reason"], "powered-off", "{log}");
    (r, dir, log)
}

/// arm64 under Sluice's SMMUv3: the real arm-smmu-v3 driver programs the model through the
/// proxied register window, the disk's every DMA is translated by the model (StreamID = RID
/// 00:03.0 = 0x18), the disk round-trips, and the model's points fire on the guest's commands.
///
/// The disk's completions are MSI-X through the GIC ITS: QEMU writes each message at the IOVA
/// Linux mapped the ITS doorbell at, and asks Sluice's model to translate it (SMMU_TRANSLATE).
/// So the model translated every MSI, refused none, and the disk raised no INTx.
fn arm64_smmuv3(cmdline: &str, inject: &str) -> serde_json::Value {
    let (r, dir, log) = boot_behind_iommu("arm64-6.12", "aarch64", "smmuv3", cmdline, inject);
    let proxy = &r["iommu_proxy"];
    assert!(proxy["translations"].as_u64().unwrap() > 100, "{proxy}");
    assert_eq!(proxy["translation_faults"], 0, "{proxy}");
    let blk = log
        .lines()
        .find(|l| l.starts_with("device proxy:") && l.contains("blk0:"))
        .unwrap_or_else(|| panic!("no device proxy line for blk0: {log}"));
    assert!(blk.contains(", 0 INTx raised"), "{blk}");
    assert!(!blk.contains(" 0 MSI-X vectors"), "{blk}");
    assert_eq!(r["iommu"]["kind"], "SMMUv3");
    let disk = &r["disks"][0];
    assert_eq!(disk["host_check"], "Match", "{disk}");
    assert_ne!(disk["iommu_group"], "none", "{disk}");
    let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap();
    assert!(
        serial.contains("arm-smmu-v3 9050000.smmuv3: ias"),
        "the driver probed the model"
    );
    let dma = r["dma"].as_array().unwrap();
    assert_eq!(dma.len(), 1, "{dma:?}");
    assert_eq!(dma[0]["endpoint"], "sid:0x18");
    assert_eq!(dma[0]["faulted"], 0, "{dma:?}");
    assert_eq!(r["escape_count"], 0, "{}", r["escapes"]);
    r
}

#[test]
fn arm64_smmuv3_strict_translates_every_dma_and_fires_its_points() {
    let r = arm64_smmuv3(
        "iommu.strict=1",
        "smmuv3.cmd.CMD_SYNC:delay=1ms,count=3;smmuv3.cmd.CFGI_STE:delay=1ms,count=1;\
         smmuv3.cmd.TLBI_NH_VA:delay=1ms,count=3;smmuv3.mmio.write.CR0:delay=1ms,count=1",
    );
    assert_eq!(r["guest"]["iommu_groups"][0][2], "DMA", "{}", r["guest"]);
    let dma = &r["dma"][0];
    assert!(dma["translated"].as_u64().unwrap() > 1000, "{dma}");
    assert_eq!(dma["bypassed"], 0, "{dma}");
    assert_eq!(
        r["injection"]["firings_per_rule"],
        serde_json::json!([3, 1, 3, 1]),
        "CMD_SYNC, CFGI_STE, TLBI_NH_VA (strict unmaps) and CR0 all reached: {}",
        r["injection"]
    );
    // IDR0.MSI: Linux completes each CMD_SYNC by an MSI into guest memory and polls memory,
    // so a strict run's syncs (about one per unmap) cost one register access each (the
    // CMDQ_PROD doorbell), not two (plus a CMDQ_CONS read), and no wired interrupt.
    let proxy = &r["iommu_proxy"];
    let msis = proxy["msis"].as_u64().unwrap();
    let accesses = proxy["register_accesses"].as_u64().unwrap();
    // How many syncs a run makes depends on the guest: Linux's virtio ring maps and unmaps
    // every segment of a request on its own, and how many segments dd's buffer has differs
    // from boot to boot (716 to 2316 seen). 300 is enough that a second access per sync
    // would break the bounds below.
    assert!(msis > 300, "{proxy}");
    assert!(
        accesses < msis + 200,
        "CONS polled over the socket? {proxy}"
    );
    assert_eq!(proxy["line_interrupts"], 0, "{proxy}");
    // The CMDQ_PROD doorbells are posted (the QEMU patch's BAR_WRITE_POSTED): nearly every
    // register access of a strict run is one, so the vCPU rarely waits on the socket.
    let posted = proxy["posted_writes"].as_u64().unwrap();
    assert!(posted > 300 && posted + 200 > accesses, "{proxy}");
    // The guest spins for each CMD_SYNC: the server thread that answers runs SCHED_FIFO.
    if runs_as_root() {
        assert_eq!(proxy["server_fifo"], true, "{proxy}");
    }
}

/// s390x under Sluice's zPCI model: QEMU forwards the guest's MPCIFC, RPCIT and enable to the
/// model, which walks the guest's DMA tables and translates every DMA of the disk (a zPCI
/// function, UID 1: 0001:00:00.0 in the guest); the disk round-trips and the model's points
/// (and a guest-code point, through the TCG plugin) fire.
fn s390x_zpci(variant: &str, cmdline: &str, inject: &str) -> serde_json::Value {
    let (r, _, _) = boot_behind_iommu(variant, "s390x", "zpci", cmdline, inject);
    let disk = &r["disks"][0];
    assert_eq!(disk["host_check"], "Match", "{disk}");
    assert_eq!(disk["guest_name"], "vda", "{disk}");
    assert_ne!(disk["iommu_group"], "none", "{disk}");
    let dma = r["dma"].as_array().unwrap();
    assert_eq!(dma.len(), 1, "{dma:?}");
    assert!(
        dma[0]["endpoint"].as_str().unwrap().starts_with("fh:0x8"),
        "an enabled function handle: {dma:?}"
    );
    assert!(dma[0]["translated"].as_u64().unwrap() > 1000, "{dma:?}");
    assert_eq!(dma[0]["faulted"], 0, "{dma:?}");
    assert_eq!(dma[0]["bypassed"], 0, "{dma:?}");
    assert_eq!(r["escape_count"], 0, "{}", r["escapes"]);
    let z = &r["zpci_proxy"];
    assert!(
        z["mpcifc"].as_u64().unwrap() >= 2,
        "REG_IOAT and REG_INT at least: {z}"
    );
    assert_eq!(z["enable_disable"], 1, "{z}");
    assert_eq!(z["refused"], 0, "{z}");
    assert_eq!(z["error_events"], 0, "{z}");
    // QEMU polls for answers only when the server thread cannot be kept off its core by the
    // polling vCPU (docs/backends.md); as root both hold.
    let fifo = z["server_fifo"].as_bool().unwrap();
    assert_eq!(z["answer_poll_us"].as_u64().is_some(), fifo, "{z}");
    if runs_as_root() {
        assert!(fifo, "root may use SCHED_FIFO: {z}");
        assert_eq!(z["answer_poll_us"], 200, "{z}");
    }
    // Only a SCHED_FIFO server thread polls for the next instruction (by default; the A/B
    // switch can turn it off); one that does finds some of a booting guest's RPCITs that way
    // (thousands per run).
    let polled = z["poll_caught"].as_u64().unwrap() + z["polls_expired"].as_u64().unwrap();
    if std::env::var_os("SLUICE_PROXY_IOMMU_SPIN_US").is_none() {
        assert_eq!(polled > 0, fifo, "{z}");
        if fifo {
            assert!(z["poll_caught"].as_u64().unwrap() > 0, "{z}");
        }
    }
    r
}

/// Whether the test runs as root (then SCHED_FIFO is available unless RLIMIT_RTPRIO or a
/// container's policy forbids it, which CI's machines do not).
fn runs_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

#[test]
fn s390x_zpci_strict_translates_every_dma_and_fires_its_points() {
    let r = s390x_zpci(
        "s390x-6.12",
        "iommu.strict=1",
        "zpci.rpcit:delay=1ms,count=3;zpci.mpcifc.reg_ioat:delay=1ms,count=1;\
         guest.sym.zpci_refresh_trans:delay=1ms,count=2",
    );
    assert_eq!(r["guest"]["iommu_groups"][0][2], "DMA", "{}", r["guest"]);
    assert_eq!(
        r["injection"]["firings_per_rule"],
        serde_json::json!([3, 1, 2]),
        "RPCIT, REG_IOAT and the guest's zpci_refresh_trans all reached: {}",
        r["injection"]
    );
    // Strict: every unmap is an RPCIT, so a 64 MiB disk check takes thousands.
    let rpcit = r["zpci_proxy"]["rpcit"].as_u64().unwrap();
    assert!(rpcit > 2000, "{}", r["zpci_proxy"]);
}

#[test]
fn s390x_zpci_lazy_on_6_1() {
    // 6.1's s390 PCI DMA is its own DMA API (arch/s390/pci/pci_dma.c), lazy by default.
    let r = s390x_zpci("s390x-6.1", "", "zpci.rpcit:delay=1ms,count=1");
    assert_eq!(r["injection"]["firings_per_rule"], serde_json::json!([1]));
    assert!(
        r["zpci_proxy"]["rpcit"].as_u64().unwrap() > 100,
        "{}",
        r["zpci_proxy"]
    );
}

/// Negative control of the oracle's SMMU rules on real DMA: an identity domain makes Linux
/// program bypass STEs, so every DMA bypasses the model, legitimately: no escape.
#[test]
fn arm64_smmuv3_identity_domain_bypasses_without_escapes() {
    let r = arm64_smmuv3(
        "iommu.passthrough=1",
        "smmuv3.cmd.CFGI_STE:delay=1ms,count=1",
    );
    assert_eq!(
        r["guest"]["iommu_groups"][0][2], "identity",
        "{}",
        r["guest"]
    );
    let dma = &r["dma"][0];
    assert!(dma["bypassed"].as_u64().unwrap() > 1000, "{dma}");
    assert_eq!(dma["translated"], 0, "{dma}");
}

/// One strict virtio-iommu boot running the bench workload with small tests and the 1M tests'
/// buffer in `layout`: its BENCH lines and the virtio-iommu's MAP request count.
fn bench_with_layout(layout: &str) -> (Vec<String>, u64) {
    let dir = scratch(&format!("bench-{layout}"));
    let disk = dir.join("disk.img");
    // the bench workload writes from 512 MiB on
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let cmdline = format!("iommu.strict=1 sluice.ddmb=4 sluice.dd4k=64 sluice.layout={layout}");
    let (out, report) = run_behind_viommu(
        &dir,
        &["--disk", disk.to_str().unwrap(), "--workload", "bench"],
        &cmdline,
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap();
    let bench: Vec<String> = serial
        .lines()
        .filter_map(|l| l.split_once("SLUICE: BENCH ").map(|(_, b)| b.to_string()))
        .collect();
    let r = report.unwrap();
    assert_eq!(r["guest"]["result"], "PASS", "{}\n{serial}", r["guest"]);
    let maps = r["devices"][0]["counters"]["requests_map"]
        .as_u64()
        .unwrap();
    (bench, maps)
}

/// The bench workload's 1M tests really run from the buffer layout asked for, and the layout
/// is what decides the guest's IOMMU traffic: scattered, every 4 KiB page of a 1 MiB request
/// is its own DMA segment and its own MAP (256 per request); contiguous, the request is one
/// segment. 4 MiB read + 4 MiB written = 8 requests of 1 MiB: 8 * 255 more MAPs, plus a
/// header and a status MAP for each request the block layer splits off (256 segments exceed
/// virtio-blk's seg_max of 254); measured 2468 against 412. The floor leaves room for boots
/// that map a little differently and still needs most pages of every request mapped alone.
#[test]
fn bench_1m_buffers_have_the_asked_layout_and_it_sets_the_map_count() {
    let (scattered, scattered_maps) = bench_with_layout("scattered");
    let (contiguous, contiguous_maps) = bench_with_layout("contiguous");
    for (lines, layout, segments) in [
        (&scattered, "scattered", 256),
        (&contiguous, "contiguous", 1),
    ] {
        for test in ["read1M", "write1M"] {
            let line = lines
                .iter()
                .find(|l| l.starts_with(&format!("{test} ")))
                .unwrap_or_else(|| panic!("no {test} line: {lines:?}"));
            assert!(
                line.starts_with(&format!("{test} 4 MiB "))
                    && line.ends_with(&format!(" layout={layout} segments={segments}")),
                "{line}"
            );
        }
        assert_eq!(lines.len(), 4, "four tests, none failed: {lines:?}");
    }
    assert!(
        scattered_maps >= contiguous_maps + 8 * 200,
        "scattered {scattered_maps} MAPs, contiguous {contiguous_maps}"
    );
}
