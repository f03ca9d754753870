//! Guest RAM from QEMU's memory-sync message: each region is a window of a memfd.

use std::fs::File;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::protocol::RamRegion;

/// Mapping guest RAM failed.
#[derive(Debug, Error)]
pub enum MemoryMapError {
    /// mmap of a region failed.
    #[error("cannot map {size:#x} bytes at offset {offset:#x} for GPA {gpa:#x}")]
    Mmap {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// Offset in the memfd.
        offset: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A region is empty, wraps, or overlaps another.
    #[error("invalid RAM layout: {0}")]
    Layout(String),
}

/// Maps every region and builds the guest memory map.
pub fn map_regions(regions: Vec<RamRegion>) -> Result<GuestMemoryMmap, MemoryMapError> {
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let (gpa, size, offset) = (r.gpa, r.size, r.offset);
        if size == 0 || gpa.checked_add(size).is_none() || usize::try_from(size).is_err() {
            return Err(MemoryMapError::Layout(format!("region {gpa:#x}+{size:#x}")));
        }
        let file = File::from(r.fd);
        let region = MmapRegion::from_file(FileOffset::new(file, offset), size as usize).map_err(
            |source| MemoryMapError::Mmap {
                gpa,
                size,
                offset,
                source,
            },
        )?;
        let region = GuestRegionMmap::new(region, GuestAddress(gpa))
            .ok_or_else(|| MemoryMapError::Layout(format!("region {gpa:#x}+{size:#x} wraps")))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryMapError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn memfd(len: u64) -> std::os::fd::OwnedFd {
        let f = tempfile_in_dev_shm(len);
        f.into()
    }

    fn tempfile_in_dev_shm(len: u64) -> File {
        let path =
            std::env::temp_dir().join(format!("sluice-memtest-{}-{len}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(len).unwrap();
        f.write_all(b"hello").unwrap();
        f
    }

    #[test]
    fn maps_windows_of_one_file_at_their_gpas() {
        let fd = memfd(0x20_0000);
        let fd2 = fd.try_clone().unwrap();
        let mem = map_regions(vec![
            RamRegion {
                gpa: 0,
                size: 0xa_0000,
                offset: 0,
                fd,
            },
            RamRegion {
                gpa: 0x10_0000,
                size: 0x10_0000,
                offset: 0x10_0000,
                fd: fd2,
            },
        ])
        .unwrap();
        let mut b = [0u8; 5];
        mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(&b, b"hello");
        mem.write_obj(0xdead_beefu32, GuestAddress(0x10_0000))
            .unwrap();
        assert!(mem.read_obj::<u32>(GuestAddress(0xb_0000)).is_err());
    }

    #[test]
    fn rejects_empty_and_overlapping_regions() {
        let fd = memfd(0x1000);
        assert!(
            map_regions(vec![RamRegion {
                gpa: 0,
                size: 0,
                offset: 0,
                fd
            }])
            .is_err()
        );
        let fd = memfd(0x2000);
        let fd2 = fd.try_clone().unwrap();
        assert!(
            map_regions(vec![
                RamRegion {
                    gpa: 0,
                    size: 0x2000,
                    offset: 0,
                    fd
                },
                RamRegion {
                    gpa: 0x1000,
                    size: 0x1000,
                    offset: 0,
                    fd: fd2
                },
            ])
            .is_err()
        );
        let fd = memfd(0x1000);
        assert!(
            map_regions(vec![RamRegion {
                gpa: u64::MAX - 10,
                size: 0x1000,
                offset: 0,
                fd
            }])
            .is_err()
        );
    }
}
