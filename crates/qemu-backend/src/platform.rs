//! Serving one platform device (a register window at a fixed guest-physical address plus wired
//! interrupt lines) over its own mpqemu socket: the remote half of `x-smmuv3-proxy`, Sluice's
//! QEMU patch that replaces the arm `virt` machine's SMMUv3 by a sysbus device forwarding its
//! 128 KiB register window (0x0905_0000 on `virt`) and its four SPIs. The wire format is
//! x-pci-proxy-dev's ([`crate::protocol`]); what each message means here:
//!
//! - `SYNC_SYSMEM` (no reply): guest RAM as memfds, from QEMU's memory listener at realize and
//!   whenever the layout changes. Replaces the [`SharedMemory`] the model reads its queues and
//!   tables through.
//! - `SET_IRQFD {intr, resample}` (no reply): one per wired line at realize, in DT order (for
//!   the SMMU: eventq, priq, cmdq-sync, gerror, which is also the model's numbering,
//!   `sluice_smmuv3::IRQ_*`). The i-th pair received becomes line i of [`PlatformInterrupts`];
//!   pairs beyond the number of lines are dropped with a log line. QEMU pulses the GIC line on
//!   every `intr` signal (the DT marks the SPIs edge-triggered) and never looks at `resample`,
//!   so that descriptor is closed at once and, unlike the PCI server's INTx, no thread relays
//!   it: a SET_IRQFD costs no thread, however many QEMU sends.
//! - `BAR_READ` / `BAR_WRITE {addr, val, size, memory}` (reply RET): a register access at the
//!   **absolute** guest-physical `addr`. Served when it is a memory access of 4 or 8 bytes
//!   (the proxy's MemoryRegionOps allow 4..=8 and QEMU's memory core only issues powers of two),
//!   naturally aligned (the ops leave `unaligned` false, so QEMU never forwards another) and
//!   inside `[base, base + window)`. Anything else is refused without reaching the device: a
//!   read answers all-ones, a write is dropped (and answered all-ones, as the PCI server
//!   answers a BAR access that decodes to nothing), and
//!   [`PlatformStats::refused_accesses`] counts it.
//! - `DEVICE_RESET` (reply RET 0): machine reset. Resets the device and lowers every line; the
//!   eventfd bindings stay (QEMU sends SET_IRQFD only at realize). `x-smmuv3-proxy`
//!   (`guest-images/qemu/aarch64/20-smmuv3-proxy.patch`) sends it on every system reset, the
//!   first one before the guest starts.
//! - `SMMU_TRANSLATE {iova, sid, flags}` (reply RET): QEMU writes a proxied PCI function's
//!   MSI itself (`msix_notify()`), through an address space `x-smmuv3-proxy` hands the function
//!   (`guest-images/qemu/aarch64/40-smmuv3-proxy-msi-translate.patch`). Answered through that
//!   function's seam ([`PlatformServer::with_msi_translation`]): the page's output address and
//!   the permissions checked, or 0 when the model refused (and recorded its event) or no
//!   function of the run has the stream ID.
//! - `PCI_CONFIG_READ` / `PCI_CONFIG_WRITE`: a platform device has no configuration space, and
//!   the only peer that sends them is an `x-pci-proxy-dev` wired to the wrong socket. Protocol
//!   error, like an unknown command on the PCI server's channel: the connection ends with
//!   [`ProtocolError::NotServed`]. QEMU waits for a RET on both, so an all-ones RET goes out
//!   first: the waiting vCPU gets a failed read at once instead of depending on the close
//!   reaching it.
//!
//! A caller builds the interrupt sink first (the model needs it at construction), builds the
//! model with it, and then serves the model's window on the socket whose other end QEMU got as
//! `-M virt,iommu=smmuv3,x-smmuv3-proxy-fd=N`:
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//! use std::sync::Arc;
//!
//! use sluice_devapi::{Bdf, NoHooks};
//! use sluice_host::IommuChoice;
//! use sluice_host::iommu::IommuBuild;
//! use sluice_qemu::{PlatformInterrupts, PlatformServer};
//! use sluice_virtio_pci::SharedMemory;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (sock, _qemu_end) = UnixStream::pair()?;
//! let mem = SharedMemory::default();
//! let irq = PlatformInterrupts::new("smmuv3", 4);
//! // The run's configuration: boot bypass off (GBPA.ABORT), IDR0.MSI set.
//! let smmu = IommuChoice::with_boot_bypass(sluice_host::IommuKind::Smmuv3, false)
//!     .model(vec![Bdf::new(0, 1, 0)])
//!     .build(&IommuBuild {
//!         hooks: Arc::new(NoHooks),
//!         mem: mem.clone(),
//!         irq: irq.clone(),
//!     })?;
//! let window = smmu.mmio().ok_or("an SMMUv3 has a register window")?;
//! let server = PlatformServer::new(sock, "smmuv3", 0x0905_0000, window, mem, irq);
//! let served = std::thread::spawn(move || server.run());
//! # let _ = served;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sluice_devapi::{EndpointIommu, InterruptSink};
use sluice_pci::MmioDevice;
use sluice_virtio_pci::SharedMemory;
use vm_memory::{GuestAddress, Iommu, Permissions};
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{Channel, ChannelError};
use crate::protocol::{
    FAILED, ProtocolError, Request, SmmuTranslate, TRANSLATE_PAGE, TRANSLATE_READ, TRANSLATE_WRITE,
    translate_answer,
};
use crate::server::ServeError;
use crate::serving::{self, Handler, Reply, into_eventfd};

