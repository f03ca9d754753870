//! Reading protocol messages (with their file descriptors) from the proxy's socket, and
//! writing replies.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::poll::{PollCounters, poll_briefly};
use crate::protocol::{self, HEADER_LEN, Header, MAX_FDS, ProtocolError, Request};

/// Receiving a message failed.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("socket I/O failed")]
    Io(#[from] io::Error),
    /// The message breaks the protocol.
    #[error("malformed protocol message")]
    Protocol(#[from] ProtocolError),
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed inside a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The kernel dropped descriptors because our control buffer was too small.
    #[error("file descriptors were truncated in transit")]
    FdsTruncated,
}

impl ChannelError {
    /// The peer went away (the socket reset or a message cut short), as when QEMU exits or is
    /// killed, rather than sending something wrong.
    pub fn peer_gone(&self) -> bool {
        match self {
            ChannelError::Truncated { .. } => true,
            ChannelError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            ChannelError::Protocol(_) | ChannelError::FdsTruncated => false,
        }
    }
}

/// One end of a proxy connection.
pub struct Channel {
    sock: UnixStream,
    /// How long to poll for the next message after one before blocking (zero: block at once).
    poll_budget: Duration,
    poll_counters: Arc<PollCounters>,
    /// A message came: the next wait starts by polling.
    busy: bool,
}

/// Room for MAX_FDS descriptors plus headers, 8-byte aligned as cmsg requires.
const CMSG_WORDS: usize = 16;

pub(crate) fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, ChannelError> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; CMSG_WORDS];
    // SAFETY: an all-zero msghdr is a valid empty header; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at a live iovec over `buf` and a live control buffer of the stated
    // size; recvmsg writes only within them.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `msg` was filled by a successful recvmsg, so its control fields are consistent.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/NXTHDR return null or a pointer to a complete header inside
        // `control`.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure size computation.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let count =
                (hdr.cmsg_len as usize).saturating_sub(header_len) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS message holds `count` descriptors.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count` stays inside the message's data; unaligned read because
                // CMSG_DATA only guarantees byte alignment in general.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed `raw` in our table; we are its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `cmsg` is a valid header of `msg`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ChannelError::FdsTruncated);
    }
    Ok(n as usize)
}

impl Channel {
    /// Wraps a connected socket.
    pub fn new(sock: UnixStream) -> Self {
        Channel {
            sock,
            poll_budget: Duration::ZERO,
            poll_counters: Arc::default(),
            busy: false,
        }
    }

    /// After each message, [`Channel::recv`] polls the socket for up to `budget` before it
    /// blocks, counting in `counters`: a guest that busy-waits for an answer and then sends the
    /// next request at once (an SMMUv3 driver's CMD_SYNCs, a zPCI driver's RPCITs) is then
    /// served without a thread wake-up. Only a SCHED_FIFO thread should poll: at SCHED_OTHER it
    /// would hold the core the guest's vCPU needs to send that request.
    pub fn set_poll_budget(&mut self, budget: Duration, counters: Arc<PollCounters>) {
        self.poll_budget = budget;
        self.poll_counters = counters;
    }

    /// Polls (without sleeping) until the socket has something to read, or is closed or
    /// failed (the blocking read then sees which), or the budget since the last message
    /// passes.
    fn poll_for_next(&mut self) {
        if self.poll_budget.is_zero() || !std::mem::take(&mut self.busy) {
            return;
        }
        let mut pfd = [libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        poll_briefly(&mut pfd, self.poll_budget, &self.poll_counters);
    }

    /// The next [`Channel::recv`] blocks at once instead of polling: the message just handled
    /// is not one that another soon follows, and its sender needs a core more than this
    /// thread needs to catch the next message early.
    pub fn skip_next_poll(&mut self) {
        self.busy = false;
    }

    /// Receives one request. `Ok(None)` means the peer closed the connection between messages.
    pub fn recv(&mut self) -> Result<Option<Request>, ChannelError> {
        self.poll_for_next();
        let mut header = [0u8; HEADER_LEN];
        let mut fds = Vec::new();
        let mut got = 0;
        while got < HEADER_LEN {
            let rest = header.get_mut(got..).unwrap_or(&mut []);
            let n = recv_with_fds(self.sock.as_raw_fd(), rest, &mut fds)?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(ChannelError::Truncated {
                        got,
                        want: HEADER_LEN,
                    })
                };
            }
            got += n;
            if fds.len() > MAX_FDS {
                return Err(ProtocolError::TooManyFds(fds.len()).into());
            }
        }
        self.busy = true;
        let h: Header = protocol::parse_header(&header)?;
        let mut payload = vec![0u8; h.payload_len];
        let mut have = 0;
        while have < payload.len() {
            let n = self.sock.read(payload.get_mut(have..).unwrap_or(&mut []))?;
            if n == 0 {
                return Err(ChannelError::Truncated {
                    got: HEADER_LEN + have,
                    want: HEADER_LEN + h.payload_len,
                });
            }
            have += n;
        }
        Ok(Some(protocol::parse_request(h, &payload, fds)?))
    }

    /// Sends a reply.
    pub fn reply(&mut self, value: u64) -> io::Result<()> {
        self.sock.write_all(&protocol::encode_reply(value))
    }

    /// Sends a whole message with `fds` attached to its first byte (SCM_RIGHTS), as QEMU's
    /// `mpqemu_msg_recv` expects them. The descriptors stay ours; the peer gets copies.
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.is_empty() {
            return self.sock.write_all(bytes);
        }
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many descriptors for one message",
            ));
        }
        let mut control = [0u64; CMSG_WORDS];
        let fd_bytes = std::mem::size_of_val(fds);
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty header; the pointers set below outlive
        // the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation; MAX_FDS descriptors fit in `control`.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        // SAFETY: `msg` has a control buffer of at least one header plus `fd_bytes`, so
        // CMSG_FIRSTHDR is non-null and its data has room for the descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
        // SAFETY: `msg` points at live buffers; sendmsg only reads them.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // The descriptors went with the first byte; the rest is a plain write.
        self.sock
            .write_all(bytes.get(n as usize..).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, encode_message};
    use std::sync::atomic::Ordering;

    /// A reset, a broken pipe or a message cut short means QEMU's side went away; a malformed
    /// message or other I/O failure does not.
    #[test]
    fn only_a_vanished_peer_counts_as_gone() {
        let io_err = |k| ChannelError::Io(io::Error::from(k));
        assert!(io_err(io::ErrorKind::ConnectionReset).peer_gone());
        assert!(io_err(io::ErrorKind::BrokenPipe).peer_gone());
        assert!(ChannelError::Truncated { got: 3, want: 8 }.peer_gone());
        assert!(!io_err(io::ErrorKind::PermissionDenied).peer_gone());
        assert!(!ChannelError::FdsTruncated.peer_gone());
    }

    /// The first message is waited for by blocking; one sent while the channel polls after
    /// the previous one is counted as caught; a poll that sees nothing ends at its budget and
    /// the read then blocks as usual.
    /// A channel that polls 5 s after each message, having received a first one; QEMU's end
    /// of it and the poll counters.
    fn polling_after_one_message() -> (Channel, UnixStream, Arc<PollCounters>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let counters = Arc::new(PollCounters::default());
        let mut ch = Channel::new(a);
        ch.set_poll_budget(Duration::from_secs(5), counters.clone());
        b.write_all(&encode_message(Command::DeviceReset, &[]))
            .unwrap();
        assert!(ch.recv().unwrap().is_some());
        (ch, b, counters)
    }

    /// Sends one message on `b` after 20 ms, from another thread.
    fn send_soon(mut b: UnixStream) -> std::thread::JoinHandle<UnixStream> {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(&encode_message(Command::DeviceReset, &[]))
                .unwrap();
            b
        })
    }

    #[test]
    fn a_message_sent_within_the_poll_budget_is_caught() {
        let (mut ch, b, counters) = polling_after_one_message();
        assert_eq!(
            counters.caught.load(Ordering::Relaxed),
            0,
            "nothing to poll after yet"
        );
        let sender = send_soon(b);
        assert!(ch.recv().unwrap().is_some());
        assert_eq!(counters.caught.load(Ordering::Relaxed), 1);
        let mut b = sender.join().unwrap();
        // A short budget runs out before the next message.
        ch.set_poll_budget(Duration::from_micros(50), counters.clone());
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.write_all(&encode_message(Command::DeviceReset, &[]))
                .unwrap();
            b
        });
        assert!(ch.recv().unwrap().is_some());
        assert_eq!(counters.expired.load(Ordering::Relaxed), 1);
        drop(late.join().unwrap());
        assert!(ch.recv().unwrap().is_none(), "the close is still seen");
    }

    /// After `skip_next_poll` the next wait blocks at once: a message that comes later is
    /// received, but not counted as caught by a poll, and no poll expires either.
    #[test]
    fn a_skipped_poll_blocks_at_once() {
        let (mut ch, b, counters) = polling_after_one_message();
        ch.skip_next_poll();
        let sender = send_soon(b);
        assert!(ch.recv().unwrap().is_some());
        assert_eq!(counters.caught.load(Ordering::Relaxed), 0);
        assert_eq!(counters.expired.load(Ordering::Relaxed), 0);
        drop(sender.join().unwrap());
    }

    #[test]
    fn clean_close_between_messages_is_none() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(Channel::new(a).recv().unwrap().is_none());
    }

    #[test]
    fn truncated_message_is_an_error_not_a_hang() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let msg = encode_message(Command::BarRead, &[0u8; 24]);
        b.write_all(&msg[..20]).unwrap();
        drop(b);
        assert!(matches!(
            Channel::new(a).recv(),
            Err(ChannelError::Truncated { got: 20, want: 40 })
        ));
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&msg[..5]).unwrap();
        drop(b);
        assert!(matches!(
            Channel::new(a).recv(),
            Err(ChannelError::Truncated { got: 5, want: 16 })
        ));
    }

    #[test]
    fn oversized_and_garbage_are_protocol_errors() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut msg = encode_message(Command::BarRead, &[]);
        msg[8..16].copy_from_slice(&4096u64.to_ne_bytes());
        b.write_all(&msg).unwrap();
        assert!(matches!(
            Channel::new(a).recv(),
            Err(ChannelError::Protocol(ProtocolError::Oversized(4096)))
        ));
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[0xff; 40]).unwrap();
        assert!(matches!(
            Channel::new(a).recv(),
            Err(ChannelError::Protocol(_))
        ));
    }

    #[test]
    fn message_split_across_writes_is_reassembled_and_reply_is_sent() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let msg = encode_message(Command::DeviceReset, &[]);
        b.write_all(&msg[..3]).unwrap();
        let t = std::thread::spawn(move || {
            b.write_all(&msg[3..]).unwrap();
            let mut r = [0u8; 24];
            b.read_exact(&mut r).unwrap();
            r
        });
        let mut ch = Channel::new(a);
        assert!(matches!(ch.recv().unwrap(), Some(Request::DeviceReset)));
        ch.reply(7).unwrap();
        assert_eq!(t.join().unwrap(), protocol::encode_reply(7));
    }
}
