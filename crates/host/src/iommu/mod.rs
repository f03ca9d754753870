//! The IOMMU of a run behind one interface. [`IommuChoice::model`] is the only place that
//! looks at which IOMMU a run has; everything else (devices, firmware tables, injection
//! points, the oracle's topology, reports) asks the [`IommuModel`] it returns.
//!
//! Two stages, because the oracle needs the topology before any device exists (the devices are
//! built with hooks that include the oracle): an [`IommuModel`] describes the IOMMU of a run
//! (which endpoints, which points, what firmware says), and [`IommuModel::build`] makes the
//! device itself, an [`IommuInstance`] that hands out each endpoint's translation seam, its
//! PCI function or its MMIO register window.

mod smmuv3;
mod virtio;
mod zpci;

use std::fmt;
use std::sync::Arc;

use sluice_devapi::{Bdf, EndpointIommu, Hooks, InterruptSink, PointDecl};
use sluice_oracle::topology::IommuTopo;
use sluice_pci::MmioDevice;
use sluice_virtio_pci::{SharedMemory, VirtioDevice};
use thiserror::Error;

use crate::machine::Arch;
use crate::points::Model;

pub use smmuv3::SMMU_NAME;
pub use virtio::VIOMMU_NAME;
pub use zpci::{ZPCI_NAME, ZpciHandle};

/// Which IOMMU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IommuKind {
    /// virtio-iommu on PCI.
    Virtio,
    /// Arm SMMUv3, a platform device with a register window.
    Smmuv3,
    /// s390 zPCI translation (per function, driven by instructions).
    Zpci,
}

impl IommuKind {
    /// Every kind, in the order lists show them.
    pub const ALL: [IommuKind; 3] = [IommuKind::Virtio, IommuKind::Smmuv3, IommuKind::Zpci];

    /// The name on the command line and in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            IommuKind::Virtio => "virtio",
            IommuKind::Smmuv3 => "smmuv3",
            IommuKind::Zpci => "zpci",
        }
    }

    /// The model's full name, for reports.
    pub fn long_name(self) -> &'static str {
        match self {
            IommuKind::Virtio => "virtio-iommu",
            IommuKind::Smmuv3 => "SMMUv3",
            IommuKind::Zpci => "zPCI",
        }
    }
}

impl fmt::Display for IommuKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The IOMMU a run puts in front of its devices, with the model's configuration.
#[derive(Debug, Clone)]
pub enum IommuChoice {
    /// virtio-iommu on PCI, described to the guest by a VIOT table.
    Virtio(sluice_virtio_iommu::ViommuConfig),
    /// An Arm SMMUv3 (StreamID = the endpoint's RID).
    Smmuv3(sluice_smmuv3::SmmuConfig),
    /// s390 zPCI, one function per endpoint.
    Zpci(sluice_zpci::ZpciOptions),
}

impl IommuChoice {
    /// `kind` with its model's default configuration.
    pub fn default_for(kind: IommuKind) -> Self {
        match kind {
            IommuKind::Virtio => IommuChoice::Virtio(Default::default()),
            IommuKind::Smmuv3 => IommuChoice::Smmuv3(Default::default()),
            IommuKind::Zpci => IommuChoice::Zpci(Default::default()),
        }
    }

    /// `kind` with its default configuration and boot bypass `on`: what a device that no
    /// domain claims may do before the driver takes over. virtio-iommu: `config.bypass`;
    /// SMMUv3: GBPA.ABORT clear at reset; zPCI has none (a function translates once enabled).
    pub fn with_boot_bypass(kind: IommuKind, on: bool) -> Self {
        match Self::default_for(kind) {
            IommuChoice::Virtio(cfg) => IommuChoice::Virtio(sluice_virtio_iommu::ViommuConfig {
                boot_bypass: on,
                ..cfg
            }),
            IommuChoice::Smmuv3(cfg) => {
                // IDR0.MSI stays set: Linux then completes CMD_SYNC by an MSI into the sync
                // command's own queue entry and polls that memory instead of CMDQ_CONS, so
                // strict mode's syncs cost no register read over the proxy socket. Its event
                // queue and GERROR stay on the wired lines (QEMU's DT node has no MSI domain).
                IommuChoice::Smmuv3(sluice_smmuv3::SmmuConfig {
                    gbpa_reset: if on {
                        0
                    } else {
                        sluice_smmuv3::regs::gbpa::ABORT
                    },
                    ..cfg
                })
            }
            zpci @ IommuChoice::Zpci(_) => zpci,
        }
    }

