//! Parsing: the bytes of one request chain → a typed [`Request`], with no side effects.
//!
//! A request is a device-readable part (head + body) followed by a device-writable part
//! (PROBE properties, then the 4-byte tail). The device only sees the lengths of both parts
//! and the first [`MAX_READABLE`] readable bytes; this module decides what they mean:
//!
//! - no room for a tail, no head, an unknown type, or a writable part too large to answer
//!   → the buffer is returned unwritten with used length 0 ([`RequestError::status`] is None);
//! - a readable or writable part of the wrong size for its type, or nonzero reserved bytes
//!   where the spec says MUST be zero (ATTACH) or MAY be refused (UNMAP) → `S_INVAL`.

use thiserror::Error;

use crate::spec::{
    ATTACH_LEN, DETACH_LEN, HEAD_LEN, MAP_LEN, PROBE_LEN, RESV_MEM_PROP_LEN, Status, T_ATTACH,
    T_DETACH, T_MAP, T_PROBE, T_UNMAP, TAIL_LEN, UNMAP_LEN,
};

/// The longest readable part of any request (PROBE).
pub const MAX_READABLE: usize = PROBE_LEN;
/// The largest writable part the device answers (zero-filled up to the tail).
pub const MAX_WRITABLE: u64 = 64 * 1024;

/// One parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Attach `endpoint` to `domain` (creating it).
    Attach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
        /// `VIRTIO_IOMMU_ATTACH_F_*`.
        flags: u32,
    },
    /// Detach `endpoint` from `domain`.
    Detach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
    },
    /// Map `[virt_start, virt_end]` to `phys_start`.
    Map {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// First guest-physical address.
        phys_start: u64,
        /// `VIRTIO_IOMMU_MAP_F_*`.
        flags: u32,
    },
    /// Unmap every mapping inside `[virt_start, virt_end]`.
    Unmap {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
    },
    /// Report the properties of `endpoint`.
    Probe {
        /// Endpoint ID.
        endpoint: u32,
    },
}

impl Request {
    /// Wire type.
    pub fn kind(&self) -> u8 {
        match self {
            Request::Attach { .. } => T_ATTACH,
            Request::Detach { .. } => T_DETACH,
            Request::Map { .. } => T_MAP,
            Request::Unmap { .. } => T_UNMAP,
            Request::Probe { .. } => T_PROBE,
        }
    }
}

/// Why a request could not be turned into a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RequestError {
    /// The writable part cannot hold a tail.
    #[error("writable part of {0} bytes has no room for the tail")]
    NoTail(u64),
    /// The writable part is larger than the device answers.
    #[error("writable part of {0} bytes is too large")]
    WritableTooLarge(u64),
    /// The readable part cannot hold a head.
    #[error("readable part of {0} bytes has no room for the head")]
    NoHead(u64),
    /// Unknown request type.
    #[error("unknown request type {0}")]
    UnknownType(u8),
    /// A part has the wrong size for the type.
    #[error(
        "type {kind}: readable {readable} / writable {writable} bytes, expected {want_readable} / {want_writable}"
    )]
    BadLength {
        /// Request type.
        kind: u8,
        /// Readable bytes given.
        readable: u64,
        /// Writable bytes given.
        writable: u64,
        /// Readable bytes expected.
        want_readable: usize,
        /// Writable bytes expected.
        want_writable: u64,
    },
    /// Reserved bytes the device checks are not zero.
    #[error("type {0}: reserved field is not zero")]
    ReservedNotZero(u8),
}

impl RequestError {
    /// The status to write, or None when the buffer goes back unwritten (used length 0).
    pub fn status(&self) -> Option<Status> {
        match self {
            RequestError::NoTail(_)
            | RequestError::WritableTooLarge(_)
            | RequestError::NoHead(_)
            | RequestError::UnknownType(_) => None,
            RequestError::BadLength { .. } | RequestError::ReservedNotZero(_) => {
                Some(Status::Inval)
            }
        }
    }

