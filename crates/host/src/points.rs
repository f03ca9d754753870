//! The catalogue of injection points: which model announces which point, which can defer, and
//! the per-instance points of the devices a run builds. The model crates name their points; the
//! injection engine (`sluice-inject`) only validates rules against what this module gives it,
//! so it depends on no model.

use sluice_devapi::PointDecl;
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
        let points = match self {
            Model::VirtioIommu => sluice_virtio_iommu::point_decls(),
            Model::VirtioPci => sluice_virtio_pci::points::model(),
            Model::Smmuv3 => sluice_smmuv3::point_decls(),
            Model::Zpci => sluice_zpci::point_decls(),
        };
        ModelPoints {
            owner: self.owner(),
            points,
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

/// The points of virtio device instance `name`, as its transport and device declare them.
pub fn virtio_device_points(name: &str, kind: VirtioKind) -> Vec<PointDecl> {
    let mut p = sluice_virtio_pci::points::instance(name);
    if kind == VirtioKind::Block {
        p.extend(sluice_virtio_blk::instance_points(name));
    }
    p
}

/// Adds the points of virtio device instance `name`.
pub fn add_virtio_device(reg: &mut PointRegistry, name: &str, kind: VirtioKind) {
    reg.add_instance(name, &virtio_device_points(name, kind));
}

/// Adds the points of DMA engine instance `name` (`--dma-engine`; a run's is `dma0`).
pub fn add_dma_engine(reg: &mut PointRegistry, name: &str) {
    reg.add_instance(name, &sluice_dma_engine::points::instance(name));
}

/// `reg` with the virtio device instances of a run of `disks` disks (`blk0`...) and, when
/// `viommu`, the virtio-iommu (`viommu0`), as the device host names them.
pub fn with_run_devices(mut reg: PointRegistry, disks: usize, viommu: bool) -> PointRegistry {
    for i in 0..disks {
        add_virtio_device(&mut reg, &format!("blk{i}"), VirtioKind::Block);
    }
    if viommu {
        add_virtio_device(&mut reg, crate::iommu::VIOMMU_NAME, VirtioKind::Iommu);
    }
    reg
}

/// The points of one run: its devices' (`disks` disks, the DMA engine when `dma_engine`), its
/// IOMMU's (model and device instance) and the transport's. Points of models the run does not
/// have stay known, so a rule on one is refused as "not in this run".
pub fn run_registry(
    disks: usize,
    iommu: Option<&dyn crate::iommu::IommuModel>,
    dma_engine: bool,
) -> PointRegistry {
    let mut models = vec![Model::VirtioPci];
    models.extend(iommu.map(|m| m.point_model()));
    let mut reg = with_run_devices(registry(&models), disks, false);
    if let Some(m) = iommu {
        reg.add_instance(m.name(), &m.device_points());
    }
    if dma_engine {
        add_dma_engine(&mut reg, "dma0");
    }
    reg
}

/// Points `device` reaches synchronously inside a doorbell write, on the thread that wrote it
/// (a stall there holds that vCPU), as the device's models declare them.
pub fn doorbell_points(device: &crate::HostedDevice) -> Vec<String> {
    device
        .points
        .iter()
        .filter(|p| p.doorbell)
        .map(|p| p.name.clone())
        .collect()
}

/// The rules of `injector`'s plan on `device`'s doorbell points ([`doorbell_points`]): while
/// there are any, the backend must keep that device's doorbells synchronous (an MMIO exit, a
/// socket round trip) so that a stall holds the vCPU that rang, not a doorbell thread.
pub fn doorbell_rules(
    injector: &sluice_inject::Injector,
    device: &crate::HostedDevice,
) -> Vec<String> {
    let points = doorbell_points(device);
    injector
        .rules()
        .filter(|r| points.contains(&r.spec.point))
        .map(|r| r.spec.text.clone())
        .collect()
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

    /// The points the timeline samples are those reached once per I/O: doorbells, request
    /// completions, MAP/UNMAP (what the oracle hard-coded before the models declared it).
    #[test]
    fn hot_points_are_the_per_io_ones() {
        let viommu = crate::IommuChoice::default_for(crate::IommuKind::Virtio).model(Vec::new());
        let reg = run_registry(1, Some(&*viommu), true);
        let mut hot: Vec<String> = reg.hot_points().into_iter().collect();
        hot.sort();
        assert_eq!(
            hot,
            [
                "dma.dma0.complete",
                "virtio-iommu.req.map",
                "virtio-iommu.req.unmap",
                "virtio.blk0.complete",
                "virtio.blk0.notify",
                "virtio.viommu0.notify",
            ]
        );
    }
}
