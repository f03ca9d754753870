//! Serving one device over its proxy socket: the remote half of `x-pci-proxy-dev`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_host::HostedDevice;
use sluice_virtio_pci::{QueueEvent, SharedMemory, VirtioPciFunction};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{Channel, ChannelError};
use crate::fastpath::{AbsorbedDoorbell, DoorbellThread, FastPathStats, MsixEventfds};
use crate::memory::MemoryMapError;
use crate::protocol::{FAILED, MAX_IOEVENTFDS, ProtocolError, Request, encode_ioeventfds};
use crate::serving::{self, Handler, Reply, into_eventfd};

const CONFIG_SPACE: u32 = 256;
const RESAMPLE_POLL: Duration = Duration::from_millis(100);

/// Why serving a device stopped abnormally.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The connection broke or carried a malformed message.
    #[error("device {device}")]
    Channel {
        /// Device name.
        device: String,
        /// Cause.
        #[source]
        source: ChannelError,
    },
    /// Guest memory could not be mapped.
    #[error("device {device}")]
    Memory {
        /// Device name.
        device: String,
        /// Cause.
        #[source]
        source: MemoryMapError,
    },
}

impl ServeError {
    /// QEMU's end of the connection went away ([`ChannelError::peer_gone`]): a device error
    /// only if QEMU keeps running without it; when QEMU has exited, its exit explains it.
    pub fn peer_gone(&self) -> bool {
        matches!(self, ServeError::Channel { source, .. } if source.peer_gone())
    }
}

/// Counters of one connection.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Config-space accesses.
    pub config_accesses: AtomicU64,
    /// BAR accesses.
    pub bar_accesses: AtomicU64,
    /// Accesses answered with all-ones because they were out of range or malformed.
    pub rejected_accesses: AtomicU64,
    /// Memory-map updates.
    pub memory_syncs: AtomicU64,
    /// INTx resamples seen.
    pub resamples: AtomicU64,
    /// INTx resample threads started (one per SET_IRQFD).
    pub resample_threads_started: AtomicU64,
    /// INTx resample threads running now: at most one per connection.
    pub resample_threads_live: AtomicU64,
}

