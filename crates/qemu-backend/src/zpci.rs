//! Serving the zPCI model to an s390x guest: the remote half of Sluice's QEMU patch
//! `guest-images/qemu/s390x/20-zpci-proxy.patch` (`hw/s390x/s390-pci-proxy.c`).
//!
//! QEMU's s390 PCI host bridge keeps what an s390 machine does with a PCI function that is not
//! translation: CLP list/query, PCILG/PCISTG (forwarded to the device's own `x-pci-proxy-dev`
//! channel), adapter interrupts. For functions whose device is an `x-pci-proxy-dev`, it sends the
//! instructions and state changes that decide translation to this channel (one per machine,
//! `-M s390-ccw-virtio,x-zpci-proxy-fd=N`), and the model here answers them:
//!
//! - `ZPCI_SET_EVENTFD` (no reply): QEMU's eventfd for error events. The model's error
//!   listener signals it whenever it records one (a DMA fault, an RPCIT that finds an invalid
//!   entry); QEMU then sends `ZPCI_FETCH_EVENTS`.
//! - `ZPCI_INSN` (RET): an operation of function FID ([`ZpciOp`]). MPCIFC and RPCIT are executed
//!   by the model, with the model's current handle for that FID (QEMU checked the guest's
//!   handle), and answered with `cc | status << 8`; a program exception is answered with
//!   [`ZPCI_ANSWER_PROGRAM`], and QEMU's own checks raise it. Enable, disable, configure and
//!   deconfigure are what QEMU already did; the model follows and answers 0, or 1 when it
//!   disagrees (QEMU logs that). An unknown FID answers cc 3: nothing is translated for a
//!   function the model does not have.
//! - `ZPCI_FETCH_EVENTS` (answered with a message): up to [`MAX_ZPCI_EVENTS`] error events and
//!   whether more wait. QEMU raises each as a PCI error event (CHSC store event information)
//!   and puts the function in the error state.
//!
//! Anything else on this channel is a protocol error that ends it (QEMU's side then fails every
//! forwarded instruction closed).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use sluice_host::iommu::ZpciHandle;
use sluice_zpci::clp::SetPciFnOp;
use sluice_zpci::{Fib, InsnStatus, MpcifcOp};
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{Channel, ChannelError};
use crate::protocol::{
    FAILED, MAX_ZPCI_EVENTS, ProtocolError, Request, ZPCI_ANSWER_PROGRAM, ZpciEventEntry, ZpciInsn,
    ZpciOp, encode_zpci_events, zpci_answer,
};
use crate::server::ServeError;
use crate::serving::{self, Handler, Reply, into_eventfd};

/// What crossed the zPCI channel.
#[derive(Debug, Default)]
pub struct ZpciStats {
    /// MPCIFC instructions executed by the model.
    pub mpcifc: AtomicU64,
    /// RPCIT instructions executed by the model.
    pub rpcit: AtomicU64,
    /// Of those, answered busy (cc 2): the guest retried to continue a long refresh.
    pub rpcit_busy: AtomicU64,
    /// Instructions the model refused (cc 1 or 3) or raised a program exception for.
    pub refused: AtomicU64,
    /// Enable and disable (CLP SET PCI FN) the model followed.
    pub enable_disable: AtomicU64,
    /// SCLP configure and deconfigure the model followed.
    pub configure_deconfigure: AtomicU64,
    /// State changes QEMU made that the model refused (logged; QEMU's state stands).
    pub disagreements: AtomicU64,
    /// Error events handed to QEMU.
    pub error_events: AtomicU64,
    /// Error events the model dropped for lack of room.
    pub error_events_dropped: AtomicU64,
    /// Polling for the next instruction ([`ZpciServer::with_poll_budget`]).
    pub poll: Arc<crate::poll::PollCounters>,
}

/// A snapshot of [`ZpciStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZpciTraffic {
    /// MPCIFC executed.
    pub mpcifc: u64,
    /// RPCIT executed.
    pub rpcit: u64,
    /// RPCIT answered busy.
    pub rpcit_busy: u64,
    /// Refused instructions.
    pub refused: u64,
    /// Enables and disables.
    pub enable_disable: u64,
    /// Configures and deconfigures.
    pub configure_deconfigure: u64,
    /// State changes the model refused.
    pub disagreements: u64,
    /// Error events delivered.
    pub error_events: u64,
    /// Error events dropped.
    pub error_events_dropped: u64,
    /// Whether the channel's server thread ran SCHED_FIFO (set by the launcher).
    pub server_fifo: bool,
    /// How long QEMU polled for each answer before sleeping, µs (set by the launcher).
    pub answer_poll_us: Option<u32>,
    /// Instructions that arrived while the server thread polled (no wake-up).
    pub poll_caught: u64,
    /// Polls that ended without an instruction.
    pub polls_expired: u64,
}

