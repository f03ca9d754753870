//! PCILG / PCISTG: loads and stores to a function's config space (PCIAS 15) and memory BARs
//! (PCIAS 0-5), backed by a small store. Register values are the big-endian reading of the
//! bytes (QEMU byte-swaps the little-endian config space the same way).

use crate::codes::{InsnStatus, ProgramException, status};
use crate::function::{FunctionConfig, FunctionState, fh};
use crate::model::Zpci;

/// Config-space PCIAS.
pub const PCIAS_CONFIG: u8 = 15;
/// Largest BAR PCIAS.
pub const PCIAS_BAR_MAX: u8 = 5;
/// Size of the config space.
pub const CONFIG_SIZE: usize = 4096;
/// Largest BAR backing store.
pub const BAR_CAP: u32 = 64 * 1024;

/// Config space plus BAR backing stores.
#[derive(Debug, Clone)]
pub struct ConfigStore {
    config: Vec<u8>,
    bars: [Vec<u8>; 6],
}

impl ConfigStore {
    /// A store with vendor/device IDs set and zeroed BARs.
    pub fn new(cfg: &FunctionConfig) -> Self {
        let mut config = vec![0u8; CONFIG_SIZE];
        let ids = [cfg.vendor_id.to_le_bytes(), cfg.device_id.to_le_bytes()].concat();
        for (d, s) in config.iter_mut().zip(ids) {
            *d = s;
        }
        let bars = cfg.bar_sizes.map(|sz| vec![0u8; sz.min(BAR_CAP) as usize]);
        ConfigStore { config, bars }
    }

    fn space(&mut self, pcias: u8) -> Option<&mut Vec<u8>> {
        if pcias == PCIAS_CONFIG {
            Some(&mut self.config)
        } else {
            self.bars.get_mut(usize::from(pcias))
        }
    }
}

/// Length/offset rules: BARs take 1-8 bytes within a doubleword, config space 1, 2 or 4 bytes
/// within a word.
fn check_len(pcias: u8, offset: u64, len: u8) -> Result<(), ProgramException> {
    let ok = if pcias == PCIAS_CONFIG {
        matches!(len, 1 | 2 | 4) && u64::from(len) <= 4 - (offset & 3)
    } else {
        (1..=8).contains(&len) && u64::from(len) <= 8 - (offset & 7)
    };
    if ok {
        Ok(())
    } else {
        Err(ProgramException::Operand)
    }
}

impl Zpci {
    fn ls_access(
        &self,
        handle: u32,
        pcias: u8,
        offset: u64,
        len: u8,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> Result<InsnStatus, ProgramException> {
        if handle & fh::ENABLE == 0 {
            return Ok(InsnStatus::INVALID_HANDLE);
        }
        let Some(slot) = self.slot_by_fh(handle) else {
            return Ok(InsnStatus::INVALID_HANDLE);
        };
        let mut g = slot.write();
        if g.fh(slot.idx) != handle {
            return Ok(InsnStatus::INVALID_HANDLE);
        }
        if g.state == FunctionState::Error {
            return Ok(InsnStatus::error(status::PCI_BLOCKED));
        }
        if pcias > PCIAS_BAR_MAX && pcias != PCIAS_CONFIG {
            return Ok(InsnStatus::error(status::PCI_INVAL_AS));
        }
        check_len(pcias, offset, len)?;
        let space = g.store.space(pcias).ok_or(ProgramException::Operand)?;
        let start = usize::try_from(offset).map_err(|_| ProgramException::Operand)?;
        let bytes = space
            .get_mut(start..start.saturating_add(usize::from(len)))
            .filter(|b| b.len() == usize::from(len))
            .ok_or(ProgramException::Operand)?;
        f(bytes);
        Ok(InsnStatus::OK)
    }

    /// PCILG: load `len` bytes at `offset` of address space `pcias`.
    pub fn pcilg(
        &self,
        handle: u32,
        pcias: u8,
        offset: u64,
        len: u8,
    ) -> Result<(InsnStatus, u64), ProgramException> {
        let mut v = 0u64;
        let st = self.ls_access(handle, pcias, offset, len, &mut |b| {
            v = b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
        })?;
        Ok((st, v))
    }

    /// PCISTG: store the low `len` bytes of `data` at `offset` of `pcias`. Vendor and device ID
    /// are read-only.
    pub fn pcistg(
        &self,
        handle: u32,
        pcias: u8,
        offset: u64,
        len: u8,
        data: u64,
    ) -> Result<InsnStatus, ProgramException> {
        let ro = pcias == PCIAS_CONFIG && offset < 4;
        self.ls_access(handle, pcias, offset, len, &mut |b| {
            if ro {
                return;
            }
            let be = data.to_be_bytes();
            let n = b.len();
            if let Some(src) = be.get(8 - n..) {
                b.copy_from_slice(src);
            }
        })
    }
}
