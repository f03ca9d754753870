//! An Arm SMMUv3 as a run's IOMMU: a platform device (register window, wired interrupt lines),
//! StreamID = the endpoint's RID. Firmware describes it on arm64 (the `virt` machine's DT node
//! with `iommu-map`, or IORT); x86 has no description for it.

use std::sync::Arc;

use sluice_devapi::{Bdf, EndpointIommu, Hooks, PointDecl, TableMemory};
use sluice_oracle::topology::IommuTopo;
use sluice_pci::{MmioDevice, le_value, put_le};
use sluice_smmuv3::seam::StreamTranslator;
use sluice_smmuv3::{SmmuConfig, SmmuV3};
use sluice_virtio_pci::VirtioDevice;

use super::{FirmwareDescription, IommuBuild, IommuError, IommuInstance, IommuKind, IommuModel};
use crate::machine::Arch;
use crate::points::Model;

/// The SMMU's instance name: the `source` of its state events.
pub const SMMU_NAME: &str = sluice_smmuv3::SOURCE;
/// Wired interrupt lines of an SMMU on a platform (eventq, priq, cmdq-sync, gerror).
const SMMU_IRQ_LINES: usize = 4;

#[derive(Debug)]
pub(super) struct SmmuModel {
    cfg: SmmuConfig,
    endpoints: Vec<Bdf>,
}

impl SmmuModel {
    pub(super) fn new(cfg: SmmuConfig, endpoints: Vec<Bdf>) -> Self {
        SmmuModel { cfg, endpoints }
    }
}

impl IommuModel for SmmuModel {
    fn kind(&self) -> IommuKind {
        IommuKind::Smmuv3
    }

    fn name(&self) -> &str {
        SMMU_NAME
    }

    fn endpoints(&self) -> &[Bdf] {
        &self.endpoints
    }

    fn pci_address(&self) -> Option<Bdf> {
        None
    }

    fn boot_bypass(&self) -> Option<bool> {
        // GBPA.ABORT clear at reset: an SMMU that is not enabled lets DMA through.
        Some(self.cfg.gbpa_reset & sluice_smmuv3::regs::gbpa::ABORT == 0)
    }

    fn topology(&self) -> IommuTopo {
        IommuTopo::Smmu {
            source: SMMU_NAME.to_string(),
            sids: self.endpoints.iter().map(|b| u32::from(b.0)).collect(),
        }
    }

    fn point_model(&self) -> Model {
        Model::Smmuv3
    }

    fn device_points(&self) -> Vec<PointDecl> {
        Vec::new()
    }

    fn firmware(&self, arch: Arch) -> Result<FirmwareDescription, IommuError> {
        match arch {
            // virt places the SMMU at its fixed address, with its four SPIs (eventq, priq,
            // cmdq-sync, gerror), and writes the DT node, `iommu-map` and IORT itself.
            Arch::Aarch64 => Ok(FirmwareDescription::PlatformDevice {
                machine_option: "iommu=smmuv3".into(),
                irq_lines: SMMU_IRQ_LINES,
            }),
            Arch::X86_64 | Arch::S390x => Err(IommuError::Unsupported {
                kind: IommuKind::Smmuv3,
                arch,
                why: "an SMMU is an Arm platform device",
            }),
        }
    }

    fn build(&self, ctx: &IommuBuild) -> Result<Box<dyn IommuInstance>, IommuError> {
        let smmu = Arc::new(SmmuV3::new(self.cfg, ctx.irq.clone(), ctx.hooks.clone()));
        Ok(Box::new(SmmuInstance {
            smmu,
            tables: super::table_memory(&ctx.mem),
            endpoints: self.endpoints.clone(),
            hooks: ctx.hooks.clone(),
        }))
    }
}

struct SmmuInstance {
    smmu: Arc<SmmuV3>,
    tables: TableMemory,
    endpoints: Vec<Bdf>,
    hooks: Arc<dyn Hooks>,
}

impl IommuInstance for SmmuInstance {
    fn translator(&self, endpoint: Bdf) -> Option<EndpointIommu> {
        if !self.endpoints.contains(&endpoint) {
            return None;
        }
        self.msi_translator(endpoint)
    }

    /// Any requester: virt's `iommu-map` puts every RID of the root bus behind the SMMU.
    fn msi_translator(&self, endpoint: Bdf) -> Option<EndpointIommu> {
        let stream = StreamTranslator::new(
            self.smmu.clone(),
            self.tables.clone(),
            endpoint.0.into(),
            None,
        );
        Some(stream.endpoint_iommu(self.hooks.clone()))
    }

    fn take_pci_device(&mut self) -> Option<Box<dyn VirtioDevice>> {
        None
    }

    fn mmio(&self) -> Option<Arc<dyn MmioDevice>> {
        Some(Arc::new(SmmuRegisters {
            smmu: self.smmu.clone(),
            tables: self.tables.clone(),
        }))
    }
}

/// The SMMU's register window. Register writes may make the SMMU read its queues and tables,
/// so every access carries the current guest memory.
struct SmmuRegisters {
    smmu: Arc<SmmuV3>,
    tables: TableMemory,
}

impl MmioDevice for SmmuRegisters {
    fn window_size(&self) -> u64 {
        sluice_smmuv3::regs::MMIO_SIZE
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let mem = (self.tables)();
        let value = self.smmu.mmio_read_mem(&*mem, offset, data.len() as u32);
        put_le(data, value);
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        let mem = (self.tables)();
        self.smmu
            .mmio_write(&*mem, offset, data.len() as u32, le_value(data));
    }

    fn reset(&self) {
        self.smmu.reset();
    }
}