/// Counters of one platform connection.
#[derive(Debug, Default)]
pub struct PlatformStats {
    /// Register accesses that reached the device (posted writes included).
    pub accesses: AtomicU64,
    /// Of those, posted writes (`BAR_WRITE_POSTED`): no round trip, QEMU did not wait.
    pub posted_writes: AtomicU64,
    /// Register accesses refused (outside the window, wrong size, unaligned, I/O space): they
    /// never reached the device.
    pub refused_accesses: AtomicU64,
    /// Guest memory map updates.
    pub memory_syncs: AtomicU64,
    /// SET_IRQFD pairs bound to a line.
    pub irqfds_bound: AtomicU64,
    /// SET_IRQFD pairs beyond the device's lines, dropped.
    pub irqfds_ignored: AtomicU64,
    /// DEVICE_RESETs executed.
    pub resets: AtomicU64,
    /// SMMU_TRANSLATEs answered with a translation (QEMU's MSI writes through the IOMMU).
    pub translations: AtomicU64,
    /// SMMU_TRANSLATEs refused: the model faulted (it reported the fault itself, as for any
    /// DMA), or no device of the run has the stream ID.
    pub translation_faults: AtomicU64,
    /// Polling for the next message ([`PlatformServer::with_poll_budget`]).
    pub poll: Arc<crate::poll::PollCounters>,
}

/// Counters of a [`PlatformInterrupts`].
#[derive(Debug, Default)]
pub struct InterruptStats {
    /// Rising edges signalled on a line's eventfd.
    pub signalled: AtomicU64,
    /// Rising edges on a line QEMU has not sent an eventfd for yet: lost, and counted here so
    /// the loss is visible.
    pub dropped_unbound: AtomicU64,
    /// Rising edges whose eventfd write failed.
    pub signal_failed: AtomicU64,
    /// `set_level` on a line number the device does not have.
    pub unknown_line: AtomicU64,
    /// MSIs the model made. It writes those aimed at guest RAM itself (Linux's CMD_SYNC
    /// completion by MSI: MSIDATA over the sync command's own queue entry, polled in memory);
    /// one aimed anywhere else (the GIC ITS doorbell, a QEMU register) fails there and sets
    /// GERROR's MSI abort bit. Nothing of either crosses the socket.
    pub msi_seen: AtomicU64,
}

/// One wired line.
#[derive(Default)]
struct Line {
    /// QEMU's eventfd for the line, once SET_IRQFD brought it.
    intr: Option<EventFd>,
    /// The level the model last set, to turn levels into edges.
    asserted: bool,
}

/// The wired interrupt lines of a platform device served over mpqemu, as the
/// [`InterruptSink`] its model raises them through.
///
/// Edge semantics: `set_level(line, true)` on a low line is a rising edge and signals the
/// line's eventfd once; QEMU pulses the GIC input for each signal. `set_level(line, false)`
/// only records the level, nothing goes to QEMU: the line is already low on QEMU's side after
/// its pulse. A line held high does not signal again until it has been set low. (The SMMUv3
/// model pulses, true then false, for each interrupt, so each one is one signal.)
///
/// MSIs are only counted: `x-smmuv3-proxy` forwards wired lines only, and the model itself
/// writes an MSI aimed at guest RAM (CMD_SYNC completion) and raises GERROR for any other
/// (see [`InterruptStats::msi_seen`]). Linux's driver finds no MSI domain on QEMU's DT node
/// and uses the wired lines for the event queue and GERROR either way.
///
/// Created before the model (the model takes the sink at construction); the server binds the
/// eventfds as SET_IRQFD arrives. Interrupts raised before that are counted in
/// [`InterruptStats::dropped_unbound`].
pub struct PlatformInterrupts {
    name: String,
    lines: Vec<Mutex<Line>>,
    stats: InterruptStats,
}

impl PlatformInterrupts {
    /// `lines` unbound wired lines of device `name` (4 for an SMMUv3).
    pub fn new(name: impl Into<String>, lines: usize) -> Arc<Self> {
        Arc::new(PlatformInterrupts {
            name: name.into(),
            lines: (0..lines).map(|_| Mutex::new(Line::default())).collect(),
            stats: InterruptStats::default(),
        })
    }

    /// How many lines the device has.
    pub fn lines(&self) -> usize {
        self.lines.len()
    }

    /// Counters.
    pub fn stats(&self) -> &InterruptStats {
        &self.stats
    }

    /// Whether QEMU's eventfd for `line` has arrived.
    pub fn is_bound(&self, line: usize) -> bool {
        self.lines.get(line).is_some_and(|l| lock(l).intr.is_some())
    }

    /// Routes `line` to `intr` from now on; false (and `intr` closed) if there is no such line.
    pub(crate) fn bind(&self, line: usize, intr: EventFd) -> bool {
        match self.lines.get(line) {
            Some(l) => {
                lock(l).intr = Some(intr);
                true
            }
            None => false,
        }
    }

    /// Every line low (machine reset), so the next assertion is an edge again.
    pub(crate) fn lower_all(&self) {
        for l in &self.lines {
            lock(l).asserted = false;
        }
    }
}