impl ZpciStats {
    /// The counters now.
    pub fn snapshot(&self) -> ZpciTraffic {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ZpciTraffic {
            mpcifc: g(&self.mpcifc),
            rpcit: g(&self.rpcit),
            rpcit_busy: g(&self.rpcit_busy),
            refused: g(&self.refused),
            enable_disable: g(&self.enable_disable),
            configure_deconfigure: g(&self.configure_deconfigure),
            disagreements: g(&self.disagreements),
            error_events: g(&self.error_events),
            error_events_dropped: g(&self.error_events_dropped),
            server_fifo: false,
            answer_poll_us: None,
            poll_caught: g(&self.poll.caught),
            polls_expired: g(&self.poll.expired),
        }
    }
}

/// The zPCI channel's server.
pub struct ZpciServer {
    channel: Channel,
    model: ZpciHandle,
    stats: Arc<ZpciStats>,
    /// QEMU's error-event eventfd, once ZPCI_SET_EVENTFD brought it.
    wake: Arc<OnceLock<EventFd>>,
    /// Events fetched from the model but not yet sent (more than one answer holds).
    pending: Vec<ZpciEventEntry>,
}

impl ZpciServer {
    /// Serves `model` on `sock`, the other end of QEMU's `x-zpci-proxy-fd`. Sets the model's
    /// error listener (a model serves one machine).
    pub fn new(sock: UnixStream, model: ZpciHandle) -> Self {
        let wake: Arc<OnceLock<EventFd>> = Arc::new(OnceLock::new());
        let listener_wake = wake.clone();
        let set = model.zpci.set_error_listener(Box::new(move || {
            if let Some(fd) = listener_wake.get() {
                // A full counter still wakes QEMU; nothing else can fail on an eventfd.
                let _ = fd.write(1);
            }
        }));
        if !set {
            log::warn!("zpci: the model already has an error listener; error events stay queued");
        }
        ZpciServer {
            channel: Channel::new(sock),
            model,
            stats: Arc::new(ZpciStats::default()),
            wake,
            pending: Vec::new(),
        }
    }

    /// The counters, shared with the caller.
    pub fn stats(&self) -> Arc<ZpciStats> {
        self.stats.clone()
    }

    /// Polls for the next instruction for `budget` after each one before blocking
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

    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The answer to an instruction the model executed.
    fn answer(&self, st: InsnStatus) -> u64 {
        if !st.is_ok() && st.cc != sluice_zpci::Cc::Busy {
            self.count(&self.stats.refused);
        }
        zpci_answer(st.cc as u8, st.status)
    }

