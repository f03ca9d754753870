//! s390 zPCI as a run's IOMMU: one zPCI function per endpoint (FID = the endpoint's RID, UID =
//! its position + 1), translated by the function's own DMA tables. The guest finds functions
//! through CLP, so firmware adds nothing. Under QEMU, QEMU answers CLP and forwards the
//! instructions that change translation (MPCIFC, RPCIT, enable/disable, configure/deconfigure)
//! to the model ([`ZpciHandle`]); the functions start configured (disabled), as QEMU plugs them.

use std::sync::Arc;

use sluice_devapi::{Bdf, EndpointIommu, Hooks, PointDecl, TableMemory};
use sluice_oracle::topology::IommuTopo;
use sluice_pci::MmioDevice;
use sluice_virtio_pci::VirtioDevice;
use sluice_zpci::seam::FunctionTranslator;
use sluice_zpci::{FunctionConfig, FunctionState, Zpci, ZpciOptions};

use super::{FirmwareDescription, IommuBuild, IommuError, IommuInstance, IommuKind, IommuModel};
use crate::machine::Arch;
use crate::points::Model;

/// The zPCI model's instance name: the `source` of its state events.
pub const ZPCI_NAME: &str = sluice_zpci::SOURCE;

/// A built zPCI model, for the backend that forwards the guest's zPCI instructions to it.
#[derive(Clone)]
pub struct ZpciHandle {
    /// The model.
    pub zpci: Arc<Zpci>,
    /// The guest memory its tables are read from.
    pub tables: TableMemory,
}

impl std::fmt::Debug for ZpciHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZpciHandle")
            .field("zpci", &self.zpci)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(super) struct ZpciModel {
    opts: ZpciOptions,
    endpoints: Vec<Bdf>,
}

impl ZpciModel {
    pub(super) fn new(opts: ZpciOptions, endpoints: Vec<Bdf>) -> Self {
        ZpciModel { opts, endpoints }
    }

    /// The function of each endpoint, in endpoint order (handle index = position).
    fn functions(&self) -> Vec<FunctionConfig> {
        self.endpoints
            .iter()
            .zip(1u32..)
            .map(|(b, uid)| FunctionConfig {
                fid: fid_of(*b),
                uid,
                // QEMU plugs every function configured: standby -> disabled at machine start.
                initial_state: FunctionState::Disabled,
                ..FunctionConfig::default()
            })
            .collect()
    }
}

/// The FID of the function that carries endpoint `bdf`.
fn fid_of(bdf: Bdf) -> u32 {
    u32::from(bdf.0)
}

impl IommuModel for ZpciModel {
    fn kind(&self) -> IommuKind {
        IommuKind::Zpci
    }

    fn name(&self) -> &str {
        ZPCI_NAME
    }

    fn endpoints(&self) -> &[Bdf] {
        &self.endpoints
    }

    fn pci_address(&self) -> Option<Bdf> {
        None
    }

    fn boot_bypass(&self) -> Option<bool> {
        None
    }

    fn topology(&self) -> IommuTopo {
        IommuTopo::Zpci {
            indexes: (0..self.endpoints.len())
                .filter_map(|i| u16::try_from(i).ok())
                .collect(),
        }
    }

    fn point_model(&self) -> Model {
        Model::Zpci
    }

    fn device_points(&self) -> Vec<PointDecl> {
        Vec::new()
    }

    fn firmware(&self, arch: Arch) -> Result<FirmwareDescription, IommuError> {
        match arch {
            Arch::S390x => Ok(FirmwareDescription::Discovered),
            Arch::X86_64 | Arch::Aarch64 => Err(IommuError::Unsupported {
                kind: IommuKind::Zpci,
                arch,
                why: "zPCI translation exists only on s390",
            }),
        }
    }

    fn build(&self, ctx: &IommuBuild) -> Result<Box<dyn IommuInstance>, IommuError> {
        let zpci = Zpci::new(self.functions(), self.opts.clone(), ctx.hooks.clone())
            .map_err(IommuError::Zpci)?;
        Ok(Box::new(ZpciInstance {
            zpci: Arc::new(zpci),
            tables: super::table_memory(&ctx.mem),
            hooks: ctx.hooks.clone(),
        }))
    }
}

struct ZpciInstance {
    zpci: Arc<Zpci>,
    tables: TableMemory,
    hooks: Arc<dyn Hooks>,
}

impl IommuInstance for ZpciInstance {
    fn translator(&self, endpoint: Bdf) -> Option<EndpointIommu> {
        FunctionTranslator::new(self.zpci.clone(), self.tables.clone(), fid_of(endpoint))
            .map(|f| f.endpoint_iommu(self.hooks.clone()))
    }

    fn take_pci_device(&mut self) -> Option<Box<dyn VirtioDevice>> {
        None
    }

    fn mmio(&self) -> Option<Arc<dyn MmioDevice>> {
        None
    }

    fn zpci(&self) -> Option<ZpciHandle> {
        Some(ZpciHandle {
            zpci: self.zpci.clone(),
            tables: self.tables.clone(),
        })
    }
}
