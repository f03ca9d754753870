//! The body of the `mpqemu_server` fuzz target (`fuzz/fuzz_targets/`): a byte stream, as QEMU's
//! `x-pci-proxy-dev` would send it (no file descriptors attached), is written into a socket
//! and served by a real [`DeviceServer`] until it ends, against a virtio-pci function wrapped
//! in a checking [`PciFunction`]. The stream is built by operations: raw bytes, well-formed
//! config and BAR messages (in or out of range), resets, fd-carrying commands without their
//! fds, replies, and headers with wrong payload sizes.
//!
//! Invariants (`assert!`, so the fuzzer reports a violation as a crash):
//! - the function sees only config accesses of 1/2/4 bytes inside the 256-byte space and BAR
//!   accesses of 1/2/4/8 bytes inside the BAR (no access outside the BAR);
//! - a rejected access reaches nothing: function calls = accesses − rejected (+ resets), and
//!   every rejected access is answered with all-ones;
//! - the server answers exactly the messages a reference parser of the wire format accepts,
//!   in order, each with a well-formed RET, and stops with an error exactly when that parser
//!   finds a malformed message or a truncated one (clean EOF between messages is `Ok`).
#![allow(clippy::panic, clippy::indexing_slicing)]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use sluice_devapi::{Bdf, NoHooks, NullInterrupts};
use sluice_host::{HostedDevice, IntxRelay};
use sluice_pci::PciFunction;
use sluice_virtio_pci::{
    ActivateError, ActivationContext, SharedMemory, TransportOptions, VirtioDevice,
    VirtioPciFunction,
};

use crate::protocol::{
    BAR_PAYLOAD, CONFIG_PAYLOAD, FAILED, HEADER_LEN, IOEVENTFDS_PAYLOAD, MAX_PAYLOAD,
};
use crate::server::DeviceServer;

const BAR0_BASE: u64 = 0xfe00_0000;
const BAR0_SIZE: u64 = sluice_virtio_pci::BAR_SIZE;
/// Bounded so the whole stream fits the socket buffer in one write.
const MAX_STREAM: usize = 16 * 1024;

/// A do-nothing virtio device with one queue.
struct Quiet;

impl VirtioDevice for Quiet {
    fn device_type(&self) -> u16 {
        2
    }
    fn name(&self) -> &str {
        "fuzz0"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _ctx: ActivationContext) -> Result<(), ActivateError> {
        Ok(())
    }
    fn queue_notify(&self, _queue: u16) {}
    fn reset(&mut self) {}
}

/// Checks and counts every access the server lets through.
struct Checked {
    inner: VirtioPciFunction,
    calls: AtomicU64,
}

impl Checked {
    fn config(&self, offset: u16, len: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        assert!(
            matches!(len, 1 | 2 | 4),
            "config access of {len} bytes reached the device"
        );
        assert!(
            usize::from(offset) + len <= 256,
            "config access at {offset:#x}/{len} outside the config space"
        );
    }

    fn bar(&self, bar: u8, offset: u64, len: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        assert_eq!(bar, 0, "access to BAR {bar}, which does not exist");
        assert!(
            matches!(len, 1 | 2 | 4 | 8),
            "BAR access of {len} bytes reached the device"
        );
        assert!(
            offset < BAR0_SIZE,
            "BAR access starts outside the BAR: {offset:#x}"
        );
        // The host wraps every function in a BarGuard, which refuses straddling accesses.
        assert!(
            offset + len as u64 <= BAR0_SIZE,
            "BAR access at {offset:#x}/{len} straddles the end of the {BAR0_SIZE:#x}-byte BAR"
        );
    }
}

impl PciFunction for Checked {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config(offset, data.len());
        self.inner.config_read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        self.config(offset, data.len());
        self.inner.config_write(offset, data);
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        self.bar(bar, offset, data.len());
        self.inner.bar_read(bar, offset, data);
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        self.bar(bar, offset, data.len());
        self.inner.bar_write(bar, offset, data);
    }
    fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
        self.inner.decode_bar(addr, memory)
    }
    fn bar_size(&self, bar: u8) -> Option<u64> {
        self.inner.bar_size(bar)
    }
    fn reset(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.reset();
    }
}

