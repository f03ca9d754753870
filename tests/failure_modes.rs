//! Every way a run can go wrong ends with a clear message and a non-zero exit, never a panic.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

fn assert_clean_failure(out: &std::process::Output, needle: &str) {
    let log = text(out);
    assert!(!out.status.success(), "expected failure:\n{log}");
    assert!(!log.contains("panicked"), "sluice panicked:\n{log}");
    assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
}

#[test]
fn missing_kernel() {
    let dir = scratch("missing-kernel");
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"x").unwrap();
    let (out, _) = run_guest(
        &dir.join("nope"),
        &initrd,
        std::path::Path::new("/bin/true"),
        &dir,
        &[],
    );
    assert_clean_failure(&out, "kernel");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn corrupt_kernel() {
    let (_, initrd) = guest("6.12");
    let dir = scratch("corrupt-kernel");
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, vec![0x5a; 64 * 1024]).unwrap();
    let (out, report) = run_guest(&kernel, &initrd, &qemu(), &dir, &["--timeout", "60"]);
    assert_clean_failure(&out, "qemu-failed");
    assert_eq!(report.unwrap()["exit_reason"], "qemu-failed");
}

#[test]
fn unreadable_disk() {
    let (kernel, initrd) = guest("6.12");
    let dir = scratch("bad-disk");
    let missing = dir.join("absent.img");
    let (out, _) = run_guest(
        &kernel,
        &initrd,
        &qemu(),
        &dir,
        &["--disk", missing.to_str().unwrap()],
    );
    assert_clean_failure(&out, "cannot open disk");
}

#[test]
fn guest_that_never_powers_off_is_killed_at_the_timeout() {
    let (kernel, initrd) = guest("6.12");
    let dir = scratch("timeout");
    // /init never gets to power off within one second.
    let (out, report) = run_guest(&kernel, &initrd, &qemu(), &dir, &["--timeout", "1"]);
    assert_clean_failure(&out, "timeout");
    assert_eq!(report.unwrap()["exit_reason"], "timeout");
}

#[test]
fn qemu_dying_mid_run() {
    let (kernel, initrd) = guest("6.12");
    let dir = scratch("qemu-dies");
    let wrapper = dir.join("qemu-killed.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec timeout -s KILL 1.5 {} \"$@\"\n",
            qemu().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (out, report) = run_guest(&kernel, &initrd, &wrapper, &dir, &["--timeout", "60"]);
    assert_clean_failure(&out, "qemu-failed");
    assert_eq!(report.unwrap()["exit_reason"], "qemu-failed");
}

#[test]
fn malformed_protocol_message_from_the_proxy() {
    let (kernel, initrd) = guest("6.12");
    let dir = scratch("malformed");
    // A stand-in for QEMU that sends garbage down the proxy socket, then waits to be killed.
    let fake = dir.join("fake-qemu.py");
    std::fs::write(
        &fake,
        "#!/usr/bin/env python3\nimport os, re, sys, time\n\
         fd = int(re.search(r'fd=(\\d+)', ' '.join(sys.argv)).group(1))\n\
         os.write(fd, b'\\x04\\x00\\x00\\x00\\x00\\x00\\x00\\x00' + (99999).to_bytes(8, 'little'))\n\
         time.sleep(60)\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (out, report) = run_guest(&kernel, &initrd, &fake, &dir, &["--timeout", "30"]);
    assert_clean_failure(&out, "malformed protocol message");
    let r = report.unwrap();
    assert_eq!(r["exit_reason"], "device-error");
    assert!(
        r["exit_detail"]["error"]
            .as_str()
            .unwrap()
            .contains("exceeds"),
        "{r}"
    );
}
