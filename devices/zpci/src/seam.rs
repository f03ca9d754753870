//! One zPCI function behind the translation seam, so a PCI function's DMA is translated by this
//! model exactly as a device model does it for any IOMMU. The model owns the shadow IOTLB under
//! test and reports every DMA to the hooks itself, so the seam is used in its model-owned form
//! ([`EndpointIommu::model_owned`]): no second cache, no second report.
//!
//! The device is bound to its function ID, not to a handle: the guest gets a new function
//! handle at every enable, while the hardware function (and its DMA) stays the same one. Each
//! access uses the handle the function has now, so DMA under a stale handle is refused by the
//! model as it would be by the machine.

use std::fmt;
use std::sync::Arc;

use sluice_devapi::{
    DmaFault, DmaResolution, DmaTranslate, Endpoint, EndpointIommu, Hooks, TableMemory,
};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::Zpci;
use crate::codes::reason;

/// Translates the DMA of one zPCI function through a [`Zpci`].
pub struct FunctionTranslator {
    zpci: Arc<Zpci>,
    mem: TableMemory,
    fid: u32,
}

impl fmt::Debug for FunctionTranslator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionTranslator")
            .field("fid", &self.fid)
            .finish()
    }
}

impl FunctionTranslator {
    /// Function `fid` of `zpci`, walking DMA tables in `mem`. `None` when `zpci` has no such
    /// function (the set of functions is fixed when the model is built).
    pub fn new(zpci: Arc<Zpci>, mem: TableMemory, fid: u32) -> Option<Self> {
        zpci.fh_of(fid)?;
        Some(FunctionTranslator { zpci, mem, fid })
    }

    /// The seam a device behind this function reads and writes guest memory through. `hooks`
    /// receive only what the seam refuses on its own (the model reports everything else).
    pub fn endpoint_iommu(self, hooks: Arc<dyn Hooks>) -> EndpointIommu {
        let fh = self.zpci.fh_of(self.fid).unwrap_or_default();
        EndpointIommu::model_owned(Endpoint::Zpci { fh }, Arc::new(self), hooks)
    }
}

impl DmaTranslate for FunctionTranslator {
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        // `new` checked the function exists and functions are never removed from a model.
        let Some(fh) = self.zpci.fh_of(self.fid) else {
            return Err(DmaFault::new(
                reason::NO_SUCH_FUNCTION,
                "zPCI: function vanished",
            ));
        };
        let write = matches!(access, Permissions::Write | Permissions::ReadWrite);
        let mem = (self.mem)();
        let t = self
            .zpci
            .translate(mem.as_ref(), fh, iova, len, write)
            .map_err(|r| DmaFault::new(r.reason, format!("zPCI: {:?} at {:#x}", r.kind, r.iova)))?;
        for p in &t.pieces {
            let length = usize::try_from(p.len)
                .map_err(|_| DmaFault::new(0, "zPCI: piece longer than the address space"))?;
            fill.set_mapping(GuestAddress(p.iova), GuestAddress(p.gpa), length, access)
                .map_err(|e| DmaFault::new(0, format!("zPCI: {e}")))?;
        }
        Ok(DmaResolution::Translated {
            domain: t.generation as u32,
        })
    }
}