    fn execute(&mut self, insn: &ZpciInsn) -> u64 {
        let zpci = &self.model.zpci;
        let Ok(op) = insn.op else {
            log::warn!(
                "zpci: unknown operation {:?} for fid {:#x}",
                insn.op,
                insn.fid
            );
            self.count(&self.stats.refused);
            return ZPCI_ANSWER_PROGRAM;
        };
        let fh = zpci.fh_of(insn.fid);
        let mem = (self.model.tables)();
        match (op, fh) {
            (ZpciOp::Mpcifc | ZpciOp::Rpcit, None) => self.answer(InsnStatus::INVALID_HANDLE),
            (ZpciOp::Mpcifc, Some(fh)) => {
                self.count(&self.stats.mpcifc);
                let oc = (insn.arg0 & 0xff) as u8;
                let dmaas = ((insn.arg0 >> 16) & 0xff) as u8;
                let Some(op) = MpcifcOp::from_code(oc) else {
                    self.count(&self.stats.refused);
                    return ZPCI_ANSWER_PROGRAM;
                };
                match zpci.mpcifc_with_fib(mem.as_ref(), fh, dmaas, op, &Fib::parse(&insn.fib)) {
                    Ok(st) => self.answer(st),
                    Err(e) => {
                        log::debug!("zpci: MPCIFC {op:?} fid {:#x}: {e}", insn.fid);
                        self.count(&self.stats.refused);
                        ZPCI_ANSWER_PROGRAM
                    }
                }
            }
            (ZpciOp::Rpcit, Some(fh)) => {
                self.count(&self.stats.rpcit);
                let st = zpci.rpcit(mem.as_ref(), fh, insn.arg0, insn.arg1);
                if st.cc == sluice_zpci::Cc::Busy {
                    self.count(&self.stats.rpcit_busy);
                }
                self.answer(st)
            }
            (ZpciOp::Enable | ZpciOp::Disable, fh) => {
                self.count(&self.stats.enable_disable);
                let op = if op == ZpciOp::Enable {
                    SetPciFnOp::Enable { ndas: 1 }
                } else {
                    SetPciFnOp::Disable
                };
                let r = fh
                    .ok_or_else(|| "no such function".to_string())
                    .and_then(|fh| zpci.clp_set_pci_fn(fh, op).map_err(|rc| format!("{rc:?}")));
                self.followed(insn, r.map(|_| ()))
            }
            (ZpciOp::Configure | ZpciOp::Deconfigure, _) => {
                self.count(&self.stats.configure_deconfigure);
                let r = if op == ZpciOp::Configure {
                    zpci.configure(insn.fid)
                } else {
                    zpci.deconfigure(insn.fid)
                };
                self.followed(insn, r.map(|_| ()).map_err(|e| e.to_string()))
            }
        }
    }

    /// The answer to a state change QEMU made: 0, or 1 when the model could not follow.
    fn followed(&self, insn: &ZpciInsn, r: Result<(), String>) -> u64 {
        match r {
            Ok(()) => 0,
            Err(why) => {
                self.count(&self.stats.disagreements);
                log::warn!(
                    "zpci: QEMU did {:?} on fid {:#x} but the model refused: {why}",
                    insn.op,
                    insn.fid
                );
                1
            }
        }
    }

    /// Moves the model's recorded error events to the queue QEMU fetches from.
    fn collect_events(&mut self) {
        let (fresh, dropped) = self.model.zpci.take_error_events();
        self.stats
            .error_events_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        self.pending.extend(fresh.iter().map(|e| ZpciEventEntry {
            fid: e.fid,
            pec: e.pec,
            faddr: e.addr,
        }));
    }

    /// The next ZPCI_FETCH_EVENTS answer.
    fn events(&mut self) -> Reply {
        self.collect_events();
        let n = self.pending.len().min(MAX_ZPCI_EVENTS);
        let now: Vec<ZpciEventEntry> = self.pending.drain(..n).collect();
        self.stats
            .error_events
            .fetch_add(now.len() as u64, Ordering::Relaxed);
        Reply::Message {
            bytes: encode_zpci_events(&now, !self.pending.is_empty()),
            fds: Vec::new(),
        }
    }
}

impl Handler for ZpciServer {
    fn device_name(&self) -> &str {
        "zpci"
    }

    fn channel(&mut self) -> &mut Channel {
        &mut self.channel
    }