/// The lock of a line; a panic elsewhere while holding it left a `Line` that is still valid.
fn lock(l: &Mutex<Line>) -> MutexGuard<'_, Line> {
    l.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts one more in `counter` and says whether it is the first (worth a warning; the rest
/// go to debug so a misbehaving guest cannot flood the log).
fn first(counter: &AtomicU64) -> bool {
    counter.fetch_add(1, Ordering::Relaxed) == 0
}

impl InterruptSink for PlatformInterrupts {
    fn set_level(&self, line: u32, asserted: bool) {
        let Some(slot) = self.lines.get(line as usize) else {
            if first(&self.stats.unknown_line) {
                log::warn!(
                    "{}: interrupt on line {line}, which it does not have",
                    self.name
                );
            }
            return;
        };
        let mut l = lock(slot);
        let rising = asserted && !l.asserted;
        l.asserted = asserted;
        if !rising {
            return;
        }
        match &l.intr {
            Some(fd) => match fd.write(1) {
                Ok(()) => {
                    self.stats.signalled.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.signal_failed.fetch_add(1, Ordering::Relaxed);
                    log::error!("{}: cannot signal interrupt line {line}: {e}", self.name);
                }
            },
            None => {
                if first(&self.stats.dropped_unbound) {
                    log::warn!(
                        "{}: interrupt on line {line} before QEMU sent its eventfd: dropped",
                        self.name
                    );
                } else {
                    log::debug!("{}: interrupt on unbound line {line} dropped", self.name);
                }
            }
        }
    }

    fn msi(&self, address: u64, data: u32) {
        // The model writes RAM itself or reports the abort through GERROR: per-sync logging
        // would only add cost to the hot strict-mode path.
        self.stats.msi_seen.fetch_add(1, Ordering::Relaxed);
        log::trace!("{}: MSI {data:#x} to {address:#x}", self.name);
    }
}

/// Where a register access lands: its offset in a window of `window` bytes at `base`, or
/// `None` if it must not reach the device (see the module documentation).
fn decode(base: u64, window: u64, addr: u64, size: u32, memory: bool) -> Option<u64> {
    if !memory || !matches!(size, 4 | 8) {
        return None;
    }
    let offset = addr.checked_sub(base)?;
    let end = offset.checked_add(u64::from(size))?;
    (end <= window && offset % u64::from(size) == 0).then_some(offset)
}

/// The remote end of one platform device's proxy socket.
pub struct PlatformServer {
    channel: Channel,
    name: String,
    base: u64,
    device: Arc<dyn MmioDevice>,
    mem: SharedMemory,
    irq: Arc<PlatformInterrupts>,
    /// SET_IRQFD pairs received so far: the next one is for this line.
    irqfds_received: usize,
    stats: Arc<PlatformStats>,
    /// Translation seams by stream ID, for SMMU_TRANSLATE.
    msi: BTreeMap<u16, EndpointIommu>,
}

impl PlatformServer {
    /// Serves `device`'s register window, placed at guest-physical `base`, on `sock`. `mem` is
    /// the guest memory the device reads (SYNC_SYSMEM replaces its contents); `irq` is the sink
    /// the device was built with, whose lines SET_IRQFD binds.
    pub fn new(
        sock: UnixStream,
        name: impl Into<String>,
        base: u64,
        device: Arc<dyn MmioDevice>,
        mem: SharedMemory,
        irq: Arc<PlatformInterrupts>,
    ) -> Self {
        PlatformServer {
            channel: Channel::new(sock),
            name: name.into(),
            base,
            device,
            mem,
            irq,
            irqfds_received: 0,
            stats: Arc::new(PlatformStats::default()),
            msi: BTreeMap::new(),
        }
    }

    /// Answers SMMU_TRANSLATE for these stream IDs through their seams (a device's MSIs, which
    /// QEMU writes, translated by the same model and reported to the same hooks as its DMA).
    /// Any other stream ID is refused.
    #[must_use]
    pub fn with_msi_translation(mut self, seams: BTreeMap<u16, EndpointIommu>) -> Self {
        self.msi = seams;
        self
    }

    /// One SMMU_TRANSLATE: the output page of `t.iova` and the permissions checked, or a fault
    /// (0). The access checked is the MSI's 4 bytes (fewer at the end of the page): the answer
    /// covers the page, and the SMMU maps nothing smaller.
    fn translate(&self, t: SmmuTranslate) -> u64 {
        let seam = u16::try_from(t.sid).ok().and_then(|sid| self.msi.get(&sid));
        // The permissions asked for are the ones checked and granted; none asked is a read.
        let perm = match t.flags & (TRANSLATE_READ | TRANSLATE_WRITE) {
            0 => TRANSLATE_READ,
            p => p,
        };
        let access = match perm {
            TRANSLATE_WRITE => Permissions::Write,
            TRANSLATE_READ => Permissions::Read,
            _ => Permissions::ReadWrite,
        };
        let to_page_end = TRANSLATE_PAGE - (t.iova & (TRANSLATE_PAGE - 1));
        let len = to_page_end.min(4) as usize;
        let answer = seam.and_then(|seam| {
            let mapped = seam
                .translate(GuestAddress(t.iova), len, access)
                .ok()?
                .next()?;
            Some((mapped.base.0, perm))
        });
        if answer.is_some() {
            self.stats.translations.fetch_add(1, Ordering::Relaxed);
        } else {
            let n = self
                .stats
                .translation_faults
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            // Logged at the 1st, 2nd, 4th, 8th... refusal: a guest can make QEMU ask for
            // translations as fast as it likes. A fault of the model is its own event.
            if n.is_power_of_two() && seam.is_none() {
                log::warn!(
                    "{}: translation for stream {:#x} at {:#x}: no device of the run has that \
                     stream ID; refused ({n} refused so far)",
                    self.name,
                    t.sid,
                    t.iova
                );
            }
        }
        translate_answer(answer)
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<PlatformStats> {
        self.stats.clone()
    }

    /// Polls for the next message for `budget` after each one before blocking
    /// ([`crate::channel::Channel::set_poll_budget`]).
    #[must_use]
    pub fn with_poll_budget(mut self, budget: std::time::Duration) -> Self {
        self.channel
            .set_poll_budget(budget, self.stats.poll.clone());
        self
    }

    /// Handles messages until QEMU closes the connection.
    pub fn run(mut self) -> Result<(), ServeError> {
        serving::serve(&mut self)
    }

    fn refuse(&self, what: &str, addr: u64, size: u32, memory: bool) -> u64 {
        let n = self.stats.refused_accesses.fetch_add(1, Ordering::Relaxed) + 1;
        log::warn!(
            "{}: {what} {addr:#x}/{size}{} outside the {:#x}-byte window at {:#x} or malformed: \
             refused ({n} so far)",
            self.name,
            if memory { "" } else { " (I/O space)" },
            self.device.window_size(),
            self.base,
        );
        FAILED
    }

    fn set_irqfd(&mut self, intr: EventFd) {
        let line = self.irqfds_received;
        self.irqfds_received = self.irqfds_received.saturating_add(1);
        if self.irq.bind(line, intr) {
            self.stats.irqfds_bound.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.irqfds_ignored.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "{}: SET_IRQFD #{} ignored: the device has {} interrupt lines",
                self.name,
                line + 1,
                self.irq.lines()
            );
        }
    }
}

impl Handler for PlatformServer {
    fn device_name(&self) -> &str {
        &self.name
    }

    fn channel(&mut self) -> &mut Channel {
        &mut self.channel
    }

    fn handle(&mut self, request: Request) -> Result<Option<Reply>, ServeError> {
        self.handle_request(request).map(|r| r.map(Reply::Value))
    }
}

impl PlatformServer {
    fn handle_request(&mut self, request: Request) -> Result<Option<u64>, ServeError> {
        let window = self.device.window_size();
        Ok(Some(match request {
            Request::SyncSysmem(regions) => {
                serving::sync_memory(&self.name, &self.mem, regions, &self.stats.memory_syncs)?;
                return Ok(None);
            }
            Request::SetIrqfd { intr, resample } => {
                // The lines are edge-triggered on QEMU's side: nothing to resample.
                drop(resample);
                self.set_irqfd(into_eventfd(intr));
                return Ok(None);
            }
            Request::BarRead { addr, size, memory } => {
                match decode(self.base, window, addr, size, memory) {
                    Some(offset) => {
                        self.stats.accesses.fetch_add(1, Ordering::Relaxed);
                        let mut b = [0u8; 8];
                        let b = b.get_mut(..size as usize).unwrap_or_default();
                        self.device.mmio_read(offset, b);
                        sluice_pci::le_value(b)
                    }
                    None => self.refuse("read", addr, size, memory),
                }
            }
            Request::BarWrite {
                addr,
                value,
                size,
                memory,
                posted,
            } => match decode(self.base, window, addr, size, memory) {
                Some(offset) => {
                    self.stats.accesses.fetch_add(1, Ordering::Relaxed);
                    if posted {
                        self.stats.posted_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    let b = value.to_le_bytes();
                    self.device
                        .mmio_write(offset, b.get(..size as usize).unwrap_or_default());
                    0
                }
                None => self.refuse("write", addr, size, memory),
            },
            Request::DeviceReset => {
                self.device.reset();
                self.irq.lower_all();
                self.stats.resets.fetch_add(1, Ordering::Relaxed);
                0
            }
            Request::SmmuTranslate(t) => {
                // QEMU's main loop asked (an MSI to deliver) and waits for this answer; no
                // vCPU spins for a next message, so the thread blocks after it instead of
                // polling on the core the main loop needs next (measured: polling after
                // translations made the main loop wait 19-27 % of strict 4k tests for a core,
                // and strict 4k slower with MSI-X than with INTx; docs/benchmarks.md).
                self.channel.skip_next_poll();
                self.translate(t)
            }
            Request::ConfigRead { .. }
            | Request::ConfigWrite { .. }
            | Request::GetIoeventfds { .. }
            | Request::SetMsixFds { .. }
            | Request::ZpciSetEventfd(_)
            | Request::ZpciInsn(_)
            | Request::ZpciFetchEvents => {
                let command = request.command();
                // QEMU waits for a RET (see the module documentation); the error that follows
                // ends the connection either way, so a failed send adds nothing to report.
                let _ = self.channel.reply(FAILED);
                return Err(serving::channel_error(
                    &self.name,
                    ChannelError::Protocol(ProtocolError::NotServed(command)),
                ));
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, encode_message};
    use sluice_devapi::{Bdf, NoHooks};
    use sluice_host::IommuChoice;
    use sluice_host::iommu::IommuBuild;
    use sluice_smmuv3::regs::{cr0, gerror, idr0, irq_ctrl, off};
    use sluice_smmuv3::{IRQ_CMD_SYNC, IRQ_EVENTQ, IRQ_GERROR, IRQ_PRIQ, SmmuConfig};
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    use std::os::unix::fs::FileExt;

    /// virt's SMMU window and the start of its RAM.
    const BASE: u64 = 0x0905_0000;
    const RAM_BASE: u64 = 0x4000_0000;
    const RAM_SIZE: u64 = 2 << 20;
    const STRTAB: u64 = RAM_BASE + 0x1_0000;
    const CMDQ: u64 = RAM_BASE + 0x2_0000;
    const CMDQ_LOG2: u64 = 8;
    const EVTQ: u64 = RAM_BASE + 0x3_0000;
    const EVTQ_LOG2: u64 = 5;

    /// Sends one message with `fds` attached as SCM_RIGHTS, the way QEMU's qio channel does.
    fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        let mut control = [0u64; 16];
        // SAFETY: an all-zero msghdr is a valid empty header; the pointers set below outlive
        // the sendmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = std::mem::size_of_val(fds);
            msg.msg_control = control.as_mut_ptr().cast();
            // SAFETY: a pure size computation.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
            assert!(msg.msg_controllen <= std::mem::size_of_val(&control));
            // SAFETY: the control buffer is large enough for one header with `fds` (checked
            // above), so CMSG_FIRSTHDR points at a complete header inside it and CMSG_DATA at
            // room for the descriptors.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    data_len,
                );
            }
        }
        // SAFETY: `msg` describes live buffers; sendmsg only reads them.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        assert_eq!(
            n,
            bytes.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// A memfd of `len` bytes: the guest RAM QEMU's memory-backend-memfd shares.
    fn memfd(len: u64) -> File {
        // SAFETY: a NUL-terminated name; memfd_create returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"sluice-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    /// SYNC_SYSMEM with one region: `ram` at `RAM_BASE`.
    fn sync_sysmem(qemu: &UnixStream, ram: &File) {
        let mut p = vec![0u8; crate::protocol::MAX_PAYLOAD];
        p[0..8].copy_from_slice(&RAM_BASE.to_ne_bytes());
        p[64..72].copy_from_slice(&RAM_SIZE.to_ne_bytes());
        p[128..136].copy_from_slice(&0u64.to_ne_bytes());
        send_with_fds(
            qemu,
            &encode_message(Command::SyncSysmem, &p),
            &[ram.as_raw_fd()],
        );
    }

    fn bar_msg(cmd: Command, addr: u64, val: u64, size: u32, memory: bool) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&addr.to_ne_bytes());
        p[8..16].copy_from_slice(&val.to_ne_bytes());
        p[16..20].copy_from_slice(&size.to_ne_bytes());
        p[20] = u8::from(memory);
        encode_message(cmd, &p)
    }

    fn ask(sock: &mut UnixStream, msg: &[u8]) -> u64 {
        sock.write_all(msg).unwrap();
        let mut r = [0u8; 24];
        sock.read_exact(&mut r).unwrap();
        assert_eq!(i32::from_ne_bytes(r[0..4].try_into().unwrap()), 1, "RET");
        u64::from_ne_bytes(r[16..24].try_into().unwrap())
    }

    /// The guest's side of the window: what the proxy forwards for a vCPU's access.
    struct Guest(UnixStream);

    impl Guest {
        fn read(&mut self, offset: u64, size: u32) -> u64 {
            ask(
                &mut self.0,
                &bar_msg(Command::BarRead, BASE + offset, 0, size, true),
            )
        }
        fn write(&mut self, offset: u64, size: u32, value: u64) {
            ask(
                &mut self.0,
                &bar_msg(Command::BarWrite, BASE + offset, value, size, true),
            );
        }
        /// A posted write (x-smmuv3-proxy's CMDQ_PROD): no reply comes back.
        fn post(&mut self, offset: u64, size: u32, value: u64) {
            let msg = bar_msg(Command::BarWritePosted, BASE + offset, value, size, true);
            self.0.write_all(&msg).unwrap();
        }
        /// Writes and polls the ACK register, as the driver's `arm_smmu_write_reg_sync`.
        fn write_sync(&mut self, reg: u64, ack: u64, value: u64) {
            self.write(reg, 4, value);
            for _ in 0..100 {
                if self.read(ack, 4) == value {
                    return;
                }
            }
            panic!("{ack:#x} never acknowledged {value:#x}");
        }
    }

    /// Times `fd` was signalled since the last look (0 if never).
    fn signals(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    /// QEMU's x-smmuv3-proxy end to end, without a guest: memory, four lines (and a fifth
    /// SET_IRQFD too many), then the register accesses of the Linux driver's probe and reset,
    /// a CMD_SYNC that signals the cmdq-sync line, one rung by a posted doorbell that completes
    /// by MSI into its own queue entry (no line, no reply), an illegal command that raises GERROR on
    /// its line, refused accesses, and a machine reset.
    #[test]
    fn serves_an_smmuv3_through_the_proxy_protocol() {
        let mem = SharedMemory::default();
        // The model numbers its lines in the DT order x-smmuv3-proxy sends SET_IRQFD in.
        assert_eq!(
            (IRQ_EVENTQ, IRQ_PRIQ, IRQ_CMD_SYNC, IRQ_GERROR),
            (0, 1, 2, 3)
        );
        let irq = PlatformInterrupts::new("smmuv3", 4);
        let cfg = SmmuConfig::default();
        assert_ne!(
            cfg.idr.idr[0] & idr0::MSI,
            0,
            "the run's SMMU advertises MSI"
        );
        let smmu = IommuChoice::Smmuv3(cfg)
            .model(vec![Bdf::new(0, 1, 0)])
            .build(&IommuBuild {
                hooks: Arc::new(NoHooks),
                mem: mem.clone(),
                irq: irq.clone(),
            })
            .unwrap();
        let (ours, qemu) = UnixStream::pair().unwrap();
        let server = PlatformServer::new(
            ours,
            "smmuv3",
            BASE,
            smmu.mmio().unwrap(),
            mem.clone(),
            irq.clone(),
        );
        let stats = server.stats();
        let t = std::thread::spawn(move || server.run());

        // Realize: the memory listener's SYNC_SYSMEM, then one SET_IRQFD per line in DT order.
        let ram = memfd(RAM_SIZE);
        sync_sysmem(&qemu, &ram);
        let lines: Vec<(EventFd, EventFd)> = (0..5)
            .map(|_| {
                (
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                )
            })
            .collect();
        for (intr, resample) in &lines {
            send_with_fds(
                &qemu,
                &encode_message(Command::SetIrqfd, &[]),
                &[intr.as_raw_fd(), resample.as_raw_fd()],
            );
        }
        let mut g = Guest(qemu);

        // Probe: ID registers (their replies also show the messages before them were handled).
        assert_eq!(g.read(off::IDR0, 4), u64::from(cfg.idr.idr[0]));
        assert_eq!(g.read(off::IDR1, 4), u64::from(cfg.idr.idr[1]));
        assert_eq!(g.read(off::IDR5, 4), u64::from(cfg.idr.idr[5]));
        assert_eq!(stats.memory_syncs.load(Ordering::Relaxed), 1);
        assert_eq!(stats.irqfds_bound.load(Ordering::Relaxed), 4);
        assert_eq!(stats.irqfds_ignored.load(Ordering::Relaxed), 1);
        assert!((0..4).all(|l| irq.is_bound(l)));

        // Reset: disable, tables and queues in guest RAM, interrupts, then enable the queues.
        g.write_sync(off::CR0, off::CR0ACK, 0);
        g.write(off::CR1, 4, 0);
        g.write(off::CR2, 4, 2);
        g.write(off::STRTAB_BASE, 8, STRTAB);
        g.write(off::STRTAB_BASE_CFG, 4, 4);
        g.write(off::CMDQ_BASE, 8, CMDQ | CMDQ_LOG2);
        assert_eq!(g.read(off::CMDQ_BASE, 8), CMDQ | CMDQ_LOG2);
        g.write(off::CMDQ_PROD, 4, 0);
        g.write(off::CMDQ_CONS, 4, 0);
        g.write(off::EVENTQ_BASE, 8, EVTQ | EVTQ_LOG2);
        g.write(0x1_0000 + off::EVENTQ_PROD, 4, 0);
        g.write(0x1_0000 + off::EVENTQ_CONS, 4, 0);
        let irqs = u64::from(irq_ctrl::GERROR_IRQEN | irq_ctrl::EVTQ_IRQEN);
        g.write_sync(off::IRQ_CTRL, off::IRQ_CTRLACK, irqs);
        let queues = u64::from(cr0::CMDQEN | cr0::EVTQEN);
        g.write_sync(off::CR0, off::CR0ACK, queues);

        // CMD_SYNC with CS=SIG_IRQ, written into guest RAM (the memfd) and rung by CMDQ_PROD.
        let sync_irq: u64 = 0x46 | (1 << 12);
        ram.write_all_at(&sync_irq.to_le_bytes(), CMDQ - RAM_BASE)
            .unwrap();
        g.write(off::CMDQ_PROD, 4, 1);
        assert_eq!(g.read(off::CMDQ_CONS, 4), 1, "the SYNC was consumed");
        let fired = |lines: &[(EventFd, EventFd)]| -> Vec<u64> {
            lines.iter().map(|(intr, _)| signals(intr)).collect()
        };
        let mut want = vec![0; 5];
        want[IRQ_CMD_SYNC as usize] = 1;
        assert_eq!(fired(&lines), want, "only the cmdq-sync line, once");

        // Linux's MSI polling: CS=SIG_IRQ with MSIADDR = the command's own entry and
        // MSIDATA 0. The completion is a write to RAM by the model; no line, no MSI message.
        let entry = CMDQ + 16;
        ram.write_all_at(&sync_irq.to_le_bytes(), entry - RAM_BASE)
            .unwrap();
        ram.write_all_at(&entry.to_le_bytes(), entry - RAM_BASE + 8)
            .unwrap();
        // The doorbell is posted, as x-smmuv3-proxy sends CMDQ_PROD: no RET comes back (the
        // next reply read below is the CONS read's), and that later request sees its effect.
        let before = stats.accesses.load(Ordering::Relaxed);
        g.post(off::CMDQ_PROD, 4, 2);
        assert_eq!(
            g.read(off::CMDQ_CONS, 4),
            2,
            "the posted doorbell ran the queue first"
        );
        let mut word = [0u8; 4];
        ram.read_exact_at(&mut word, entry - RAM_BASE).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0, "MSIDATA over the opcode");
        assert_eq!(
            stats.accesses.load(Ordering::Relaxed),
            before + 2,
            "the doorbell and the CONS read"
        );
        assert_eq!(stats.posted_writes.load(Ordering::Relaxed), 1);
        assert_eq!(fired(&lines), vec![0; 5], "no line for an MSI completion");
        assert_eq!(irq.stats().msi_seen.load(Ordering::Relaxed), 1);

        // An illegal opcode halts the queue with GERROR.CMDQ_ERR, on the gerror line.
        ram.write_all_at(&0xffu64.to_le_bytes(), CMDQ - RAM_BASE + 32)
            .unwrap();
        g.write(off::CMDQ_PROD, 4, 3);
        assert_eq!(g.read(off::GERROR, 4) & u64::from(gerror::CMDQ_ERR), 1);
        let mut want = vec![0; 5];
        want[IRQ_GERROR as usize] = 1;
        assert_eq!(fired(&lines), want, "only the gerror line, once");
        assert_eq!(irq.stats().signalled.load(Ordering::Relaxed), 2);

        // Refused: outside the window on either side, straddling its end, sizes QEMU cannot
        // send, unaligned, I/O space. None reaches the SMMU.
        let served = stats.accesses.load(Ordering::Relaxed);
        let q = &mut g.0;
        for (cmd, addr, size, memory) in [
            (Command::BarRead, BASE - 4, 4, true),
            (Command::BarRead, BASE + 0x2_0000, 4, true),
            (Command::BarRead, BASE + 0x1_fffc, 8, true),
            (Command::BarRead, BASE + off::IDR0, 2, true),
            (Command::BarRead, BASE + off::IDR0, 16, true),
            (Command::BarRead, BASE + off::CR0 + 2, 4, true),
            (Command::BarRead, BASE + off::IDR0, 4, false),
            (Command::BarRead, u64::MAX - 3, 4, true),
            (Command::BarWrite, BASE + off::CR0, 2, true),
            (Command::BarWrite, BASE + off::CR0, 1, true),
            (Command::BarWrite, BASE + off::STRTAB_BASE + 4, 8, true),
        ] {
            assert_eq!(
                ask(q, &bar_msg(cmd, addr, 0, size, memory)),
                FAILED,
                "{cmd:?} {addr:#x}/{size} memory={memory}"
            );
        }
        assert_eq!(stats.refused_accesses.load(Ordering::Relaxed), 11);
        assert_eq!(stats.accesses.load(Ordering::Relaxed), served);
        assert_eq!(
            g.read(off::CR0, 4),
            queues,
            "refused writes changed nothing"
        );
        assert_eq!(g.read(off::STRTAB_BASE, 8), STRTAB);

        // Machine reset: registers back to their reset values.
        assert_eq!(ask(&mut g.0, &encode_message(Command::DeviceReset, &[])), 0);
        assert_eq!(g.read(off::CR0, 4), 0);
        assert_eq!(g.read(off::CR0ACK, 4), 0);
        assert_eq!(g.read(off::GERROR, 4), 0);
        assert_eq!(g.read(off::CMDQ_BASE, 8), 0);
        assert_eq!(stats.resets.load(Ordering::Relaxed), 1);

        // QEMU closing the socket ends the server cleanly.
        drop(g);
        t.join().unwrap().unwrap();
        assert_eq!(irq.stats().dropped_unbound.load(Ordering::Relaxed), 0);
        assert_eq!(fired(&lines), vec![0; 5]);
    }

    /// SMMU_TRANSLATE: QEMU's MSI writes for a translated device go through the model. A
    /// bypassing STE gives the identity page with the permission asked for; an invalid STE a
    /// fault that the model records in its event queue (C_BAD_STE) as it would for the
    /// device's own DMA; a stream ID no device of the run has, a refusal.
    #[test]
    fn translates_msi_writes_through_the_model() {
        let mem = SharedMemory::default();
        let irq = PlatformInterrupts::new("smmuv3", 4);
        let disk = Bdf::new(0, 1, 0);
        let smmu = IommuChoice::with_boot_bypass(sluice_host::IommuKind::Smmuv3, false)
            .model(vec![disk])
            .build(&IommuBuild {
                hooks: Arc::new(NoHooks),
                mem: mem.clone(),
                irq: irq.clone(),
            })
            .unwrap();
        let seams = BTreeMap::from([(disk.0, smmu.translator(disk).unwrap())]);
        let (ours, qemu) = UnixStream::pair().unwrap();
        let server = PlatformServer::new(ours, "smmuv3", BASE, smmu.mmio().unwrap(), mem, irq)
            .with_msi_translation(seams);
        let stats = server.stats();
        let t = std::thread::spawn(move || server.run());
        let ram = memfd(RAM_SIZE);
        sync_sysmem(&qemu, &ram);
        let mut g = Guest(qemu);
        let translate = |g: &mut Guest, sid: u32, iova: u64| {
            let mut p = [0u8; crate::protocol::SMMU_TRANSLATE_PAYLOAD];
            p[0..8].copy_from_slice(&iova.to_ne_bytes());
            p[8..12].copy_from_slice(&sid.to_ne_bytes());
            p[12..16].copy_from_slice(&TRANSLATE_WRITE.to_ne_bytes());
            ask(&mut g.0, &encode_message(Command::SmmuTranslate, &p))
        };
        let ste = STRTAB - RAM_BASE + u64::from(disk.0) * 64;

        // Before the driver enables the SMMU, GBPA aborts (boot bypass off): a fault.
        assert_eq!(translate(&mut g, disk.0.into(), 0x0809_0040), 0);

        // Linear stream table of 16 STEs, event queue, then SMMUEN; the disk's STE bypasses.
        ram.write_all_at(&(1u64 | 0b100 << 1).to_le_bytes(), ste)
            .unwrap();
        g.write(off::STRTAB_BASE, 8, STRTAB);
        g.write(off::STRTAB_BASE_CFG, 4, 4);
        g.write(off::EVENTQ_BASE, 8, EVTQ | EVTQ_LOG2);
        g.write(0x1_0000 + off::EVENTQ_PROD, 4, 0);
        g.write(0x1_0000 + off::EVENTQ_CONS, 4, 0);
        g.write(off::CMDQ_BASE, 8, CMDQ | CMDQ_LOG2);
        g.write(off::CMDQ_PROD, 4, 0);
        g.write(off::CMDQ_CONS, 4, 0);
        let on = u64::from(cr0::SMMUEN | cr0::EVTQEN | cr0::CMDQEN);
        g.write_sync(off::CR0, off::CR0ACK, on);
        assert_eq!(
            translate(&mut g, disk.0.into(), 0x0809_0040),
            0x0809_0000 | u64::from(TRANSLATE_WRITE),
            "bypass: the identity page, writable"
        );

        // An invalid STE (V=0), made visible by CFGI_STE + CMD_SYNC as the driver does:
        // refused, and the model reports C_BAD_STE in its event queue.
        ram.write_all_at(&0u64.to_le_bytes(), ste).unwrap();
        let cfgi_ste = 0x03u64 | u64::from(disk.0) << 32;
        ram.write_all_at(&cfgi_ste.to_le_bytes(), CMDQ - RAM_BASE)
            .unwrap();
        ram.write_all_at(&0x46u64.to_le_bytes(), CMDQ - RAM_BASE + 16)
            .unwrap();
        g.write(off::CMDQ_PROD, 4, 2);
        assert_eq!(
            g.read(off::CMDQ_CONS, 4),
            2,
            "CFGI_STE and CMD_SYNC consumed"
        );
        let events = g.read(0x1_0000 + off::EVENTQ_PROD, 4);
        assert_eq!(translate(&mut g, disk.0.into(), 0x0809_0040), 0);
        assert_eq!(g.read(0x1_0000 + off::EVENTQ_PROD, 4), events + 1);
        let mut record = [0u8; 8];
        ram.read_exact_at(&mut record, EVTQ - RAM_BASE + events * 32)
            .unwrap();
        assert_eq!(record[0], 0x04, "C_BAD_STE");

        // A stream ID no device of the run has: refused without reaching the model.
        assert_eq!(translate(&mut g, 0x10, 0x0809_0040), 0);
        assert_eq!(translate(&mut g, 0x1_0008, 0x0809_0040), 0);
        assert_eq!(g.read(0x1_0000 + off::EVENTQ_PROD, 4), events + 1);
        assert_eq!(stats.translations.load(Ordering::Relaxed), 1);
        assert_eq!(stats.translation_faults.load(Ordering::Relaxed), 4);
        drop(g);
        t.join().unwrap().unwrap();
    }

    /// A 16-byte register file that counts the accesses reaching it.
    #[derive(Default)]
    struct Regs {
        calls: AtomicU64,
    }

    impl MmioDevice for Regs {
        fn window_size(&self) -> u64 {
            16
        }
        fn mmio_read(&self, _offset: u64, data: &mut [u8]) {
            self.calls.fetch_add(1, Ordering::Relaxed);
            data.fill(0);
        }
        fn mmio_write(&self, _offset: u64, _data: &[u8]) {
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
        fn reset(&self) {}
    }

    /// Config space has no meaning on a platform channel: QEMU still gets the RET it waits
    /// for, then the connection ends with a protocol error naming the command.
    #[test]
    fn config_space_access_is_answered_then_ends_the_connection() {
        let regs = Arc::new(Regs::default());
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let server = PlatformServer::new(
            ours,
            "smmuv3",
            BASE,
            regs.clone(),
            SharedMemory::default(),
            PlatformInterrupts::new("smmuv3", 4),
        );
        let t = std::thread::spawn(move || server.run());
        let mut c = vec![0u8; 12];
        c[8..12].copy_from_slice(&4u32.to_ne_bytes());
        assert_eq!(
            ask(&mut qemu, &encode_message(Command::PciConfigRead, &c)),
            FAILED
        );
        let err = t.join().unwrap().unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            "device smmuv3: malformed protocol message: PciConfigRead is not served on this channel"
        );
        // The server is gone: QEMU's next access sees the connection closed, not a hang.
        let mut r = [0u8; 1];
        assert_eq!(qemu.read(&mut r).unwrap(), 0);
        assert_eq!(regs.calls.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn interrupt_sink_signals_rising_edges_and_counts_what_it_cannot_deliver() {
        let irq = PlatformInterrupts::new("smmuv3", 4);
        // Before SET_IRQFD: lost, but counted.
        irq.set_level(IRQ_CMD_SYNC, true);
        irq.set_level(IRQ_CMD_SYNC, false);
        assert_eq!(irq.stats().dropped_unbound.load(Ordering::Relaxed), 1);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(irq.bind(IRQ_CMD_SYNC as usize, fd.try_clone().unwrap()));
        assert!(!irq.bind(4, EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        // Pulses: one signal each.
        for _ in 0..3 {
            irq.set_level(IRQ_CMD_SYNC, true);
            irq.set_level(IRQ_CMD_SYNC, false);
        }
        assert_eq!(signals(&fd), 3);
        // Held high: one edge, one signal; lowering sends nothing.
        irq.set_level(IRQ_CMD_SYNC, true);
        irq.set_level(IRQ_CMD_SYNC, true);
        assert_eq!(signals(&fd), 1);
        irq.set_level(IRQ_CMD_SYNC, false);
        assert_eq!(signals(&fd), 0);
        // A reset lowers a line left high, so its next assertion is an edge again.
        irq.set_level(IRQ_CMD_SYNC, true);
        irq.lower_all();
        irq.set_level(IRQ_CMD_SYNC, true);
        assert_eq!(signals(&fd), 2);
        assert_eq!(irq.stats().signalled.load(Ordering::Relaxed), 6);
        // No such line: counted; MSIs: counted (the model writes or refuses them).
        irq.set_level(7, true);
        irq.msi(0x0808_0040, 1);
        irq.msi(0x0808_0040, 2);
        let s = irq.stats();
        assert_eq!(s.unknown_line.load(Ordering::Relaxed), 1);
        assert_eq!(s.msi_seen.load(Ordering::Relaxed), 2);
        assert_eq!(s.dropped_unbound.load(Ordering::Relaxed), 1);
        assert_eq!(s.signal_failed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn decode_passes_only_aligned_4_and_8_byte_memory_accesses_inside_the_window() {
        let w = 0x2_0000;
        assert_eq!(decode(BASE, w, BASE, 4, true), Some(0));
        assert_eq!(decode(BASE, w, BASE + 0x1_fff8, 8, true), Some(0x1_fff8));
        assert_eq!(decode(BASE, w, BASE + 0x1_fffc, 4, true), Some(0x1_fffc));
        assert_eq!(decode(BASE, w, BASE + 0x1_fffc, 8, true), None);
        assert_eq!(decode(BASE, w, BASE + w, 4, true), None);
        assert_eq!(decode(BASE, w, BASE - 4, 4, true), None);
        assert_eq!(decode(BASE, w, BASE + 4, 8, true), None);
        assert_eq!(decode(BASE, w, BASE + 2, 4, true), None);
        for size in [0, 1, 2, 3, 5, 6, 7, 16, u32::MAX] {
            assert_eq!(decode(BASE, w, BASE, size, true), None, "size {size}");
        }
        assert_eq!(decode(BASE, w, BASE, 4, false), None);
        // No arithmetic overflow at the top of the address space.
        assert_eq!(
            decode(0, u64::MAX, u64::MAX - 7, 4, true),
            Some(u64::MAX - 7)
        );
        assert_eq!(decode(0, u64::MAX, u64::MAX - 3, 8, true), None);
    }
}
