//! Which Sluice threads run SCHED_FIFO, and what follows from it.
//!
//! Linux busy-polls for some answers: its virtio-iommu driver spins on the used ring after
//! every MAP/UNMAP, its SMMUv3 driver on each CMD_SYNC's completion, and a forwarded zPCI RPCIT
//! holds its vCPU in QEMU. The thread that answers must then get a core while a vCPU thread
//! spins on one; on a host with no core to spare a SCHED_OTHER thread waits behind the spinner.
//! These threads run SCHED_FIFO at priority [`SERVER_PRIORITY`] where the process may (they
//! block between requests), and the paths that need it fall back where it may not
//! (`docs/backends.md`).
//!
//! A real-time thread that polls after an answer holds its core, and a vCPU thread that lands
//! there waits for it: on a 2-core host the vCPU waited for a core 53–62 % of a 4k disk test
//! behind the polling virtio-iommu doorbell thread (`benches/guest-io.sh` `SCHED=1`). With
//! `SLUICE_VCPU_SCHED=fifo` QEMU's vCPU threads run SCHED_FIFO too, one priority below these
//! threads, so neither waits for the other ([`VcpuRaiser`]; a benchmark setting, off by default:
//! a guest that spins then holds its core against every ordinary host thread).

use std::path::Path;

/// How one device's doorbells are served: absorbed by QEMU as ioeventfds or kept on the socket,
/// and whether the thread serving the eventfds runs SCHED_FIFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorbellPlan {
    /// QEMU signals an eventfd and the vCPU returns at once.
    pub absorb: bool,
    /// The doorbell thread runs SCHED_FIFO ([`SERVER_PRIORITY`]).
    pub fifo: bool,
    /// How long a SCHED_FIFO doorbell thread keeps polling after serving a doorbell before it
    /// sleeps again (zero: at once).
    pub spin: std::time::Duration,
}

/// The default poll budget of a busy-polled device's SCHED_FIFO doorbell thread, in µs
/// (`SLUICE_PROXY_DOORBELL_SPIN_US` overrides it). Linux's virtio-iommu rings once per sync of
/// its mapped buffers, about six times per 4k disk request in strict mode, a few tens of µs
/// apart under TCG: with 200 µs about 95 % of them were found while polling, which saves the
/// ~20 µs wake-up each. 100 and 400 µs measured worse (`docs/benchmarks.md`, "Polling after a
/// doorbell").
pub const DOORBELL_SPIN_US: u32 = 200;
/// The most `SLUICE_PROXY_DOORBELL_SPIN_US` or `SLUICE_PROXY_IOMMU_SPIN_US` may ask for: a
/// thread at SCHED_FIFO that polls longer holds a core the guest's own vCPU threads need.
pub const MAX_POLL_US: u32 = 1000;

/// A poll budget in µs from a switch's `value`: a number, capped at [`MAX_POLL_US`];
/// `default_us` when the switch is unset or not a number.
fn poll_us(value: Option<&str>, default_us: u32) -> u32 {
    value
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(default_us, |us| us.min(MAX_POLL_US))
}

/// The plan for a device of `kind`, from `SLUICE_PROXY_IOEVENTFD` (`off`: no device's doorbells
/// are absorbed; `all`: every device's) and `SLUICE_PROXY_DOORBELL_SCHED` (`normal`: no
/// SCHED_FIFO; `fifo`: every doorbell thread's) and `SLUICE_PROXY_DOORBELL_SPIN_US` (how long
/// the thread polls after a doorbell, capped at [`MAX_POLL_US`]; only an absorbing
/// SCHED_FIFO thread polls).
///
/// Default: a device whose guest driver busy-polls for the answer (virtio-iommu: Linux spins on
/// the used ring after every MAP/UNMAP) gets its doorbells absorbed with a SCHED_FIFO thread,
/// and keeps them on the socket where this process may not use SCHED_FIFO. The spinning vCPU
/// thread holds a host core; on a host with no core to spare (2 cores, 2 TCG vCPUs) a
/// SCHED_OTHER doorbell thread waits behind it, and strict 4k throughput fell to half the
/// socket path's. At SCHED_FIFO its wake-up preempts the spinner instead (`docs/benchmarks.md`,
/// "SCHED_FIFO for busy-polled IOMMU threads"). Other devices' drivers sleep until the interrupt: their
/// doorbells are absorbed and their threads stay SCHED_OTHER (no gain measured). The
/// busy-polled device's thread polls [`DOORBELL_SPIN_US`] after each doorbell.
pub fn doorbell_plan(kind: &str) -> DoorbellPlan {
    plan_from(
        kind,
        std::env::var("SLUICE_PROXY_IOEVENTFD").ok().as_deref(),
        std::env::var("SLUICE_PROXY_DOORBELL_SCHED").ok().as_deref(),
        std::env::var("SLUICE_PROXY_DOORBELL_SPIN_US")
            .ok()
            .as_deref(),
        fifo_permitted,
    )
}

