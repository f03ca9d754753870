//! One stream of the SMMUv3 behind the translation seam, so a PCI function's DMA is translated
//! by this model (StreamID = the function's RID) exactly as a device model does it for any
//! IOMMU. The SMMU owns the caches under test (configuration cache, IOTLB) and reports every
//! translation to the hooks itself, so the seam is used in its model-owned form
//! ([`EndpointIommu::model_owned`]): no second cache, no second report.

use std::fmt;
use std::sync::Arc;

use sluice_devapi::{
    DmaFault, DmaResolution, DmaTranslate, Endpoint, EndpointIommu, Hooks, TableMemory,
};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::walk::perm;
use crate::{Access, SmmuV3};

/// Translates the accesses of one stream (and substream) through an [`SmmuV3`].
pub struct StreamTranslator {
    smmu: Arc<SmmuV3>,
    mem: TableMemory,
    sid: u32,
    ssid: Option<u32>,
}

impl fmt::Debug for StreamTranslator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamTranslator")
            .field("sid", &self.sid)
            .field("ssid", &self.ssid)
            .finish()
    }
}

impl StreamTranslator {
    /// Stream `sid` (substream `ssid`) of `smmu`, walking tables in `mem`.
    pub fn new(smmu: Arc<SmmuV3>, mem: TableMemory, sid: u32, ssid: Option<u32>) -> Self {
        StreamTranslator {
            smmu,
            mem,
            sid,
            ssid,
        }
    }

    /// The seam a device behind this stream reads and writes guest memory through. `hooks`
    /// receive only what the seam refuses on its own (the SMMU reports everything else).
    pub fn endpoint_iommu(self, hooks: Arc<dyn Hooks>) -> EndpointIommu {
        let endpoint = Endpoint::Stream {
            sid: self.sid,
            ssid: self.ssid,
        };
        EndpointIommu::model_owned(endpoint, Arc::new(self), hooks)
    }
}

/// The event type's code (0 for an abort without an event), as the oracle sees it.
fn reason(f: &crate::Fault) -> u32 {
    f.event_type().map_or(0, |k| u32::from(k.code()))
}

impl DmaTranslate for StreamTranslator {
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        let write = matches!(access, Permissions::Write | Permissions::ReadWrite);
        let mem = (self.mem)();
        let t = self
            .smmu
            .translate(
                mem.as_ref(),
                self.sid,
                self.ssid,
                iova,
                len,
                if write { Access::WRITE } else { Access::READ },
            )
            .map_err(|f| DmaFault::new(reason(&f), format!("SMMUv3: {f:?}")))?;
        for seg in &t.segments {
            // A read-write access was checked for write; it also needs read permission.
            if access == Permissions::ReadWrite && !t.bypassed && seg.perms & perm::R_PRIV == 0 {
                return Err(DmaFault::new(
                    0,
                    "SMMUv3: write-only mapping for a read-write access",
                ));
            }
            let length = usize::try_from(seg.len)
                .map_err(|_| DmaFault::new(0, "SMMUv3: segment longer than the address space"))?;
            fill.set_mapping(GuestAddress(seg.iova), GuestAddress(seg.pa), length, access)
                .map_err(|e| DmaFault::new(0, format!("SMMUv3: {e}")))?;
        }
        Ok(if t.bypassed {
            DmaResolution::Bypassed
        } else {
            // The model reports the domain it translated in; the seam does not report.
            DmaResolution::Translated { domain: 0 }
        })
    }
}
