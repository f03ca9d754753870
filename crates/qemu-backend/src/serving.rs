//! What the PCI server ([`crate::server`]) and the platform server ([`crate::platform`]) share:
//! the receive / execute / reply loop, guest memory updates from SYNC_SYSMEM, and taking
//! ownership of the eventfds SET_IRQFD carries. Each server keeps only what its kind of device
//! means by a request.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_virtio_pci::SharedMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{Channel, ChannelError};
use crate::memory::map_regions;
use crate::protocol::{RamRegion, Request};
use crate::server::ServeError;

/// What goes back to QEMU for a request that wants an answer.
pub(crate) enum Reply {
    /// A RET with this value.
    Value(u64),
    /// A whole message with descriptors attached (the GET_IOEVENTFDS answer). The descriptors
    /// stay owned by the handler; QEMU gets copies.
    Message {
        /// Header and payload.
        bytes: Vec<u8>,
        /// Descriptors to pass with it.
        fds: Vec<RawFd>,
    },
}

/// One connection's device end, as the loop in [`serve`] drives it.
pub(crate) trait Handler {
    /// The device's name, for errors.
    fn device_name(&self) -> &str;
    /// The connection.
    fn channel(&mut self) -> &mut Channel;
    /// Executes one request; `Some(reply)` is what to send back.
    fn handle(&mut self, request: Request) -> Result<Option<Reply>, ServeError>;
}

/// `source` as the error of device `device`.
pub(crate) fn channel_error(device: &str, source: ChannelError) -> ServeError {
    ServeError::Channel {
        device: device.to_string(),
        source,
    }
}

/// Handles messages until QEMU closes the connection (`Ok`), a message breaks the protocol or
/// the socket fails (`Err`).
pub(crate) fn serve(h: &mut impl Handler) -> Result<(), ServeError> {
    loop {
        let request = match h.channel().recv() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(channel_error(h.device_name(), e)),
        };
        // Whether a RET goes back is the protocol's (a posted write is executed like any
        // other, but QEMU is not waiting for it), not the handler's.
        let wanted = request.expects_reply();
        let sent = match h.handle(request)? {
            Some(Reply::Value(v)) if wanted => h.channel().reply(v),
            Some(Reply::Message { bytes, fds }) if wanted => {
                h.channel().send_with_fds(&bytes, &fds)
            }
            _ => Ok(()),
        };
        if let Err(e) = sent {
            return Err(channel_error(h.device_name(), ChannelError::Io(e)));
        }
    }
}

/// Maps the RAM layout of a SYNC_SYSMEM and makes it the memory every user of `mem` sees from
/// now on; counts it in `syncs`.
pub(crate) fn sync_memory(
    device: &str,
    mem: &SharedMemory,
    regions: Vec<RamRegion>,
    syncs: &AtomicU64,
) -> Result<(), ServeError> {
    let mapped = map_regions(regions).map_err(|source| ServeError::Memory {
        device: device.to_string(),
        source,
    })?;
    mem.replace(mapped);
    syncs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A descriptor from SET_IRQFD as the eventfd it is.
pub(crate) fn into_eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: `fd` is an owned descriptor (QEMU sent it to us, or a test made it); ownership
    // moves into the EventFd, which closes it exactly once. If it is not an eventfd after all,
    // reads and writes on it fail with an error, nothing worse.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}
