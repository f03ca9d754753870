//! A guest-side table builder that mirrors what Linux's s390 DMA code writes
//! (`dma_alloc_cpu_table`, `dma_update_cpu_trans`): new region and segment tables filled with
//! invalid entries, page tables with invalid PTEs, big-endian entries, a region-third IOTA.
//! Used by tests, benches, the fuzz body and (later) a guest-side shim's host tests.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::walk::{bits, px, rtx, sx};

/// Why a table edit failed.
#[derive(Debug, Error)]
pub enum GuestTableError {
    /// The table arena is full.
    #[error("table arena exhausted")]
    OutOfSpace,
    /// Guest memory could not be accessed.
    #[error("guest memory access at {addr:#x} failed")]
    Memory {
        /// Address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Tables allocated from a bump arena `[next, limit)` in guest memory.
#[derive(Debug, Clone)]
pub struct GuestTables {
    /// Region-third table origin.
    pub rt: u64,
    next: u64,
    limit: u64,
}

/// Reads a big-endian u64 from guest memory.
pub fn read_be<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Result<u64, GuestTableError> {
    let mut b = [0u8; 8];
    mem.read_slice(&mut b, GuestAddress(addr))
        .map_err(|source| GuestTableError::Memory { addr, source })?;
    Ok(u64::from_be_bytes(b))
}

/// Writes a big-endian u64 to guest memory.
pub fn write_be<M: GuestMemoryBackend>(mem: &M, addr: u64, v: u64) -> Result<(), GuestTableError> {
    mem.write_slice(&v.to_be_bytes(), GuestAddress(addr))
        .map_err(|source| GuestTableError::Memory { addr, source })
}

impl GuestTables {
    /// Creates an empty region-third table at the start of the arena `[base, limit)`.
    pub fn new<M: GuestMemoryBackend>(
        mem: &M,
        base: u64,
        limit: u64,
    ) -> Result<Self, GuestTableError> {
        let mut t = GuestTables {
            rt: 0,
            next: base,
            limit,
        };
        t.rt = t.alloc(mem, 0x4000, 2048, bits::TE_INVALID)?;
        Ok(t)
    }

    fn alloc<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        size: u64,
        entries: usize,
        fill: u64,
    ) -> Result<u64, GuestTableError> {
        let at = self
            .next
            .checked_add(size - 1)
            .ok_or(GuestTableError::OutOfSpace)?
            & !(size - 1);
        let end = at.checked_add(size).ok_or(GuestTableError::OutOfSpace)?;
        if end > self.limit {
            return Err(GuestTableError::OutOfSpace);
        }
        let buf: Vec<u8> = std::iter::repeat_n(fill.to_be_bytes(), entries)
            .flatten()
            .collect();
        mem.write_slice(&buf, GuestAddress(at))
            .map_err(|source| GuestTableError::Memory { addr: at, source })?;
        self.next = end;
        Ok(at)
    }

    /// The IOTA Linux registers: `ZPCI_IOTA_RTTO_FLAG | origin`.
    pub fn iota(&self) -> u64 {
        self.rt | bits::IOTA_T | (u64::from(bits::DT_RTTO) << bits::IOTA_DT_SHIFT)
    }

    /// Address of the region-third entry for `iova`.
    pub fn rte_addr(&self, iova: u64) -> u64 {
        self.rt + rtx(iova) * 8
    }

    /// Address of the segment entry for `iova`, allocating the segment table if needed.
    pub fn ste_addr<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        iova: u64,
    ) -> Result<u64, GuestTableError> {
        let ra = self.rte_addr(iova);
        let rte = read_be(mem, ra)?;
        let sto = if rte & bits::TE_INVALID != 0 || rte == 0 {
            let sto = self.alloc(mem, 0x4000, 2048, bits::TE_INVALID)?;
            write_be(mem, ra, sto | bits::TE_TYPE_RTX | bits::RTE_LEN_MASK)?;
            sto
        } else {
            rte & bits::RTE_ADDR_MASK
        };
        Ok(sto + sx(iova) * 8)
    }

    /// Address of the page entry for `iova`, allocating tables if needed.
    pub fn pte_addr<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        iova: u64,
    ) -> Result<u64, GuestTableError> {
        let sa = self.ste_addr(mem, iova)?;
        let ste = read_be(mem, sa)?;
        let pto = if ste & bits::TE_INVALID != 0 || ste & bits::TE_FC != 0 || ste == 0 {
            let pto = self.alloc(mem, 0x800, 256, bits::PTE_INVALID)?;
            write_be(mem, sa, pto | bits::TE_TYPE_SX)?;
            pto
        } else {
            ste & bits::STE_ADDR_MASK
        };
        Ok(pto + px(iova) * 8)
    }

    /// Maps the 4 KiB page at `iova` to `gpa` (read-only unless `writable`).
    pub fn map<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        iova: u64,
        gpa: u64,
        writable: bool,
    ) -> Result<(), GuestTableError> {
        let pa = self.pte_addr(mem, iova)?;
        let prot = if writable { 0 } else { bits::PROT };
        write_be(mem, pa, (gpa & bits::PTE_ADDR_MASK) | prot)
    }

    /// Maps `pages` consecutive pages.
    pub fn map_range<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        iova: u64,
        gpa: u64,
        pages: u64,
        writable: bool,
    ) -> Result<(), GuestTableError> {
        for i in 0..pages {
            self.map(mem, iova + i * 0x1000, gpa + i * 0x1000, writable)?;
        }
        Ok(())
    }

    /// Invalidates the page at `iova` (Linux writes `ZPCI_PTE_INVALID`).
    pub fn unmap<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        iova: u64,
    ) -> Result<(), GuestTableError> {
        let pa = self.pte_addr(mem, iova)?;
        write_be(mem, pa, bits::PTE_INVALID)
    }

    /// Maps the 1 MiB segment at `iova` to the 1 MiB frame at `gpa` (format control set).
    pub fn map_segment<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        iova: u64,
        gpa: u64,
        writable: bool,
    ) -> Result<(), GuestTableError> {
        let sa = self.ste_addr(mem, iova)?;
        let prot = if writable { 0 } else { bits::PROT };
        write_be(
            mem,
            sa,
            (gpa & bits::SFAA_MASK) | bits::TE_FC | bits::TE_TYPE_SX | prot,
        )
    }
}
