//! The two paths a proxied device's I/O takes without a socket round trip, with Sluice's QEMU
//! patch (`guest-images/qemu/proxy-intx-tcg.patch`, "x-sluice-protocol" 2):
//!
//! - **Doorbells**: QEMU asks for the device's doorbells (GET_IOEVENTFDS) and registers the
//!   eventfds Sluice hands over as ioeventfds on the BAR. The vCPU's queue-notify write then
//!   signals an eventfd and returns; [`DoorbellThread`] replays it as the `bar_write` the
//!   socket path would have made.
//! - **MSI-X**: QEMU emulates the function's MSI-X table and hands over one eventfd per
//!   vector (SET_MSIX_FDS). [`MsixEventfds`] is the function's [`VectorRelay`]: a completion
//!   signals the vector's eventfd and QEMU delivers the message, so the guest needs no ISR
//!   read.
//!
//! Both are optional: a device whose injection plan holds a doorbell rule keeps its doorbells
//! on the socket (a stall there must hold the vCPU that rang), a virtio-iommu's are absorbed
//! only with a SCHED_FIFO doorbell thread ([`crate::sched::doorbell_plan`]), and
//! `SLUICE_PROXY_IOEVENTFD`,
//! `SLUICE_PROXY_DOORBELL_SCHED` and `SLUICE_PROXY_MSIX` switch the paths for A/B
//! measurements.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_pci::{Doorbell, PciFunction, VectorRelay};
use vmm_sys_util::eventfd::EventFd;

use crate::protocol::{IoeventfdEntry, MAX_MSIX_VECTORS};
use crate::serving::into_eventfd;

/// The Sluice protocol level of a patched proxy that speaks GET_IOEVENTFDS and SET_MSIX_FDS.
pub const PROTOCOL_FASTPATH: u32 = 2;
/// MSI-X vectors per function through the proxy: a config vector and one per queue for every
/// Sluice device (virtio-iommu has two queues), as on the kvm backend.
pub const PROXY_MSIX_VECTORS: u16 = 8;
const POLL: Duration = Duration::from_millis(100);

/// Whether `SLUICE_PROXY_<name>` leaves the path on (anything but `off`).
pub(crate) fn enabled(name: &str) -> bool {
    std::env::var(format!("SLUICE_PROXY_{name}")).map_or(true, |v| v != "off")
}

/// The "x-sluice-protocol" level `qemu`'s `x-pci-proxy-dev` advertises (0: an unpatched or
/// older QEMU, which speaks neither GET_IOEVENTFDS nor SET_MSIX_FDS). Asks the binary once per
/// path (`-device x-pci-proxy-dev,help`).
pub fn proxy_protocol(qemu: &Path) -> u32 {
    parse_protocol(&qemu_help(qemu, &["-device", "x-pci-proxy-dev,help"])).unwrap_or(0)
}

/// Whether `qemu`'s `x-smmuv3-proxy` makes the PCI functions' address spaces go through the
/// remote SMMUv3 and so asks Sluice to translate the MSIs it writes
/// (`guest-images/qemu/aarch64/40-smmuv3-proxy-msi-translate.patch`,
/// [`crate::protocol::Command::SmmuTranslate`]): its `x-sluice-msi-translate` property.
/// `SLUICE_PROXY_MSI_TRANSLATE=off` answers no (arm64 behind the SMMUv3 then stays on INTx,
/// while runs without an IOMMU keep MSI-X: the A/B of docs/benchmarks.md).
pub fn smmu_proxy_translates_msi(qemu: &Path) -> bool {
    enabled("MSI_TRANSLATE")
        && lists_msi_translate(&qemu_help(qemu, &["-device", "x-smmuv3-proxy,help"]))
}

/// Whether `-device x-smmuv3-proxy,help` output has `x-sluice-msi-translate` on by default
/// (`  x-sluice-msi-translate=<bool> -  (default: true)`).
fn lists_msi_translate(help: &str) -> bool {
    help.lines()
        .any(|l| l.contains("x-sluice-msi-translate") && !l.contains("default: false"))
}

