//! The device host: what both CPU backends share.
//!
//! [`DeviceSet`] builds the PCI functions a run asks for (virtio-blk disks now; IOMMUs in later
//! issues), gives each a fixed PCI address, one [`IntxRelay`] for its interrupt line, and the
//! shared guest memory. Backends only move bytes: config and BAR accesses in, interrupts out,
//! memory maps in.
#![forbid(unsafe_code)]

mod dma_stats;
mod intx;
pub mod iommu;
pub mod machine;
mod outcome;
pub mod points;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;

use sluice_devapi::EndpointIommu;
use sluice_devapi::{Bdf, Endpoint, Hooks, InterruptSink, NullInterrupts, PointDecl};
use sluice_dma_engine::DmaEngine;
use sluice_marker::MarkerDevice;
use sluice_pci::PciFunction;
use sluice_virtio_blk::{BlockDevice, RawDisk};
use sluice_virtio_pci::{
    DmaMemory, SharedMemory, TransportOptions, VirtioDevice, VirtioPciFunction,
};
use thiserror::Error;

pub use dma_stats::{DmaStats, EndpointDmaCounts};
pub use intx::{IntxRelay, MsiDelivery};
pub use iommu::{IommuChoice, IommuKind, IommuModel, ModelBug};
pub use outcome::{GuestExit, RunOutcome};

/// First PCI slot used for Sluice devices (00:01 and 00:02 stay free for IOMMUs and tests).
pub const FIRST_SLOT: u8 = 3;
/// PCI class code of a mass-storage device (as QEMU's virtio-blk-pci reports it).
const CLASS_STORAGE_SCSI: u32 = 0x01_00_00;
/// PCI class code QEMU gives virtio-iommu-pci ("other").
const CLASS_OTHER: u32 = 0x00_ff_00;
/// Where an IOMMU goes when the run has one.
pub const IOMMU_SLOT: u8 = 2;

/// One disk as the user asked for it.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Raw image.
    pub path: PathBuf,
    /// Expose read-only.
    pub read_only: bool,
    /// Put the disk behind the run's IOMMU (ignored when there is none).
    pub iommu: bool,
}

/// The DMA engine a run adds (`devices/dma-engine`), after the disks and the marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaEngineSpec {
    /// Put the engine behind the run's IOMMU (ignored when there is none).
    pub iommu: bool,
}