    /// This IOMMU with `bug` built in; `None` when the bug belongs to another model.
    pub fn with_bug(self, bug: ModelBug) -> Option<Self> {
        match (self, bug) {
            (IommuChoice::Zpci(opts), ModelBug::SkipRpcitInvalidation) => {
                Some(IommuChoice::Zpci(sluice_zpci::ZpciOptions {
                    fault_injection: sluice_zpci::FaultInjection {
                        skip_rpcit_invalidation: true,
                    },
                    ..opts
                }))
            }
            _ => None,
        }
    }

    /// Which model this is.
    pub fn kind(&self) -> IommuKind {
        match self {
            IommuChoice::Virtio(_) => IommuKind::Virtio,
            IommuChoice::Smmuv3(_) => IommuKind::Smmuv3,
            IommuChoice::Zpci(_) => IommuKind::Zpci,
        }
    }

    /// The factory: this IOMMU in front of `endpoints` (PCI requester IDs, in the order the
    /// devices are placed).
    pub fn model(&self, endpoints: Vec<Bdf>) -> Arc<dyn IommuModel> {
        match self {
            IommuChoice::Virtio(cfg) => Arc::new(virtio::VirtioModel::new(cfg.clone(), endpoints)),
            IommuChoice::Smmuv3(cfg) => Arc::new(smmuv3::SmmuModel::new(*cfg, endpoints)),
            IommuChoice::Zpci(opts) => Arc::new(zpci::ZpciModel::new(opts.clone(), endpoints)),
        }
    }
}

/// A deliberate bug in an IOMMU model, for the escape oracle's positive controls on real guests:
/// a run with one must show the escape the bug makes, a run without it must not. Never a
/// default; a run's report names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelBug {
    /// zPCI: RPCIT installs the valid frames of its range but keeps the shadow entries of
    /// frames the tables no longer map (a stale translation after the refresh).
    SkipRpcitInvalidation,
}

impl ModelBug {
    /// Every bug, by name.
    pub const ALL: [ModelBug; 1] = [ModelBug::SkipRpcitInvalidation];

    /// Its name on the command line and in scenarios.
    pub fn name(self) -> &'static str {
        match self {
            ModelBug::SkipRpcitInvalidation => "skip-rpcit-invalidation",
        }
    }

    /// The model it breaks.
    pub fn kind(self) -> IommuKind {
        match self {
            ModelBug::SkipRpcitInvalidation => IommuKind::Zpci,
        }
    }
}

impl std::str::FromStr for ModelBug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|b| b.name()).collect();
                format!("unknown model bug `{s}` (known: {})", known.join(", "))
            })
    }
}

/// What firmware must tell the guest about an IOMMU on a given platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareDescription {
    /// A complete ACPI table to add (x86: the VIOT).
    AcpiTable(Vec<u8>),
    /// Nothing to add: the platform's own discovery finds it (zPCI functions are listed by
    /// CLP, which the model answers).
    Discovered,
    /// A platform device the machine places and describes itself (arm64 `virt`: device-tree
    /// node with `iommu-map`, and the IORT) when given `machine_option`; its register window
    /// and `irq_lines` wired interrupts are served by this process.
    PlatformDevice {
        /// The QEMU machine option (`iommu=smmuv3`).
        machine_option: String,
        /// Wired interrupt lines, in the machine's order.
        irq_lines: usize,
    },
}

