//! One request: parse the header, move the data, write the status byte.

use std::io::{Read, Write};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemory;

use crate::SECTOR_SIZE;
use crate::disk::Disk;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Device ID string.
pub const T_GET_ID: u32 = 8;

/// Status values.
pub const S_OK: u8 = 0;
/// I/O error.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;

/// The 16-byte header a driver puts first in a request: type, reserved, sector (little
/// endian).
pub fn request_header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Length of the GET_ID string.
pub const ID_LEN: usize = 20;
const HEADER_LEN: usize = 16;
/// Data is moved in chunks of this size so a hostile length never sizes an allocation.
const CHUNK: usize = 64 * 1024;

/// Why a request failed. Guest-caused variants end as a status byte, never as a panic.
#[derive(Debug, Error)]
pub enum BlockRequestError {
    /// The chain cannot be walked (bad address, loop, bad indirect table).
    #[error("guest gave a malformed descriptor chain: {0}")]
    MalformedChain(#[source] virtio_queue::Error),
    /// No writable byte for the status.
    #[error("guest gave a chain without a writable status byte")]
    NoStatusByte,
    /// The header is shorter than 16 bytes.
    #[error("guest gave a request header shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    /// Access past the end of the disk or not sector-sized.
    #[error("guest asked for {len} bytes at sector {sector}, outside the {capacity}-byte disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Disk size.
        capacity: u64,
    },
    /// Write to a read-only disk.
    #[error("guest wrote to a read-only disk")]
    ReadOnly,
    /// Host I/O failed.
    #[error("host I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What the device does with one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into the chain (the used length).
    pub used_len: u32,
    /// Status byte written (None if there was nowhere to write it).
    pub status: Option<u8>,
    /// Request type, if the header could be read.
    pub kind: Option<u32>,
    /// Payload bytes moved.
    pub bytes: u64,
}

/// Everything a request needs besides the chain.
pub struct RequestEnv<'a> {
    /// Backing store.
    pub disk: &'a dyn Disk,
    /// Device ID string for GET_ID.
    pub id: &'a [u8; ID_LEN],
    /// Refuse OUT.
    pub read_only: bool,
}

fn check_range(sector: u64, len: u64, capacity: u64) -> Result<u64, BlockRequestError> {
    let start = sector.checked_mul(SECTOR_SIZE);
    match start.and_then(|s| s.checked_add(len).map(|e| (s, e))) {
        Some((s, e)) if e <= capacity && len.is_multiple_of(SECTOR_SIZE) => Ok(s),
        _ => Err(BlockRequestError::OutOfRange {
            sector,
            len,
            capacity,
        }),
    }
}

/// Moves `len` bytes through a bounded buffer, one chunk at a time: `step(chunk, disk_offset)`
/// fills or drains `chunk` on both sides. A hostile length never sizes an allocation.
fn copy_chunked(
    start: u64,
    len: u64,
    mut step: impl FnMut(&mut [u8], u64) -> Result<(), BlockRequestError>,
) -> Result<(), BlockRequestError> {
    let mut buf = vec![0u8; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        let chunk = buf.get_mut(..n).ok_or(BlockRequestError::NoStatusByte)?;
        step(chunk, start + done)?;
        done += n as u64;
    }
    Ok(())
}

fn copy_disk_to_guest(
    env: &RequestEnv<'_>,
    w: &mut Writer<'_>,
    start: u64,
    len: u64,
) -> Result<(), BlockRequestError> {
    copy_chunked(start, len, |chunk, off| {
        env.disk.read_at(chunk, off)?;
        Ok(w.write_all(chunk)?)
    })
}

fn copy_guest_to_disk(
    env: &RequestEnv<'_>,
    r: &mut Reader<'_>,
    start: u64,
    len: u64,
) -> Result<(), BlockRequestError> {
    copy_chunked(start, len, |chunk, off| {
        r.read_exact(chunk)?;
        Ok(env.disk.write_at(chunk, off)?)
    })
}

/// Executes the request in `chain`. Errors become status bytes; the returned completion says
/// what to put in the used ring.
pub fn execute<M, T>(
    mem: &M,
    chain: DescriptorChain<T>,
    env: &RequestEnv<'_>,
) -> (Completion, Option<BlockRequestError>)
where
    M: GuestMemory<Bitmap = ()>,
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let mut done = Completion {
        used_len: 0,
        status: None,
        kind: None,
        bytes: 0,
    };
    let (mut reader, writer) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => return (done, Some(BlockRequestError::MalformedChain(e))),
    };
    let mut data_w = writer;
    let Some(data_len) = data_w.available_bytes().checked_sub(1) else {
        return (done, Some(BlockRequestError::NoStatusByte));
    };
    let mut status_w = match data_w.split_at(data_len) {
        Ok(s) => s,
        Err(e) => return (done, Some(BlockRequestError::MalformedChain(e))),
    };
    let mut header = [0u8; HEADER_LEN];
    let outcome = if reader.read_exact(&mut header).is_err() {
        Err(BlockRequestError::ShortHeader)
    } else {
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(s);
        done.kind = Some(kind);
        run(
            kind,
            sector,
            env,
            &mut reader,
            &mut data_w,
            data_len as u64,
            &mut done,
        )
    };
    let (status, err) = match outcome {
        Ok(status) => (status, None),
        Err(e) => (S_IOERR, Some(e)),
    };
    if status_w.write_all(&[status]).is_ok() {
        done.status = Some(status);
        done.used_len = (data_w.bytes_written() + 1) as u32;
    }
    (done, err)
}

fn run(
    kind: u32,
    sector: u64,
    env: &RequestEnv<'_>,
    reader: &mut Reader<'_>,
    data_w: &mut Writer<'_>,
    data_len: u64,
    done: &mut Completion,
) -> Result<u8, BlockRequestError> {
    match kind {
        T_IN => {
            let start = check_range(sector, data_len, env.disk.size())?;
            copy_disk_to_guest(env, data_w, start, data_len)?;
            done.bytes = data_len;
        }
        T_OUT => {
            if env.read_only {
                return Err(BlockRequestError::ReadOnly);
            }
            let len = reader.available_bytes() as u64;
            let start = check_range(sector, len, env.disk.size())?;
            copy_guest_to_disk(env, reader, start, len)?;
            done.bytes = len;
        }
        T_FLUSH => env.disk.flush()?,
        T_GET_ID => {
            let n = (data_len as usize).min(ID_LEN);
            data_w.write_all(env.id.get(..n).unwrap_or(&[]))?;
        }
        _ => return Ok(S_UNSUPP),
    }
    Ok(S_OK)
}

#[cfg(test)]
mod tests;
