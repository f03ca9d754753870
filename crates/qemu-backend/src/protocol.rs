//! The messages of QEMU's multi-process protocol (`hw/remote/mpqemu-link.h`, QEMU 7.2), parsed
//! from raw bytes. Pure functions: the socket code lives in `channel`.
//!
//! Wire format (x86_64 host, native endianness): a 16-byte header `{ int32 cmd; pad; uint64
//! size }`, then `size` bytes of payload (at most the 192-byte union), with file descriptors
//! attached to the header as SCM_RIGHTS. Replies are `cmd = RET` with an 8-byte value.

use std::os::fd::OwnedFd;

use thiserror::Error;

/// Header size (`offsetof(MPQemuMsg, data)`).
pub const HEADER_LEN: usize = 16;
/// Largest payload: `SyncSysmemMsg` (three arrays of 8 u64).
pub const MAX_PAYLOAD: usize = 192;
/// File descriptors one message may carry.
pub const MAX_FDS: usize = 8;
/// Size of a PCI config message payload.
pub const CONFIG_PAYLOAD: usize = 12;
/// Size of a BAR access payload.
pub const BAR_PAYLOAD: usize = 24;
/// The value QEMU treats as a failed read.
pub const FAILED: u64 = u64::MAX;

/// Command numbers, in the order of QEMU 7.2's `MPQemuCmd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Command {
    /// Guest RAM layout with memfds.
    SyncSysmem = 0,
    /// A reply.
    Ret = 1,
    /// Config space write.
    PciConfigWrite = 2,
    /// Config space read.
    PciConfigRead = 3,
    /// BAR write.
    BarWrite = 4,
    /// BAR read.
    BarRead = 5,
    /// The INTx eventfd pair.
    SetIrqfd = 6,
    /// Device reset.
    DeviceReset = 7,
    /// A BAR write QEMU does not wait for (Sluice's QEMU patch: x-smmuv3-proxy posts
    /// CMDQ_PROD with it). No reply; later requests see its effect (one socket, in order).
    BarWritePosted = 8,
    /// The proxy asks for the device's doorbells from entry `n` on (Sluice's QEMU patch);
    /// answered with a message of the same command carrying [`IoeventfdEntry`]s and one
    /// eventfd each, which QEMU registers as ioeventfds on the BAR.
    GetIoeventfds = 9,
    /// The proxy hands over one eventfd per MSI-X vector, from vector `n` on (Sluice's QEMU
    /// patch: it emulates the MSI-X table and delivers a vector when its eventfd fires).
    SetMsixFds = 10,
    /// s390x, the zPCI channel: QEMU hands over the eventfd Sluice signals when the zPCI model
    /// has PCI error events for the guest (Sluice's QEMU patch, `s390-pci-proxy.c`). No reply.
    ZpciSetEventfd = 11,
    /// s390x: one zPCI operation of a proxied function ([`ZpciInsn`]); answered with a RET
    /// ([`zpci_answer`]).
    ZpciInsn = 12,
    /// s390x: QEMU fetches pending error events; answered with a message of the same command
    /// ([`encode_zpci_events`]).
    ZpciFetchEvents = 13,
    /// arm64, the SMMUv3 channel: QEMU asks for the translation of one device write through
    /// the SMMU (Sluice's QEMU patch: x-smmuv3-proxy is the PCI bus's IOMMU, so an MSI that
    /// `msix_notify()` writes is translated by Sluice's model). [`SmmuTranslate`]; answered
    /// with a RET ([`translate_answer`]).
    SmmuTranslate = 14,
}

impl Command {
    fn from_raw(v: i32) -> Option<Self> {
        Some(match v {
            0 => Command::SyncSysmem,
            1 => Command::Ret,
            2 => Command::PciConfigWrite,
            3 => Command::PciConfigRead,
            4 => Command::BarWrite,
            5 => Command::BarRead,
            6 => Command::SetIrqfd,
            7 => Command::DeviceReset,
            8 => Command::BarWritePosted,
            9 => Command::GetIoeventfds,
            10 => Command::SetMsixFds,
            11 => Command::ZpciSetEventfd,
            12 => Command::ZpciInsn,
            13 => Command::ZpciFetchEvents,
            14 => Command::SmmuTranslate,
            _ => return None,
        })
    }

    /// Whether QEMU waits for a reply to this command.
    pub fn expects_reply(self) -> bool {
        matches!(
            self,
            Command::PciConfigWrite
                | Command::PciConfigRead
                | Command::BarWrite
                | Command::BarRead
                | Command::DeviceReset
                | Command::GetIoeventfds
                | Command::ZpciInsn
                | Command::ZpciFetchEvents
                | Command::SmmuTranslate
        )
    }
}

