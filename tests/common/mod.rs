//! Shared helpers for the end-to-end tests: the `sluice` binary, cached guest images and the
//! patched QEMU (built on first use by the project's own scripts, then cached).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn kv(out: &Output, key: &str) -> PathBuf {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| {
            panic!(
                "no {key}= in output:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    PathBuf::from(line)
}

/// (kernel, initrd) of a guest variant.
pub fn guest(variant: &str) -> (PathBuf, PathBuf) {
    let out = sluice()
        .args(["image", "build", variant])
        .output()
        .expect("run sluice image build");
    assert!(
        out.status.success(),
        "image build {variant} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (kv(&out, "KERNEL"), kv(&out, "INITRD"))
}

/// The QEMU binary the qemu backend uses here.
pub fn qemu() -> PathBuf {
    static QEMU: OnceLock<PathBuf> = OnceLock::new();
    QEMU.get_or_init(|| build_qemu("x86_64")).clone()
}

/// The patched QEMU for guests of `arch` (`aarch64`: with the SMMUv3 proxy).
pub fn qemu_for(arch: &str) -> PathBuf {
    match arch {
        "x86_64" => qemu(),
        _ => build_qemu(arch),
    }
}

fn build_qemu(arch: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("guest-images/qemu/build-qemu.sh"))
        .args(["--arch", arch])
        .output()
        .expect("run build-qemu.sh");
    assert!(
        out.status.success(),
        "QEMU build ({arch}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kv(&out, "QEMU")
}

/// A fresh directory under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `sluice run` with the given guest, QEMU and extra arguments.
pub fn run_guest(
    kernel: &Path,
    initrd: &Path,
    qemu: &Path,
    dir: &Path,
    extra: &[&str],
) -> (Output, Option<serde_json::Value>) {
    let report = dir.join("report.json");
    let out = sluice()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--qemu")
        .arg(qemu)
        .arg("--run-dir")
        .arg(dir)
        .arg("--report")
        .arg(&report)
        .args(extra)
        .output()
        .expect("spawn sluice");
    let json = std::fs::read_to_string(&report)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("report is JSON"));
    (out, json)
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
