//! The catalogue of injection points: which model announces which point, which can defer, and
//! the per-instance points of the devices a run builds. The model crates name their points; the
//! injection engine (`sluice-inject`) only validates rules against what this module gives it,
//! so it depends on no model.

use sluice_inject::{ModelPoints, PointRegistry};

/// A Sluice model with named points of its own (device instances add theirs with
/// [`add_virtio_device`] and [`add_dma_engine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// virtio-iommu requests and config (`virtio-iommu.*`).
    VirtioIommu,
    /// The PCI command register of virtio-pci functions (`pci.cfg.write.command`).
    VirtioPci,
    /// Arm SMMUv3 registers and commands (`smmuv3.*`).
    Smmuv3,
    /// s390 zPCI (`zpci.*`).
    Zpci,
}

impl Model {
    /// Every model, in the order `sluice points` lists them.
    pub const ALL: [Model; 4] = [
        Model::VirtioIommu,
        Model::VirtioPci,
        Model::Smmuv3,
        Model::Zpci,
    ];

    /// The owner name its points carry.
    pub fn owner(self) -> &'static str {
        match self {
            Model::VirtioIommu => "virtio-iommu",
            Model::VirtioPci => "virtio-pci",
            Model::Smmuv3 => "smmuv3",
            Model::Zpci => "zpci",
        }
    }

    /// Its points, as its crate declares them.
    pub fn points(self) -> ModelPoints {
        let (names, defer) = match self {
            Model::VirtioIommu => (
                sluice_virtio_iommu::POINTS.to_vec(),
                sluice_virtio_iommu::DEFER_POINTS,
            ),
            Model::VirtioPci => (vec![sluice_virtio_pci::points::CFG_WRITE_COMMAND], &[][..]),
            Model::Smmuv3 => (sluice_smmuv3::points(), &[][..]),
            Model::Zpci => (sluice_zpci::POINTS.to_vec(), &[][..]),
        };
        ModelPoints {
            owner: self.owner(),
            names,
            defer,
        }
    }
}

/// Every model's points.
pub fn catalogue() -> Vec<ModelPoints> {
    Model::ALL.iter().map(|m| m.points()).collect()
}

/// The points a run with `models` can fire (the others stay known, refused as "not in this
/// run").
pub fn registry(models: &[Model]) -> PointRegistry {
    let present: Vec<&str> = models.iter().map(|m| m.owner()).collect();
    PointRegistry::with_models(&catalogue(), &present)
}

/// Every point of every model (what `sluice points` lists).
pub fn all_models() -> PointRegistry {
    PointRegistry::all_models(&catalogue())
}

/// The kind of a virtio device instance, for its per-instance points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioKind {
    /// virtio-blk: `virtio.<dev>.{notify,status,complete}`.
    Block,
    /// virtio-iommu: `virtio.<dev>.{notify,status}`.
    Iommu,
    /// Any other virtio device: `virtio.<dev>.{notify,status}`.
    Other,
}

/// The points of virtio device instance `name` (as the transport names them), with whether
/// each can defer: only virtio-blk's completion can.
pub fn virtio_device_points(name: &str, kind: VirtioKind) -> Vec<(String, bool)> {
    let mut p = vec![
        (sluice_virtio_pci::points::notify(name), false),
        (sluice_virtio_pci::points::status(name), false),
    ];
    if kind == VirtioKind::Block {
        p.push((sluice_virtio_blk::complete_point(name), true));
    }
    p
}

/// Adds the points of virtio device instance `name`.
pub fn add_virtio_device(reg: &mut PointRegistry, name: &str, kind: VirtioKind) {
    reg.add_instance(name, &virtio_device_points(name, kind));
}

/// Adds the points of DMA engine instance `name` (`--dma-engine`; a run's is `dma0`).
pub fn add_dma_engine(reg: &mut PointRegistry, name: &str) {
    use sluice_dma_engine::points;
    let p: Vec<(String, bool)> = [points::doorbell, points::complete, points::rogue]
        .iter()
        .map(|f| (f(name), false))
        .collect();
    reg.add_instance(name, &p);
}

/// `reg` with the virtio device instances of a run of `disks` disks (`blk0`...) and, when
/// `viommu`, the virtio-iommu (`viommu0`), as the device host names them.
pub fn with_run_devices(mut reg: PointRegistry, disks: usize, viommu: bool) -> PointRegistry {
    for i in 0..disks {
        add_virtio_device(&mut reg, &format!("blk{i}"), VirtioKind::Block);
    }
    if viommu {
        add_virtio_device(&mut reg, "viommu0", VirtioKind::Iommu);
    }
    reg
}

/// Points a device reaches synchronously inside a doorbell write, on the thread that wrote it
/// (a stall there holds that vCPU): its `virtio.<dev>.notify`, and for virtio-iommu (requests
/// answered inline, the default) the completion of every request type. `kind` is the hosted
/// device's kind (`HostedDevice::kind`).
pub fn doorbell_points(device: &str, kind: &str) -> Vec<String> {
    let mut v = vec![sluice_virtio_pci::points::notify(device)];
    if kind == "virtio-iommu" {
        v.extend(
            sluice_virtio_iommu::REQUEST_POINTS
                .iter()
                .map(|p| p.to_string()),
        );
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_carries_each_models_real_points() {
        let all = all_models();
        for p in [
            "virtio-iommu.req.attach",
            "pci.cfg.write.command",
            "smmuv3.cmd.CFGI_STE",
            "smmuv3.cmd.CMD_SYNC",
            "smmuv3.mmio.write.CR0",
            "zpci.rpcit",
        ] {
            assert!(all.get(p).is_some(), "{p}");
        }
        assert!(all.get("virtio-iommu.req.attach").is_some_and(|i| i.defer));
        let x86 = registry(&[Model::VirtioPci, Model::VirtioIommu]);
        assert!(x86.get("smmuv3.cmd.CFGI_STE").is_none());
        assert!(x86.get("virtio-iommu.req.map").is_some());
    }

    #[test]
    fn only_a_block_device_completion_can_defer() {
        let mut r = registry(&[]);
        add_virtio_device(&mut r, "blk0", VirtioKind::Block);
        add_virtio_device(&mut r, "viommu0", VirtioKind::Iommu);
        add_dma_engine(&mut r, "dma0");
        assert!(r.get("virtio.blk0.complete").is_some_and(|i| i.defer));
        assert!(r.get("virtio.viommu0.complete").is_none());
        assert!(r.get("virtio.viommu0.notify").is_some_and(|i| !i.defer));
        assert!(r.get("dma.dma0.rogue").is_some());
    }
}