/// Doorbells per GET_IOEVENTFDS answer (one descriptor each; QEMU accepts at most 7).
pub const MAX_IOEVENTFDS: usize = 7;
/// Size of the GET_IOEVENTFDS answer's payload (`IoeventfdsMsg`): count, more, 7 entries.
pub const IOEVENTFDS_PAYLOAD: usize = 8 + MAX_IOEVENTFDS * 24;
/// `flags` bit of an entry: only writes of `data` ring it.
const IOEVENTFD_MATCH_DATA: u8 = 1;
/// Highest MSI-X vector count (the capability's 11-bit table size).
pub const MAX_MSIX_VECTORS: u64 = 2048;

/// One doorbell as QEMU's proxy registers it (`IoeventfdEntry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoeventfdEntry {
    /// BAR.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Access size.
    pub size: u8,
    /// Value a write must have to ring it, if it must.
    pub datamatch: Option<u64>,
}

/// The GET_IOEVENTFDS answer: header and payload (the descriptors travel beside it).
pub fn encode_ioeventfds(entries: &[IoeventfdEntry], more: bool) -> Vec<u8> {
    let entries = entries.get(..MAX_IOEVENTFDS).unwrap_or(entries);
    let mut p = vec![0u8; IOEVENTFDS_PAYLOAD];
    p[0..4].copy_from_slice(&(entries.len() as u32).to_ne_bytes());
    p[4..8].copy_from_slice(&u32::from(more).to_ne_bytes());
    for (e, chunk) in entries.iter().zip(p[8..].chunks_exact_mut(24)) {
        chunk[0..8].copy_from_slice(&e.offset.to_ne_bytes());
        chunk[8..16].copy_from_slice(&e.datamatch.unwrap_or(0).to_ne_bytes());
        chunk[16] = e.bar;
        chunk[17] = e.size;
        chunk[18] = if e.datamatch.is_some() {
            IOEVENTFD_MATCH_DATA
        } else {
            0
        };
    }
    encode_message(Command::GetIoeventfds, &p)
}

/// Size of a ZPCI_INSN payload (`ZpciInsnMsg`): op, fid, two arguments, the 80-byte FIB.
pub const ZPCI_INSN_PAYLOAD: usize = 24 + ZPCI_FIB_LEN;
/// Bytes of a FIB.
pub const ZPCI_FIB_LEN: usize = 80;
/// Error events per ZPCI_FETCH_EVENTS answer (`MPQEMU_MAX_ZPCI_EVENTS`).
pub const MAX_ZPCI_EVENTS: usize = 11;
/// Size of that answer's payload (`ZpciEventsMsg`): count, more, 11 entries of 16 bytes.
pub const ZPCI_EVENTS_PAYLOAD: usize = 8 + MAX_ZPCI_EVENTS * 16;
/// Answer bit: the model raised a program exception; QEMU's own checks raise it.
pub const ZPCI_ANSWER_PROGRAM: u64 = 1 << 62;

/// The operations of a ZPCI_INSN (`S390_ZPROXY_*` in the QEMU patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZpciOp {
    /// MPCIFC: `arg0` = `oc | dmaas << 16`, `arg1` = the FIB's address, plus the FIB.
    Mpcifc,
    /// RPCIT: `arg0` = first IOVA, `arg1` = length.
    Rpcit,
    /// CLP SET PCI FN enable, which QEMU did.
    Enable,
    /// CLP SET PCI FN disable, which QEMU did.
    Disable,
    /// SCLP configure, which QEMU did.
    Configure,
    /// SCLP deconfigure, which QEMU did (the release).
    Deconfigure,
}

impl ZpciOp {
    fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            1 => ZpciOp::Mpcifc,
            2 => ZpciOp::Rpcit,
            3 => ZpciOp::Enable,
            4 => ZpciOp::Disable,
            5 => ZpciOp::Configure,
            6 => ZpciOp::Deconfigure,
            _ => return None,
        })
    }
}

/// One forwarded zPCI operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZpciInsn {
    /// The operation, or its raw number when unknown (answered as a refusal).
    pub op: Result<ZpciOp, u32>,
    /// Function ID.
    pub fid: u32,
    /// First argument.
    pub arg0: u64,
    /// Second argument.
    pub arg1: u64,
    /// The FIB as the guest stored it (MPCIFC only; zeros otherwise).
    pub fib: [u8; ZPCI_FIB_LEN],
}

