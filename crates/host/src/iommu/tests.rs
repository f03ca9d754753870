use std::sync::Arc;

use sluice_devapi::{Bdf, NoHooks};

use super::*;
use crate::{DeviceSet, DiskSpec, HostOptions};

fn scratch_disks(tag: &str, n: usize) -> (std::path::PathBuf, Vec<DiskSpec>) {
    let dir = std::env::temp_dir().join(format!("sluice-iommu-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disks = (0..n)
        .map(|i| {
            let path = dir.join(format!("d{i}.img"));
            std::fs::File::create(&path)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
            DiskSpec {
                path,
                read_only: false,
                iommu: true,
            }
        })
        .collect();
    (dir, disks)
}

#[test]
fn the_factory_builds_each_kind_with_its_topology_and_points() {
    let eps = vec![Bdf::new(0, 3, 0), Bdf::new(0, 4, 0)];
    for kind in IommuKind::ALL {
        let m = IommuChoice::default_for(kind).model(eps.clone());
        assert_eq!(m.kind(), kind);
        assert_eq!(m.endpoints(), &eps[..]);
        let (topo_ok, model) = match m.topology() {
            IommuTopo::Virtio { bdf, endpoints } => (
                bdf == Bdf::new(0, 2, 0) && endpoints == eps,
                Model::VirtioIommu,
            ),
            IommuTopo::Smmu { source, sids } => {
                (source == m.name() && sids == [0x18, 0x20], Model::Smmuv3)
            }
            IommuTopo::Zpci { indexes } => (indexes == [0, 1], Model::Zpci),
        };
        assert!(topo_ok, "{kind}: {:?}", m.topology());
        assert_eq!(m.point_model(), model, "{kind}");
    }
}

#[test]
fn firmware_descriptions_exist_only_where_the_platform_has_one() {
    let eps = vec![Bdf::new(0, 3, 0)];
    let model = |k| IommuChoice::default_for(k).model(eps.clone());
    match model(IommuKind::Virtio).firmware(Arch::X86_64).unwrap() {
        FirmwareDescription::AcpiTable(t) => assert_eq!(&t[..4], b"VIOT"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        model(IommuKind::Zpci).firmware(Arch::S390x).unwrap(),
        FirmwareDescription::Discovered
    );
    assert_eq!(
        model(IommuKind::Smmuv3).firmware(Arch::Aarch64).unwrap(),
        FirmwareDescription::PlatformDevice {
            machine_option: "iommu=smmuv3".into(),
            irq_lines: 4
        }
    );
    for (kind, arch) in [
        (IommuKind::Smmuv3, Arch::X86_64),
        (IommuKind::Zpci, Arch::X86_64),
        (IommuKind::Virtio, Arch::S390x),
    ] {
        let err = model(kind).firmware(arch).unwrap_err();
        assert!(
            matches!(err, IommuError::Unsupported { .. }),
            "{kind} {arch}"
        );
        assert!(err.to_string().contains(kind.name()), "{err}");
    }
}

/// Every model goes into a device set through the same interface: its disks get a seam,
/// the virtio-iommu a PCI function with its points, the SMMU a guarded register window.
#[test]
fn every_model_puts_its_seam_under_the_disks_of_a_device_set() {
    let (dir, disks) = scratch_disks("set", 2);
    for kind in IommuKind::ALL {
        let choice = IommuChoice::with_boot_bypass(kind, true);
        let opts = HostOptions::default().with_iommu(&choice, &disks);
        let set = DeviceSet::with_options(&disks, Arc::new(NoHooks), &opts).unwrap();
        let blks: Vec<_> = set
            .devices
            .iter()
            .filter(|d| d.kind == "virtio-blk")
            .collect();
        assert_eq!(blks.len(), 2, "{kind}");
        assert!(blks.iter().all(|d| d.behind_iommu), "{kind}");
        let function = set.devices.iter().find(|d| d.kind == "virtio-iommu");
        assert_eq!(function.is_some(), kind == IommuKind::Virtio, "{kind}");
        assert_eq!(
            set.iommu_mmio.is_some(),
            kind == IommuKind::Smmuv3,
            "{kind}"
        );
        if let Some(f) = function {
            let attach = f
                .points
                .iter()
                .find(|p| p.name == "virtio-iommu.req.attach");
            assert!(
                attach.is_some_and(|p| p.doorbell && p.defer),
                "{:?}",
                f.points
            );
            assert_eq!(
                crate::points::doorbell_points(f)[0],
                "virtio.viommu0.notify"
            );
        }
        if let Some(w) = &set.iommu_mmio {
            // The run's SMMU advertises MSI (IDR0.MSI), so Linux completes CMD_SYNC in memory
            // (MSI polling) instead of reading CMDQ_CONS through the proxy.
            // An access past the window is refused (all ones).
            let mut b = [0u8; 4];
            w.mmio_read(0, &mut b);
            let idr0 = u32::from_le_bytes(b);
            assert_ne!(idr0 & sluice_smmuv3::regs::idr0::MSI, 0, "IDR0 {idr0:#x}");
            w.mmio_read(w.window_size() - 2, &mut b);
            assert_eq!(b, [0xff; 4]);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_model_bug_belongs_to_one_model_and_is_named() {
    for bug in ModelBug::ALL {
        assert_eq!(bug.name().parse::<ModelBug>(), Ok(bug));
        for kind in IommuKind::ALL {
            let broken = IommuChoice::default_for(kind).with_bug(bug);
            assert_eq!(broken.is_some(), kind == bug.kind(), "{bug:?} on {kind}");
        }
    }
    let e = "skip-everything".parse::<ModelBug>().unwrap_err();
    assert!(e.contains("known: skip-rpcit-invalidation"), "{e}");
    match IommuChoice::default_for(IommuKind::Zpci).with_bug(ModelBug::SkipRpcitInvalidation) {
        Some(IommuChoice::Zpci(o)) => assert!(o.fault_injection.skip_rpcit_invalidation),
        other => panic!("{other:?}"),
    }
}