use sluice_devapi::fuzz_support::FuzzInput as Input;

fn header(cmd: i32, size: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&cmd.to_ne_bytes());
    h[8..16].copy_from_slice(&size.to_ne_bytes());
    h
}

fn message(cmd: i32, payload: &[u8]) -> Vec<u8> {
    let mut m = header(cmd, payload.len() as u64);
    m.extend_from_slice(payload);
    m
}

/// Builds the byte stream from the operations.
fn stream(data: &[u8]) -> Vec<u8> {
    let mut inp = Input(data);
    let mut out = Vec::new();
    while out.len() < MAX_STREAM {
        let Some(op) = inp.u8() else { break };
        match op % 8 {
            0 => {
                // Raw bytes.
                let Some(n) = inp.u8() else { break };
                let n = usize::from(n % 64);
                let take = inp.0.len().min(n);
                out.extend_from_slice(&inp.0[..take]);
                inp.0 = &inp.0[take..];
            }
            1 | 2 => {
                // Config read (1) or write (2): offset, value, length (mostly valid).
                let (Some(addr), Some(val), Some(len)) = (inp.u16(), inp.u32(), inp.u8()) else {
                    break;
                };
                let len = if op & 0x80 != 0 {
                    u32::from(len)
                } else {
                    [1, 2, 4][usize::from(len % 3)]
                };
                let addr = if op & 0x40 != 0 {
                    u32::from(addr) << 16 | u32::from(addr)
                } else {
                    u32::from(addr % 0x110)
                };
                let mut p = [0u8; CONFIG_PAYLOAD];
                p[0..4].copy_from_slice(&addr.to_ne_bytes());
                p[4..8].copy_from_slice(&val.to_ne_bytes());
                p[8..12].copy_from_slice(&len.to_ne_bytes());
                out.extend(message(if op % 8 == 2 { 2 } else { 3 }, &p));
            }
            3 | 4 => {
                // BAR write (3) or read (4), at BAR 0 or anywhere.
                let (Some(off), Some(val), Some(size)) = (inp.u16(), inp.u64(), inp.u8()) else {
                    break;
                };
                let addr = if op & 0x80 != 0 {
                    u64::from(off) << 20 | u64::from(size)
                } else {
                    BAR0_BASE + u64::from(off) % (BAR0_SIZE + 0x10)
                };
                let size = if op & 0x40 != 0 {
                    u32::from(size)
                } else {
                    [1, 2, 4, 8][usize::from(size % 4)]
                };
                let mut p = [0u8; BAR_PAYLOAD];
                p[0..8].copy_from_slice(&addr.to_ne_bytes());
                p[8..16].copy_from_slice(&val.to_ne_bytes());
                p[16..20].copy_from_slice(&size.to_ne_bytes());
                p[20] = u8::from(op & 0x20 == 0);
                out.extend(message(if op % 8 == 3 { 4 } else { 5 }, &p));
            }
            5 => out.extend(message(7, &[])),
            6 => {
                // A command with the payload size it should have, fds absent.
                let Some(which) = inp.u8() else { break };
                match which % 5 {
                    0 => out.extend(message(0, &[0u8; MAX_PAYLOAD])),
                    1 => out.extend(message(6, &[])),
                    2 => out.extend(message(1, &[0u8; 8])),
                    // GET_IOEVENTFDS from some index (answered), SET_MSIX_FDS without fds.
                    3 => out.extend(message(9, &u64::from(which).to_ne_bytes())),
                    _ => out.extend(message(10, &[0u8; 8])),
                }
            }
            _ => {
                // Any command with any size and a payload of that size (or cut short).
                let (Some(cmd), Some(size), Some(fill)) = (inp.u8(), inp.u8(), inp.u8()) else {
                    break;
                };
                let cmd = i32::from(cmd as i8);
                let size = u64::from(size);
                out.extend(header(cmd, size));
                let n = if op & 0x80 != 0 { size / 2 } else { size };
                out.extend(std::iter::repeat_n(fill, n as usize));
            }
        }
    }
    out
}