/// The RET value of a ZPCI_INSN: condition code in bits 0-7, status in bits 8-15.
pub fn zpci_answer(cc: u8, status: u8) -> u64 {
    u64::from(cc) | u64::from(status) << 8
}

/// One error event as QEMU raises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZpciEventEntry {
    /// Function ID.
    pub fid: u32,
    /// PCI error code.
    pub pec: u16,
    /// Faulting address.
    pub faddr: u64,
}

/// The ZPCI_FETCH_EVENTS answer: header and payload, at most [`MAX_ZPCI_EVENTS`] events.
pub fn encode_zpci_events(events: &[ZpciEventEntry], more: bool) -> Vec<u8> {
    let events = events.get(..MAX_ZPCI_EVENTS).unwrap_or(events);
    let mut p = vec![0u8; ZPCI_EVENTS_PAYLOAD];
    p[0..4].copy_from_slice(&(events.len() as u32).to_ne_bytes());
    p[4..8].copy_from_slice(&u32::from(more).to_ne_bytes());
    for (e, chunk) in events.iter().zip(p[8..].chunks_exact_mut(16)) {
        chunk[0..4].copy_from_slice(&e.fid.to_ne_bytes());
        chunk[4..6].copy_from_slice(&e.pec.to_ne_bytes());
        chunk[8..16].copy_from_slice(&e.faddr.to_ne_bytes());
    }
    encode_message(Command::ZpciFetchEvents, &p)
}

/// Size of an SMMU_TRANSLATE payload (`SmmuTranslateMsg`): IOVA, stream ID, flags.
pub const SMMU_TRANSLATE_PAYLOAD: usize = 16;
/// SMMU_TRANSLATE `flags`: the access reads.
pub const TRANSLATE_READ: u32 = 1;
/// SMMU_TRANSLATE `flags`: the access writes.
pub const TRANSLATE_WRITE: u32 = 2;
/// The granule an SMMU_TRANSLATE answer covers: the 4 KiB page around the IOVA (the SMMU's
/// smallest granule, so a translation holds for the whole page).
pub const TRANSLATE_PAGE: u64 = 0x1000;

/// One access QEMU needs translated: a device write it performs itself (an MSI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuTranslate {
    /// Input address.
    pub iova: u64,
    /// Stream ID (the PCI requester ID on `virt`: bus << 8 | devfn).
    pub sid: u32,
    /// [`TRANSLATE_READ`] | [`TRANSLATE_WRITE`]; other bits are ignored.
    pub flags: u32,
}

/// The RET value of an SMMU_TRANSLATE: the output address of the IOVA's 4 KiB page, with the
/// granted permissions in bits 0-1 ([`TRANSLATE_READ`], [`TRANSLATE_WRITE`]); 0 is a fault.
pub fn translate_answer(page: Option<(u64, u32)>) -> u64 {
    match page {
        Some((pa, perm)) => {
            (pa & !(TRANSLATE_PAGE - 1)) | u64::from(perm & (TRANSLATE_READ | TRANSLATE_WRITE))
        }
        None => 0,
    }
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Command.
    pub command: Command,
    /// Payload length that follows.
    pub payload_len: usize,
}

/// One RAM region of a memory-sync message.
#[derive(Debug)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length.
    pub size: u64,
    /// Offset into the memfd.
    pub offset: u64,
    /// The memfd.
    pub fd: OwnedFd,
}

/// A request from QEMU's proxy.
#[derive(Debug)]
pub enum Request {
    /// Replace the guest memory map.
    SyncSysmem(Vec<RamRegion>),
    /// Config write of `len` bytes at `addr`.
    ConfigWrite {
        /// Offset.
        addr: u32,
        /// Value.
        value: u32,
        /// 1, 2 or 4.
        len: u32,
    },
    /// Config read.
    ConfigRead {
        /// Offset.
        addr: u32,
        /// 1, 2 or 4.
        len: u32,
    },
    /// BAR write at absolute guest address `addr`.
    BarWrite {
        /// Guest-physical (or I/O port) address.
        addr: u64,
        /// Value.
        value: u64,
        /// Access size, a power of two up to 8.
        size: u32,
        /// Memory (true) or I/O space.
        memory: bool,
        /// QEMU does not wait for a reply (`BAR_WRITE_POSTED`): none is sent.
        posted: bool,
    },
    /// BAR read.
    BarRead {
        /// Address.
        addr: u64,
        /// Access size.
        size: u32,
        /// Memory or I/O.
        memory: bool,
    },
    /// INTx eventfds: `intr` raises, `resample` tells us the guest acknowledged.
    SetIrqfd {
        /// Raise eventfd.
        intr: OwnedFd,
        /// Resample eventfd.
        resample: OwnedFd,
    },
    /// Reset the device.
    DeviceReset,
    /// Send the doorbells from entry `first` on.
    GetIoeventfds {
        /// Index of the first doorbell wanted.
        first: u64,
    },
    /// Eventfds of MSI-X vectors `first..first + fds.len()`.
    SetMsixFds {
        /// Vector of the first descriptor.
        first: u64,
        /// One eventfd per vector.
        fds: Vec<OwnedFd>,
    },
    /// The eventfd that tells QEMU the zPCI model has error events.
    ZpciSetEventfd(OwnedFd),
    /// A zPCI operation.
    ZpciInsn(Box<ZpciInsn>),
    /// Send the pending error events.
    ZpciFetchEvents,
    /// Translate one access through the SMMU.
    SmmuTranslate(SmmuTranslate),
}

