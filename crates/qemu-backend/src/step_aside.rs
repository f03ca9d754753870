//! A SCHED_FIFO doorbell thread that wakes on the core of the vCPU that rang moves off it.
//!
//! Linux wakes a real-time thread on the core it last ran on when that core runs an ordinary
//! thread, preempting it. When that ordinary thread is the guest's vCPU (SCHED_OTHER by default),
//! the vCPU that just rang and now spins for the answer waits on its core while this thread
//! serves and then polls for the next request, which that same vCPU would make. The other core
//! may sit idle meanwhile: the scheduler moves the waiting vCPU only at its next balancing
//! tick. Measured: QEMU's vCPU threads waited for a core 40–64 % of every IOMMU test behind
//! the polling doorbell thread on a 2-core host (`docs/benchmarks.md`). So after a wake-up the
//! thread looks whether a vCPU thread is runnable on its own core and, if so, moves itself to
//! another core no vCPU thread is busy on (its affinity without those cores, then the old
//! affinity again, which leaves it where it now is).
//!
//! Opt-in (`SLUICE_PROXY_STEP_ASIDE=on`), a benchmark setting like `SLUICE_VCPU_SCHED=fifo`:
//! on a 2-core host it raised scattered 1M throughput behind a lazy virtio-iommu by 24–28 %
//! but lowered every 4k test by 10–23 %, because the core it moves to is where virtio-blk's
//! worker and QEMU's main loop, the 4k requests' critical path, then wait for it.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// How many wake-ups may find no vCPU thread before the search is given up (QEMU names its
/// vCPU threads only with `debug-threads=on`, which the launcher passes).
const SEARCHES: u32 = 16;

/// QEMU's vCPU threads, watched through their `/proc` stat files.
pub(crate) struct VcpuCores {
    pid: u32,
    stats: Vec<File>,
    searches_left: u32,
    buf: Vec<u8>,
}

impl VcpuCores {
    /// The vCPU threads of QEMU process `pid`, found at the first look.
    pub(crate) fn of(pid: u32) -> Self {
        VcpuCores {
            pid,
            stats: Vec::new(),
            searches_left: SEARCHES,
            buf: vec![0; 1024],
        }
    }

    /// When a vCPU thread waits for the calling thread's core, moves the calling thread to a
    /// core no vCPU thread is busy on, if there is one (else it would only change which vCPU
    /// waits); whether it moved.
    pub(crate) fn leave_if_waited_for(&mut self) -> bool {
        let Some(core) = current_core() else {
            return false;
        };
        let busy = self.busy_cores();
        crate::mask_bit(core).is_some_and(|bit| busy & bit != 0) && move_off(core, busy)
    }

    /// The cores (of the first 64) a vCPU thread is runnable on (running, or waiting for it).
    fn busy_cores(&mut self) -> u64 {
        if self.stats.is_empty() {
            if self.searches_left == 0 {
                return 0;
            }
            self.searches_left -= 1;
            self.stats = crate::sched::vcpu_threads(self.pid)
                .into_iter()
                .filter_map(|tid| File::open(format!("/proc/{}/task/{tid}/stat", self.pid)).ok())
                .collect();
        }
        let buf = &mut self.buf;
        self.stats
            .iter()
            .filter_map(|f| {
                let n = f.read_at(buf, 0).ok()?;
                crate::mask_bit(runnable_core(buf.get(..n)?)?)
            })
            .fold(0, |cores, bit| cores | bit)
    }
}

/// The core of a task whose `/proc/.../stat` line is `stat`, when it is runnable (`R`).
fn runnable_core(stat: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(stat).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let (_, fields) = text.rsplit_once(')')?;
    let mut fields = fields.split_ascii_whitespace();
    // field 3 of proc_pid_stat(5): the state; field 39: the core last run on
    let state = fields.next()?;
    let core = fields.nth(35)?;
    (state == "R").then(|| core.parse().ok()).flatten()
}

/// The core the calling thread runs on.
fn current_core() -> Option<usize> {
    // SAFETY: no arguments; returns the core or -1.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// Moves the calling thread off core `cpu` to a core it may run on that is not in `busy`
/// (a mask of the first 64 cores), keeping its affinity as it was; false when there is none
/// or the kernel refused.
fn move_off(cpu: usize, busy: u64) -> bool {
    exclude(cpu, busy).is_some_and(|allowed| set_affinity(&allowed))
}

/// Takes core `cpu` and the cores in `busy` out of the calling thread's affinity, which moves
/// the thread off `cpu` before the call returns; the affinity it had, to be restored (which
/// does not move it back). `None` when no core would be left.
fn exclude(cpu: usize, busy: u64) -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `allowed` is a live cpu_set_t of the stated size; 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&allowed), &mut allowed) } != 0 {
        return None;
    }
    let mut elsewhere = allowed;
    // SAFETY: CPU_CLR/CPU_COUNT only touch the set they are given, bounded by its size.
    let others = unsafe {
        libc::CPU_CLR(cpu, &mut elsewhere);
        for core in (0..64).filter(|c| busy & (1 << c) != 0) {
            libc::CPU_CLR(core, &mut elsewhere);
        }
        libc::CPU_COUNT(&elsewhere)
    };
    (others > 0 && set_affinity(&elsewhere)).then_some(allowed)
}

fn set_affinity(set: &libc::cpu_set_t) -> bool {
    // SAFETY: `set` is a live cpu_set_t of the stated size; 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_of_a_runnable_task_is_read_after_its_name() {
        let fields = |state: &str| {
            let mut f = vec!["0"; 49];
            f[0] = state;
            f[36] = "7";
            f.join(" ")
        };
        let line = format!("4242 (CPU 0/TCG) {}\n", fields("R"));
        assert_eq!(runnable_core(line.as_bytes()), Some(7));
        // a name with a parenthesis and spaces of its own
        let odd = format!("4242 (a) b (c) {}\n", fields("R"));
        assert_eq!(runnable_core(odd.as_bytes()), Some(7));
        let sleeping = format!("4242 (CPU 1/TCG) {}\n", fields("S"));
        assert_eq!(runnable_core(sleeping.as_bytes()), None);
        assert_eq!(runnable_core(b"4242 (truncated) R 1 2"), None);
        assert_eq!(runnable_core(b"garbage"), None);
    }

    /// This very thread is runnable (it runs) on the core `sched_getcpu` names, and its stat
    /// file says so: the parser agrees with the kernel's layout.
    #[test]
    fn the_running_thread_is_found_on_its_core() {
        // SAFETY: no arguments.
        let tid = unsafe { libc::gettid() };
        let stat = std::fs::read(format!("/proc/self/task/{tid}/stat")).unwrap();
        let core = current_core().unwrap();
        // the thread may migrate between the two reads: accept either core it then names
        let read = runnable_core(&stat).unwrap();
        assert!(
            read == core || read == current_core().unwrap(),
            "{read} vs {core}"
        );
    }

    #[test]
    fn a_thread_moves_off_its_core_to_one_no_vcpu_is_busy_on() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let here = current_core().unwrap();
        // every core but this one busy: nowhere to go
        assert!(exclude(here, !0).is_none());
        if cores < 2 {
            eprintln!("SKIPPED: one core only, nowhere to move to");
            assert!(exclude(here, 0).is_none());
            return;
        }
        let allowed = exclude(here, 0).expect("another core is allowed");
        assert_ne!(current_core(), Some(here), "moved off core {here}");
        assert!(set_affinity(&allowed));
        assert!(move_off(current_core().unwrap(), 0));
    }
}