/// What the reference parser expects: the replies in order (`true`: a RET; `false`: a
/// GET_IOEVENTFDS answer, here always empty: the fuzzed function is no virtio function), and
/// whether the stream is malformed (or truncated) somewhere.
fn expected(stream: &[u8]) -> (Vec<bool>, bool) {
    let mut rest = stream;
    let mut replies = Vec::new();
    loop {
        if rest.is_empty() {
            return (replies, false);
        }
        let Some((h, tail)) = rest.split_first_chunk::<HEADER_LEN>() else {
            return (replies, true);
        };
        let cmd = i32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[8..16]);
        let size = u64::from_ne_bytes(s);
        if !(0..=10).contains(&cmd) || size > MAX_PAYLOAD as u64 || tail.len() < size as usize {
            return (replies, true);
        }
        // (payload length, whether QEMU waits for a RET)
        let (want, answered) = match cmd {
            2 | 3 => (CONFIG_PAYLOAD, true),
            4 | 5 => (BAR_PAYLOAD, true),
            7 => (0, true),
            // BAR_WRITE_POSTED: executed, never answered.
            8 => (BAR_PAYLOAD, false),
            // GET_IOEVENTFDS: answered with a doorbell list, not a RET.
            9 => (8, false),
            // SYNC_SYSMEM, SET_IRQFD and SET_MSIX_FDS need fds, which this stream never
            // carries; RET is never sent by QEMU.
            _ => return (replies, true),
        };
        if size as usize != want {
            return (replies, true);
        }
        if answered {
            replies.push(true);
        } else if cmd == 9 {
            replies.push(false);
        }
        rest = &tail[size as usize..];
    }
}

/// Hands `peer` to this thread's drainer, which reads it to EOF and sends back everything it
/// read. The drainer is started on first use and then serves every input (a thread per input
/// cost more than the rest of a short input, above all under AddressSanitizer).
fn drain(peer: UnixStream) -> mpsc::Receiver<Vec<u8>> {
    type Job = (UnixStream, mpsc::Sender<Vec<u8>>);
    thread_local! {
        static DRAINER: RefCell<Option<mpsc::Sender<Job>>> = const { RefCell::new(None) };
    }
    let (done_tx, done_rx) = mpsc::channel();
    DRAINER.with(|d| {
        let mut d = d.borrow_mut();
        let mut job = (peer, done_tx);
        if let Some(tx) = d.as_ref() {
            // A send fails only if the drainer is gone; then a new one is started.
            match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(j)) => job = j,
            }
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("mpqemu-drain".into())
            .spawn(move || {
                for (mut peer, done) in rx {
                    let mut replies = Vec::new();
                    let _ = peer.read_to_end(&mut replies);
                    let _ = done.send(replies);
                }
            });
        assert!(spawned.is_ok(), "cannot start the reply drainer");
        if tx.send(job).is_ok() {
            *d = Some(tx);
        }
    });
    done_rx
}