impl Request {
    /// The command it arrived as.
    pub fn command(&self) -> Command {
        match self {
            Request::SyncSysmem(_) => Command::SyncSysmem,
            Request::ConfigWrite { .. } => Command::PciConfigWrite,
            Request::ConfigRead { .. } => Command::PciConfigRead,
            Request::BarWrite { posted: false, .. } => Command::BarWrite,
            Request::BarWrite { posted: true, .. } => Command::BarWritePosted,
            Request::BarRead { .. } => Command::BarRead,
            Request::SetIrqfd { .. } => Command::SetIrqfd,
            Request::DeviceReset => Command::DeviceReset,
            Request::GetIoeventfds { .. } => Command::GetIoeventfds,
            Request::SetMsixFds { .. } => Command::SetMsixFds,
            Request::ZpciSetEventfd(_) => Command::ZpciSetEventfd,
            Request::ZpciInsn(_) => Command::ZpciInsn,
            Request::ZpciFetchEvents => Command::ZpciFetchEvents,
            Request::SmmuTranslate(_) => Command::SmmuTranslate,
        }
    }

    /// Whether QEMU waits for a RET to it ([`Command::expects_reply`]).
    pub fn expects_reply(&self) -> bool {
        self.command().expects_reply()
    }
}

/// A message that breaks the protocol. The connection cannot continue after it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// Unknown command number.
    #[error("unknown command {0}")]
    UnknownCommand(i32),
    /// Payload larger than any message has.
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte maximum")]
    Oversized(u64),
    /// Too many descriptors.
    #[error("{0} file descriptors exceed the maximum of {MAX_FDS}")]
    TooManyFds(usize),
    /// Payload size does not match the command.
    #[error("{command:?} with a {got}-byte payload (expected {expected})")]
    BadPayload {
        /// Command.
        command: Command,
        /// Received.
        got: usize,
        /// Expected.
        expected: usize,
    },
    /// Wrong number of descriptors for the command.
    #[error("{command:?} with {got} file descriptors")]
    BadFds {
        /// Command.
        command: Command,
        /// Received.
        got: usize,
    },
    /// QEMU sent us a reply; the proxy never does that unprompted.
    #[error("unexpected RET message")]
    UnexpectedReply,
    /// The header was cut short.
    #[error("truncated header ({0} of {HEADER_LEN} bytes)")]
    TruncatedHeader(usize),
    /// SET_MSIX_FDS names vectors beyond the largest MSI-X table.
    #[error("MSI-X vector eventfds from vector {0} exceed {MAX_MSIX_VECTORS} vectors")]
    VectorRange(u64),
    /// A well-formed command this kind of channel has no use for (config space on a platform
    /// device's channel).
    #[error("{0:?} is not served on this channel")]
    NotServed(Command),
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_ne_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_ne_bytes(a)
}

/// Parses a header.
pub fn parse_header(bytes: &[u8]) -> Result<Header, ProtocolError> {
    if bytes.len() < HEADER_LEN {
        return Err(ProtocolError::TruncatedHeader(bytes.len()));
    }
    let raw_cmd = u32_at(bytes, 0) as i32;
    let command = Command::from_raw(raw_cmd).ok_or(ProtocolError::UnknownCommand(raw_cmd))?;
    let size = u64_at(bytes, 8);
    if size > MAX_PAYLOAD as u64 {
        return Err(ProtocolError::Oversized(size));
    }
    Ok(Header {
        command,
        payload_len: size as usize,
    })
}

fn expect_len(command: Command, payload: &[u8], expected: usize) -> Result<(), ProtocolError> {
    if payload.len() == expected {
        Ok(())
    } else {
        Err(ProtocolError::BadPayload {
            command,
            got: payload.len(),
            expected,
        })
    }
}