/// The thread relaying one resample eventfd. Dropping it stops and joins the thread, so a new
/// SET_IRQFD replaces the previous thread instead of adding one (QEMU resends SET_IRQFD when
/// the guest changes INTx routing, as often as the guest likes).
struct ResampleThread {
    /// Written to make the thread leave its poll at once.
    quit: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Drop for ResampleThread {
    fn drop(&mut self) {
        if let Err(e) = self.quit.write(1) {
            // The thread still ends at the run's stop flag; joining could then take that long.
            log::error!("cannot stop an INTx resample thread: {e}");
            return;
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The remote end of one proxy device.
pub struct DeviceServer {
    channel: Channel,
    device: HostedDevice,
    mem: SharedMemory,
    stats: Arc<ServeStats>,
    stop: Arc<AtomicBool>,
    resample: Option<ResampleThread>,
    fast: Arc<FastPathStats>,
    /// Keep every doorbell a socket round trip (an injection rule must hold the ringing vCPU).
    sync_doorbells: bool,
    /// The doorbells QEMU absorbs, in the order GET_IOEVENTFDS lists them.
    doorbells: Arc<Vec<AbsorbedDoorbell>>,
    doorbell_thread: Option<DoorbellThread>,
    msix: Option<Arc<MsixEventfds>>,
    /// QEMU's process, whose vCPU threads a SCHED_FIFO doorbell thread steps aside for.
    qemu_pid: Option<u32>,
}

fn valid_access(size: u32) -> bool {
    matches!(size, 1 | 2 | 4 | 8)
}

impl DeviceServer {
    /// Serves `device` on `sock`.
    pub fn new(
        sock: UnixStream,
        device: HostedDevice,
        mem: SharedMemory,
        stop: Arc<AtomicBool>,
    ) -> Self {
        DeviceServer {
            channel: Channel::new(sock),
            device,
            mem,
            stats: Arc::new(ServeStats::default()),
            stop,
            resample: None,
            fast: Arc::new(FastPathStats::default()),
            sync_doorbells: false,
            doorbells: Arc::new(Vec::new()),
            doorbell_thread: None,
            msix: None,
            qemu_pid: None,
        }
    }

    /// Keeps this device's doorbells on the socket (`true`): QEMU gets no ioeventfds for them.
    #[must_use]
    pub fn with_sync_doorbells(mut self, sync: bool) -> Self {
        self.sync_doorbells = sync;
        self
    }

    /// QEMU's process id: a SCHED_FIFO doorbell thread that wakes on the core of one of its
    /// vCPU threads moves to another core (`crate::step_aside`).
    #[must_use]
    pub fn with_qemu_pid(mut self, pid: u32) -> Self {
        self.qemu_pid = Some(pid);
        self
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<ServeStats> {
        self.stats.clone()
    }

    /// Counters of the doorbell and MSI-X fast paths.
    pub fn fast_path_stats(&self) -> Arc<FastPathStats> {
        self.fast.clone()
    }

    /// The GET_IOEVENTFDS answer from doorbell `first` on. A request from 0 (QEMU's proxy
    /// realizing) makes a fresh set of eventfds and a thread serving them.
    fn ioeventfds(&mut self, first: u64) -> Reply {
        if first == 0 {
            self.absorb_doorbells();
        }
        let all = self.doorbells.as_slice();
        let start = usize::try_from(first).map_or(all.len(), |f| f.min(all.len()));
        let end = start.saturating_add(MAX_IOEVENTFDS).min(all.len());
        let chunk = all.get(start..end).unwrap_or_default();
        self.fast
            .ioeventfds
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Reply::Message {
            bytes: encode_ioeventfds(
                &chunk
                    .iter()
                    .map(AbsorbedDoorbell::entry)
                    .collect::<Vec<_>>(),
                end < all.len(),
            ),
            fds: chunk.iter().map(|d| d.fd.as_raw_fd()).collect(),
        }
    }

    /// Hands the absorbed doorbells to a device whose worker waits on them itself (no
    /// doorbell thread, one wake-up less per request); false when it does not, or
    /// `SLUICE_PROXY_DEVICE_DOORBELLS=off` keeps the doorbell thread for an A/B.
    fn hand_to_device(&self, virtio: &VirtioPciFunction, list: &[AbsorbedDoorbell]) -> bool {
        if !crate::fastpath::enabled("DEVICE_DOORBELLS") {
            return false;
        }
        let mut events = Vec::with_capacity(list.len());
        for d in list {
            let (Ok(queue), Ok(fd)) = (u16::try_from(d.doorbell.value), d.fd.try_clone()) else {
                return false;
            };
            let fast = self.fast.clone();
            events.push(QueueEvent {
                queue,
                fd,
                rung: Arc::new(move || {
                    fast.doorbells_served.fetch_add(1, Ordering::Relaxed);
                }),
            });
        }
        let taken = virtio.hand_queue_doorbells(events);
        if taken {
            self.fast
                .device_doorbells
                .fetch_add(list.len() as u64, Ordering::Relaxed);
        }
        taken
    }

    fn absorb_doorbells(&mut self) {
        self.doorbell_thread = None;
        self.doorbells = Arc::new(Vec::new());
        let plan = crate::sched::doorbell_plan(self.device.kind);
        if self.sync_doorbells || !plan.absorb {
            return;
        }
        let Some(virtio) = &self.device.virtio else {
            return;
        };
        let mut list = Vec::new();
        for doorbell in virtio.doorbells() {
            match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
                Ok(fd) => list.push(AbsorbedDoorbell { doorbell, fd }),
                Err(e) => {
                    log::error!("{}: no doorbell eventfd ({e})", self.device.name);
                    return;
                }
            }
        }
        if list.is_empty() {
            return;
        }
        if self.hand_to_device(virtio, &list) {
            self.doorbells = Arc::new(list);
            return;
        }
        let list = Arc::new(list);
        match DoorbellThread::spawn(
            format!("{}-doorbells", self.device.name),
            self.device.function.clone(),
            list.clone(),
            self.stop.clone(),
            self.fast.clone(),
            plan,
            self.qemu_pid,
        ) {
            Ok(t) => {
                self.doorbell_thread = Some(t);
                self.doorbells = list;
            }
            Err(e) => log::error!(
                "{}: cannot start the doorbell thread ({e}); doorbells stay on the socket",
                self.device.name
            ),
        }
    }

    /// SET_MSIX_FDS: QEMU emulates the MSI-X table; vectors go to its eventfds from now on.
    fn connect_msix(&mut self, first: u64, fds: Vec<OwnedFd>) {
        let fresh = self.msix.is_none();
        let relay = self
            .msix
            .get_or_insert_with(|| Arc::new(MsixEventfds::new(self.fast.clone())))
            .clone();
        relay.set(first, fds);
        if fresh {
            let taken = self
                .device
                .virtio
                .as_ref()
                .is_some_and(|v| v.set_vector_relay(Some(relay)));
            if !taken {
                log::warn!(
                    "{}: QEMU sent MSI-X vector eventfds but the function has no MSI-X",
                    self.device.name
                );
            }
        }
    }

    /// Handles messages until QEMU closes the connection.
    pub fn run(mut self) -> Result<(), ServeError> {
        serving::serve(&mut self)
    }

    /// Executes one request; returns the reply for commands that get one.
    fn handle(&mut self, request: Request) -> Result<Option<Reply>, ServeError> {
        let f = self.device.function.as_ref();
        Ok(Some(Reply::Value(match request {
            Request::GetIoeventfds { first } => return Ok(Some(self.ioeventfds(first))),
            Request::ZpciSetEventfd(_)
            | Request::ZpciInsn(_)
            | Request::ZpciFetchEvents
            | Request::SmmuTranslate(_) => {
                // zPCI instructions and SMMU translations travel on the machine's own channel,
                // never a device's.
                let command = request.command();
                if request.expects_reply() {
                    let _ = self.channel.reply(FAILED);
                }
                return Err(serving::channel_error(
                    &self.device.name,
                    ChannelError::Protocol(ProtocolError::NotServed(command)),
                ));
            }
            Request::SetMsixFds { first, fds } => {
                self.connect_msix(first, fds);
                return Ok(None);
            }
            Request::SyncSysmem(regions) => {
                serving::sync_memory(
                    &self.device.name,
                    &self.mem,
                    regions,
                    &self.stats.memory_syncs,
                )?;
                return Ok(None);
            }
            Request::SetIrqfd { intr, resample } => {
                self.connect_intx(intr, resample);
                return Ok(None);
            }
            Request::ConfigRead { addr, len } => {
                self.stats.config_accesses.fetch_add(1, Ordering::Relaxed);
                if !matches!(len, 1 | 2 | 4) || addr.saturating_add(len) > CONFIG_SPACE {
                    self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                    FAILED
                } else {
                    let mut b = vec![0u8; len as usize];
                    f.config_read(addr as u16, &mut b);
                    sluice_pci::le_value(&b)
                }
            }
            Request::ConfigWrite { addr, value, len } => {
                self.stats.config_accesses.fetch_add(1, Ordering::Relaxed);
                if !matches!(len, 1 | 2 | 4) || addr.saturating_add(len) > CONFIG_SPACE {
                    self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                    FAILED
                } else {
                    f.config_write(addr as u16, &value.to_le_bytes()[..len as usize]);
                    0
                }
            }
            Request::BarRead { addr, size, memory } => {
                self.stats.bar_accesses.fetch_add(1, Ordering::Relaxed);
                match f.decode_bar(addr, memory) {
                    Some((bar, off)) if valid_access(size) => {
                        let mut b = vec![0u8; size as usize];
                        f.bar_read(bar, off, &mut b);
                        sluice_pci::le_value(&b)
                    }
                    _ => {
                        self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "{}: BAR read {addr:#x}/{size} decodes to nothing",
                            self.device.name
                        );
                        FAILED
                    }
                }
            }
            Request::BarWrite {
                addr,
                value,
                size,
                memory,
                ..
            } => {
                self.stats.bar_accesses.fetch_add(1, Ordering::Relaxed);
                match f.decode_bar(addr, memory) {
                    Some((bar, off)) if valid_access(size) => {
                        f.bar_write(bar, off, &value.to_le_bytes()[..size as usize]);
                        0
                    }
                    _ => {
                        self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "{}: BAR write {addr:#x}/{size} decodes to nothing",
                            self.device.name
                        );
                        FAILED
                    }
                }
            }
            Request::DeviceReset => {
                f.reset();
                0
            }
        })))
    }

    fn connect_intx(&mut self, intr: OwnedFd, resample: OwnedFd) {
        self.device.intx.connect(into_eventfd(intr));
        // The previous resample descriptor is QEMU's old route: stop relaying it first.
        self.resample = None;
        let resample = into_eventfd(resample);
        let quit = match EventFd::new(libc::EFD_NONBLOCK).and_then(|q| Ok((q.try_clone()?, q))) {
            Ok(pair) => pair,
            Err(e) => {
                log::error!(
                    "{}: cannot start the INTx resample thread: {e}",
                    self.device.name
                );
                return;
            }
        };
        let (quit_theirs, quit_ours) = quit;
        let relay = self.device.intx.clone();
        let stop = self.stop.clone();
        let stats = self.stats.clone();
        let name = format!("{}-resample", self.device.name);
        stats.resample_threads_live.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match wait_readable(resample.as_raw_fd(), quit_theirs.as_raw_fd(), RESAMPLE_POLL) {
                    Wake::Quit => break,
                    Wake::Ready if resample.read().is_ok() => {
                        stats.resamples.fetch_add(1, Ordering::Relaxed);
                        relay.resample();
                    }
                    _ => {}
                }
            }
            stats.resample_threads_live.fetch_sub(1, Ordering::Relaxed);
        });
        match spawned {
            Ok(handle) => {
                self.stats
                    .resample_threads_started
                    .fetch_add(1, Ordering::Relaxed);
                self.resample = Some(ResampleThread {
                    quit: quit_ours,
                    handle: Some(handle),
                });
            }
            Err(e) => {
                self.stats
                    .resample_threads_live
                    .fetch_sub(1, Ordering::Relaxed);
                log::error!(
                    "{}: cannot start the INTx resample thread: {e}",
                    self.device.name
                );
            }
        }
    }
}