/// Building the devices failed.
#[derive(Debug, Error)]
pub enum HostError {
    /// The disk image cannot be opened.
    #[error("cannot open disk {path}")]
    Disk {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The disk is too small to hold a sector.
    #[error("disk {0} is smaller than one 512-byte sector")]
    DiskTooSmall(PathBuf),
    /// Too many devices for the slots left on bus 0.
    #[error("too many devices: slot {0} is beyond bus 0")]
    OutOfSlots(u8),
    /// Device construction failed.
    #[error("cannot build the PCI function")]
    Pci(#[from] sluice_pci::ConfigError),
    /// The IOMMU cannot be built.
    #[error(transparent)]
    Iommu(#[from] iommu::IommuError),
}

/// A device placed on the bus.
#[derive(Clone)]
pub struct HostedDevice {
    /// Its address.
    pub bdf: Bdf,
    /// Name (`blk0`).
    pub name: String,
    /// The PCI function, as the backends dispatch to it: behind a [`sluice_pci::BarGuard`], so
    /// no BAR access reaches the device unless it fits in one BAR.
    pub function: Arc<dyn PciFunction>,
    /// The same function when it is a virtio device (counters, status), for reports.
    pub virtio: Option<Arc<VirtioPciFunction>>,
    /// Its INTx line.
    pub intx: Arc<IntxRelay>,
    /// The image path for disks.
    pub disk: Option<PathBuf>,
    /// What the device is (`virtio-blk`, `virtio-iommu`, `marker`, `dma-engine`).
    pub kind: &'static str,
    /// Whether its DMA goes through the run's IOMMU.
    pub behind_iommu: bool,
    /// The same function when it is the DMA engine, for host-armed rogue DMAs.
    pub dma_engine: Option<Arc<DmaEngine>>,
    /// The injection points this device reaches, as its models declare them (for the IOMMU's
    /// own function: its model's points too).
    pub points: Vec<PointDecl>,
}

/// What the CPU backend can offer devices.
#[derive(Clone, Default)]
pub struct HostOptions {
    /// MSI-X vectors per function (0: INTx only, as QEMU's proxy requires).
    pub msix_vectors: u16,
    /// Where MSI messages go, if the backend can deliver them.
    pub msi: Option<Arc<dyn MsiDelivery>>,
    /// The IOMMU in front of the devices that ask for it (from [`IommuChoice::model`] with
    /// [`iommu_endpoints`]).
    pub iommu: Option<Arc<dyn IommuModel>>,
    /// Interrupt lines of a platform IOMMU (an SMMU's). Without it they go nowhere, which only
    /// tests without a guest may want.
    pub iommu_irq: Option<Arc<dyn InterruptSink>>,
    /// Place the guest marker device after the disks; committed lines go here.
    pub marker: Option<MarkerSink>,
    /// Place a DMA engine after the disks and the marker.
    pub dma_engine: Option<DmaEngineSpec>,
}

impl HostOptions {
    /// These options with `choice` in front of the devices of `disks` (and of the DMA engine)
    /// that ask for it. Set `marker` and `dma_engine` first: they decide the slots.
    #[must_use]
    pub fn with_iommu(mut self, choice: &IommuChoice, disks: &[DiskSpec]) -> Self {
        let endpoints = iommu_endpoints(disks, self.marker.is_some(), self.dma_engine);
        self.iommu = Some(choice.model(endpoints));
        self
    }
}

/// Where guest marker lines go (the escape oracle's timeline, injection filters).
pub type MarkerSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Every device of a run plus the guest memory they share.
pub struct DeviceSet {
    /// Guest memory (filled in by the backend).
    pub mem: SharedMemory,
    /// Devices in slot order.
    pub devices: Vec<HostedDevice>,
    /// The IOMMU, if the run has one.
    pub iommu: Option<Arc<dyn IommuModel>>,
    /// Its register window, when it is a platform device (behind an [`sluice_pci::MmioGuard`]).
    pub iommu_mmio: Option<Arc<dyn sluice_pci::MmioDevice>>,
    /// Its model, when the CPU backend forwards the guest's zPCI instructions to it.
    pub iommu_zpci: Option<iommu::ZpciHandle>,
    /// A platform IOMMU's translation of the writes the CPU backend makes on a device's behalf
    /// (its MSIs, which QEMU's MSI-X emulation writes), by requester ID (StreamID = RID on
    /// `virt`), for every device: see [`iommu::IommuInstance::msi_translator`]. Empty without
    /// a platform IOMMU: a virtio-iommu does not translate MSIs on x86 (they target the
    /// reserved MSI window).
    pub iommu_msi: std::collections::BTreeMap<u16, EndpointIommu>,
}

/// Where a disk goes.
fn disk_bdf(i: usize) -> Bdf {
    Bdf::new(0, FIRST_SLOT.saturating_add(i as u8), 0)
}

/// The slot of the DMA engine: after the disks and the marker (may be beyond bus 0's last
/// slot; placement refuses that).
fn engine_slot(disks: usize, marker: bool) -> usize {
    usize::from(FIRST_SLOT) + disks + usize::from(marker)
}

/// Where the DMA engine goes.
fn engine_bdf(disks: usize, marker: bool) -> Bdf {
    Bdf::new(
        0,
        u8::try_from(engine_slot(disks, marker)).unwrap_or(u8::MAX),
        0,
    )
}

/// The endpoints a run's IOMMU translates, in placement order: the disks that ask for it,
/// then the DMA engine if it does. What [`IommuChoice::model`] needs.
pub fn iommu_endpoints(
    disks: &[DiskSpec],
    marker: bool,
    dma_engine: Option<DmaEngineSpec>,
) -> Vec<Bdf> {
    let mut v: Vec<Bdf> = (0..disks.len())
        .filter(|i| disks.get(*i).is_some_and(|d| d.iommu))
        .map(disk_bdf)
        .collect();
    if dma_engine.is_some_and(|e| e.iommu) {
        v.push(engine_bdf(disks.len(), marker));
    }
    v
}

impl DeviceSet {
    /// Builds one virtio-blk function per disk, at slots `FIRST_SLOT..`, INTx only.
    pub fn new(disks: &[DiskSpec], hooks: Arc<dyn Hooks>) -> Result<Self, HostError> {
        Self::with_options(disks, hooks, &HostOptions::default())
    }

    /// As [`DeviceSet::new`], with what the backend offers.
    pub fn with_options(
        disks: &[DiskSpec],
        hooks: Arc<dyn Hooks>,
        opts: &HostOptions,
    ) -> Result<Self, HostError> {
        let mem = SharedMemory::default();
        let mut devices = Vec::new();
        // The IOMMU is built first: each translated device needs its endpoint seam.
        let engine_bdf = engine_bdf(disks.len(), opts.marker.is_some());
        let mut iommu = match &opts.iommu {
            Some(model) => Some(
                model.build(&iommu::IommuBuild {
                    hooks: hooks.clone(),
                    mem: mem.clone(),
                    irq: opts
                        .iommu_irq
                        .clone()
                        .unwrap_or_else(|| Arc::new(NullInterrupts)),
                })?,
            ),
            None => None,
        };
        for (i, spec) in disks.iter().enumerate() {
            let slot = FIRST_SLOT + i as u8;
            if slot >= 0x1f {
                return Err(HostError::OutOfSlots(slot));
            }
            let raw =
                RawDisk::open(&spec.path, spec.read_only).map_err(|source| HostError::Disk {
                    path: spec.path.clone(),
                    source,
                })?;
            if sluice_virtio_blk::Disk::size(&raw) < sluice_virtio_blk::SECTOR_SIZE {
                return Err(HostError::DiskTooSmall(spec.path.clone()));
            }
            let bdf = disk_bdf(i);
            let seam = iommu
                .as_ref()
                .filter(|_| spec.iommu)
                .and_then(|m| m.translator(bdf));
            let device = BlockDevice::new(&format!("blk{i}"), Arc::new(raw), spec.read_only)
                .with_hooks(hooks.clone());
            let mut dev = Self::place(
                Box::new(device),
                bdf,
                "virtio-blk",
                CLASS_STORAGE_SCSI,
                seam,
                Some(spec.path.clone()),
                &mem,
                &hooks,
                opts,
            )?;
            dev.points = points::virtio_device_points(&dev.name, points::VirtioKind::Block);
            devices.push(dev);
        }
        if let Some(sink) = &opts.marker {
            let slot = FIRST_SLOT + disks.len() as u8;
            if slot >= 0x1f {
                return Err(HostError::OutOfSlots(slot));
            }
            let marker = Arc::new(MarkerDevice::new(sink.clone())?);
            devices.push(HostedDevice {
                bdf: Bdf::new(0, slot, 0),
                name: "marker0".into(),
                function: sluice_pci::BarGuard::wrap(marker),
                virtio: None,
                intx: Arc::new(IntxRelay::default()),
                disk: None,
                kind: "marker",
                behind_iommu: false,
                dma_engine: None,
                points: Vec::new(),
            });
        }
        if let Some(spec) = opts.dma_engine {
            let slot = engine_slot(disks.len(), opts.marker.is_some());
            if slot >= 0x1f {
                return Err(HostError::OutOfSlots(u8::try_from(slot).unwrap_or(u8::MAX)));
            }
            let seam = iommu
                .as_ref()
                .filter(|_| spec.iommu)
                .and_then(|m| m.translator(engine_bdf));
            let behind_iommu = seam.is_some();
            let dma = match seam {
                Some(iommu) => DmaMemory::Translated {
                    phys: mem.clone(),
                    iommu,
                },
                None => DmaMemory::Direct(mem.clone()),
            };
            let intx = Arc::new(Self::intx_relay(opts));
            let engine = Arc::new(DmaEngine::new(
                "dma0",
                Endpoint::Pci(engine_bdf),
                dma,
                intx.clone(),
                hooks.clone(),
            )?);
            devices.push(HostedDevice {
                bdf: engine_bdf,
                name: "dma0".into(),
                function: sluice_pci::BarGuard::wrap(engine.clone()),
                virtio: None,
                intx,
                disk: None,
                kind: "dma-engine",
                behind_iommu,
                dma_engine: Some(engine),
                points: sluice_dma_engine::points::instance("dma0"),
            });
        }
        let model = opts.iommu.as_ref();
        if let (Some(m), Some(bdf)) = (model, model.and_then(|m| m.pci_address()))
            && let Some(function) = iommu.as_mut().and_then(|i| i.take_pci_device())
        {
            let mut dev = Self::place(
                function,
                bdf,
                "virtio-iommu",
                CLASS_OTHER,
                None,
                None,
                &mem,
                &hooks,
                opts,
            )?;
            dev.points = m.device_points();
            dev.points.extend(m.point_model().points().points);
            devices.insert(0, dev);
        }
        let iommu_msi = match iommu.as_ref().filter(|i| i.mmio().is_some()) {
            Some(i) => devices
                .iter()
                .filter_map(|d| i.msi_translator(d.bdf).map(|seam| (d.bdf.0, seam)))
                .collect(),
            None => Default::default(),
        };
        Ok(DeviceSet {
            mem,
            devices,
            iommu_mmio: iommu
                .as_ref()
                .and_then(|i| i.mmio())
                .map(|w| sluice_pci::MmioGuard::wrap(w) as Arc<dyn sluice_pci::MmioDevice>),
            iommu_zpci: iommu.as_ref().and_then(|i| i.zpci()),
            iommu_msi,
            iommu: opts.iommu.clone(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn place(
        device: Box<dyn VirtioDevice>,
        bdf: Bdf,
        kind: &'static str,
        class_code: u32,
        iommu: Option<EndpointIommu>,
        disk: Option<PathBuf>,
        mem: &SharedMemory,
        hooks: &Arc<dyn Hooks>,
        opts: &HostOptions,
    ) -> Result<HostedDevice, HostError> {
        let name = device.name().to_string();
        let intx = Arc::new(Self::intx_relay(opts));
        let behind_iommu = iommu.is_some();
        let topts = TransportOptions {
            bdf,
            access_platform: false,
            msix_vectors: opts.msix_vectors,
            class_code,
            iommu,
        };
        let function = Arc::new(VirtioPciFunction::new(
            device,
            topts,
            mem.clone(),
            intx.clone(),
            hooks.clone(),
        )?);
        Ok(HostedDevice {
            bdf,
            name,
            function: sluice_pci::BarGuard::wrap(function.clone()),
            virtio: Some(function),
            intx,
            disk,
            kind,
            behind_iommu,
            dma_engine: None,
            points: Vec::new(),
        })
    }

    /// A function's interrupt relay: INTx, or MSI when the backend delivers it.
    fn intx_relay(opts: &HostOptions) -> IntxRelay {
        match &opts.msi {
            Some(m) => IntxRelay::with_msi(m.clone()),
            None => IntxRelay::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_devapi::NoHooks;

    fn disk(dir: &std::path::Path, name: &str, size: u64, iommu: bool) -> DiskSpec {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        DiskSpec {
            path,
            read_only: false,
            iommu,
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-host-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn disks_get_consecutive_slots_and_bad_paths_are_errors() {
        let dir = scratch("slots");
        let specs = [
            disk(&dir, "a.img", 1 << 20, false),
            disk(&dir, "b.img", 1 << 20, false),
        ];
        let set = DeviceSet::new(&specs, Arc::new(NoHooks)).unwrap();
        let bdfs: Vec<String> = set.devices.iter().map(|d| d.bdf.to_string()).collect();
        assert_eq!(bdfs, ["0000:00:03.0", "0000:00:04.0"]);
        assert!(set.iommu.is_none());
        let missing = [DiskSpec {
            path: dir.join("nope.img"),
            read_only: false,
            iommu: false,
        }];
        assert!(matches!(
            DeviceSet::new(&missing, Arc::new(NoHooks)),
            Err(HostError::Disk { .. })
        ));
        let empty = [disk(&dir, "empty.img", 0, false)];
        assert!(matches!(
            DeviceSet::new(&empty, Arc::new(NoHooks)),
            Err(HostError::DiskTooSmall(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_dma_engine_follows_the_marker_and_joins_the_iommu_when_asked() {
        let dir = scratch("engine");
        let specs = [disk(&dir, "a.img", 1 << 20, true)];
        for behind in [true, false] {
            let opts = HostOptions {
                marker: Some(Arc::new(|_: &str| {})),
                dma_engine: Some(DmaEngineSpec { iommu: behind }),
                ..Default::default()
            }
            .with_iommu(&IommuChoice::Virtio(Default::default()), &specs);
            let set = DeviceSet::with_options(&specs, Arc::new(NoHooks), &opts).unwrap();
            let placed: Vec<(String, &str)> = set
                .devices
                .iter()
                .map(|d| (d.bdf.to_string(), d.kind))
                .collect();
            assert_eq!(
                placed,
                [
                    ("0000:00:02.0".to_string(), "virtio-iommu"),
                    ("0000:00:03.0".to_string(), "virtio-blk"),
                    ("0000:00:04.0".to_string(), "marker"),
                    ("0000:00:05.0".to_string(), "dma-engine"),
                ]
            );
            let engine = set.devices.last().unwrap();
            assert!(engine.dma_engine.is_some());
            assert_eq!(engine.behind_iommu, behind);
            let endpoints = set.iommu.as_ref().unwrap().endpoints();
            assert_eq!(
                endpoints.contains(&Bdf::new(0, 5, 0)),
                behind,
                "{endpoints:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn virtio_iommu_sits_at_slot_2_in_front_of_the_chosen_disks() {
        let dir = scratch("iommu");
        let specs = [
            disk(&dir, "a.img", 1 << 20, true),
            disk(&dir, "b.img", 1 << 20, false),
        ];
        let opts =
            HostOptions::default().with_iommu(&IommuChoice::Virtio(Default::default()), &specs);
        let set = DeviceSet::with_options(&specs, Arc::new(NoHooks), &opts).unwrap();
        let kinds: Vec<_> = set
            .devices
            .iter()
            .map(|d| (d.bdf.to_string(), d.kind, d.behind_iommu))
            .collect();
        assert_eq!(
            kinds,
            [
                ("0000:00:02.0".to_string(), "virtio-iommu", false),
                ("0000:00:03.0".to_string(), "virtio-blk", true),
                ("0000:00:04.0".to_string(), "virtio-blk", false),
            ]
        );
        let p = set.iommu.unwrap();
        assert_eq!(p.pci_address(), Some(Bdf::new(0, 2, 0)));
        assert_eq!(p.endpoints(), [Bdf::new(0, 3, 0)]);
        // The translated disk offers ACCESS_PLATFORM (bit 33), the other one does not.
        let offered = |i: usize| {
            let f = &set.devices[i].function;
            f.config_write(0x10, &0xfe00_0000u32.to_le_bytes());
            f.config_write(0x04, &2u16.to_le_bytes());
            f.bar_write(0, 0, &1u32.to_le_bytes());
            let mut b = [0u8; 4];
            f.bar_read(0, 4, &mut b);
            u32::from_le_bytes(b) & 2 != 0
        };
        assert!(offered(1));
        assert!(!offered(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bar_accesses_past_the_end_of_a_bar_are_refused_for_every_device() {
        let dir = scratch("barguard");
        let specs = [disk(&dir, "a.img", 1 << 20, true)];
        let opts =
            HostOptions::default().with_iommu(&IommuChoice::Virtio(Default::default()), &specs);
        let set = DeviceSet::with_options(&specs, Arc::new(NoHooks), &opts).unwrap();
        for d in &set.devices {
            let f = &d.function;
            f.config_write(0x10, &0xfe00_0000u32.to_le_bytes());
            f.config_write(0x04, &0x6u16.to_le_bytes());
            let (bar, off) = f
                .decode_bar(0xfe00_0000 + sluice_virtio_pci::BAR_SIZE - 4, true)
                .unwrap();
            let mut b = [0u8; 8];
            f.bar_read(bar, off, &mut b);
            assert_eq!(b, [0xff; 8], "{}: straddling read", d.name);
            let mut b = [0xaau8; 4];
            f.bar_read(0, 0, &mut b);
            assert_eq!(b, [0; 4], "{}: device_feature_select reads 0", d.name);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