fn expect_fds(
    command: Command,
    fds: &[OwnedFd],
    ok: impl Fn(usize) -> bool,
) -> Result<(), ProtocolError> {
    if ok(fds.len()) {
        Ok(())
    } else {
        Err(ProtocolError::BadFds {
            command,
            got: fds.len(),
        })
    }
}

/// Parses a complete message.
pub fn parse_request(
    header: Header,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Request, ProtocolError> {
    let command = header.command;
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds(fds.len()));
    }
    match command {
        Command::SyncSysmem => {
            expect_len(command, payload, MAX_PAYLOAD)?;
            expect_fds(command, &fds, |n| n >= 1)?;
            let regions = fds
                .into_iter()
                .enumerate()
                .map(|(i, fd)| RamRegion {
                    gpa: u64_at(payload, 8 * i),
                    size: u64_at(payload, 64 + 8 * i),
                    offset: u64_at(payload, 128 + 8 * i),
                    fd,
                })
                .collect();
            Ok(Request::SyncSysmem(regions))
        }
        Command::PciConfigWrite | Command::PciConfigRead => {
            expect_len(command, payload, CONFIG_PAYLOAD)?;
            expect_fds(command, &fds, |n| n == 0)?;
            let addr = u32_at(payload, 0);
            let len = u32_at(payload, 8);
            Ok(if command == Command::PciConfigWrite {
                Request::ConfigWrite {
                    addr,
                    value: u32_at(payload, 4),
                    len,
                }
            } else {
                Request::ConfigRead { addr, len }
            })
        }
        Command::BarWrite | Command::BarWritePosted | Command::BarRead => {
            expect_len(command, payload, BAR_PAYLOAD)?;
            expect_fds(command, &fds, |n| n == 0)?;
            let addr = u64_at(payload, 0);
            let size = u32_at(payload, 16);
            let memory = payload.get(20).copied().unwrap_or(0) != 0;
            Ok(if command != Command::BarRead {
                Request::BarWrite {
                    addr,
                    value: u64_at(payload, 8),
                    size,
                    memory,
                    posted: command == Command::BarWritePosted,
                }
            } else {
                Request::BarRead { addr, size, memory }
            })
        }
        Command::SetIrqfd => {
            expect_len(command, payload, 0)?;
            expect_fds(command, &fds, |n| n == 2)?;
            let mut it = fds.into_iter();
            match (it.next(), it.next()) {
                (Some(intr), Some(resample)) => Ok(Request::SetIrqfd { intr, resample }),
                _ => Err(ProtocolError::BadFds { command, got: 0 }),
            }
        }
        Command::DeviceReset => {
            expect_len(command, payload, 0)?;
            Ok(Request::DeviceReset)
        }
        Command::GetIoeventfds => {
            expect_len(command, payload, 8)?;
            expect_fds(command, &fds, |n| n == 0)?;
            Ok(Request::GetIoeventfds {
                first: u64_at(payload, 0),
            })
        }
        Command::SetMsixFds => {
            expect_len(command, payload, 8)?;
            expect_fds(command, &fds, |n| (1..MAX_FDS).contains(&n))?;
            let first = u64_at(payload, 0);
            if first.saturating_add(fds.len() as u64) > MAX_MSIX_VECTORS {
                return Err(ProtocolError::VectorRange(first));
            }
            Ok(Request::SetMsixFds { first, fds })
        }
        Command::ZpciSetEventfd => {
            expect_len(command, payload, 8)?;
            expect_fds(command, &fds, |n| n == 1)?;
            fds.into_iter()
                .next()
                .map(Request::ZpciSetEventfd)
                .ok_or(ProtocolError::BadFds { command, got: 0 })
        }
        Command::ZpciInsn => {
            expect_len(command, payload, ZPCI_INSN_PAYLOAD)?;
            expect_fds(command, &fds, |n| n == 0)?;
            let raw = u32_at(payload, 0);
            let mut fib = [0u8; ZPCI_FIB_LEN];
            if let Some(b) = payload.get(24..24 + ZPCI_FIB_LEN) {
                fib.copy_from_slice(b);
            }
            Ok(Request::ZpciInsn(Box::new(ZpciInsn {
                op: ZpciOp::from_raw(raw).ok_or(raw),
                fid: u32_at(payload, 4),
                arg0: u64_at(payload, 8),
                arg1: u64_at(payload, 16),
                fib,
            })))
        }
        Command::ZpciFetchEvents => {
            expect_len(command, payload, 8)?;
            expect_fds(command, &fds, |n| n == 0)?;
            Ok(Request::ZpciFetchEvents)
        }
        Command::SmmuTranslate => {
            expect_len(command, payload, SMMU_TRANSLATE_PAYLOAD)?;
            expect_fds(command, &fds, |n| n == 0)?;
            Ok(Request::SmmuTranslate(SmmuTranslate {
                iova: u64_at(payload, 0),
                sid: u32_at(payload, 8),
                flags: u32_at(payload, 12),
            }))
        }
        Command::Ret => Err(ProtocolError::UnexpectedReply),
    }
}

