//! `benches/sched-sampler.py`: a process tree that burns CPU between the guest's bench markers
//! shows up with that CPU time, split at the markers, and the summary reads its own lines.
use std::io::Write;
use std::process::{Command, Stdio};

const SAMPLER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sched-sampler.py");

fn python() -> Option<&'static str> {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some("python3")
}

#[test]
fn cpu_time_between_the_markers_is_counted_per_thread_group() {
    let Some(py) = python() else {
        println!("SKIPPED: no python3 to run benches/sched-sampler.py");
        return;
    };
    let dir = std::env::temp_dir().join(format!("sluice-sched-sampler-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let console = dir.join("console.log");
    std::fs::write(&console, "").unwrap();
    // The "guest": a shell that marks a test start, has a child that names itself busy-thread
    // burn 0.4 s of CPU, and prints the result line once it has (the child lives on past it, as
    // a guest's threads do).
    let guest = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "sleep 0.3; echo 'SLUICE: bench-start read4k' >> {c}; \
             python3 -c 'import ctypes, os, time\n\
ctypes.CDLL(None).prctl(15, b\"busy-thread\", 0, 0, 0)\n\
t = time.process_time()\n\
while time.process_time() - t < 0.4: pass\n\
open(\"{d}\", \"w\").close()\n\
time.sleep(3)' & \
             while [ ! -e {d} ]; do sleep 0.05; done; \
             echo 'SLUICE: BENCH read4k 64 MiB 0.40 s 160.0 MiB/s' >> {c}; wait",
            c = console.display(),
            d = dir.join("burnt").display()
        ))
        .spawn()
        .unwrap();
    let out = Command::new(py)
        .arg(SAMPLER)
        .arg(guest.id().to_string())
        .arg(&console)
        .arg("1 fake strict")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let mut guest = guest;
    guest.wait().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let busy = lines
        .lines()
        .find(|l| l.contains(" busy-thread "))
        .unwrap_or_else(|| panic!("no busy-thread line in:\n{lines}"));
    assert!(
        busy.starts_with("sched 1 fake strict read4k wall="),
        "{busy}"
    );
    let run: f64 = busy
        .split_whitespace()
        .find_map(|f| f.strip_prefix("run="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no run= in {busy}"));
    assert!(
        (0.3..2.0).contains(&run),
        "0.4 s of CPU burnt, {run} s counted: {busy}"
    );

    // The summary reads those lines back: one row for the test, with the thread group in it.
    let log = dir.join("sched.txt");
    std::fs::File::create(&log)
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let summary = Command::new(py)
        .arg(SAMPLER)
        .arg("--summary")
        .arg(&log)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&summary.stdout).into_owned();
    let row = summary
        .lines()
        .find(|l| l.starts_with("strict  read4k   fake"))
        .unwrap_or_else(|| panic!("no summary row in:\n{summary}"));
    assert!(row.contains("busy-thread="), "{row}");
    let _ = std::fs::remove_dir_all(&dir);
}