/// The IOMMU cannot be used as asked.
#[derive(Debug, Error)]
pub enum IommuError {
    /// No firmware description exists for this IOMMU on this platform (yet).
    #[error("the {kind} IOMMU cannot be described to an {arch} guest: {why}")]
    Unsupported {
        /// The IOMMU.
        kind: IommuKind,
        /// The platform.
        arch: Arch,
        /// What is missing.
        why: &'static str,
    },
    /// The zPCI model refused its function list.
    #[error("cannot build the zPCI model")]
    Zpci(#[source] sluice_zpci::BuildError),
}

/// What building an IOMMU device needs from the run.
#[derive(Clone)]
pub struct IommuBuild {
    /// Hooks of the run (injection, oracle, counters).
    pub hooks: Arc<dyn Hooks>,
    /// Guest memory, where the model reads its tables.
    pub mem: SharedMemory,
    /// Wired lines and MSIs of a platform IOMMU (an SMMU's event, GERROR and sync lines).
    pub irq: Arc<dyn InterruptSink>,
}

/// One IOMMU of a run, before its device exists.
pub trait IommuModel: Send + Sync + fmt::Debug {
    /// Which model.
    fn kind(&self) -> IommuKind;
    /// Instance name (the `source` of its state events, its points' owner).
    fn name(&self) -> &str;
    /// The endpoints it translates.
    fn endpoints(&self) -> &[Bdf];
    /// Its own PCI address, when it is a PCI function.
    fn pci_address(&self) -> Option<Bdf>;
    /// Boot bypass as configured, when the model has one (reports).
    fn boot_bypass(&self) -> Option<bool>;
    /// What firmware declares, for the oracle.
    fn topology(&self) -> IommuTopo;
    /// The model whose named points a run with it can fire.
    fn point_model(&self) -> Model;
    /// The points of the device instance itself (a virtio-iommu's doorbell and status),
    /// beyond its model's.
    fn device_points(&self) -> Vec<PointDecl>;
    /// How firmware describes it to a guest on `arch`.
    fn firmware(&self, arch: Arch) -> Result<FirmwareDescription, IommuError>;
    /// Builds the device.
    fn build(&self, ctx: &IommuBuild) -> Result<Box<dyn IommuInstance>, IommuError>;
}

/// One built IOMMU device.
pub trait IommuInstance: Send {
    /// The translation seam of the device at `endpoint` (`None`: not behind this IOMMU).
    fn translator(&self, endpoint: Bdf) -> Option<EndpointIommu>;
    /// The translation of the writes the CPU backend makes on behalf of the PCI function at
    /// `endpoint` (its MSIs, which QEMU's MSI-X emulation writes). A platform IOMMU that sees
    /// every requester on its bus (an SMMU under virt's `iommu-map`) translates them whether or
    /// not Sluice sends the function's own DMA through the model: a function that is "not
    /// behind the IOMMU" there offers no VIRTIO_F_ACCESS_PLATFORM, so the guest gives it
    /// physical addresses, but the guest still attaches it to a domain and maps its MSI
    /// doorbell there. Default: [`IommuInstance::translator`].
    fn msi_translator(&self, endpoint: Bdf) -> Option<EndpointIommu> {
        self.translator(endpoint)
    }
    /// The PCI function the IOMMU presents itself as (virtio-iommu), handed out once, to be
    /// placed at [`IommuModel::pci_address`].
    fn take_pci_device(&mut self) -> Option<Box<dyn VirtioDevice>>;
    /// Its register window, when it is a platform device (SMMUv3).
    fn mmio(&self) -> Option<Arc<dyn MmioDevice>>;
    /// The zPCI model and the memory its tables are read from, when the IOMMU is driven by
    /// instructions the CPU backend forwards (s390 zPCI).
    fn zpci(&self) -> Option<ZpciHandle> {
        None
    }
}

/// The table memory a model walks: always the current guest memory (QEMU may remap it).
fn table_memory(mem: &SharedMemory) -> sluice_devapi::TableMemory {
    let mem = mem.clone();
    Arc::new(move || mem.snapshot())
}

#[cfg(test)]
mod tests;