/// What `qemu -nodefaults ARGS` prints on stdout (empty when it cannot run), asked once per
/// binary and arguments: the capability probes of the launcher read QEMU's `help` output.
pub(crate) fn qemu_help(qemu: &Path, args: &[&str]) -> String {
    type Seen = Vec<(std::path::PathBuf, Vec<String>, String)>;
    static SEEN: Mutex<Seen> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, out)) = seen.iter().find(|(p, a, _)| p == qemu && a == args) {
        return out.clone();
    }
    let out = std::process::Command::new(qemu)
        .arg("-nodefaults")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    seen.push((
        qemu.to_path_buf(),
        args.iter().map(|a| a.to_string()).collect(),
        out.clone(),
    ));
    out
}

/// The default of "x-sluice-protocol" in `-device x-pci-proxy-dev,help` output
/// (`  x-sluice-protocol=<uint32>  -  (default: 2)`).
fn parse_protocol(help: &str) -> Option<u32> {
    let line = help.lines().find(|l| l.contains("x-sluice-protocol"))?;
    let tail = line.split("default:").nth(1)?;
    let digits: String = tail
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// MSI-X vectors to give each proxied function: [`PROXY_MSIX_VECTORS`] when `qemu`'s proxy
/// emulates MSI-X and QEMU's own message write reaches the interrupt controller, else 0 (INTx).
/// With an IOMMU that translates MSIs (arm64: the ITS doorbell is an IOVA the guest maps into
/// the function's domain), QEMU's `msix_notify` write must itself be translated: so
/// `msi_delivered` says either that the platform's MSIs bypass translation (x86: virtio-iommu
/// does not remap the interrupt range; s390: the MSI region of a zPCI function's address space
/// is QEMU's own, and a zPCI function without MSI-X is refused anyway), or that QEMU asks
/// Sluice's SMMUv3 to translate it ([`smmu_proxy_translates_msi`]). Otherwise runs with an
/// IOMMU stay on INTx. `SLUICE_PROXY_MSIX=off` forces INTx.
pub fn proxy_msix_vectors(qemu: &Path, msi_delivered: bool, iommu: bool) -> u16 {
    if !enabled("MSIX") || (!msi_delivered && iommu) || proxy_protocol(qemu) < PROTOCOL_FASTPATH {
        0
    } else {
        PROXY_MSIX_VECTORS
    }
}

/// Counters of the fast paths of one device.
#[derive(Debug, Default)]
pub struct FastPathStats {
    /// Doorbells handed to QEMU as ioeventfds.
    pub ioeventfds: AtomicU64,
    /// Doorbell eventfd reads that replayed a queue notify (one read may stand for several
    /// guest writes).
    pub doorbells_served: AtomicU64,
    /// MSI-X vector eventfds QEMU handed over.
    pub msix_fds: AtomicU64,
    /// Vectors signalled through them.
    pub msix_signals: AtomicU64,
    /// Doorbells the device's own worker waits on (no doorbell thread replays them).
    pub device_doorbells: AtomicU64,
    /// Doorbell threads that run SCHED_FIFO.
    pub fifo_threads: AtomicU64,
    /// Wake-ups of a SCHED_FIFO doorbell thread on the core of a waiting vCPU thread after
    /// which it moved to another core.
    pub stepped_aside: AtomicU64,
    /// The doorbell thread's polls after a doorbell ([`crate::poll`]).
    pub poll: crate::poll::PollCounters,
}

/// One doorbell absorbed by QEMU: what to replay, and the eventfd QEMU signals.
pub(crate) struct AbsorbedDoorbell {
    pub(crate) doorbell: Doorbell,
    pub(crate) fd: EventFd,
}

impl AbsorbedDoorbell {
    /// How QEMU registers it.
    pub(crate) fn entry(&self) -> IoeventfdEntry {
        IoeventfdEntry {
            bar: self.doorbell.bar,
            offset: self.doorbell.offset,
            size: self.doorbell.size,
            datamatch: self.doorbell.datamatch,
        }
    }
}

/// The thread serving one device's absorbed doorbells. Dropping it stops and joins it.
pub(crate) struct DoorbellThread {
    quit: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl DoorbellThread {
    /// Serves `doorbells` of `function` until dropped or `stop` is set.
    pub(crate) fn spawn(
        name: String,
        function: Arc<dyn PciFunction>,
        doorbells: Arc<Vec<AbsorbedDoorbell>>,
        stop: Arc<AtomicBool>,
        stats: Arc<FastPathStats>,
        plan: crate::sched::DoorbellPlan,
        qemu_pid: Option<u32>,
    ) -> std::io::Result<Self> {
        let quit = EventFd::new(libc::EFD_NONBLOCK)?;
        let quit_theirs = quit.try_clone()?;
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let fifo = plan.fifo && crate::sched::raise_to_fifo();
            if fifo {
                stats.fifo_threads.fetch_add(1, Ordering::Relaxed);
            }
            // Polling at SCHED_OTHER holds the core the spinning vCPU's next request needs
            // answered on (docs/benchmarks.md): only a SCHED_FIFO thread polls.
            let spin = if fifo { plan.spin } else { Duration::ZERO };
            let served = ServedDoorbells {
                function: function.as_ref(),
                doorbells: &doorbells,
                stats: &stats,
                rings: enabled("RING_POLL"),
            };
            // Only a real-time thread preempts the vCPU it wakes beside (`crate::step_aside`).
            // Opt-in (`SLUICE_PROXY_STEP_ASIDE=on`): measured, it speeds up scattered 1M requests
            // behind a lazy virtio-iommu by a quarter but slows every 4k test, whose critical
            // path runs on the core it moves to (docs/benchmarks.md).
            let vcpus = qemu_pid
                .filter(|_| {
                    fifo && std::env::var("SLUICE_PROXY_STEP_ASIDE").is_ok_and(|v| v == "on")
                })
                .map(crate::step_aside::VcpuCores::of);
            served.serve(&quit_theirs, &stop, spin, vcpus)
        })?;
        Ok(DoorbellThread {
            quit,
            handle: Some(handle),
        })
    }
}

