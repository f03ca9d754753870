//! virtio-iommu as a run's IOMMU: a PCI function at [`crate::IOMMU_SLOT`], declared by a VIOT.

use std::collections::HashMap;
use std::sync::Arc;

use sluice_devapi::{Bdf, EndpointIommu, PointDecl};
use sluice_oracle::topology::IommuTopo;
use sluice_pci::MmioDevice;
use sluice_virtio_iommu::{ViommuConfig, VirtioIommu};
use sluice_virtio_pci::VirtioDevice;

use super::{FirmwareDescription, IommuBuild, IommuError, IommuInstance, IommuKind, IommuModel};
use crate::machine::Arch;
use crate::points::Model;

/// The virtio-iommu instance name (`virtio.viommu0.*` points).
pub const VIOMMU_NAME: &str = "viommu0";

#[derive(Debug)]
pub(super) struct VirtioModel {
    cfg: ViommuConfig,
    endpoints: Vec<Bdf>,
    bdf: Bdf,
}

impl VirtioModel {
    pub(super) fn new(mut cfg: ViommuConfig, endpoints: Vec<Bdf>) -> Self {
        // virtio-iommu endpoint ID = the endpoint's RID, as the VIOT says.
        cfg.endpoints = endpoints.iter().map(|b| u32::from(b.0)).collect();
        VirtioModel {
            cfg,
            endpoints,
            bdf: Bdf::new(0, crate::IOMMU_SLOT, 0),
        }
    }
}

impl IommuModel for VirtioModel {
    fn kind(&self) -> IommuKind {
        IommuKind::Virtio
    }

    fn name(&self) -> &str {
        VIOMMU_NAME
    }

    fn endpoints(&self) -> &[Bdf] {
        &self.endpoints
    }

    fn pci_address(&self) -> Option<Bdf> {
        Some(self.bdf)
    }

    fn boot_bypass(&self) -> Option<bool> {
        Some(self.cfg.boot_bypass)
    }

    fn topology(&self) -> IommuTopo {
        IommuTopo::Virtio {
            bdf: self.bdf,
            endpoints: self.endpoints.clone(),
        }
    }

    fn point_model(&self) -> Model {
        Model::VirtioIommu
    }

    fn device_points(&self) -> Vec<PointDecl> {
        crate::points::virtio_device_points(VIOMMU_NAME, crate::points::VirtioKind::Iommu)
    }

    fn firmware(&self, arch: Arch) -> Result<FirmwareDescription, IommuError> {
        match arch {
            Arch::X86_64 => Ok(FirmwareDescription::AcpiTable(
                sluice_acpi::viot_virtio_pci(self.bdf, &self.endpoints),
            )),
            Arch::Aarch64 | Arch::S390x => Err(IommuError::Unsupported {
                kind: IommuKind::Virtio,
                arch,
                why: "only the x86 VIOT is generated so far",
            }),
        }
    }

    fn build(&self, ctx: &IommuBuild) -> Result<Box<dyn IommuInstance>, IommuError> {
        let device = VirtioIommu::new(VIOMMU_NAME, self.cfg.clone(), ctx.hooks.clone());
        let seams = self
            .endpoints
            .iter()
            .filter_map(|b| Some((*b, device.endpoint_iommu(u32::from(b.0))?)))
            .collect();
        Ok(Box::new(VirtioInstance {
            device: Some(device),
            seams,
        }))
    }
}

struct VirtioInstance {
    device: Option<VirtioIommu>,
    seams: HashMap<Bdf, EndpointIommu>,
}

impl IommuInstance for VirtioInstance {
    fn translator(&self, endpoint: Bdf) -> Option<EndpointIommu> {
        self.seams.get(&endpoint).cloned()
    }

    fn take_pci_device(&mut self) -> Option<Box<dyn VirtioDevice>> {
        self.device
            .take()
            .map(|d| Box::new(d) as Box<dyn VirtioDevice>)
    }

    fn mmio(&self) -> Option<Arc<dyn MmioDevice>> {
        None
    }
}
