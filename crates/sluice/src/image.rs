//! Finding or building guest images and the patched QEMU, through the scripts in
//! `guest-images/` (which cache their results outside the work tree).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The guest variant used when none is named.
pub const DEFAULT_VARIANT: &str = "6.12";

/// Paths of one built guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub vmlinux: PathBuf,
    pub system_map: PathBuf,
    pub initrd: PathBuf,
}

/// The checkout's root: `SLUICE_ROOT`, or where this crate was built from.
pub fn repo_root() -> PathBuf {
    std::env::var_os("SLUICE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .canonicalize()
                .unwrap_or_else(|_| PathBuf::from("."))
        })
}

/// Runs a build script, passing its progress through to stderr, and returns its KEY=VALUE lines.
fn run_script(script: &Path, args: &[&str]) -> Result<Vec<(String, String)>> {
    if !script.exists() {
        bail!("build script {} is missing", script.display());
    }
    // The scripts serialise concurrent builds of the same image themselves (per-key locks).
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let mut vars = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            match line.split_once('=') {
                Some((k, v))
                    if !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
                {
                    vars.push((k.to_string(), v.to_string()))
                }
                _ => eprintln!("{line}"),
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(vars)
}

fn var(vars: &[(String, String)], key: &str) -> Result<PathBuf> {
    vars.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| PathBuf::from(v))
        .with_context(|| format!("build script printed no {key}="))
}

/// Builds or finds guest `variant`.
pub fn build_guest(variant: &str) -> Result<GuestImage> {
    let vars = run_script(&repo_root().join("guest-images/build.sh"), &[variant])?;
    Ok(GuestImage {
        kernel: var(&vars, "KERNEL")?,
        vmlinux: var(&vars, "VMLINUX")?,
        system_map: var(&vars, "SYSTEM_MAP")?,
        initrd: var(&vars, "INITRD")?,
    })
}

/// Builds or finds the QEMU with the project's proxy patch (needed under TCG).
pub fn build_qemu() -> Result<PathBuf> {
    let vars = run_script(&repo_root().join("guest-images/qemu/build-qemu.sh"), &[])?;
    var(&vars, "QEMU")
}