    /// The request type, when the head was readable and known.
    pub fn kind(&self) -> Option<u8> {
        match self {
            RequestError::BadLength { kind, .. } | RequestError::ReservedNotZero(kind) => {
                Some(*kind)
            }
            _ => None,
        }
    }
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn zero(b: &[u8], off: usize, len: usize) -> bool {
    b.get(off..off + len)
        .is_some_and(|s| s.iter().all(|&x| x == 0))
}

/// Parses one request. `readable` holds the first `min(readable_len, MAX_READABLE)` readable
/// bytes; `probe_size` is the device's configured value.
pub fn parse(
    readable: &[u8],
    readable_len: u64,
    writable_len: u64,
    probe_size: u32,
) -> Result<Request, RequestError> {
    if writable_len < TAIL_LEN as u64 {
        return Err(RequestError::NoTail(writable_len));
    }
    if writable_len > MAX_WRITABLE {
        return Err(RequestError::WritableTooLarge(writable_len));
    }
    let Some(&kind) = readable.first().filter(|_| readable_len >= HEAD_LEN as u64) else {
        return Err(RequestError::NoHead(readable_len));
    };
    let (want_readable, want_writable) = match kind {
        T_ATTACH => (ATTACH_LEN, TAIL_LEN as u64),
        T_DETACH => (DETACH_LEN, TAIL_LEN as u64),
        T_MAP => (MAP_LEN, TAIL_LEN as u64),
        T_UNMAP => (UNMAP_LEN, TAIL_LEN as u64),
        T_PROBE => (PROBE_LEN, u64::from(probe_size) + TAIL_LEN as u64),
        other => return Err(RequestError::UnknownType(other)),
    };
    if readable_len != want_readable as u64
        || writable_len != want_writable
        || readable.len() < want_readable
    {
        return Err(RequestError::BadLength {
            kind,
            readable: readable_len,
            writable: writable_len,
            want_readable,
            want_writable,
        });
    }
    let b = readable;
    Ok(match kind {
        T_ATTACH => {
            if !zero(b, 16, 4) {
                return Err(RequestError::ReservedNotZero(kind));
            }
            Request::Attach {
                domain: le32(b, 4),
                endpoint: le32(b, 8),
                flags: le32(b, 12),
            }
        }
        // DETACH and PROBE reserved fields MUST be ignored.
        T_DETACH => Request::Detach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
        },
        T_MAP => Request::Map {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
            phys_start: le64(b, 24),
            flags: le32(b, 32),
        },
        T_UNMAP => {
            if !zero(b, 24, 4) {
                return Err(RequestError::ReservedNotZero(kind));
            }
            Request::Unmap {
                domain: le32(b, 4),
                virt_start: le64(b, 8),
                virt_end: le64(b, 16),
            }
        }
        _ => Request::Probe {
            endpoint: le32(b, 4),
        },
    })
}

/// Encodes `regions` (`(start, end, subtype)`) as RESV_MEM properties in a zero-filled buffer
/// of `probe_size` bytes. None if they do not fit.
pub fn encode_probe(
    regions: impl Iterator<Item = (u64, u64, u8)>,
    probe_size: u32,
) -> Option<Vec<u8>> {
    let mut out = vec![0u8; usize::try_from(probe_size).ok()?];
    let mut off = 0usize;
    for (start, end, subtype) in regions {
        let mut p = [0u8; RESV_MEM_PROP_LEN];
        p[0..2].copy_from_slice(&crate::spec::PROBE_T_RESV_MEM.to_le_bytes());
        p[2..4].copy_from_slice(&((RESV_MEM_PROP_LEN - 4) as u16).to_le_bytes());
        p[4] = subtype;
        p[8..16].copy_from_slice(&start.to_le_bytes());
        p[16..24].copy_from_slice(&end.to_le_bytes());
        out.get_mut(off..off + RESV_MEM_PROP_LEN)?
            .copy_from_slice(&p);
        off += RESV_MEM_PROP_LEN;
    }
    Some(out)
}

/// Wire encoding of a request's readable part (for tests, benches and fuzzing).
pub fn encode(req: &Request) -> Vec<u8> {
    let mut b = vec![req.kind(), 0, 0, 0];
    match *req {
        Request::Attach {
            domain,
            endpoint,
            flags,
        } => {
            b.extend_from_slice(&domain.to_le_bytes());
            b.extend_from_slice(&endpoint.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        Request::Detach { domain, endpoint } => {
            b.extend_from_slice(&domain.to_le_bytes());
            b.extend_from_slice(&endpoint.to_le_bytes());
            b.extend_from_slice(&[0; 8]);
        }
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => {
            b.extend_from_slice(&domain.to_le_bytes());
            b.extend_from_slice(&virt_start.to_le_bytes());
            b.extend_from_slice(&virt_end.to_le_bytes());
            b.extend_from_slice(&phys_start.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
        }
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => {
            b.extend_from_slice(&domain.to_le_bytes());
            b.extend_from_slice(&virt_start.to_le_bytes());
            b.extend_from_slice(&virt_end.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        Request::Probe { endpoint } => {
            b.extend_from_slice(&endpoint.to_le_bytes());
            b.extend_from_slice(&[0; 64]);
        }
    }
    b
}

/// The writable size a well-formed request of type `kind` needs.
pub fn writable_len(kind: u8, probe_size: u32) -> u64 {
    if kind == T_PROBE {
        u64::from(probe_size) + TAIL_LEN as u64
    } else {
        TAIL_LEN as u64
    }
}
