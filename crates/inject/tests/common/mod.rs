//! Shared by the end-to-end tests: the repository root and the guest-images scripts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs a guest-images script under the shared build lock; its KEY=value stdout lines.
pub fn script(args: &[&str]) -> Result<HashMap<String, String>, String> {
    let cache = std::env::var("SLUICE_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/sluice",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let out = Command::new("flock")
        .arg(format!("{cache}/.build.lock"))
        .arg("bash")
        .args(args)
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run {args:?}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!("{args:?} failed: {tail:?}"));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Runs a guest-images script and returns the values of `keys` from its output. A failed build
/// or a missing key fails the test: a guest, QEMU or plugin that did not build is a defect of this
/// checkout, not a missing host capability, so it must never pass as a skip.
pub fn built(args: &[&str], keys: &[&str]) -> Vec<PathBuf> {
    let out = script(args).unwrap_or_else(|e| panic!("build failed: {e}"));
    keys.iter()
        .map(|k| match out.get(*k) {
            Some(v) => PathBuf::from(v),
            None => panic!("{args:?} printed no {k}= line"),
        })
        .collect()
}