fn plan_from(
    kind: &str,
    ioeventfd: Option<&str>,
    sched: Option<&str>,
    spin_us: Option<&str>,
    permitted: impl FnOnce() -> bool,
) -> DoorbellPlan {
    let busy_polled = kind == "virtio-iommu";
    let fifo = match sched {
        Some("normal") => false,
        Some("fifo") => true,
        _ => busy_polled,
    };
    let absorb = match ioeventfd {
        Some("off") => false,
        Some("all") => true,
        _ => !busy_polled || (fifo && permitted()),
    };
    let spin_us = poll_us(spin_us, if busy_polled { DOORBELL_SPIN_US } else { 0 });
    DoorbellPlan {
        absorb,
        fifo,
        spin: std::time::Duration::from_micros(if fifo && absorb {
            u64::from(spin_us)
        } else {
            0
        }),
    }
}

/// Whether the server thread of a platform IOMMU (SMMUv3) or of the zPCI channel runs
/// SCHED_FIFO (`SLUICE_PROXY_IOMMU_SCHED=normal` keeps it SCHED_OTHER). Linux waits for every
/// SMMUv3 CMD_SYNC spinning on memory, and with the CMDQ_PROD write posted the vCPU spins while
/// this thread has yet to run the queue: SCHED_OTHER, it waits behind the spinner for a core.
/// A forwarded RPCIT holds its vCPU in QEMU until the answer, which QEMU polls for a while
/// before it sleeps (`x-zpci-proxy-spin-us`): the same wait.
pub fn iommu_server_fifo() -> bool {
    std::env::var("SLUICE_PROXY_IOMMU_SCHED").map_or(true, |v| v != "normal")
}

/// How long a SCHED_FIFO IOMMU server thread polls for QEMU's next message after one before
/// it blocks: `default_us`, or `SLUICE_PROXY_IOMMU_SPIN_US` (µs, capped at
/// [`MAX_POLL_US`]; 0: block at once).
pub fn iommu_server_spin(default_us: u32) -> std::time::Duration {
    let us = poll_us(
        std::env::var("SLUICE_PROXY_IOMMU_SPIN_US").ok().as_deref(),
        default_us,
    );
    std::time::Duration::from_micros(u64::from(us))
}

/// The zPCI server thread's default poll budget, in µs. A guest's RPCITs come back to back
/// (one per unmap in strict mode, per flush in lazy); with 200 µs most are found while polling
/// and strict 4k throughput rose 62–74 % (`docs/benchmarks.md`, "Polling after a doorbell").
pub const ZPCI_SERVER_SPIN_US: u32 = 200;
/// The SMMUv3 server thread's, for a guest of `vcpus` vCPUs: 200 µs when the host has a core
/// beyond one per vCPU, else none. Linux waits for each CMD_SYNC with its vCPU spinning, and
/// the CMDQ_PROD write before it is posted, so the vCPU that made it runs on while the thread
/// serves and polls: with a core to spare polling saves a thread wake-up per CMD_SYNC (1 vCPU
/// on 2 cores: strict scattered 1M +62–100 %, strict 4k +9–18 %), without one the poller
/// takes the core the spinning vCPUs need (2 vCPUs: strict read4k slower in every round
/// measured, 10.0 to 7.2 MiB/s). `docs/benchmarks.md`, "what bounds the IOMMU rows".
pub fn smmu_server_spin_us(vcpus: u32) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > vcpus as usize {
        SMMU_SERVER_SPARE_CORE_SPIN_US
    } else {
        0
    }
}
/// The SMMUv3 server thread's poll budget when the host has a core to spare
/// ([`smmu_server_spin_us`]): the zPCI thread's, which was measured first.
const SMMU_SERVER_SPARE_CORE_SPIN_US: u32 = ZPCI_SERVER_SPIN_US;