impl Handler for DeviceServer {
    fn device_name(&self) -> &str {
        &self.device.name
    }

    fn channel(&mut self) -> &mut Channel {
        &mut self.channel
    }

    fn handle(&mut self, request: Request) -> Result<Option<Reply>, ServeError> {
        DeviceServer::handle(self, request)
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        // QEMU's table is gone with the connection: the function's own table takes over.
        if self.msix.is_some()
            && let Some(v) = &self.device.virtio
        {
            v.set_vector_relay(None);
        }
    }
}

/// Why a resample thread woke up.
enum Wake {
    /// The resample eventfd is readable.
    Ready,
    /// The thread is being replaced or the connection ended.
    Quit,
    /// Timeout (time to look at the run's stop flag) or an interrupted poll.
    Idle,
}

fn wait_readable(fd: i32, quit: i32, timeout: Duration) -> Wake {
    let mut pfds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: quit,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds, length 2.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout.as_millis() as i32) };
    let [ours, stop] = pfds;
    if n <= 0 {
        Wake::Idle
    } else if stop.revents != 0 {
        Wake::Quit
    } else if ours.revents & libc::POLLIN != 0 {
        Wake::Ready
    } else if ours.revents != 0 {
        // POLLERR/POLLNVAL on the resample descriptor: it will not become readable again.
        Wake::Quit
    } else {
        Wake::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, encode_message};
    use sluice_devapi::NoHooks;
    use sluice_host::{DeviceSet, DiskSpec};
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, IntoRawFd};

    fn bar_msg(cmd: Command, addr: u64, val: u64, size: u32) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&addr.to_ne_bytes());
        p[8..16].copy_from_slice(&val.to_ne_bytes());
        p[16..20].copy_from_slice(&size.to_ne_bytes());
        p[20] = 1;
        encode_message(cmd, &p)
    }

    fn cfg_msg(cmd: Command, addr: u32, val: u32, len: u32) -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p[0..4].copy_from_slice(&addr.to_ne_bytes());
        p[4..8].copy_from_slice(&val.to_ne_bytes());
        p[8..12].copy_from_slice(&len.to_ne_bytes());
        encode_message(cmd, &p)
    }

    fn ask(sock: &mut UnixStream, msg: &[u8]) -> u64 {
        sock.write_all(msg).unwrap();
        let mut r = [0u8; 24];
        sock.read_exact(&mut r).unwrap();
        u64::from_ne_bytes(r[16..24].try_into().unwrap())
    }

    #[test]
    fn serves_probe_sequence_like_qemus_proxy_then_rejects_garbage() {
        let (set, dir) = one_disk();
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let server = DeviceServer::new(
            ours,
            set.devices[0].clone(),
            set.mem.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        let stats = server.stats();
        let t = std::thread::spawn(move || server.run());
        // probe_pci_info(): IDs, then BAR sizing with 32-bit probes.
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 0, 0, 2)),
            0x1af4
        );
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 2, 0, 2)),
            0x1042
        );
        ask(
            &mut qemu,
            &cfg_msg(Command::PciConfigWrite, 0x10, 0xffff_ffff, 4),
        );
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 0x10, 0, 4)),
            0xffff_c000
        );
        ask(
            &mut qemu,
            &cfg_msg(Command::PciConfigWrite, 0x10, 0xfe00_0000, 4),
        );
        ask(&mut qemu, &cfg_msg(Command::PciConfigWrite, 0x04, 0x6, 2));
        // num_queues through the BAR, at its absolute address.
        assert_eq!(
            ask(&mut qemu, &bar_msg(Command::BarRead, 0xfe00_0012, 0, 2)),
            1
        );
        // Out-of-range accesses answer all-ones instead of touching anything.
        assert_eq!(
            ask(&mut qemu, &bar_msg(Command::BarRead, 0xfd00_0000, 0, 4)),
            FAILED
        );
        assert_eq!(
            ask(&mut qemu, &bar_msg(Command::BarRead, 0xfe00_0012, 0, 3)),
            FAILED
        );
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 0xfe, 0, 4)),
            FAILED
        );
        assert_eq!(
            ask(&mut qemu, &encode_message(Command::DeviceReset, &[])),
            0
        );
        assert_eq!(stats.rejected_accesses.load(Ordering::Relaxed), 3);
        // A malformed message ends the connection with a clear error.
        qemu.write_all(&encode_message(Command::BarRead, &[0u8; 5]))
            .unwrap();
        let err = t.join().unwrap().unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            "device blk0: malformed protocol message: BarRead with a 5-byte payload (expected 24)"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn one_disk() -> (DeviceSet, std::path::PathBuf) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-serve-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let set = DeviceSet::new(
            &[DiskSpec {
                path: img,
                read_only: false,
                iommu: false,
            }],
            Arc::new(NoHooks),
        )
        .unwrap();
        (set, dir)
    }

    /// QEMU's proxy realizing: GET_IOEVENTFDS gets the queue doorbell with its eventfd, which
    /// goes to virtio-blk's worker; a device kept synchronous (an injection rule) and an index
    /// past the end get empty lists; SET_MSIX_FDS is taken.
    #[test]
    fn doorbells_are_handed_over_as_eventfds_and_served() {
        let (set, dir) = one_disk();
        for sync in [false, true] {
            let (ours, mut qemu) = UnixStream::pair().unwrap();
            let server = DeviceServer::new(
                ours,
                set.devices[0].clone(),
                set.mem.clone(),
                Arc::new(AtomicBool::new(false)),
            )
            .with_sync_doorbells(sync);
            let fast = server.fast_path_stats();
            let t = std::thread::spawn(move || server.run());
            let ask_doorbells = |qemu: &mut UnixStream, first: u64| {
                qemu.write_all(&encode_message(
                    Command::GetIoeventfds,
                    &first.to_ne_bytes(),
                ))
                .unwrap();
                let mut buf = [0u8; 16 + crate::protocol::IOEVENTFDS_PAYLOAD];
                let mut fds = Vec::new();
                let mut got = 0;
                while got < buf.len() {
                    got +=
                        crate::channel::recv_with_fds(qemu.as_raw_fd(), &mut buf[got..], &mut fds)
                            .unwrap();
                }
                let count = u32::from_ne_bytes(buf[16..20].try_into().unwrap());
                assert_eq!(count as usize, fds.len());
                (buf, fds)
            };
            let (buf, fds) = ask_doorbells(&mut qemu, 0);
            if sync {
                assert!(fds.is_empty(), "a ruled device keeps its doorbells");
            } else {
                assert_eq!(fds.len(), 1, "virtio-blk has one queue");
                // queue 0 at 0x3000 of BAR 0, 2 bytes, any value
                assert_eq!(u64::from_ne_bytes(buf[24..32].try_into().unwrap()), 0x3000);
                assert_eq!(&buf[40..43], &[0, 2, 0]);
                // virtio-blk's worker waits on the eventfd itself (tested with the device):
                // no doorbell thread here.
                assert_eq!(fast.device_doorbells.load(Ordering::Relaxed), 1);
            }
            let (_, fds) = ask_doorbells(&mut qemu, u64::MAX);
            assert!(fds.is_empty());
            // Vector eventfds for a function without MSI-X: taken, counted, unused.
            let v = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let msg = encode_message(Command::SetMsixFds, &0u64.to_ne_bytes());
            let raw = [v.as_raw_fd()];
            crate::channel::Channel::new(qemu.try_clone().unwrap())
                .send_with_fds(&msg, &raw)
                .unwrap();
            drop(qemu);
            t.join().unwrap().unwrap();
            assert_eq!(fast.msix_fds.load(Ordering::Relaxed), 1);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Waits (at most 10 s, else fails with `why`) until another thread has counted something.
    fn wait_for_count(counter: &AtomicU64, why: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counter.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "{why}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A second descriptor of `fd`, as QEMU's SCM_RIGHTS would deliver it.
    fn owned(fd: &EventFd) -> OwnedFd {
        let dup = fd.try_clone().unwrap();
        // SAFETY: `dup` is a fresh descriptor nobody else owns; ownership moves into the OwnedFd.
        unsafe { OwnedFd::from_raw_fd(dup.into_raw_fd()) }
    }

    /// QEMU resends SET_IRQFD whenever the guest reroutes INTx: each one replaces the relay
    /// thread of the previous resample descriptor, and only the newest descriptor is relayed.
    #[test]
    fn repeated_set_irqfd_keeps_one_resample_thread() {
        let (set, dir) = one_disk();
        let (ours, _qemu) = UnixStream::pair().unwrap();
        let mut server = DeviceServer::new(
            ours,
            set.devices[0].clone(),
            set.mem.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        let stats = server.stats();
        let mut routes = Vec::new();
        for _ in 0..64 {
            let intr = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            server
                .handle(Request::SetIrqfd {
                    intr: owned(&intr),
                    resample: owned(&resample),
                })
                .unwrap();
            assert_eq!(stats.resample_threads_live.load(Ordering::Relaxed), 1);
            routes.push((intr, resample));
        }
        assert_eq!(stats.resample_threads_started.load(Ordering::Relaxed), 64);
        // The device holds its line high; a resample on the newest route re-asserts it there.
        sluice_devapi::InterruptSink::set_level(set.devices[0].intx.as_ref(), 0, true);
        let (intr, resample) = routes.last().unwrap();
        assert_eq!(intr.read().unwrap(), 1, "raised on the newest route");
        resample.write(1).unwrap();
        wait_for_count(&stats.resamples, "resample never relayed");
        assert_eq!(intr.read().unwrap(), 1, "re-asserted after the resample");
        // An old route's resample is nobody's business any more.
        routes[0].1.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(stats.resamples.load(Ordering::Relaxed), 1);
        assert!(
            routes[0].0.read().is_err(),
            "nothing raised on an old route"
        );
        // Ending the connection stops the last thread too.
        drop(server);
        assert_eq!(stats.resample_threads_live.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