/// A reply carrying `value`.
pub fn encode_reply(value: u64) -> [u8; HEADER_LEN + 8] {
    let mut b = [0u8; HEADER_LEN + 8];
    b[0..4].copy_from_slice(&(Command::Ret as i32).to_ne_bytes());
    b[8..16].copy_from_slice(&8u64.to_ne_bytes());
    b[16..24].copy_from_slice(&value.to_ne_bytes());
    b
}

/// Encodes a request header + payload as QEMU would send it (for tests and tools).
pub fn encode_message(command: Command, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&(command as i32).to_ne_bytes());
    b[8..16].copy_from_slice(&(payload.len() as u64).to_ne_bytes());
    b.extend_from_slice(payload);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar_payload(addr: u64, val: u64, size: u32, memory: bool) -> Vec<u8> {
        let mut p = vec![0u8; BAR_PAYLOAD];
        p[0..8].copy_from_slice(&addr.to_ne_bytes());
        p[8..16].copy_from_slice(&val.to_ne_bytes());
        p[16..20].copy_from_slice(&size.to_ne_bytes());
        p[20] = u8::from(memory);
        p
    }

    #[test]
    fn parses_bar_and_config_messages() {
        let msg = encode_message(Command::BarWrite, &bar_payload(0xfebf_3000, 0, 2, true));
        let h = parse_header(&msg).unwrap();
        assert_eq!(
            h,
            Header {
                command: Command::BarWrite,
                payload_len: 24
            }
        );
        match parse_request(h, &msg[16..], vec![]).unwrap() {
            Request::BarWrite {
                addr,
                value,
                size,
                memory,
                posted,
            } => {
                assert_eq!(
                    (addr, value, size, memory, posted),
                    (0xfebf_3000, 0, 2, true, false)
                )
            }
            other => panic!("{other:?}"),
        }
        let mut c = vec![0u8; 12];
        c[0..4].copy_from_slice(&0x10u32.to_ne_bytes());
        c[4..8].copy_from_slice(&0xffff_ffffu32.to_ne_bytes());
        c[8..12].copy_from_slice(&4u32.to_ne_bytes());
        let msg = encode_message(Command::PciConfigWrite, &c);
        let h = parse_header(&msg).unwrap();
        assert!(matches!(
            parse_request(h, &msg[16..], vec![]).unwrap(),
            Request::ConfigWrite {
                addr: 0x10,
                value: 0xffff_ffff,
                len: 4
            }
        ));
        assert!(Command::PciConfigRead.expects_reply());
        assert!(!Command::SetIrqfd.expects_reply());
        assert!(!Command::BarWritePosted.expects_reply());
        // The same payload as BAR_WRITE; only the reply differs.
        let posted = encode_message(Command::BarWritePosted, &[0u8; 24]);
        let req = parse_request(parse_header(&posted).unwrap(), &posted[16..], vec![]).unwrap();
        assert!(matches!(req, Request::BarWrite { posted: true, .. }));
        assert_eq!(req.command(), Command::BarWritePosted);
        assert!(!req.expects_reply());
        assert!(!Command::SyncSysmem.expects_reply());
    }

    #[test]
    fn rejects_truncated_oversized_and_unknown() {
        assert_eq!(
            parse_header(&[0u8; 7]),
            Err(ProtocolError::TruncatedHeader(7))
        );
        let mut h = encode_message(Command::BarRead, &[]);
        h[8..16].copy_from_slice(&193u64.to_ne_bytes());
        assert_eq!(parse_header(&h), Err(ProtocolError::Oversized(193)));
        h[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(parse_header(&h), Err(ProtocolError::Oversized(u64::MAX)));
        let mut h = encode_message(Command::BarRead, &[]);
        h[0..4].copy_from_slice(&99i32.to_ne_bytes());
        assert_eq!(parse_header(&h), Err(ProtocolError::UnknownCommand(99)));
        h[0..4].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(parse_header(&h), Err(ProtocolError::UnknownCommand(-1)));
    }

    #[test]
    fn rejects_payload_and_fd_mismatches() {
        let h = Header {
            command: Command::BarRead,
            payload_len: 23,
        };
        assert_eq!(
            parse_request(h, &[0u8; 23], vec![]).unwrap_err(),
            ProtocolError::BadPayload {
                command: Command::BarRead,
                got: 23,
                expected: 24
            }
        );
        let h = Header {
            command: Command::SetIrqfd,
            payload_len: 0,
        };
        assert_eq!(
            parse_request(h, &[], vec![]).unwrap_err(),
            ProtocolError::BadFds {
                command: Command::SetIrqfd,
                got: 0
            }
        );
        let h = Header {
            command: Command::SyncSysmem,
            payload_len: 192,
        };
        assert_eq!(
            parse_request(h, &[0u8; 192], vec![]).unwrap_err(),
            ProtocolError::BadFds {
                command: Command::SyncSysmem,
                got: 0
            }
        );
        let h = Header {
            command: Command::Ret,
            payload_len: 8,
        };
        assert_eq!(
            parse_request(h, &[0u8; 8], vec![]).unwrap_err(),
            ProtocolError::UnexpectedReply
        );
        let h = Header {
            command: Command::DeviceReset,
            payload_len: 4,
        };
        assert!(parse_request(h, &[0u8; 4], vec![]).is_err());
    }

    #[test]
    fn sync_sysmem_takes_one_region_per_fd() {
        let mut p = vec![0u8; 192];
        p[0..8].copy_from_slice(&0u64.to_ne_bytes());
        p[8..16].copy_from_slice(&0x10_0000u64.to_ne_bytes());
        p[64..72].copy_from_slice(&0xa_0000u64.to_ne_bytes());
        p[72..80].copy_from_slice(&0x1ff0_0000u64.to_ne_bytes());
        p[128..136].copy_from_slice(&0u64.to_ne_bytes());
        p[136..144].copy_from_slice(&0x10_0000u64.to_ne_bytes());
        let fds: Vec<OwnedFd> = (0..2)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let h = Header {
            command: Command::SyncSysmem,
            payload_len: 192,
        };
        match parse_request(h, &p, fds).unwrap() {
            Request::SyncSysmem(r) => {
                assert_eq!(r.len(), 2);
                assert_eq!(
                    (r[1].gpa, r[1].size, r[1].offset),
                    (0x10_0000, 0x1ff0_0000, 0x10_0000)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ioeventfd_and_msix_messages() {
        let msg = encode_message(Command::GetIoeventfds, &7u64.to_ne_bytes());
        let h = parse_header(&msg).unwrap();
        assert!(matches!(
            parse_request(h, &msg[16..], vec![]).unwrap(),
            Request::GetIoeventfds { first: 7 }
        ));
        assert!(Command::GetIoeventfds.expects_reply());
        assert!(!Command::SetMsixFds.expects_reply());
        let fd = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
        let h = Header {
            command: Command::SetMsixFds,
            payload_len: 8,
        };
        match parse_request(h, &2u64.to_ne_bytes(), vec![fd(), fd()]).unwrap() {
            Request::SetMsixFds { first, fds } => assert_eq!((first, fds.len()), (2, 2)),
            other => panic!("{other:?}"),
        }
        // No descriptor, too many, or vectors past any MSI-X table: refused.
        assert!(parse_request(h, &0u64.to_ne_bytes(), vec![]).is_err());
        assert!(parse_request(h, &0u64.to_ne_bytes(), (0..8).map(|_| fd()).collect()).is_err());
        assert_eq!(
            parse_request(h, &2047u64.to_ne_bytes(), vec![fd(), fd()]).unwrap_err(),
            ProtocolError::VectorRange(2047)
        );
        assert!(parse_request(h, &u64::MAX.to_ne_bytes(), vec![fd()]).is_err());
        // The answer's layout is QEMU's IoeventfdsMsg.
        let e = IoeventfdEntry {
            bar: 0,
            offset: 0x3004,
            size: 2,
            datamatch: Some(1),
        };
        let b = encode_ioeventfds(&[e; 9], true);
        assert_eq!(b.len(), HEADER_LEN + IOEVENTFDS_PAYLOAD);
        assert_eq!(u32_at(&b, 0), Command::GetIoeventfds as u32);
        assert_eq!(u64_at(&b, 8), IOEVENTFDS_PAYLOAD as u64);
        assert_eq!(
            (u32_at(&b, 16), u32_at(&b, 20)),
            (7, 1),
            "at most 7 per answer"
        );
        assert_eq!((u64_at(&b, 24), u64_at(&b, 32)), (0x3004, 1));
        assert_eq!(&b[40..43], &[0, 2, 1]);
    }

    #[test]
    fn reply_layout() {
        let r = encode_reply(0x1234);
        assert_eq!(i32::from_ne_bytes(r[0..4].try_into().unwrap()), 1);
        assert_eq!(u64::from_ne_bytes(r[8..16].try_into().unwrap()), 8);
        assert_eq!(u64::from_ne_bytes(r[16..24].try_into().unwrap()), 0x1234);
    }

    #[test]
    fn zpci_messages_parse_and_refuse_wrong_shapes() {
        let mut p = vec![0u8; ZPCI_INSN_PAYLOAD];
        p[0..4].copy_from_slice(&2u32.to_ne_bytes());
        p[4..8].copy_from_slice(&0x18u32.to_ne_bytes());
        p[8..16].copy_from_slice(&0x1_0000_0000u64.to_ne_bytes());
        p[16..24].copy_from_slice(&0x2000u64.to_ne_bytes());
        p[24] = 0xab;
        let h = Header {
            command: Command::ZpciInsn,
            payload_len: p.len(),
        };
        match parse_request(h, &p, vec![]).unwrap() {
            Request::ZpciInsn(i) => {
                assert_eq!(i.op, Ok(ZpciOp::Rpcit));
                assert_eq!(
                    (i.fid, i.arg0, i.arg1, i.fib[0]),
                    (0x18, 0x1_0000_0000, 0x2000, 0xab)
                );
            }
            other => panic!("{other:?}"),
        }
        p[0..4].copy_from_slice(&9u32.to_ne_bytes());
        match parse_request(h, &p, vec![]).unwrap() {
            Request::ZpciInsn(i) => assert_eq!(i.op, Err(9)),
            other => panic!("{other:?}"),
        }
        assert!(Command::ZpciInsn.expects_reply() && Command::ZpciFetchEvents.expects_reply());
        assert!(!Command::ZpciSetEventfd.expects_reply());
        let short = Header {
            command: Command::ZpciInsn,
            payload_len: 8,
        };
        assert!(matches!(
            parse_request(short, &p[..8], vec![]),
            Err(ProtocolError::BadPayload { .. })
        ));
        let no_fd = Header {
            command: Command::ZpciSetEventfd,
            payload_len: 8,
        };
        assert!(matches!(
            parse_request(no_fd, &[0u8; 8], vec![]),
            Err(ProtocolError::BadFds { .. })
        ));
        // The events answer: count, more, entries of fid / pec / address.
        let m = encode_zpci_events(
            &[ZpciEventEntry {
                fid: 0x20,
                pec: 4,
                faddr: 0x1_0100_0000,
            }],
            true,
        );
        assert_eq!(m.len(), HEADER_LEN + ZPCI_EVENTS_PAYLOAD);
        assert_eq!(u32_at(&m, HEADER_LEN), 1);
        assert_eq!(u32_at(&m, HEADER_LEN + 4), 1);
        assert_eq!(u32_at(&m, HEADER_LEN + 8), 0x20);
        assert_eq!(u64_at(&m, HEADER_LEN + 16), 0x1_0100_0000);
    }

    #[test]
    fn smmu_translate_parses_and_answers_a_page_and_its_permissions() {
        let mut p = [0u8; SMMU_TRANSLATE_PAYLOAD];
        p[0..8].copy_from_slice(&0x0800_0040u64.to_ne_bytes());
        p[8..12].copy_from_slice(&0x0008u32.to_ne_bytes());
        p[12..16].copy_from_slice(&TRANSLATE_WRITE.to_ne_bytes());
        let h = Header {
            command: Command::SmmuTranslate,
            payload_len: p.len(),
        };
        match parse_request(h, &p, vec![]).unwrap() {
            Request::SmmuTranslate(t) => assert_eq!(
                t,
                SmmuTranslate {
                    iova: 0x0800_0040,
                    sid: 8,
                    flags: TRANSLATE_WRITE
                }
            ),
            other => panic!("{other:?}"),
        }
        assert!(Command::SmmuTranslate.expects_reply());
        assert!(matches!(
            parse_request(h, &p[..8], vec![]),
            Err(ProtocolError::BadPayload { .. })
        ));
        // The page of the output address, the permissions below it; a fault is 0.
        assert_eq!(
            translate_answer(Some((0x0809_0040, TRANSLATE_WRITE))),
            0x0809_0002
        );
        assert_eq!(
            translate_answer(Some((0x4000_1fff, TRANSLATE_READ | TRANSLATE_WRITE | 0x10))),
            0x4000_1003
        );
        assert_eq!(translate_answer(None), 0);
    }
}