/// How long (µs) a zPCI instruction QEMU forwards polls for the answer before its vCPU thread
/// sleeps: [`ZPCI_SPIN_US`] when the zPCI server thread runs SCHED_FIFO (a polling vCPU holds a
/// core, and a SCHED_OTHER server would wait behind it) and `qemu` knows
/// `x-zpci-proxy-spin-us`; `SLUICE_ZPCI_SPIN_US` overrides it (0: sleep at once).
pub fn zpci_spin_us(qemu: &Path) -> Option<u32> {
    if let Ok(v) = std::env::var("SLUICE_ZPCI_SPIN_US") {
        return v.parse().ok();
    }
    (iommu_server_fifo()
        && fifo_permitted()
        && machine_has_property(qemu, "s390-ccw-virtio", "x-zpci-proxy-spin-us"))
    .then_some(ZPCI_SPIN_US)
}

/// The default poll budget of a forwarded zPCI instruction: the model answers an RPCIT in
/// microseconds once its thread runs; waking a sleeping vCPU thread costs about 20 µs on the
/// VMs measured, a budget of 200 µs covers a loaded host's answer too.
pub const ZPCI_SPIN_US: u32 = 200;

/// Whether `qemu -M machine,help` lists `property`.
fn machine_has_property(qemu: &Path, machine: &str, property: &str) -> bool {
    let prefix = format!("{property}=");
    crate::fastpath::qemu_help(qemu, &["-M", &format!("{machine},help")])
        .lines()
        .any(|l| l.trim_start().starts_with(&prefix))
}

/// Whether this process may make a thread SCHED_FIFO (CAP_SYS_NICE, or an RLIMIT_RTPRIO of at
/// least [`SERVER_PRIORITY`]), tried once on a short-lived thread.
pub fn fifo_permitted() -> bool {
    static PERMITTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PERMITTED.get_or_init(|| {
        // The probe thread ends right after, taking its policy with it.
        let probe = std::thread::Builder::new()
            .name("fifo-probe".into())
            .spawn(|| {
                set_fifo().map_err(|e| {
                    log::info!(
                        "no SCHED_FIFO ({e}): a virtio-iommu's doorbells stay on the socket, \
                         IOMMU server threads stay SCHED_OTHER"
                    );
                })
            });
        probe
            .ok()
            .and_then(|h| h.join().ok())
            .is_some_and(|r| r.is_ok())
    })
}

/// Makes the calling thread SCHED_FIFO at [`SERVER_PRIORITY`]; without the privilege it stays
/// as it was (logged) and the answer is false.
pub(crate) fn raise_to_fifo() -> bool {
    set_fifo()
        .map_err(|e| {
            log::info!(
                "{} stays SCHED_OTHER: {e}",
                std::thread::current().name().unwrap_or("a thread")
            );
        })
        .is_ok()
}

/// The SCHED_FIFO priority of Sluice's answering threads: above the guest's vCPU threads when
/// those run SCHED_FIFO ([`VCPU_PRIORITY`]), so a vCPU that spins for an answer never holds the
/// core its answer needs.
pub const SERVER_PRIORITY: i32 = 2;
/// The SCHED_FIFO priority of QEMU's vCPU threads with `SLUICE_VCPU_SCHED=fifo`.
pub const VCPU_PRIORITY: i32 = 1;

/// The calling thread to SCHED_FIFO at [`SERVER_PRIORITY`].
fn set_fifo() -> std::io::Result<()> {
    set_fifo_of(0, SERVER_PRIORITY)
}

