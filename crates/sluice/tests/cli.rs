//! The command line without a real guest: what `sluice run` refuses before building anything,
//! and how it reads a stand-in QEMU (a shell script) that misbehaves.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `cmd` with an empty image cache (so a missed validation would start a kernel build,
/// not find a cached image), killing it after `limit`. Returns its output and wall time.
fn run_bounded(mut cmd: Command, cache: &Path, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = cmd
        .env("SLUICE_CACHE", cache)
        .env_remove("SLUICE_QEMU")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "sluice still running after {limit:?} (building?):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = start.elapsed();
    (child.wait_with_output().unwrap(), wall)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `sluice run ARGS` with an empty cache; asserts it failed with exit 2 in under 5 s and
/// one line of output; returns that line.
fn refused(name: &str, args: &[&str]) -> String {
    let dir = scratch(name);
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mut cmd = sluice();
    cmd.arg("run")
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(args);
    let (out, wall) = run_bounded(cmd, &cache, Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(wall < Duration::from_secs(5), "took {wall:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        std::fs::read_dir(&cache).unwrap().next().is_none(),
        "nothing was built"
    );
    err.trim_end().to_string()
}

#[test]
fn missing_disk_fails_at_once_naming_the_file() {
    let line = refused("nodisk", &["--disk", "/nonexistent"]);
    assert_eq!(
        line,
        "sluice: error: cannot open disk /nonexistent: No such file or directory (os error 2)"
    );
}

#[test]
fn bad_values_fail_at_once() {
    assert!(refused("cpus", &["--cpus", "0"]).starts_with("sluice: error: --cpus 0: "));
    let line = refused(
        "smmu-point",
        &[
            "--iommu",
            "virtio",
            "--inject",
            "smmuv3.cmd.CFGI_STE:delay=1ms",
        ],
    );
    assert!(
        line.contains(
            "point `smmuv3.cmd.CFGI_STE` cannot fire in this run: it belongs to the smmuv3 \
             model, which this run does not have; points of this run, nearest first: "
        ),
        "{line}"
    );
    let line = refused(
        "bad-delay",
        &[
            "--iommu",
            "virtio",
            "--inject",
            "virtio-iommu.req.attach:delay=1banana",
        ],
    );
    assert!(
        line.starts_with(
            "sluice: error: --inject \"virtio-iommu.req.attach:delay=1banana\": bad delay \
             `1banana`: unknown unit `banana` (forms: "
        ),
        "{line}"
    );
    let line = refused("bad-plan", &["--inject-file", "/nonexistent.toml"]);
    assert_eq!(
        line,
        "sluice: error: cannot read /nonexistent.toml: No such file or directory (os error 2)"
    );
}

#[test]
fn points_lists_what_the_configuration_can_fire_and_all_lists_every_model() {
    let list = |args: &[&str]| {
        let out = sluice().arg("points").args(args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let x86 = list(&["--iommu", "virtio", "--dma-engine"]);
    for p in [
        "virtio-iommu.req.attach",
        "virtio.blk0.notify",
        "dma.dma0.rogue",
    ] {
        assert!(x86.contains(p), "{p} missing from:\n{x86}");
    }
    for p in ["smmuv3.", "zpci."] {
        assert!(
            !x86.contains(p),
            "{p} listed for an x86 virtio-iommu run:\n{x86}"
        );
    }
    // Each IOMMU brings its own model's points and no other's; the points' properties are
    // listed with them.
    let smmu = list(&["--iommu", "smmuv3"]);
    assert!(smmu.contains("smmuv3.cmd.CMD_SYNC"), "{smmu}");
    assert!(
        !smmu.contains("virtio-iommu.") && !smmu.contains("zpci."),
        "{smmu}"
    );
    let zpci = list(&["--iommu", "zpci"]);
    assert!(zpci.contains("zpci.rpcit"), "{zpci}");
    assert!(
        !zpci.contains("smmuv3.") && !zpci.contains("viommu0"),
        "{zpci}"
    );
    let attach = x86
        .lines()
        .find(|l| l.starts_with("virtio-iommu.req.attach "))
        .unwrap_or_default();
    assert!(attach.contains("defer,doorbell"), "{attach}");
    let bare = list(&["--iommu", "none"]);
    assert!(!bare.contains("virtio-iommu.req.attach"), "{bare}");
    assert!(!bare.contains("dma.dma0"), "{bare}");
    let all = list(&["--iommu", "none", "--all"]);
    for p in [
        "smmuv3.cmd.CFGI_STE",
        "zpci.rpcit",
        "virtio-iommu.req.attach",
        "virtio.blk0.notify",
    ] {
        assert!(all.contains(p), "{p} missing from:\n{all}");
    }
}

#[test]
fn an_iommu_the_platform_cannot_describe_is_refused_before_any_build() {
    for (iommu, why) in [
        ("smmuv3", "an SMMU is an Arm platform device"),
        ("zpci", "zPCI translation exists only on s390"),
    ] {
        let line = refused(&format!("iommu-{iommu}"), &["--iommu", iommu]);
        assert_eq!(
            line,
            format!(
                "sluice: error: the {iommu} IOMMU cannot be described to an x86_64 guest: {why}"
            )
        );
    }
}

/// `sluice run` with a stand-in QEMU script `body` and dummy kernel/initrd files.
fn run_fake(name: &str, body: &str) -> (Output, serde_json::Value, PathBuf) {
    let dir = scratch(name);
    let qemu = dir.join("qemu.sh");
    std::fs::write(&qemu, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["bzImage", "initrd"] {
        std::fs::write(dir.join(f), b"not a kernel").unwrap();
    }
    let mut cmd = sluice();
    cmd.arg("run")
        .arg("--kernel")
        .arg(dir.join("bzImage"))
        .arg("--initrd")
        .arg(dir.join("initrd"))
        .arg("--qemu")
        .arg(&qemu)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(["--workload", "none", "--timeout", "60"]);
    let (out, _) = run_bounded(cmd, &dir, Duration::from_secs(60));
    let report = std::fs::read_to_string(dir.join("run/report.json")).expect("a report");
    (out, serde_json::from_str(&report).unwrap(), dir)
}

#[test]
fn console_with_invalid_utf8_still_gets_its_verdict_and_full_log() {
    let (out, report, dir) = run_fake(
        "utf8",
        r"printf 'SLUICE: init started\nSLUICE: nproc=2\n'
printf 'binary \377\376\375 junk\n'
printf 'SLUICE: RESULT PASS\nSLUICE: done\n'",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr(&out));
    assert!(stdout.contains("VERDICT: PASS"), "{stdout}");
    assert_eq!(report["exit_reason"], "powered-off");
    assert_eq!(report["console"]["non_utf8_lines"], 1);
    assert_eq!(report["console"]["truncated"], false);
    let log = std::fs::read(dir.join("run/serial.log")).unwrap();
    let needle: &[u8] = b"] binary \xff\xfe\xfd junk\n";
    assert!(log.windows(needle.len()).any(|w| w == needle));
    assert!(String::from_utf8_lossy(&log).ends_with("] SLUICE: done\n"));
}

#[test]
fn qemu_exiting_zero_at_once_is_a_failure() {
    let (out, report, _) = run_fake("exit0", "exit 0");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(report["exit_reason"], "qemu-failed");
    assert_eq!(report["exit_detail"]["code"], 0);
    assert_eq!(
        report["exit_detail"]["stderr"],
        "QEMU exited with status 0 before the guest's /init started"
    );
}

/// A sweep whose judgement fails exits non-zero: stock 6.12 must reproduce the registration
/// window in some cell, and a stand-in QEMU whose "guest" passes cleanly never does. Needs the
/// 6.12 image (built on first use, like the end-to-end tests), not a real boot.
#[test]
fn sweep_exits_non_zero_when_its_judgement_fails() {
    let dir = scratch("sweep-judgement");
    let qemu = dir.join("qemu.sh");
    std::fs::write(
        &qemu,
        "#!/bin/sh\nprintf 'SLUICE: init started\\nSLUICE: nproc=2\\nSLUICE: RESULT PASS\\nSLUICE: done\\n'\n",
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let scenario =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/registration-window.toml");
    let out = sluice()
        .args(["harness", "sweep"])
        .arg(&scenario)
        .args([
            "--variant",
            "6.12",
            "--point",
            "virtio-iommu.req.attach",
            "--delays",
            "0ms,100ms",
        ])
        .args([
            "--modes",
            "stall",
            "--seeds",
            "1",
            "--replace",
            "--budget",
            "5m",
        ])
        .arg("--qemu")
        .arg(&qemu)
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}{}", stderr(&out));
    assert!(
        stdout.contains(
            "JUDGEMENT FAILED: 6.12: the scenario expects a reproduction, and none of the 1 \
             run(s) with a sweep rule reproduced it"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("SWEEP: COMPLETE; JUDGEMENT FAILED"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/sweep.json")).unwrap())
            .unwrap();
    assert_eq!(json["failures"].as_array().map(Vec::len), Some(1));
}
