//! CLP (Call Logical Processor) commands the guest uses to find and enable functions:
//! LIST PCI, QUERY PCI FN (DMA window `sdma`/`edma`), QUERY PCI FN GROUP (DMA address-space mask
//! `dasm`) and SET PCI FN (enable/disable). Typed requests and responses; response codes as
//! Linux `asm/pci_clp.h` defines them.

use sluice_devapi::ZpciState;
use thiserror::Error;

use crate::function::{FunctionState, Transition, fh};
use crate::model::Zpci;

/// CLP response codes.
pub mod rc {
    /// Command completed.
    pub const OK: u16 = 0x0010;
    /// Invalid PCI function handle.
    pub const SETPCIFN_FH: u16 = 0x0101;
    /// Function handle not valid for the operation.
    pub const SETPCIFN_FHOP: u16 = 0x0102;
    /// Invalid number of DMA address spaces.
    pub const SETPCIFN_DMAAS: u16 = 0x0103;
    /// Insufficient resources.
    pub const SETPCIFN_RES: u16 = 0x0104;
    /// Unrecognized function group.
    pub const QUERYPCIFG_PFGID: u16 = 0x010b;
}

/// A CLP command that did not complete: the response code the guest reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("CLP response code {0:#06x}")]
pub struct ClpRc(pub u16);

/// One LIST PCI entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClpListEntry {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Configured (not standby).
    pub configured: bool,
    /// Function ID.
    pub fid: u32,
    /// Current handle.
    pub fh: u32,
}

/// QUERY PCI FN response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClpQueryPciFn {
    /// Function ID.
    pub fid: u32,
    /// UID.
    pub uid: u32,
    /// Function group.
    pub pfgid: u8,
    /// Start of the DMA range.
    pub sdma: u64,
    /// End (inclusive) of the DMA range.
    pub edma: u64,
    /// BAR sizes as log2 (0 = absent).
    pub bar_size: [u8; 6],
}

/// QUERY PCI FN GROUP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClpQueryPciFnGroup {
    /// DMA address-space mask.
    pub dasm: u64,
    /// MSI address.
    pub msia: u64,
    /// Max store-block length.
    pub maxstbl: u16,
    /// Refresh required (the hypervisor shadows the tables; RPCIT on map too).
    pub refresh: bool,
    /// Supported designation types (bit for region-third).
    pub dtsm: u8,
}

/// SET PCI FN operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetPciFnOp {
    /// Enable with `ndas` DMA address spaces (must be 1).
    Enable {
        /// Number of DMA address spaces.
        ndas: u8,
    },
    /// Disable (resets the function: drops IOAT, translations, interrupts).
    Disable,
}

/// MSI address QEMU advertises.
const MSIA: u64 = 0xfe00_0000_0000_0000;

impl Zpci {
    /// LIST PCI: every function that is not reserved.
    pub fn clp_list(&self) -> Vec<ClpListEntry> {
        self.slots
            .iter()
            .filter_map(|s| {
                let g = s.read();
                (g.state != FunctionState::Reserved).then(|| ClpListEntry {
                    vendor_id: s.cfg.vendor_id,
                    device_id: s.cfg.device_id,
                    configured: g.state.is_configured(),
                    fid: s.cfg.fid,
                    fh: g.fh(s.idx),
                })
            })
            .collect()
    }

    /// QUERY PCI FN by handle.
    pub fn clp_query_pci_fn(&self, handle: u32) -> Result<ClpQueryPciFn, ClpRc> {
        let s = self.slot_by_fh(handle).ok_or(ClpRc(rc::SETPCIFN_FH))?;
        if s.read().fh(s.idx) != handle {
            return Err(ClpRc(rc::SETPCIFN_FH));
        }
        let mut bar_size = [0u8; 6];
        for (o, sz) in bar_size.iter_mut().zip(s.cfg.bar_sizes) {
            *o = if sz == 0 {
                0
            } else {
                sz.next_power_of_two().trailing_zeros() as u8
            };
        }
        Ok(ClpQueryPciFn {
            fid: s.cfg.fid,
            uid: s.cfg.uid,
            pfgid: s.cfg.pfgid,
            sdma: s.cfg.sdma,
            edma: s.cfg.edma,
            bar_size,
        })
    }

    /// QUERY PCI FN GROUP.
    pub fn clp_query_pci_fn_group(&self, pfgid: u8) -> Result<ClpQueryPciFnGroup, ClpRc> {
        let edma = self
            .slots
            .iter()
            .filter(|s| s.cfg.pfgid == pfgid)
            .map(|s| s.cfg.edma)
            .max()
            .ok_or(ClpRc(rc::QUERYPCIFG_PFGID))?;
        Ok(ClpQueryPciFnGroup {
            dasm: u64::MAX >> edma.leading_zeros(),
            msia: MSIA,
            maxstbl: 128,
            refresh: self
                .slots
                .iter()
                .any(|s| s.cfg.pfgid == pfgid && s.cfg.refresh_required),
            dtsm: 0x40,
        })
    }

    /// SET PCI FN: enable or disable; returns the new handle.
    pub fn clp_set_pci_fn(&self, handle: u32, op: SetPciFnOp) -> Result<u32, ClpRc> {
        let s = self.slot_by_fh(handle).ok_or(ClpRc(rc::SETPCIFN_FH))?;
        // No lock held: a race injector may park the caller here.
        self.hooks.point(&sluice_devapi::PointCtx {
            point: match op {
                SetPciFnOp::Enable { .. } => crate::POINT_ENABLE,
                SetPciFnOp::Disable => crate::POINT_DISABLE,
            },
            endpoint: Some(sluice_devapi::Endpoint::Zpci { fh: handle }),
            domain: None,
            value: u64::from(s.cfg.fid),
        });
        let (new_fh, change) = {
            let mut g = s.write();
            if g.fh(s.idx) != handle {
                return Err(ClpRc(rc::SETPCIFN_FH));
            }
            match op {
                SetPciFnOp::Enable { ndas } => {
                    match ndas {
                        0 => return Err(ClpRc(rc::SETPCIFN_DMAAS)),
                        1 => {}
                        _ => return Err(ClpRc(rc::SETPCIFN_RES)),
                    }
                    if handle & fh::ENABLE != 0 {
                        return Err(ClpRc(rc::SETPCIFN_FHOP));
                    }
                    g.transition(Transition::Enable)
                        .map_err(|_| ClpRc(rc::SETPCIFN_FHOP))?;
                    (g.fh(s.idx), ZpciState::Enable { epoch: g.epoch })
                }
                SetPciFnOp::Disable => {
                    if handle & fh::ENABLE == 0 {
                        return Err(ClpRc(rc::SETPCIFN_FHOP));
                    }
                    g.transition(Transition::Disable)
                        .map_err(|_| ClpRc(rc::SETPCIFN_FHOP))?;
                    let freed = g.drop_translations("DISABLE");
                    self.budget.give(freed);
                    g.irq = None;
                    g.fmb_addr = 0;
                    (g.fh(s.idx), ZpciState::Disable { epoch: g.epoch })
                }
            }
        };
        self.emit_state(change, new_fh);
        self.report_drops(s);
        Ok(new_fh)
    }
}
