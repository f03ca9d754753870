//! What counts as an anomaly in one run, and the signature that groups its repetitions: an
//! escape class and the device it came from; a refused DMA and its device; a kernel report's
//! first line with addresses, numbers and CPU/PID stripped, plus its top frames; a hang and
//! the last step `/init` reported; a workload failure; an abnormal exit.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::verdict::Observation;

/// Frames printed by the reporting machinery itself, skipped when taking a report's top
/// frames: they are the same for every report of a kind.
const REPORTING_FRAMES: &[&str] = &[
    "dump_stack",
    "dump_stack_lvl",
    "show_stack",
    "__warn",
    "warn_slowpath_fmt",
    "report_bug",
    "handle_bug",
    "exc_invalid_op",
    "asm_exc_invalid_op",
    "print_report",
    "kasan_report",
    "__kasan_report",
    "check_region_inline",
    "kasan_check_range",
    "print_address_description",
    "__might_resched",
    "__might_sleep",
    "lockdep_rcu_suspicious",
    "print_circular_bug",
    "check_noncircular",
    "check_prev_add",
    "validate_chain",
    "__lock_acquire",
    "lock_acquire",
    "panic",
    "die",
    "oops_end",
    "do_trap",
    "do_error_trap",
];

/// Frames per kernel-report signature.
pub const TOP_FRAMES: usize = 3;
/// Console lines searched for a report's frames after its first line.
const FRAME_WINDOW: usize = 60;

/// What kind of anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnomalyKind {
    /// The oracle saw a DMA escape translation.
    Escape,
    /// The IOMMU refused DMAs.
    Fault,
    /// WARN, BUG, Oops, KASAN, lockdep, ... on the console.
    KernelReport,
    /// The run hit its timeout.
    Hang,
    /// The guest's workload or Sluice's disk check failed.
    Workload,
    /// The guest ended another way (panic, QEMU failure).
    Exit,
}

/// One anomaly of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Kind.
    pub kind: AnomalyKind,
    /// Stable across runs and kernels: what groups findings.
    pub signature: String,
    /// The raw evidence (first report line, the problem as the run said it).
    pub evidence: String,
}

static TIMESTAMP: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*\[\s*\d+\.\d+\]\s*").expect("static regex"));
static HEX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(0x)?[0-9a-fA-F]{6,}\b|0x[0-9a-fA-F]+").expect("static regex"));
/// A number standing alone (`17`, `0000:00:03.0` is four), not one that is part of a name
/// (`blk0`, `vda1` stay).
static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b\d+\b").expect("static regex"));
static CPU_PID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(CPU#?:? ?\d+|PID: ?\d+|\[[\w/:.-]+:\d+\]|Comm: \S+|Tainted: [A-Z ]+)")
        .expect("static regex")
});
static SOURCE_LINE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(\.[ch]):\d+").expect("static regex"));
static OFFSET: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\+0x[0-9a-f]+/0x[0-9a-f]+").expect("static regex"));
static FRAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*(\? )?([A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+").expect("static regex")
});

/// The first line of a kernel report, or `None`. Kept narrow: these lines are what the kernel
/// prints when something it considers a bug happens, never in a clean boot.
fn report_start(line: &str) -> bool {
    const STARTS: &[&str] = &[
        "BUG:",
        "WARNING:",
        "kernel BUG at",
        "Oops",
        "general protection fault",
        "Kernel panic",
        "INFO: task",
        "INFO: rcu",
        "rcu: INFO:",
        "watchdog: BUG:",
        "UBSAN:",
    ];
    STARTS.iter().any(|s| line.starts_with(s))
}

/// A console line without its timestamps: the kernel's printk time, and the host's receive
/// time when the line comes from a serial log that adds one (`[ 1.896] [ 0.000000] ...`).
fn strip_time(line: &str) -> &str {
    let mut l = line;
    for _ in 0..2 {
        match TIMESTAMP.find(l) {
            Some(m) => l = &l[m.end()..],
            None => break,
        }
    }
    l
}

