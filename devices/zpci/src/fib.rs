//! The Function Information Block (FIB) MPCIFC reads: 80 bytes, big-endian, 8-byte aligned.
//!
//! Layout: `fmt` u8 @0, `fc` u8 @8, `pba` u64 @16, `pal` u64 @24, `iota` u64 @32, `data` u32 @40,
//! `aibv` u64 @48, `aisb` u64 @56, `fmb_addr` u64 @64, `gd` u32 @76.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Size of a FIB in bytes.
pub const FIB_LEN: usize = 80;

/// A decoded FIB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fib {
    /// Format; only 0 is defined.
    pub fmt: u8,
    /// Function controls (STPCIFC output; ignored by MPCIFC).
    pub fc: u8,
    /// PCI base address: first IOVA of the DMA window.
    pub pba: u64,
    /// PCI address limit: last IOVA of the DMA window.
    pub pal: u64,
    /// I/O translation anchor.
    pub iota: u64,
    /// Interrupt parameters (ISC, NOI, AIBVO, SUM, AISBO).
    pub data: u32,
    /// Adapter interrupt bit-vector address.
    pub aibv: u64,
    /// Adapter interrupt summary-bit address.
    pub aisb: u64,
    /// Function-measurement block address (low 4 bits: key).
    pub fmb_addr: u64,
    /// Guest designation.
    pub gd: u32,
}

/// A FIB that could not be fetched.
#[derive(Debug, Error)]
pub enum FibError {
    /// The FIB address is not doubleword aligned (specification exception).
    #[error("FIB address {0:#x} is not 8-byte aligned")]
    Misaligned(u64),
    /// Guest memory at the FIB address could not be read (addressing exception).
    #[error("FIB at {addr:#x} is not readable")]
    Unreadable {
        /// FIB address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn be64(b: &[u8; FIB_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

fn be32(b: &[u8; FIB_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

fn put(b: &mut [u8; FIB_LEN], at: usize, bytes: &[u8]) {
    if let Some(s) = b.get_mut(at..at + bytes.len()) {
        s.copy_from_slice(bytes);
    }
}

impl Fib {
    /// Decodes the 80-byte block.
    pub fn parse(b: &[u8; FIB_LEN]) -> Fib {
        Fib {
            fmt: b[0],
            fc: b[8],
            pba: be64(b, 16),
            pal: be64(b, 24),
            iota: be64(b, 32),
            data: be32(b, 40),
            aibv: be64(b, 48),
            aisb: be64(b, 56),
            fmb_addr: be64(b, 64),
            gd: be32(b, 76),
        }
    }

    /// Encodes the block (what a guest would write before MPCIFC).
    pub fn to_bytes(&self) -> [u8; FIB_LEN] {
        let mut b = [0u8; FIB_LEN];
        b[0] = self.fmt;
        b[8] = self.fc;
        put(&mut b, 16, &self.pba.to_be_bytes());
        put(&mut b, 24, &self.pal.to_be_bytes());
        put(&mut b, 32, &self.iota.to_be_bytes());
        put(&mut b, 40, &self.data.to_be_bytes());
        put(&mut b, 48, &self.aibv.to_be_bytes());
        put(&mut b, 56, &self.aisb.to_be_bytes());
        put(&mut b, 64, &self.fmb_addr.to_be_bytes());
        put(&mut b, 76, &self.gd.to_be_bytes());
        b
    }

    /// Fetches and decodes the FIB at `addr` in guest memory.
    pub fn read<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Result<Fib, FibError> {
        if addr & 7 != 0 {
            return Err(FibError::Misaligned(addr));
        }
        let mut b = [0u8; FIB_LEN];
        mem.read_slice(&mut b, GuestAddress(addr))
            .map_err(|source| FibError::Unreadable { addr, source })?;
        Ok(Fib::parse(&b))
    }

    /// Interruption subclass.
    pub fn isc(&self) -> u8 {
        ((self.data >> 28) & 0x7) as u8
    }
    /// Number of interrupts (MSI vectors).
    pub fn noi(&self) -> u16 {
        ((self.data >> 16) & 0xfff) as u16
    }
    /// Offset of the first bit in the adapter bit vector.
    pub fn aibvo(&self) -> u8 {
        ((self.data >> 8) & 0x3f) as u8
    }
    /// Summary-bit enable.
    pub fn sum(&self) -> bool {
        (self.data >> 7) & 1 == 1
    }
    /// Offset of the summary bit.
    pub fn aisbo(&self) -> u8 {
        (self.data & 0x3f) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_offsets() {
        let f = Fib {
            fmt: 0,
            fc: 0x80,
            pba: 0x1_0000_0000,
            pal: 0x1_ffff_ffff,
            iota: 0xabc0_0804,
            data: 0x3004_0105,
            aibv: 0x1000,
            aisb: 0x2000,
            fmb_addr: 0x3000,
            gd: 9,
        };
        let b = f.to_bytes();
        assert_eq!(&b[16..24], &0x1_0000_0000u64.to_be_bytes());
        assert_eq!(&b[24..32], &0x1_ffff_ffffu64.to_be_bytes());
        assert_eq!(&b[32..40], &0xabc0_0804u64.to_be_bytes());
        assert_eq!(Fib::parse(&b), f);
        assert_eq!(
            (f.isc(), f.noi(), f.aibvo(), f.sum(), f.aisbo()),
            (3, 4, 1, false, 5)
        );
    }
}
