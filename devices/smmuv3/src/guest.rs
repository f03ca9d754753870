//! Little-endian structure access to guest memory. Every access can fail; callers turn a
//! failure into the event or GERROR bit the architecture names.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

/// A guest-memory access that did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest memory access of {len} bytes at {addr:#x} failed")]
pub struct GuestAccessError {
    /// Address of the access.
    pub addr: u64,
    /// Length of the access.
    pub len: usize,
}

/// Reads `N` little-endian 64-bit words at `addr`.
///
/// The structures read here (descriptors, STEs, CDs, queue entries) are read on every walk, so
/// the common case is one region lookup for the whole structure and one volatile 8-byte load per
/// word, instead of a generic `Bytes` copy per word (`get_slice` resolves the host range once and
/// checks it lies inside one region; `load` is an unaligned-safe volatile read). A structure that
/// straddles two regions, or lies outside guest RAM, takes the word-by-word path, which fails
/// exactly where the guest's address is bad.
///
/// Not inlined: inlined into `translate_inner`'s miss branches it slowed the IOTLB-hit path by
/// about 5 ns (code placement; `docs/benchmarks.md`), more than the call costs a walk.
#[inline(never)]
pub fn read_dwords<M: GuestMemoryBackend, const N: usize>(
    mem: &M,
    addr: u64,
) -> Result<[u64; N], GuestAccessError> {
    let mut out = [0u64; N];
    if let Ok(slice) = mem.get_slice(GuestAddress(addr), N * 8) {
        let mut ok = true;
        for (i, w) in out.iter_mut().enumerate() {
            match slice.get_ref::<u64>(i * 8) {
                Ok(r) => *w = u64::from_le(r.load()),
                Err(_) => ok = false,
            }
        }
        if ok {
            return Ok(out);
        }
    }
    read_dwords_slow(mem, addr)
}

/// Word-by-word reads through `Bytes`: crosses region boundaries, and names the failing access.
#[cold]
fn read_dwords_slow<M: GuestMemoryBackend, const N: usize>(
    mem: &M,
    addr: u64,
) -> Result<[u64; N], GuestAccessError> {
    let err = GuestAccessError { addr, len: N * 8 };
    let mut out = [0u64; N];
    let mut buf = [0u8; 8];
    for (i, w) in out.iter_mut().enumerate() {
        let a = addr.checked_add((i as u64) * 8).ok_or(err)?;
        mem.read_slice(&mut buf, GuestAddress(a)).map_err(|_| err)?;
        *w = u64::from_le_bytes(buf);
    }
    Ok(out)
}

/// Reads one little-endian 64-bit word.
#[inline(never)]
pub fn read_u64<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Result<u64, GuestAccessError> {
    read_dwords::<M, 1>(mem, addr).map(|[w]| w)
}

/// Writes little-endian 64-bit words at `addr`.
pub fn write_dwords<M: GuestMemoryBackend>(
    mem: &M,
    addr: u64,
    words: &[u64],
) -> Result<(), GuestAccessError> {
    let mut buf = Vec::with_capacity(words.len() * 8);
    for w in words {
        buf.extend_from_slice(&w.to_le_bytes());
    }
    mem.write_slice(&buf, GuestAddress(addr))
        .map_err(|_| GuestAccessError {
            addr,
            len: buf.len(),
        })
}

/// Writes one little-endian 32-bit word (an MSI landing in RAM).
pub fn write_u32<M: GuestMemoryBackend>(
    mem: &M,
    addr: u64,
    v: u32,
) -> Result<(), GuestAccessError> {
    mem.write_slice(&v.to_le_bytes(), GuestAddress(addr))
        .map_err(|_| GuestAccessError { addr, len: 4 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Two adjacent regions, then a hole: [0, 4K) [4K, 8K), nothing at [8K, 12K), [12K, 16K).
    fn mem() -> GuestMemoryMmap<()> {
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x3000), 0x1000),
        ])
        .unwrap();
        for a in (0..0x2000u64).step_by(8).chain((0x3000..0x4000).step_by(8)) {
            m.write_obj(a.to_le(), GuestAddress(a)).unwrap();
        }
        m
    }

    #[test]
    fn structures_across_a_region_end_misaligned_or_outside_ram() {
        let m = mem();
        // Inside one region, aligned and not.
        assert_eq!(read_u64(&m, 0x18), Ok(0x18));
        assert_eq!(read_u64(&m, 0x19), Ok(0x20u64 << 56));
        // An STE straddling two adjacent regions is read whole (word-by-word path).
        let w = read_dwords::<_, 8>(&m, 0xfe0).unwrap();
        assert_eq!(
            w,
            [0xfe0, 0xfe8, 0xff0, 0xff8, 0x1000, 0x1008, 0x1010, 0x1018]
        );
        // One running into the hole fails, naming the whole structure.
        assert_eq!(
            read_dwords::<_, 8>(&m, 0x1fe0),
            Err(GuestAccessError {
                addr: 0x1fe0,
                len: 64
            })
        );
        assert!(read_u64(&m, 0x2000).is_err());
        assert!(read_u64(&m, 0x2ffc).is_err());
        assert!(read_u64(&m, 0x3ffc).is_err());
        assert!(read_u64(&m, u64::MAX - 3).is_err());
        assert!(read_dwords::<_, 2>(&m, u64::MAX - 8).is_err());
    }
}