    fn handle(&mut self, request: Request) -> Result<Option<Reply>, ServeError> {
        match request {
            Request::ZpciSetEventfd(fd) => {
                if self.wake.set(into_eventfd(fd)).is_err() {
                    log::warn!("zpci: a second error-event eventfd; the first one stays");
                }
                // Events recorded before QEMU was ready.
                self.collect_events();
                if let (false, Some(fd)) = (self.pending.is_empty(), self.wake.get()) {
                    let _ = fd.write(1);
                }
                Ok(None)
            }
            Request::ZpciInsn(insn) => Ok(Some(Reply::Value(self.execute(&insn)))),
            Request::ZpciFetchEvents => Ok(Some(self.events())),
            other => {
                let command = other.command();
                if other.expects_reply() {
                    let _ = self.channel.reply(FAILED);
                }
                Err(serving::channel_error(
                    "zpci",
                    ChannelError::Protocol(ProtocolError::NotServed(command)),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use sluice_devapi::NoHooks;
    use sluice_zpci::guest::GuestTables;
    use sluice_zpci::{FunctionConfig, FunctionState, Zpci, ZpciOptions};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::protocol::{Command, ZPCI_INSN_PAYLOAD, encode_message};

    const FID: u32 = 0x18;
    const TABLES: u64 = 0x10_0000;
    const DMA_BASE: u64 = 0x1_0000_0000;

    /// QEMU's end of the channel, speaking the patch's side of the protocol.
    struct Qemu {
        chan: Channel,
        raw: UnixStream,
    }

    impl Qemu {
        fn insn(&mut self, op: u32, fid: u32, arg0: u64, arg1: u64, fib: Option<&Fib>) -> u64 {
            let mut p = vec![0u8; ZPCI_INSN_PAYLOAD];
            p[0..4].copy_from_slice(&op.to_ne_bytes());
            p[4..8].copy_from_slice(&fid.to_ne_bytes());
            p[8..16].copy_from_slice(&arg0.to_ne_bytes());
            p[16..24].copy_from_slice(&arg1.to_ne_bytes());
            if let Some(f) = fib {
                p[24..].copy_from_slice(&f.to_bytes());
            }
            self.chan
                .send_with_fds(&encode_message(Command::ZpciInsn, &p), &[])
                .unwrap();
            let mut r = [0u8; 24];
            self.raw.read_exact(&mut r).unwrap();
            assert_eq!(
                i32::from_ne_bytes(r[0..4].try_into().unwrap()),
                Command::Ret as i32
            );
            u64::from_ne_bytes(r[16..24].try_into().unwrap())
        }

        /// FETCH_EVENTS: the events (fid, pec, faddr) and the "more" flag.
        fn events(&mut self) -> (Vec<(u32, u16, u64)>, bool) {
            let msg = encode_message(Command::ZpciFetchEvents, &0u64.to_ne_bytes());
            self.chan.send_with_fds(&msg, &[]).unwrap();
            let mut r = vec![0u8; 16 + crate::protocol::ZPCI_EVENTS_PAYLOAD];
            self.raw.read_exact(&mut r).unwrap();
            let p = &r[16..];
            let n = u32::from_ne_bytes(p[0..4].try_into().unwrap()) as usize;
            let more = u32::from_ne_bytes(p[4..8].try_into().unwrap()) != 0;
            let ev = (0..n)
                .map(|i| {
                    let e = &p[8 + 16 * i..8 + 16 * (i + 1)];
                    (
                        u32::from_ne_bytes(e[0..4].try_into().unwrap()),
                        u16::from_ne_bytes(e[4..6].try_into().unwrap()),
                        u64::from_ne_bytes(e[8..16].try_into().unwrap()),
                    )
                })
                .collect();
            (ev, more)
        }
    }

    /// QEMU's end, the model, guest memory and the serving thread.
    type Rig = (
        Qemu,
        Arc<Zpci>,
        Arc<GuestMemoryMmap>,
        std::thread::JoinHandle<Result<(), ServeError>>,
    );

    fn rig() -> Rig {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
        let zpci = Arc::new(
            Zpci::new(
                vec![FunctionConfig {
                    fid: FID,
                    uid: 1,
                    initial_state: FunctionState::Disabled,
                    ..FunctionConfig::default()
                }],
                ZpciOptions::default(),
                Arc::new(NoHooks),
            )
            .unwrap(),
        );
        let m = mem.clone();
        let handle = ZpciHandle {
            zpci: zpci.clone(),
            tables: Arc::new(move || m.clone()),
        };
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = ZpciServer::new(ours, handle);
        let served = std::thread::spawn(move || server.run());
        let raw = theirs.try_clone().unwrap();
        (
            Qemu {
                chan: Channel::new(theirs),
                raw,
            },
            zpci,
            mem,
            served,
        )
    }

    #[test]
    fn forwarded_instructions_drive_the_model_and_faults_come_back_as_events() {
        let (mut q, zpci, mem, served) = rig();
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let msg = encode_message(Command::ZpciSetEventfd, &0u64.to_ne_bytes());
        q.chan.send_with_fds(&msg, &[wake.as_raw_fd()]).unwrap();

        // QEMU enabled the function: the model follows.
        assert_eq!(q.insn(3, FID, 0, 0, None), 0);
        assert_eq!(zpci.state_of(FID), Some(FunctionState::Enabled));
        // REG_IOAT with tables mapping one page; RPCIT of it.
        let mut t = GuestTables::new(mem.as_ref(), TABLES, TABLES + (1 << 20)).unwrap();
        t.map(mem.as_ref(), DMA_BASE, 0x30_0000, true).unwrap();
        let fib = Fib {
            pba: DMA_BASE,
            pal: DMA_BASE + (1 << 30) - 1,
            iota: t.iota(),
            ..Fib::default()
        };
        let reg_ioat = u64::from(MpcifcOp::RegIoat.code());
        assert_eq!(q.insn(1, FID, reg_ioat, 0x1000, Some(&fib)), 0);
        assert_eq!(q.insn(2, FID, DMA_BASE, 0x1000, None), 0);
        assert!(
            !zpci.iotlb_entries(FID).is_empty(),
            "RPCIT filled the shadow IOTLB"
        );
        // The same REG_IOAT again is a sequence error (cc 1, status 24), the model's answer.
        assert_eq!(q.insn(1, FID, reg_ioat, 0x1000, Some(&fib)), 1 | 24 << 8);
        // A function the model does not have: cc 3, nothing translated for it.
        assert_eq!(q.insn(2, 0x99, DMA_BASE, 0x1000, None), 3);
        // An operation code MPCIFC does not define: a program exception, raised by QEMU.
        assert_eq!(
            q.insn(1, FID, 0x7f, 0x1000, Some(&fib)),
            ZPCI_ANSWER_PROGRAM
        );
        assert_eq!(q.insn(77, FID, 0, 0, None), ZPCI_ANSWER_PROGRAM);
        assert!(wake.read().is_err(), "no error event yet");

        // RPCIT beyond the registered window: an error event, the function in error.
        let past = DMA_BASE + (1 << 30);
        let answer = q.insn(2, FID, past, 0x1000, None);
        assert_eq!(answer & 0xff, 1, "cc 1: {answer:#x}");
        assert_eq!(wake.read().unwrap(), 1, "the model woke QEMU");
        let (ev, more) = q.events();
        assert!(!more);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].0, FID);
        assert_eq!(ev[0].1, sluice_zpci::codes::pec::OORANGE);
        assert_eq!(zpci.state_of(FID), Some(FunctionState::Error));
        assert_eq!(q.events(), (vec![], false), "events are sent once");

        // SCLP deconfigure: the release. Configure brings it back to disabled.
        assert_eq!(q.insn(6, FID, 0, 0, None), 0);
        assert_eq!(zpci.state_of(FID), Some(FunctionState::Standby));
        assert!(zpci.iotlb_entries(FID).is_empty());
        assert_eq!(q.insn(5, FID, 0, 0, None), 0);
        assert_eq!(zpci.state_of(FID), Some(FunctionState::Disabled));
        // Disabling a disabled function: the model disagrees (QEMU logs it), answer 1.
        assert_eq!(q.insn(4, FID, 0, 0, None), 1);

        drop(q);
        served.join().unwrap().unwrap();
    }

    /// Garbage the guest controls (FIB contents, RPCIT ranges, operation codes) and garbage QEMU
    /// could send (unknown operations and FIDs) never ends the channel or panics the model:
    /// every request gets an answer.
    #[test]
    fn random_instructions_are_all_answered() {
        let (mut q, zpci, _mem, served) = rig();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000u32 {
            let r = next();
            let op = (r % 9) as u32; // 0 and 7..8 are not operations
            let fid = if r & 0x100 != 0 {
                FID
            } else {
                (r >> 12) as u32
            };
            let mut fib = Fib::parse(&[0u8; 80]);
            fib.pba = next();
            fib.pal = next();
            fib.iota = next();
            fib.fmt = (next() & 1) as u8;
            let arg0 = if op == 1 {
                next() & 0x00ff_00ff
            } else {
                next()
            };
            let answer = q.insn(op, fid, arg0, next() >> (next() % 64), Some(&fib));
            assert!(
                answer & ZPCI_ANSWER_PROGRAM != 0 || answer & 0xff <= 3,
                "request {i}: answer {answer:#x}"
            );
            if i % 97 == 0 {
                let _ = q.events();
            }
        }
        assert!(zpci.state_of(FID).is_some());
        drop(q);
        served.join().unwrap().unwrap();
    }

    #[test]
    fn a_device_command_on_the_zpci_channel_ends_it() {
        let (mut q, _zpci, _mem, served) = rig();
        let msg = encode_message(Command::DeviceReset, &[]);
        q.chan.send_with_fds(&msg, &[]).unwrap();
        let err = served.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("zpci"), "{err}");
        drop(q);
    }
}
