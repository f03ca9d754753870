//! Builds the bare-metal test guest (`firmware/testguest/testguest.s`) with GNU `as` and `ld`
//! (binutils, present wherever gcc is) into `$OUT_DIR/testguest.elf`, and tells the tests where
//! it is through `SLUICE_TESTGUEST`, and lists its symbols with `nm` in the System.map format
//! (`$OUT_DIR/testguest.map`, `SLUICE_TESTGUEST_MAP`) for `guest.sym.*` injection rules.
//! Any failure (missing binutils included: rustc links through `cc`, which needs them anyway)
//! fails the build, so the guest tests can never pass by skipping a guest that did not build.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let src = manifest.join("../../firmware/testguest/testguest.s");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    let obj = out.join("testguest.o");
    let elf = out.join("testguest.elf");
    let map = out.join("testguest.map");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed=build.rs");
    let built = run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src)).and_then(|()| {
        run(Command::new("ld")
            .args(["-N", "-static", "-nostdlib", "--build-id=none"])
            .args(["-Ttext=0x200000", "-e", "_start", "-o"])
            .arg(&elf)
            .arg(&obj))
    });
    let mapped = built.and_then(|()| {
        let out = Command::new("nm")
            .arg(&elf)
            .output()
            .map_err(|e| format!("nm: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nm failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::write(&map, &out.stdout).map_err(|e| format!("{}: {e}", map.display()))
    });
    match mapped {
        Ok(()) => {
            println!("cargo:rustc-env=SLUICE_TESTGUEST={}", elf.display());
            println!("cargo:rustc-env=SLUICE_TESTGUEST_MAP={}", map.display());
        }
        Err(e) => {
            // A build script reports failure by exiting non-zero; the message is what cargo shows.
            eprintln!("error: bare-metal test guest not built: {e}");
            std::process::exit(1);
        }
    }
}