/// The stable part of a report's first line: no addresses, CPU/PID/task, source line
/// numbers (they move between kernel versions) or other numbers.
pub fn normalize_report_line(line: &str) -> String {
    let l = strip_time(line);
    let l = CPU_PID.replace_all(l, "");
    let l = SOURCE_LINE.replace_all(&l, "$1");
    let l = OFFSET.replace_all(&l, "");
    let l = HEX.replace_all(&l, "ADDR");
    let l = NUMBER.replace_all(&l, "N");
    l.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first [`TOP_FRAMES`] frames after line `start` that are not the reporting machinery's.
fn top_frames(console: &[String], start: usize) -> Vec<String> {
    let mut frames = Vec::new();
    for line in console.iter().skip(start + 1).take(FRAME_WINDOW) {
        let l = strip_time(line);
        // The next report starts: its frames are its own.
        if report_start(l) {
            break;
        }
        let Some(c) = FRAME.captures(l) else { continue };
        // `?` frames are stale stack contents, not calls.
        if c.get(1).is_some() {
            continue;
        }
        let name = c.get(2).map(|m| m.as_str()).unwrap_or("");
        let base = name.split('.').next().unwrap_or(name);
        if REPORTING_FRAMES.contains(&base) {
            continue;
        }
        frames.push(base.to_string());
        if frames.len() == TOP_FRAMES {
            break;
        }
    }
    frames
}

/// Kernel reports on the console: (signature, first line), in console order.
pub fn kernel_reports(console: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, raw) in console.iter().enumerate() {
        let line = strip_time(raw);
        if !report_start(line) {
            continue;
        }
        let head = normalize_report_line(line);
        let frames = top_frames(console, i);
        let sig = if frames.is_empty() {
            head
        } else {
            format!("{head} | {}", frames.join(" < "))
        };
        out.push((sig, line.trim().to_string()));
    }
    out
}

/// The last step `/init` announced (`SLUICE: ...`), normalized, for a hang's signature.
fn last_init_step(console: &[String]) -> String {
    console
        .iter()
        .rev()
        .find_map(|l| strip_time(l).strip_prefix("SLUICE: "))
        .map(|s| {
            // `insmod virtio_iommu rc=0 t=1.23`: the words, not the numbers.
            let words: Vec<&str> = s
                .split_whitespace()
                .filter(|w| !w.contains('='))
                .take(4)
                .collect();
            NUMBER.replace_all(&words.join(" "), "N").into_owned()
        })
        .unwrap_or_else(|| "before /init".into())
}