impl Drop for DoorbellThread {
    fn drop(&mut self) {
        if let Err(e) = self.quit.write(1) {
            // It still ends at the run's stop flag.
            log::error!("cannot stop a doorbell thread: {e}");
            return;
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// How long a run of ring polls finds nothing before it looks whether it holds a waiting vCPU
/// thread's core ([`ServedDoorbells::poll_rings`]). A guest that runs asks again much sooner:
/// a scattered 1M request's 512 virtio-iommu requests took ~4 ms under TCG, ~8 µs apart.
const STEP_ASIDE_AFTER: Duration = Duration::from_micros(30);

/// One device's absorbed doorbells, replayed on its function.
struct ServedDoorbells<'a> {
    function: &'a dyn PciFunction,
    doorbells: &'a [AbsorbedDoorbell],
    stats: &'a FastPathStats,
    /// Poll the device's rings rather than the eventfds where the function allows it
    /// (`SLUICE_PROXY_RING_POLL=off`: never).
    rings: bool,
}

impl ServedDoorbells<'_> {
    /// Serves the doorbells until `quit` is signalled or `stop` set. After serving one, the
    /// thread keeps polling without sleeping for `spin` (zero: it sleeps at once), so a guest
    /// driver that rings again within that time (Linux's virtio-iommu sends a request per
    /// mapped buffer, back to back) is answered without a thread wake-up. It polls the device's
    /// rings where the function allows it ([`Self::poll_rings`], which also spares the driver
    /// its doorbells meanwhile), the eventfds otherwise. The loop sleeps again once `spin`
    /// passes with nothing to do, so an idle guest costs no CPU.
    /// With `vcpus` (a SCHED_FIFO thread) it moves off the core of a vCPU thread it woke up
    /// beside ([`Self::poll_rings`], [`crate::step_aside`]).
    fn serve(
        &self,
        quit: &EventFd,
        stop: &AtomicBool,
        spin: Duration,
        mut vcpus: Option<crate::step_aside::VcpuCores>,
    ) {
        let mut pfds: Vec<libc::pollfd> = self
            .doorbells
            .iter()
            .map(|d| d.fd.as_raw_fd())
            .chain(std::iter::once(quit.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // A doorbell was served: look for the next one by polling before sleeping.
        let mut polling = false;
        while !stop.load(Ordering::Acquire) {
            let ready = std::mem::take(&mut polling)
                && match self.poll_rings(&mut pfds, stop, spin, vcpus.as_mut()) {
                    Some(()) => false,
                    None => crate::poll::poll_briefly(&mut pfds, spin, &self.stats.poll),
                };
            if !ready {
                // SAFETY: `pfds` is a live array of pollfds of the stated length.
                let n = unsafe {
                    libc::poll(
                        pfds.as_mut_ptr(),
                        pfds.len() as libc::nfds_t,
                        POLL.as_millis() as i32,
                    )
                };
                if n <= 0 {
                    continue; // timeout (look at `stop`) or EINTR
                }
            }
            if pfds.last().is_some_and(|q| q.revents != 0) {
                return;
            }
            polling = self.replay_ready(&mut pfds) > 0 && !spin.is_zero();
        }
    }

    /// Moves off a waiting vCPU thread's core, counted
    /// ([`crate::step_aside::VcpuCores::leave_if_waited_for`]).
    fn step_aside(&self, vcpus: &mut crate::step_aside::VcpuCores) {
        if vcpus.leave_if_waited_for() {
            self.stats.stepped_aside.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Polls the device's rings with its doorbells suppressed ([`PciFunction::poll_doorbell`]):
    /// the guest's driver then skips the notify write (an MMIO exit and an eventfd signal) for
    /// every request made meanwhile, and each is served within a poll's time. Each find starts
    /// the budget `spin` again; once it passes with nothing found, doorbells are asked for again
    /// (which serves what came in between) and the thread may sleep. Every few hundred polls
    /// the eventfds are looked at too (`pfds`: a doorbell of a queue that cannot be polled, or
    /// the quit signal), and any of them ends the polling. `None` when no queue of the function
    /// can be polled this way (the eventfds are polled instead).
    ///
    /// With `vcpus`, a run that finds nothing for [`STEP_ASIDE_AFTER`] looks once whether a
    /// vCPU thread waits for this thread's core and moves to another core if so
    /// ([`crate::step_aside`]). Looking costs two `/proc` reads (~7 µs each here), which is
    /// why it waits for a quiet moment of the poll rather than delaying the answer to the
    /// doorbell that woke the thread; a vCPU that can run answers within that time.
    fn poll_rings(
        &self,
        pfds: &mut [libc::pollfd],
        stop: &AtomicBool,
        spin: Duration,
        mut vcpus: Option<&mut crate::step_aside::VcpuCores>,
    ) -> Option<()> {
        /// Polls between two looks at the eventfds (a syscall).
        const FDS_EVERY: u32 = 256;
        if !self.rings {
            return None;
        }
        // Which doorbells answered the first pass: the others (a virtio-iommu's event queue,
        // say) are not asked again in this run of polls, so they cost no transport lock per
        // spin. A doorbell that turns pollable meanwhile is picked up by the next run.
        let mut pollable = PollableDoorbells::default();
        let mut found = false;
        for (i, d) in self.doorbells.iter().enumerate() {
            if let Some(f) = self.function.poll_doorbell(&d.doorbell, true) {
                pollable.insert(i);
                found |= f;
            }
        }
        if pollable.is_empty() {
            return None;
        }
        if found {
            self.stats.poll.caught.fetch_add(1, Ordering::Relaxed);
        }
        let mut last_find = std::time::Instant::now();
        let mut deadline = last_find + spin;
        let mut round = 0u32;
        loop {
            let mut found = false;
            for (i, d) in self.doorbells.iter().enumerate() {
                if pollable.contains(i) {
                    found |= self.function.poll_doorbell(&d.doorbell, true) == Some(true);
                }
            }
            let now = std::time::Instant::now();
            if found {
                self.stats.poll.caught.fetch_add(1, Ordering::Relaxed);
                last_find = now;
                deadline = now + spin;
            } else if now >= deadline {
                break;
            } else if vcpus.is_some()
                && now >= last_find + STEP_ASIDE_AFTER
                && let Some(v) = vcpus.take()
            {
                self.step_aside(v);
            }
            round = round.wrapping_add(1);
            if stop.load(Ordering::Acquire)
                || (round.is_multiple_of(FDS_EVERY)
                    // SAFETY: `pfds` is a live array of pollfds of the stated length; no
                    // timeout. Their `revents` are read again by the next poll of the caller.
                    && unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) } > 0)
            {
                break;
            }
            std::hint::spin_loop();
        }
        // Doorbells on again before the thread may sleep; what came meanwhile is served now.
        for (i, d) in self.doorbells.iter().enumerate() {
            if pollable.contains(i) && self.function.poll_doorbell(&d.doorbell, false) == Some(true)
            {
                self.stats.poll.caught.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.poll.expired.fetch_add(1, Ordering::Relaxed);
        Some(())
    }

    /// Replays every doorbell `poll` found signalled; how many.
    fn replay_ready(&self, pfds: &mut [libc::pollfd]) -> u64 {
        let mut served = 0;
        for (p, d) in pfds.iter_mut().zip(self.doorbells) {
            if p.revents & libc::POLLIN != 0 && d.fd.read().is_ok() {
                served += 1;
                self.stats.doorbells_served.fetch_add(1, Ordering::Relaxed);
                let value = d.doorbell.value.to_le_bytes();
                let len = usize::from(d.doorbell.size).min(value.len());
                self.function.bar_write(
                    d.doorbell.bar,
                    d.doorbell.offset,
                    value.get(..len).unwrap_or_default(),
                );
            } else if p.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                // Cannot become readable again: stop polling it (it is ours, so this means a
                // bug, not a guest action).
                log::error!("doorbell eventfd {} failed; it is no longer served", p.fd);
                p.fd = -1;
            }
            p.revents = 0;
        }
        served
    }
}

/// The doorbells of one function that can be polled, by index. A function has a handful (one
/// per virtqueue); an index past the mask's width is always taken as pollable, which costs a
/// `None` answer per spin and nothing else.
#[derive(Default, Clone, Copy)]
struct PollableDoorbells {
    first_64: u64,
    any_beyond: bool,
}

impl PollableDoorbells {
    fn insert(&mut self, i: usize) {
        match crate::mask_bit(i) {
            Some(bit) => self.first_64 |= bit,
            None => self.any_beyond = true,
        }
    }

    fn contains(self, i: usize) -> bool {
        match crate::mask_bit(i) {
            Some(bit) => self.first_64 & bit != 0,
            None => true,
        }
    }

    fn is_empty(self) -> bool {
        self.first_64 == 0 && !self.any_beyond
    }
}

/// A function's MSI-X vectors as QEMU's eventfds ([`VectorRelay`]).
pub(crate) struct MsixEventfds {
    fds: RwLock<Vec<Option<EventFd>>>,
    stats: Arc<FastPathStats>,
}

impl MsixEventfds {
    /// No vectors yet.
    pub(crate) fn new(stats: Arc<FastPathStats>) -> Self {
        MsixEventfds {
            fds: RwLock::new(Vec::new()),
            stats,
        }
    }

    /// Vectors `first..` get `fds` (SET_MSIX_FDS; the protocol layer bounds `first` and the
    /// count). A vector handed over again replaces its old descriptor.
    pub(crate) fn set(&self, first: u64, fds: Vec<OwnedFd>) {
        let mut table = self.fds.write().unwrap_or_else(|p| p.into_inner());
        for (i, fd) in fds.into_iter().enumerate() {
            let Some(v) = usize::try_from(first)
                .ok()
                .and_then(|f| f.checked_add(i))
                .filter(|v| (*v as u64) < MAX_MSIX_VECTORS)
            else {
                return;
            };
            if table.len() <= v {
                table.resize_with(v + 1, || None);
            }
            if let Some(slot) = table.get_mut(v) {
                *slot = Some(into_eventfd(fd));
                self.stats.msix_fds.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl VectorRelay for MsixEventfds {
    fn signal(&self, vector: u16) -> bool {
        let table = self.fds.read().unwrap_or_else(|p| p.into_inner());
        match table.get(usize::from(vector)) {
            Some(Some(fd)) => {
                self.stats.msix_signals.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = fd.write(1) {
                    log::error!("MSI-X vector {vector}: cannot signal QEMU's eventfd: {e}");
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::time::Instant;

    fn owned(fd: &EventFd) -> OwnedFd {
        let dup = fd.try_clone().unwrap();
        // SAFETY: `dup` is a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(dup.into_raw_fd()) }
    }

    #[test]
    fn protocol_level_from_device_help() {
        let help =
            "x-pci-proxy-dev options:\n  fd=<str>\n  x-sluice-protocol=<uint32>  -  (default: 2)\n";
        assert_eq!(parse_protocol(help), Some(2));
        assert_eq!(
            parse_protocol("x-pci-proxy-dev options:\n  fd=<str>\n"),
            None
        );
        assert_eq!(
            parse_protocol("  x-sluice-protocol=<uint32>  -  (default: x)"),
            None
        );
        assert_eq!(proxy_protocol(Path::new("/nonexistent/qemu")), 0);
    }

    /// As qemu-system-aarch64 with patch 40 prints it; without the patch the property is
    /// absent, and a build that turned it off says so.
    #[test]
    fn msi_translation_from_smmu_proxy_help() {
        let patched = "x-smmuv3-proxy options:\n  fd=<str>\n  primary-bus=<link<PCI>>\n  \
                       x-sluice-msi-translate=<bool> -  (default: true)\n";
        assert!(lists_msi_translate(patched));
        assert!(!lists_msi_translate(
            "x-smmuv3-proxy options:\n  fd=<str>\n  sysbus-irq[0]=<link<irq>>\n"
        ));
        assert!(!lists_msi_translate(
            "  x-sluice-msi-translate=<bool> -  (default: false)\n"
        ));
        assert!(!smmu_proxy_translates_msi(Path::new("/nonexistent/qemu")));
    }

    #[test]
    fn vectors_go_to_their_eventfds_and_unknown_ones_are_refused() {
        let stats = Arc::new(FastPathStats::default());
        let relay = MsixEventfds::new(stats.clone());
        let (a, b) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        relay.set(1, vec![owned(&a), owned(&b)]);
        assert!(!relay.signal(0), "vector 0 has no eventfd");
        assert!(relay.signal(2));
        assert_eq!(b.read().unwrap(), 1);
        assert!(a.read().is_err());
        assert!(!relay.signal(u16::MAX));
        // Past the largest table: ignored, nothing grows.
        relay.set(MAX_MSIX_VECTORS, vec![owned(&a)]);
        relay.set(u64::MAX, vec![owned(&a)]);
        assert_eq!(relay.fds.read().unwrap().len(), 3);
        assert_eq!(stats.msix_signals.load(Ordering::Relaxed), 1);
        assert_eq!(stats.msix_fds.load(Ordering::Relaxed), 2);
    }

    /// Records the BAR writes it gets.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u8, u64, Vec<u8>)>>);

    impl PciFunction for Recorder {
        fn config_read(&self, _offset: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn config_write(&self, _offset: u16, _data: &[u8]) {}
        fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((bar, offset, data.to_vec()));
        }
        fn decode_bar(&self, _addr: u64, _memory: bool) -> Option<(u8, u64)> {
            None
        }
        fn reset(&self) {}
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A doorbell rung while the thread still polls after the previous one is served without
    /// a wake-up and counted so; with no poll budget none is; either way each is replayed as
    /// its queue-notify write, and `quit` ends the thread.
    #[test]
    fn a_doorbell_rung_within_the_poll_budget_is_caught_while_polling() {
        // With a budget the second doorbell and then the quit are found while polling.
        for (spin, caught) in [(Duration::from_secs(5), 2), (Duration::ZERO, 0)] {
            let function = Recorder::default();
            let doorbells = vec![bell(4, 0x3004, 1)];
            let ring = doorbells[0].fd.try_clone().unwrap();
            let stats = FastPathStats::default();
            let quit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let stop = AtomicBool::new(false);
            std::thread::scope(|scope| {
                let served = ServedDoorbells {
                    function: &function,
                    doorbells: &doorbells,
                    stats: &stats,
                    // a function that cannot be polled: its eventfds are
                    rings: true,
                };
                let (quit_ref, stop_ref) = (&quit, &stop);
                let t = scope.spawn(move || served.serve(quit_ref, stop_ref, spin, None));
                for n in 1..=2 {
                    ring.write(1).unwrap();
                    wait_until("doorbell never served", || {
                        stats.doorbells_served.load(Ordering::Relaxed) == n
                    });
                }
                quit.write(1).unwrap();
                t.join().unwrap();
            });
            assert_eq!(stats.poll.caught.load(Ordering::Relaxed), caught);
            let writes = function.0.lock().unwrap();
            assert_eq!(*writes, vec![(4, 0x3004, vec![1, 0]); 2]);
        }
    }

    /// An absorbed doorbell of BAR `bar` at `offset` writing `value`, with a fresh eventfd.
    fn bell(bar: u8, offset: u64, value: u64) -> AbsorbedDoorbell {
        AbsorbedDoorbell {
            doorbell: Doorbell {
                bar,
                offset,
                size: 2,
                datamatch: None,
                value,
            },
            fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// `doorbells` of `function` served with `stats`, their rings polled when `rings`.
    fn served_by<'a>(
        function: &'a dyn PciFunction,
        doorbells: &'a [AbsorbedDoorbell],
        stats: &'a FastPathStats,
        rings: bool,
    ) -> ServedDoorbells<'a> {
        ServedDoorbells {
            function,
            doorbells,
            stats,
            rings,
        }
    }

    /// The pollfds of a run of ring polls that only a quit signal on `quit` may end.
    fn quit_only(quit: &EventFd) -> [libc::pollfd; 1] {
        [libc::pollfd {
            fd: quit.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }]
    }

    /// A function whose ring has `pending` requests; counts the polls by their `quiet` flag.
    #[derive(Default)]
    struct Ring {
        pending: AtomicU64,
        quiet_polls: AtomicU64,
        rearms: AtomicU64,
        /// Asks about a doorbell written with value 1, which stands for a queue that cannot be
        /// polled (answered `None`).
        unpollable_asks: AtomicU64,
    }

    impl PciFunction for Ring {
        fn config_read(&self, _offset: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn config_write(&self, _offset: u16, _data: &[u8]) {}
        fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
        fn decode_bar(&self, _addr: u64, _memory: bool) -> Option<(u8, u64)> {
            None
        }
        fn reset(&self) {}
        fn poll_doorbell(&self, doorbell: &Doorbell, quiet: bool) -> Option<bool> {
            if doorbell.value == 1 {
                self.unpollable_asks.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            if quiet {
                self.quiet_polls.fetch_add(1, Ordering::Relaxed);
            } else {
                self.rearms.fetch_add(1, Ordering::Relaxed);
            }
            let found = self.pending.load(Ordering::Relaxed) > 0;
            if found {
                self.pending.fetch_sub(1, Ordering::Relaxed);
            }
            Some(found)
        }
    }

    /// A pollable function's ring is polled quietly until the budget passes with nothing new,
    /// each find counted; the polling always ends by asking for doorbells again; with ring
    /// polling switched off the eventfds are polled instead; a quit signal ends the polling.
    #[test]
    fn rings_are_polled_quietly_and_doorbells_asked_for_again_before_sleeping() {
        let doorbells = vec![bell(0, 0x3000, 0)];
        let quit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pfds = quit_only(&quit);
        let stop = AtomicBool::new(false);
        for rings in [true, false] {
            let function = Ring::default();
            function.pending.store(3, Ordering::Relaxed);
            let stats = FastPathStats::default();
            let served = served_by(&function, &doorbells, &stats, rings);
            let polled = served.poll_rings(&mut pfds, &stop, Duration::from_millis(2), None);
            if !rings {
                assert_eq!(polled, None);
                assert_eq!(function.quiet_polls.load(Ordering::Relaxed), 0);
                continue;
            }
            assert_eq!(polled, Some(()));
            assert_eq!(stats.poll.caught.load(Ordering::Relaxed), 3);
            assert_eq!(stats.poll.expired.load(Ordering::Relaxed), 1);
            assert!(function.quiet_polls.load(Ordering::Relaxed) > 3);
            assert_eq!(
                function.rearms.load(Ordering::Relaxed),
                1,
                "doorbells on again"
            );
        }
        // A guest that never lets the ring run dry: only the quit signal ends the polling.
        let function = Ring::default();
        function.pending.store(u64::MAX, Ordering::Relaxed);
        let stats = FastPathStats::default();
        let served = served_by(&function, &doorbells, &stats, true);
        quit.write(1).unwrap();
        assert_eq!(
            served.poll_rings(&mut pfds, &stop, Duration::from_secs(3600), None),
            Some(())
        );
        assert_eq!(function.rearms.load(Ordering::Relaxed), 1);
    }

    /// A doorbell that cannot be polled is asked once per run of polls, not on every spin,
    /// and is not re-armed; its pollable sibling is polled as before.
    #[test]
    fn a_doorbell_that_cannot_be_polled_is_asked_once_per_run() {
        let doorbells = vec![bell(0, 0x3000, 0), bell(0, 0x3004, 1)];
        let quit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pfds = quit_only(&quit);
        let function = Ring::default();
        function.pending.store(2, Ordering::Relaxed);
        let stats = FastPathStats::default();
        let served = served_by(&function, &doorbells, &stats, true);
        let stop = AtomicBool::new(false);
        assert_eq!(
            served.poll_rings(&mut pfds, &stop, Duration::from_millis(2), None),
            Some(())
        );
        assert_eq!(stats.poll.caught.load(Ordering::Relaxed), 2);
        assert!(function.quiet_polls.load(Ordering::Relaxed) > 2);
        assert_eq!(function.rearms.load(Ordering::Relaxed), 1);
        assert_eq!(function.unpollable_asks.load(Ordering::Relaxed), 1);
        // A function none of whose doorbells can be polled: one ask each, then `None`.
        let only_unpollable = [bell(0, 0x3004, 1)];
        let function = Ring::default();
        let served = served_by(&function, &only_unpollable, &stats, true);
        assert_eq!(
            served.poll_rings(&mut pfds, &stop, Duration::from_millis(2), None),
            None
        );
        assert_eq!(function.unpollable_asks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn pollable_sets_past_sixty_four_doorbells_poll_the_rest_always() {
        let mut set = PollableDoorbells::default();
        assert!(set.is_empty());
        set.insert(3);
        assert!(set.contains(3) && !set.contains(2) && !set.contains(63));
        assert!(set.contains(64), "unknown past the mask: polled");
        let mut beyond = PollableDoorbells::default();
        beyond.insert(70);
        assert!(!beyond.is_empty() && !beyond.contains(0));
    }
}