/// Thread `tid` (0: the calling thread) to SCHED_FIFO at `priority`.
fn set_fifo_of(tid: libc::pid_t, priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param for the call; a stale `tid` only fails (ESRCH).
    match unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether `SLUICE_VCPU_SCHED=fifo` asks for QEMU's vCPU threads at SCHED_FIFO.
pub fn vcpu_fifo_requested() -> bool {
    std::env::var("SLUICE_VCPU_SCHED").is_ok_and(|v| v == "fifo")
}

/// How long the launcher looks for QEMU's vCPU threads before it gives up (they exist before
/// the guest's first instruction; a QEMU that takes this long has other problems).
const VCPU_SEARCH: std::time::Duration = std::time::Duration::from_secs(10);

/// Raises QEMU's vCPU threads (named `CPU n/TCG` or `CPU n/KVM`: the launcher passes
/// `-name ...,debug-threads=on`) to SCHED_FIFO at [`VCPU_PRIORITY`] once they exist; the
/// launcher calls [`VcpuRaiser::tick`] from its supervision loop.
pub(crate) struct VcpuRaiser {
    pid: u32,
    want: usize,
    raised: Vec<libc::pid_t>,
    /// Threads that refused (logged once each).
    refused: Vec<libc::pid_t>,
    give_up: std::time::Instant,
}

impl VcpuRaiser {
    /// A raiser for QEMU process `pid` with `cpus` vCPUs, when `SLUICE_VCPU_SCHED=fifo` asks for
    /// it and this process may use SCHED_FIFO (logged when it may not).
    pub(crate) fn requested(pid: u32, cpus: u32) -> Option<Self> {
        if !vcpu_fifo_requested() {
            return None;
        }
        if !fifo_permitted() {
            log::warn!("SLUICE_VCPU_SCHED=fifo: this process may not use SCHED_FIFO");
            return None;
        }
        Some(VcpuRaiser::new(pid, cpus))
    }

    fn new(pid: u32, cpus: u32) -> Self {
        VcpuRaiser {
            pid,
            want: usize::try_from(cpus).unwrap_or(usize::MAX),
            raised: Vec::new(),
            refused: Vec::new(),
            give_up: std::time::Instant::now() + VCPU_SEARCH,
        }
    }

    /// Raises the vCPU threads found so far; the number raised once all are (or the search
    /// gave up), `None` while it goes on.
    pub(crate) fn tick(&mut self) -> Option<usize> {
        for tid in vcpu_threads(self.pid) {
            if self.raised.contains(&tid) || self.refused.contains(&tid) {
                continue;
            }
            match set_fifo_of(tid, VCPU_PRIORITY) {
                Ok(()) => self.raised.push(tid),
                Err(e) => {
                    log::warn!("vCPU thread {tid} stays SCHED_OTHER: {e}");
                    self.refused.push(tid);
                }
            }
        }
        let done = self.raised.len() >= self.want || std::time::Instant::now() > self.give_up;
        done.then_some(self.raised.len())
    }
}

/// The thread IDs of process `pid` whose name is a QEMU vCPU's (`CPU n/...`).
pub(crate) fn vcpu_threads(pid: u32) -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| is_vcpu_name(c.trim_end()))
        })
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether a thread name is a QEMU vCPU's: `CPU <index>/<accelerator>`.
fn is_vcpu_name(name: &str) -> bool {
    name.strip_prefix("CPU ")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(index, accel)| {
            !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) && !accel.is_empty()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The SMMUv3 server polls only while the host keeps a core beyond one per vCPU.
    #[test]
    fn the_smmu_server_polls_only_with_a_core_to_spare() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert_eq!(
            smmu_server_spin_us(cores),
            0,
            "one core per vCPU: none to spare"
        );
        assert_eq!(smmu_server_spin_us(cores + 7), 0);
        if cores > 1 {
            assert_eq!(smmu_server_spin_us(cores - 1), 200, "a core to spare");
        }
    }

    #[test]
    fn vcpu_threads_are_known_by_qemus_names() {
        assert!(is_vcpu_name("CPU 0/TCG"));
        assert!(is_vcpu_name("CPU 12/KVM"));
        assert!(!is_vcpu_name("CPU /TCG"));
        assert!(!is_vcpu_name("CPU 0"));
        assert!(!is_vcpu_name("qemu-system-x86"));
        assert!(!is_vcpu_name("worker"));
    }

    /// A thread of this process named like a QEMU vCPU is found and raised to SCHED_FIFO
    /// [`VCPU_PRIORITY`] (one test, so no other test's thread of that name can interfere).
    #[test]
    fn a_thread_named_like_a_vcpu_is_raised_to_fifo() {
        let me = std::process::id();
        assert!(vcpu_threads(me).is_empty());
        if !fifo_permitted() {
            println!("SKIPPED: this process may not use SCHED_FIFO");
            return;
        }
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let vcpu = std::thread::Builder::new()
            .name("CPU 0/TCG".into())
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = end_rx.recv();
            })
            .unwrap();
        let tid = tid_rx.recv().unwrap();
        assert_eq!(vcpu_threads(me), vec![tid]);
        let mut raiser = VcpuRaiser::new(me, 1);
        assert_eq!(raiser.tick(), Some(1));
        // SAFETY: `tid` is a live thread of this process (it waits on `end_rx`).
        assert_eq!(unsafe { libc::sched_getscheduler(tid) }, libc::SCHED_FIFO);
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: as above; `param` is a valid out-parameter.
        assert_eq!(unsafe { libc::sched_getparam(tid, &mut param) }, 0);
        assert_eq!(param.sched_priority, VCPU_PRIORITY);
        end_tx.send(()).unwrap();
        vcpu.join().unwrap();
    }

    #[test]
    fn busy_polled_devices_are_absorbed_only_with_a_fifo_thread() {
        let plan =
            |kind, io, sched, permitted: bool| plan_from(kind, io, sched, None, || permitted);
        let spin = Duration::from_micros(u64::from(DOORBELL_SPIN_US));
        let on = |absorb, fifo| DoorbellPlan {
            absorb,
            fifo,
            spin: Duration::ZERO,
        };
        let polled = DoorbellPlan {
            absorb: true,
            fifo: true,
            spin,
        };
        // defaults
        assert_eq!(plan("virtio-iommu", None, None, true), polled);
        assert_eq!(plan("virtio-iommu", None, None, false), on(false, true));
        assert_eq!(plan("virtio-blk", None, None, false), on(true, false));
        // a SCHED_OTHER virtio-iommu thread would wait behind the spinning vCPU: socket
        assert_eq!(
            plan("virtio-iommu", None, Some("normal"), true),
            on(false, false)
        );
        // the A/B switches
        assert_eq!(
            plan("virtio-iommu", Some("all"), Some("normal"), true),
            on(true, false)
        );
        assert_eq!(
            plan("virtio-iommu", Some("off"), None, true),
            on(false, true)
        );
        assert_eq!(
            plan("virtio-blk", Some("off"), None, true),
            on(false, false)
        );
        assert_eq!(plan("virtio-blk", None, Some("fifo"), true), on(true, true));
    }

    #[test]
    fn only_an_absorbing_fifo_thread_polls_and_never_past_the_cap() {
        let spin = |kind, sched, us| plan_from(kind, None, sched, us, || true).spin;
        let us = |n| Duration::from_micros(n);
        assert_eq!(spin("virtio-iommu", None, Some("50")), us(50));
        assert_eq!(spin("virtio-iommu", None, Some("0")), us(0));
        assert_eq!(
            spin("virtio-iommu", None, Some("99999")),
            us(u64::from(MAX_POLL_US))
        );
        // garbage: the default
        assert_eq!(
            spin("virtio-iommu", None, Some("fast")),
            us(u64::from(DOORBELL_SPIN_US))
        );
        // a SCHED_OTHER thread never polls; neither does one whose doorbells stay on the socket
        assert_eq!(spin("virtio-iommu", Some("normal"), Some("50")), us(0));
        assert_eq!(
            plan_from("virtio-iommu", None, None, Some("50"), || false).spin,
            us(0)
        );
        // other devices poll only when asked to and at SCHED_FIFO
        assert_eq!(spin("virtio-blk", None, None), us(0));
        assert_eq!(spin("virtio-blk", Some("fifo"), Some("20")), us(20));
    }

    /// A stand-in QEMU binary printing `help` as its machine help.
    fn fake_qemu(dir: &std::path::Path, name: &str, help: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\ncat <<'EOF'\n{help}\nEOF\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn machine_properties_are_read_from_the_binarys_help() {
        let dir = std::env::temp_dir().join(format!("sluice-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let new = fake_qemu(
            &dir,
            "new",
            "s390-ccw-virtio-7.2 options:\n  x-zpci-proxy-fd=<string> - socket\n  \
             x-zpci-proxy-spin-us=<string> - poll budget",
        );
        let old = fake_qemu(&dir, "old", "  x-zpci-proxy-fd=<string> - socket");
        let prop = "x-zpci-proxy-spin-us";
        assert!(machine_has_property(&new, "s390-ccw-virtio", prop));
        assert!(!machine_has_property(&old, "s390-ccw-virtio", prop));
        // a prefix of a property is not the property
        assert!(!machine_has_property(
            &new,
            "s390-ccw-virtio",
            "x-zpci-proxy"
        ));
        assert!(!machine_has_property(
            &dir.join("absent"),
            "s390-ccw-virtio",
            prop
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
