//! End to end, plain QEMU (no Sluice devices): the `sluice-stall` TCG plugin stalls the vCPU
//! that enters a kernel function called once per boot for 500 ms; the rule fires exactly
//! once, the other vCPU keeps executing meanwhile, and the guest boots to `RESULT PASS`.
//!
//! Needs the cached 6.12 guest and the patched QEMU built with plugins
//! (`guest-images/build.sh 6.12`, `guest-images/qemu/build-qemu.sh`, both run here under the
//! shared build lock). Prints `SKIPPED: <why>` and passes when they are unavailable.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_host::machine::{BackendKind, MachineSpec};
use sluice_inject::{Firing, Injector, Plan, PluginServer, PointRegistry, SymbolMap};

const SYMBOL: &str = "iommu_subsys_init";
const STALL: Duration = Duration::from_millis(500);

mod common;
use common::built;

struct Boot {
    console: String,
    wall: Duration,
}

fn boot(qemu: &Path, kernel: &str, initrd: &str, extra: &[String]) -> Boot {
    let t = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-M",
            "q35",
            "-smp",
            "2",
        ])
        .args([
            "-m",
            "512",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args([
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            kernel,
            "-initrd",
            initrd,
        ])
        .args([
            "-append".to_string(),
            format!(
                "{} sluice.workload=none sluice.load=none",
                MachineSpec::x86_q35().base_cmdline(BackendKind::Qemu)
            ),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = t.elapsed();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let mut console = reader.join().unwrap_or_default();
    console.push_str(&err);
    Boot { console, wall }
}

fn uptime_at_done(console: &str) -> Option<f64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("SLUICE: done uptime="))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn guest_sym_stall_holds_one_vcpu_once() {
    let img = built(
        &["guest-images/build.sh", "6.12"],
        &["KERNEL", "INITRD", "SYSTEM_MAP"],
    );
    let q = built(
        &["guest-images/qemu/build-qemu.sh"],
        &["QEMU", "QEMU_PLUGIN"],
    );
    let as_str = |p: &PathBuf| p.to_str().expect("UTF-8 path").to_string();
    let (kernel, initrd, map) = (as_str(&img[0]), as_str(&img[1]), img[2].clone());
    let (qemu, plugin) = (q[0].clone(), q[1].clone());
    let mut reg = PointRegistry::new();
    reg.set_symbols(SymbolMap::load(&map).expect("System.map"));
    let plan = reg
        .validate(&Plan::parse_cli(&format!("guest.sym.{SYMBOL}:delay=500ms")).unwrap())
        .expect("plan");
    let inj = Arc::new(Injector::new(plan));
    let firings = Arc::new(Mutex::new(Vec::<Firing>::new()));
    let f = firings.clone();
    inj.set_sink(Arc::new(move |x: &Firing| {
        f.lock().unwrap().push(x.clone())
    }));
    let dir = std::env::temp_dir().join(format!("sluice-inject-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let srv = PluginServer::start(&dir.join("plugin.sock"), inj.clone()).expect("socket");

    let base = boot(&qemu, &kernel, &initrd, &[]);
    let run = boot(&qemu, &kernel, &initrd, &srv.qemu_args(&plugin));
    srv_hits_report(&srv, &run, &base);

    assert!(
        base.console.contains("SLUICE: RESULT PASS"),
        "baseline boot failed:\n{}",
        base.console
    );
    assert!(
        run.console.contains("SLUICE: RESULT PASS"),
        "boot with the stall failed:\n{}",
        run.console
    );
    assert_eq!(
        srv.handshakes(),
        1,
        "plugin handshake; errors {:?}",
        srv.errors()
    );
    let hits = srv.hits();
    assert_eq!(hits.len(), 1, "{SYMBOL} runs once per boot: {hits:?}");
    let f = firings.lock().unwrap();
    assert_eq!(f.len(), 1, "fired exactly once");
    let h = &hits[0];
    assert_eq!(h.delay, Some(STALL));
    assert_eq!(f[0].vcpu, Some(h.vcpu));
    let left = h.left.expect("the vCPU reported it ran on");
    let held = left - h.arrived;
    assert!(held >= STALL && held < STALL * 3, "held {held:?}");
    // Only that vCPU stalled: the other one executed translation blocks meanwhile.
    let progress = h.progress();
    assert_eq!(progress.len(), 2, "{h:?}");
    let stalled = h.vcpu as usize;
    let other = 1 - stalled;
    assert!(
        progress[other] > 0,
        "other vCPU made no progress: {progress:?}"
    );
    assert!(
        progress[stalled] <= 1,
        "the stalled vCPU executed meanwhile: {progress:?}"
    );
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prints what the report needs (both boot times, the firing, the other vCPU's progress).
fn srv_hits_report(srv: &PluginServer, run: &Boot, base: &Boot) {
    println!(
        "baseline: wall {:?}, guest uptime at done {:?}",
        base.wall,
        uptime_at_done(&base.console)
    );
    println!(
        "with stall: wall {:?}, guest uptime at done {:?}",
        run.wall,
        uptime_at_done(&run.console)
    );
    for h in srv.hits() {
        println!(
            "hit: vcpu {} addr {:#x} {} delay {:?} held {:?} TBs executed meanwhile per vCPU {:?}",
            h.vcpu,
            h.addr,
            h.point,
            h.delay,
            h.left.map(|l| l - h.arrived),
            h.progress()
        );
    }
}