/// Runs one input; panics when an invariant is violated.
pub fn run(data: &[u8]) {
    let bytes = stream(data);
    let (want_replies, want_error) = expected(&bytes);
    let Ok(inner) = VirtioPciFunction::new(
        Box::new(Quiet),
        TransportOptions {
            bdf: Bdf::new(0, 3, 0),
            access_platform: false,
            msix_vectors: 0,
            class_code: 0x01_00_00,
            iommu: None,
        },
        SharedMemory::default(),
        Arc::new(NullInterrupts),
        Arc::new(NoHooks),
    ) else {
        return;
    };
    // Firmware's BAR assignment: memory decoding on at BAR0_BASE.
    inner.config_write(0x10, &(BAR0_BASE as u32).to_le_bytes());
    inner.config_write(0x04, &0x6u16.to_le_bytes());
    let checked = Arc::new(Checked {
        inner,
        calls: AtomicU64::new(0),
    });
    // As the host does: every function sits behind a BarGuard, which refuses straddling BAR
    // accesses before they reach it.
    let guard = Arc::new(sluice_pci::BarGuard::new(checked.clone()));
    let device = HostedDevice {
        bdf: Bdf::new(0, 3, 0),
        name: "fuzz0".into(),
        function: guard.clone(),
        virtio: None,
        intx: Arc::new(IntxRelay::default()),
        disk: None,
        kind: "virtio-blk",
        behind_iommu: false,
        dma_engine: None,
        points: Vec::new(),
    };
    let Ok((ours, mut qemu)) = UnixStream::pair() else {
        return;
    };
    if qemu.write_all(&bytes).is_err() || qemu.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let server = DeviceServer::new(
        ours,
        device,
        SharedMemory::default(),
        Arc::new(AtomicBool::new(true)),
    );
    let stats = server.stats();
    // Replies are drained concurrently (the socket buffer holds only a few hundred of them),
    // by one long-lived thread rather than a thread spawned per input.
    let pending = drain(qemu);
    let result = server.run();
    let replies = pending.recv().unwrap_or_default();
    assert_eq!(
        result.is_err(),
        want_error,
        "server verdict {result:?} but the reference parser says malformed={want_error}"
    );
    let mut failed = 0u64;
    let mut rets = 0u64;
    let mut rest = replies.as_slice();
    for ret in want_replies {
        let (cmd, size) = if ret {
            (1, 8)
        } else {
            (9, IOEVENTFDS_PAYLOAD as u64)
        };
        let len = HEADER_LEN + size as usize;
        assert!(rest.len() >= len, "missing or partial reply");
        let (r, tail) = rest.split_at(len);
        rest = tail;
        assert_eq!(
            i32::from_ne_bytes([r[0], r[1], r[2], r[3]]),
            cmd,
            "reply kind"
        );
        let mut s = [0u8; 8];
        s.copy_from_slice(&r[8..16]);
        assert_eq!(u64::from_ne_bytes(s), size, "reply size");
        if ret {
            s.copy_from_slice(&r[16..24]);
            failed += u64::from(u64::from_ne_bytes(s) == FAILED);
            rets += 1;
        } else {
            assert!(
                r[16..].iter().all(|b| *b == 0),
                "doorbells of no virtio function"
            );
        }
    }
    assert!(rest.is_empty(), "more replies than requests wanted");
    let accesses =
        stats.config_accesses.load(Ordering::Relaxed) + stats.bar_accesses.load(Ordering::Relaxed);
    let rejected = stats.rejected_accesses.load(Ordering::Relaxed);
    let resets = rets - accesses;
    assert!(
        rejected <= failed,
        "{rejected} rejected accesses but only {failed} all-ones replies"
    );
    assert_eq!(
        checked.calls.load(Ordering::Relaxed),
        accesses - rejected - guard.rejected() + resets,
        "a rejected access reached the device (or an accepted one did not)"
    );
}

#[cfg(test)]
mod tests {
    /// The fuzz body on fixed-seed pseudo-random inputs (the corpus replays in
    /// `tests/fuzz-replay.sh`).
    /// GET_IOEVENTFDS is answered in order with the other replies; SET_MSIX_FDS without
    /// descriptors ends the connection as malformed.
    #[test]
    fn doorbell_list_and_vector_fds_in_the_stream() {
        super::run(&[6, 3, 5, 6, 8, 5]);
        super::run(&[6, 3, 6, 4, 5]);
    }

    #[test]
    fn fuzz_body_on_pseudo_random_inputs() {
        for data in sluice_devapi::fuzz_support::pseudo_random_inputs(0x5eed, 200, 700) {
            super::run(&data);
        }
    }
}