/// Every anomaly of `obs`, deduplicated by signature, in a stable order.
pub fn anomalies(obs: &Observation) -> Vec<Anomaly> {
    let mut out: Vec<Anomaly> = Vec::new();
    if obs.error.is_some() {
        // The run was not performed: nothing about the kernel can be said.
        return out;
    }
    for (class, n) in &obs.escapes {
        if *n == 0 {
            continue;
        }
        let sites = obs.escape_sites.get(class).cloned().unwrap_or_default();
        if sites.is_empty() {
            out.push(Anomaly {
                kind: AnomalyKind::Escape,
                signature: format!("escape {class}"),
                evidence: format!("{n} {class} escape(s)"),
            });
        }
        for site in sites {
            out.push(Anomaly {
                kind: AnomalyKind::Escape,
                signature: format!("escape {class} from {site}"),
                evidence: format!("{n} {class} escape(s) in the run"),
            });
        }
    }
    if obs.faults > 0 {
        if obs.fault_sites.is_empty() {
            out.push(Anomaly {
                kind: AnomalyKind::Fault,
                signature: "fault".into(),
                evidence: format!("{} DMA(s) refused", obs.faults),
            });
        }
        for site in &obs.fault_sites {
            out.push(Anomaly {
                kind: AnomalyKind::Fault,
                signature: format!("fault on {site}"),
                evidence: format!("{} DMA(s) refused in the run", obs.faults),
            });
        }
    }
    for (signature, first) in kernel_reports(&obs.console) {
        out.push(Anomaly {
            kind: AnomalyKind::KernelReport,
            signature: format!("kernel {signature}"),
            evidence: first,
        });
    }
    match obs.exit.as_str() {
        "powered-off" | "not-run" => {}
        "timeout" => out.push(Anomaly {
            kind: AnomalyKind::Hang,
            signature: format!("hang after \"{}\"", last_init_step(&obs.console)),
            evidence: "the run reached its timeout".into(),
        }),
        other => out.push(Anomaly {
            kind: AnomalyKind::Exit,
            signature: format!("exit {other}"),
            evidence: format!("guest exit: {other}"),
        }),
    }
    for p in &obs.problems {
        // The exit has its own anomaly above.
        if p.starts_with("guest did not power off") {
            continue;
        }
        out.push(Anomaly {
            kind: AnomalyKind::Workload,
            signature: format!("workload {}", NUMBER.replace_all(p, "N")),
            evidence: p.clone(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|a| seen.insert(a.signature.clone()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    const WARN: &str = "\
[    3.120001] ------------[ cut here ]------------
[    3.120002] WARNING: CPU: 1 PID: 57 at drivers/iommu/iommu.c:1905 iommu_group_release_dma_owner+0x4a/0x60
[    3.120003] Modules linked in: virtio_iommu
[    3.120004] CPU: 1 UID: 0 PID: 57 Comm: vfio-dma Not tainted 6.12.43 #1
[    3.120005] RIP: 0010:iommu_group_release_dma_owner+0x4a/0x60
[    3.120006] Call Trace:
[    3.120007]  <TASK>
[    3.120008]  ? __warn+0x7d/0x130
[    3.120009]  ? report_bug+0x16d/0x1a0
[    3.120010]  vfio_group_detach_container+0x3a/0x90
[    3.120011]  vfio_group_fops_release+0x45/0x70
[    3.120012]  __fput+0xe1/0x2a0
[    3.120013]  task_work_run+0x59/0x90
";

    #[test]
    fn a_warning_is_signed_by_its_site_and_top_frames_without_numbers() {
        let r = kernel_reports(&lines(WARN));
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].0,
            "WARNING: at drivers/iommu/iommu.c iommu_group_release_dma_owner | \
             vfio_group_detach_container < vfio_group_fops_release < __fput"
        );
        assert!(r[0].1.starts_with("WARNING: CPU: 1 PID: 57"));
        // Another CPU, PID, line number and offset: the same signature.
        let other = WARN
            .replace("CPU: 1 PID: 57", "CPU: 0 PID: 112")
            .replace("1905", "1890")
            .replace("+0x3a/0x90", "+0x44/0x90");
        assert_eq!(kernel_reports(&lines(&other))[0].0, r[0].0);
    }

    #[test]
    fn kasan_and_null_dereference_reports_drop_addresses() {
        let kasan = lines(
            "[ 5.1] BUG: KASAN: slab-use-after-free in iommu_group_remove_device+0x2b/0x1c0\n\
             [ 5.1] Read of size 8 at addr ffff88800a1b2c00 by task kworker/0:1/23\n\
             [ 5.1] Call Trace:\n\
             [ 5.1]  dump_stack_lvl+0x5d/0x80\n\
             [ 5.1]  print_report+0xcf/0x630\n\
             [ 5.1]  kasan_report+0xd7/0x110\n\
             [ 5.1]  iommu_group_remove_device+0x2b/0x1c0\n\
             [ 5.1]  iommu_release_device+0x20/0x70\n",
        );
        let r = kernel_reports(&kasan);
        assert_eq!(
            r[0].0,
            "BUG: KASAN: slab-use-after-free in iommu_group_remove_device | \
             iommu_group_remove_device < iommu_release_device"
        );
        let null = lines(
            "[    1.896] [ 1.0] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        );
        assert_eq!(
            kernel_reports(&null)[0].0,
            "BUG: kernel NULL pointer dereference, address: ADDR"
        );
    }

    #[test]
    fn lockdep_and_sleep_in_atomic_reports_are_signed_by_their_heads() {
        let splat = lines(
            "[ 9.1] ======================================================\n\
             [ 9.1] WARNING: possible circular locking dependency detected\n\
             [ 9.1] 6.12.118-sluice #1 Not tainted\n\
             [ 9.1] ------------------------------------------------------\n\
             [ 9.1] the existing dependency chain (in reverse order) is:\n\
             [ 9.1] -> #1 (&group->mutex){+.+.}-{3:3}:\n\
             [ 9.1]        __mutex_lock+0x8d/0xa00\n\
             [ 9.1]        iommu_probe_device+0x35/0x90\n\
             [ 9.1]        viommu_probe+0x1c2/0x2a0\n\
             [ 9.1]        lock_acquire+0xc2/0x2a0\n\
             [ 9.1]        virtio_dev_probe+0x1d0/0x280\n",
        );
        let r = kernel_reports(&splat);
        assert_eq!(
            r[0].0,
            "WARNING: possible circular locking dependency detected | \
             __mutex_lock < iommu_probe_device < viommu_probe"
        );
        let sleep = lines(
            "[ 3.2] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:585",
        );
        assert_eq!(
            kernel_reports(&sleep)[0].0,
            "BUG: sleeping function called from invalid context at kernel/locking/mutex.c"
        );
    }

    #[test]
    fn clean_console_has_no_report() {
        let clean = lines(
            "[ 0.5] virtio_iommu virtio0: input address: 64 bits\n\
             SLUICE: insmod virtio_iommu rc=0 t=1.02\n\
             SLUICE: RESULT PASS\n\
             [ 2.0] Warning: unable to open an initial console.\n",
        );
        assert!(kernel_reports(&clean).is_empty());
    }

    #[test]
    fn anomalies_cover_escapes_faults_hangs_and_workload_failures() {
        let mut obs = Observation {
            exit: "timeout".into(),
            faults: 3,
            console: lines(
                "SLUICE: insmod virtio_blk rc=0 t=1.5\nSLUICE: reprobe 0000:00:03.0: 12",
            ),
            problems: vec![
                "guest did not power off cleanly: timeout".into(),
                "guest reported RESULT FAIL disk-vda-17".into(),
            ],
            ..Default::default()
        };
        obs.escapes.insert("bypass-after-takeover".into(), 40);
        obs.escapes.insert("wrong-domain".into(), 0);
        obs.escape_sites
            .insert("bypass-after-takeover".into(), vec!["blk0".into()]);
        obs.fault_sites = vec!["blk0".into()];
        let sigs: Vec<String> = anomalies(&obs).into_iter().map(|a| a.signature).collect();
        assert_eq!(
            sigs,
            [
                "escape bypass-after-takeover from blk0",
                "fault on blk0",
                "hang after \"reprobe N:N:N.N: N\"",
                "workload guest reported RESULT FAIL disk-vda-N",
            ]
        );
        let failed = Observation {
            error: Some("image build failed".into()),
            exit: "not-run".into(),
            ..obs.clone()
        };
        assert!(
            anomalies(&failed).is_empty(),
            "a run not performed says nothing"
        );
        let clean = Observation {
            exit: "powered-off".into(),
            escapes: BTreeMap::new(),
            ..Default::default()
        };
        assert!(anomalies(&clean).is_empty());
    }
}

#[cfg(test)]
mod real_console {
    /// The console of a real `6.12-debug` guest that loaded the variant's report self-test
    /// module (`guest-images/variants/6.12-debug/report-selftest/`): one WARN, one
    /// sleep-in-atomic, one lockdep splat, one KASAN use-after-free and one ODEBUG report,
    /// as the serial log records them (host and kernel timestamps).
    const CONSOLE: &str = include_str!("../../tests/fixtures/debug-6.12-reports.serial");

    #[test]
    fn every_report_of_a_real_debug_kernel_gets_its_own_signature() {
        let lines: Vec<String> = CONSOLE.lines().map(str::to_string).collect();
        let sigs: Vec<String> = super::kernel_reports(&lines)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let heads = [
            "WARNING: at ",
            "BUG: sleeping function called from invalid context at ",
            "WARNING: possible circular locking dependency detected | __mutex_lock < selftest_init",
            "BUG: KASAN: slab-use-after-free in selftest_uaf [sluice_report_selftest] | selftest_uaf",
            "WARNING: at lib/debugobjects.c debug_print_object | debug_check_no_obj_freed",
        ];
        assert_eq!(sigs.len(), heads.len(), "{sigs:#?}");
        for (sig, head) in sigs.iter().zip(heads) {
            assert!(sig.starts_with(head), "{sig:?} should start with {head:?}");
            assert!(!sig.contains("0x"), "no addresses: {sig}");
        }
    }
}
