//! The device host: what both CPU backends share.
//!
//! [`DeviceSet`] builds the PCI functions a run asks for (virtio-blk disks now; IOMMUs in later
//! issues), gives each a fixed PCI address, one [`IntxRelay`] for its interrupt line, and the
//! shared guest memory. Backends only move bytes: config and BAR accesses in, interrupts out,
//! memory maps in.
#![forbid(unsafe_code)]

mod dma_stats;
mod intx;
mod outcome;

use std::path::PathBuf;
use std::sync::Arc;

use sluice_devapi::{Bdf, Hooks};
use sluice_virtio_blk::{BlockDevice, RawDisk};
use sluice_virtio_pci::{SharedMemory, TransportOptions, VirtioPciFunction};
use thiserror::Error;

pub use dma_stats::{DmaStats, EndpointDmaCounts};
pub use intx::{IntxRelay, MsiDelivery};
pub use outcome::{GuestExit, RunOutcome};

/// First PCI slot used for Sluice devices (00:01 and 00:02 stay free for IOMMUs and tests).
pub const FIRST_SLOT: u8 = 3;
/// PCI class code of a mass-storage device (as QEMU's virtio-blk-pci reports it).
const CLASS_STORAGE_SCSI: u32 = 0x01_00_00;

/// One disk as the user asked for it.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Raw image.
    pub path: PathBuf,
    /// Expose read-only.
    pub read_only: bool,
}

/// Building the devices failed.
#[derive(Debug, Error)]
pub enum HostError {
    /// The disk image cannot be opened.
    #[error("cannot open disk {path}: {source}")]
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
    #[error("cannot build the PCI function: {0}")]
    Pci(#[from] sluice_pci::ConfigError),
}

/// A device placed on the bus.
#[derive(Clone)]
pub struct HostedDevice {
    /// Its address.
    pub bdf: Bdf,
    /// Name (`blk0`).
    pub name: String,
    /// The PCI function.
    pub function: Arc<VirtioPciFunction>,
    /// Its INTx line.
    pub intx: Arc<IntxRelay>,
    /// The image path for disks.
    pub disk: Option<PathBuf>,
}

/// What the CPU backend can offer devices.
#[derive(Clone, Default)]
pub struct HostOptions {
    /// MSI-X vectors per function (0: INTx only, as QEMU's proxy requires).
    pub msix_vectors: u16,
    /// Where MSI messages go, if the backend can deliver them.
    pub msi: Option<Arc<dyn MsiDelivery>>,
}

/// Every device of a run plus the guest memory they share.
pub struct DeviceSet {
    /// Guest memory (filled in by the backend).
    pub mem: SharedMemory,
    /// Devices in slot order.
    pub devices: Vec<HostedDevice>,
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
            let name = format!("blk{i}");
            let bdf = Bdf::new(0, slot, 0);
            let intx = Arc::new(match &opts.msi {
                Some(m) => IntxRelay::with_msi(m.clone()),
                None => IntxRelay::default(),
            });
            let device = BlockDevice::new(&name, Arc::new(raw), spec.read_only);
            let opts = TransportOptions {
                bdf,
                access_platform: false,
                msix_vectors: opts.msix_vectors,
                class_code: CLASS_STORAGE_SCSI,
                iommu: None,
            };
            let function = Arc::new(VirtioPciFunction::new(
                Box::new(device),
                opts,
                mem.clone(),
                intx.clone(),
                hooks.clone(),
            )?);
            devices.push(HostedDevice {
                bdf,
                name,
                function,
                intx,
                disk: Some(spec.path.clone()),
            });
        }
        Ok(DeviceSet { mem, devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_devapi::NoHooks;

    #[test]
    fn disks_get_consecutive_slots_and_bad_paths_are_errors() {
        let dir = std::env::temp_dir().join(format!("sluice-host-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.img");
        let b = dir.join("b.img");
        std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
        std::fs::File::create(&b).unwrap().set_len(1 << 20).unwrap();
        let specs = [
            DiskSpec {
                path: a,
                read_only: false,
            },
            DiskSpec {
                path: b.clone(),
                read_only: true,
            },
        ];
        let set = DeviceSet::new(&specs, Arc::new(NoHooks)).unwrap();
        let bdfs: Vec<String> = set.devices.iter().map(|d| d.bdf.to_string()).collect();
        assert_eq!(bdfs, ["0000:00:03.0", "0000:00:04.0"]);
        let missing = [DiskSpec {
            path: dir.join("nope.img"),
            read_only: false,
        }];
        assert!(matches!(
            DeviceSet::new(&missing, Arc::new(NoHooks)),
            Err(HostError::Disk { .. })
        ));
        let empty = dir.join("empty.img");
        std::fs::File::create(&empty).unwrap();
        assert!(matches!(
            DeviceSet::new(
                &[DiskSpec {
                    path: empty,
                    read_only: false
                }],
                Arc::new(NoHooks)
            ),
            Err(HostError::DiskTooSmall(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
