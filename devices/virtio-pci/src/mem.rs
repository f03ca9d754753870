//! Guest memory shared by a device host and device workers, replaceable at run time (QEMU
//! re-sends its memory map whenever the guest's address-space layout changes).

use std::sync::{Arc, RwLock};

use sluice_devapi::EndpointIommu;
use vm_memory::{GuestMemoryMmap, IommuMemory};

/// A swappable snapshot of guest memory. Workers take a snapshot per batch of work, so a
/// re-map never pulls memory from under an access in progress.
#[derive(Clone, Default)]
pub struct SharedMemory {
    inner: Arc<RwLock<Arc<GuestMemoryMmap>>>,
}

impl SharedMemory {
    /// Wraps an initial memory map.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        SharedMemory {
            inner: Arc::new(RwLock::new(Arc::new(mem))),
        }
    }

    /// The current memory map.
    pub fn snapshot(&self) -> Arc<GuestMemoryMmap> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Installs a new memory map.
    pub fn replace(&self, mem: GuestMemoryMmap) {
        let new = Arc::new(mem);
        match self.inner.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
    }
}

/// How a device reaches guest memory for DMA: directly, or through an IOMMU endpoint. Every
/// access through the translated view is translated (vm-memory's `IommuMemory` asks the
/// endpoint's IOMMU on each access), so nothing is cached at queue enable.
#[derive(Clone)]
pub enum DmaMemory {
    /// Not behind an IOMMU: device addresses are guest-physical.
    Direct(SharedMemory),
    /// Behind an IOMMU: device addresses are IOVAs of `iommu`'s endpoint.
    Translated {
        /// Guest-physical memory under the translation.
        phys: SharedMemory,
        /// The endpoint's translation seam.
        iommu: EndpointIommu,
    },
}

/// Guest memory as one DMA batch sees it.
pub enum DmaView {
    /// Guest-physical.
    Direct(Arc<GuestMemoryMmap>),
    /// IOVA, translated on every access.
    Translated(TranslatedMemory),
}

/// Guest memory seen through one IOMMU endpoint.
pub type TranslatedMemory = IommuMemory<GuestMemoryMmap, EndpointIommu>;

impl DmaMemory {
    /// The view for one batch of work (a snapshot of the current memory map).
    pub fn view(&self) -> DmaView {
        match self {
            DmaMemory::Direct(m) => DmaView::Direct(m.snapshot()),
            DmaMemory::Translated { phys, iommu } => {
                let backend = GuestMemoryMmap::clone(&phys.snapshot());
                DmaView::Translated(IommuMemory::new(backend, iommu.clone(), true, ()))
            }
        }
    }

    /// True when accesses are translated.
    pub fn is_translated(&self) -> bool {
        matches!(self, DmaMemory::Translated { .. })
    }
}
