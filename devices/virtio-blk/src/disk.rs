//! Backing stores.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Random-access storage behind a block device.
pub trait Disk: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn flush(&self) -> io::Result<()>;
    /// Size in bytes.
    fn size(&self) -> u64;
}

/// A raw image file.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
}

impl RawDisk {
    /// Opens `path` read-write, or read-only when `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(RawDisk { file, size })
    }
}

impl Disk for RawDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// A disk in host memory (tests, benchmarks, scratch disks): fixed size, zero-filled.
#[derive(Debug)]
pub struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        MemDisk(Mutex::new(vec![0; size]))
    }

    /// The contents, locked (a poisoned lock still gives the bytes).
    pub fn contents(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The byte range `[offset, offset + len)` (it may still lie past the end).
    fn range(offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| past_end())?;
        let end = start.checked_add(len).ok_or_else(past_end)?;
        Ok(start..end)
    }
}

fn past_end() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "access past the end of the disk",
    )
}

impl Disk for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = Self::range(offset, buf.len())?;
        buf.copy_from_slice(self.contents().get(r).ok_or_else(past_end)?);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = Self::range(offset, buf.len())?;
        self.contents()
            .get_mut(r)
            .ok_or_else(past_end)?
            .copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.contents().len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_disk_keeps_what_is_written_and_refuses_accesses_past_its_end() {
        let d = MemDisk::new(4096);
        d.write_at(&[7; 512], 1024).unwrap();
        let mut b = [0u8; 512];
        d.read_at(&mut b, 1024).unwrap();
        assert_eq!(b, [7; 512]);
        assert_eq!(d.size(), 4096);
        assert!(d.read_at(&mut b, 4096 - 256).is_err());
        assert!(d.write_at(&b, u64::MAX).is_err());
        assert!(
            d.contents()[3584..].iter().all(|&x| x == 0),
            "a refused write writes nothing"
        );
    }
}
