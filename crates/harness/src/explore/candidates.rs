//! Which points a hunt may perturb: guest-code points chosen from the kernel's System.map by
//! subsystem (IOMMU core and drivers, the driver core's probe and deferral paths, PCI and VFIO
//! probe and release), and every device point of the run's models.

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Prefix of guest-code points (`guest.sym.<symbol>`), as the injection crate spells it.
pub const GUEST_SYM_PREFIX: &str = "guest.sym.";

/// Kernel functions worth stalling: the paths the five seed races run through. Anchored at the
/// start of the symbol, so `iommu_` does not pick `amd_iommu_` helpers of another driver.
pub const GUEST_SYMBOL_PATTERNS: &[&str] = &[
    // IOMMU core, DMA layer, IOVA allocator, firmware glue.
    r"^_*iommu_",
    r"^bus_iommu_probe$",
    r"^_*dev_iommu_",
    r"^_*iommu_dma_",
    r"^_*(alloc|free)_iova",
    r"^iova_",
    r"^(acpi_)?viot_",
    r"^acpi_dma_configure",
    r"^of_dma_configure",
    r"^of_iommu_",
    // IOMMU drivers built into the kernel (virtio-iommu and arm-smmu-v3 are usually modules:
    // System.map does not have them).
    r"^viommu_",
    r"^arm_smmu_",
    r"^s390_iommu_",
    r"^zpci_",
    // Driver core: probe, deferral, release.
    r"^_*(really_probe|driver_probe_device|device_attach|device_driver_attach)",
    r"^_*bus_probe_device",
    r"^_*device_release_driver",
    r"^driver_deferred_probe_",
    r"^deferred_probe_work_func$",
    // PCI probe and removal, virtio probe and removal.
    r"^pci_device_(probe|remove)$",
    r"^pci_bus_add_device",
    r"^pci_stop_(and_remove_)?bus_device",
    r"^pci_remove_bus_device$",
    r"^virtio_dev_(probe|remove)$",
    // VFIO: group/container/device lifetime and ownership.
    r"^_*vfio_(group|container|device|iommu_type1|pci_core_(enable|disable|register|unregister|release|close|init)|pci_(probe|remove|open|release))",
];

/// Symbols that are not functions one can meaningfully stall: compiler clones and padding.
fn is_clone_or_padding(sym: &str) -> bool {
    sym.contains('.')
        || sym.starts_with("__pfx_")
        || sym.starts_with("__cfi_")
        || sym.starts_with("__SCT__")
        || sym.starts_with("__ksym")
        || sym.starts_with("__kstrtab")
        || sym.starts_with("__initcall")
}

/// How early a point is tried, from its name: lifecycle code (probe, registration, release,
/// attach) before the per-DMA data path, whose functions run thousands of times a boot and
/// whose first arrivals are rarely where a lifecycle race lives.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Probe, registration, release, attach/detach, ownership, deferral.
    Lifecycle,
    /// Anything else.
    #[default]
    Other,
    /// Map/unmap, IOVA, sync, I/O accessors.
    DataPath,
}

const LIFECYCLE_WORDS: &[&str] = &[
    "probe",
    "register",
    "release",
    "remove",
    "attach",
    "detach",
    "add_device",
    "owner",
    "deferred",
    "bind",
    "fwspec",
    "configure",
    "setup",
    "init_device",
    "deinit",
    "group_alloc",
    "default_domain",
    "open",
    "close",
    "notifier",
    "enable",
    "disable",
    "change",
];
const DATA_WORDS: &[&str] = &[
    "map", "iova", "sync", "read", "write", "rw", "fault", "pin", "bitmap", "pages", "magazine",
    "rcache", "flush", "iotlb", "tlb", "to_phys", "pgsize", "sg",
];

/// The tier of a point by its name.
pub fn tier_of(point: &str) -> Tier {
    let name = point.strip_prefix(GUEST_SYM_PREFIX).unwrap_or(point);
    if LIFECYCLE_WORDS.iter().any(|w| name.contains(w)) {
        Tier::Lifecycle
    } else if DATA_WORDS.iter().any(|w| name.contains(w)) {
        Tier::DataPath
    } else {
        Tier::Other
    }
}

/// One point a hunt may perturb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Point name as the injection plan spells it (`guest.sym.bus_iommu_probe`,
    /// `virtio-iommu.req.attach`).
    pub point: String,
    /// The point can defer a completion besides stalling.
    pub defer: bool,
    /// When it is tried.
    pub tier: Tier,
}

/// A device point of the run, as the injection registry lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePoint {
    /// Name.
    pub name: String,
    /// Deferrable.
    pub defer: bool,
    /// Reached about once per I/O.
    pub hot: bool,
}

/// Compiled symbol patterns.
pub struct SymbolFilter {
    include: Vec<Regex>,
}

impl SymbolFilter {
    /// The built-in patterns ([`GUEST_SYMBOL_PATTERNS`]).
    pub fn builtin() -> Self {
        SymbolFilter {
            include: GUEST_SYMBOL_PATTERNS
                .iter()
                .filter_map(|p| Regex::new(p).ok())
                .collect(),
        }
    }

    /// Whether `sym` is a function the hunt stalls.
    pub fn matches(&self, sym: &str) -> bool {
        !is_clone_or_padding(sym) && self.include.iter().any(|r| r.is_match(sym))
    }
}

/// The guest-code candidates among `symbols` (text symbols of System.map), sorted by name,
/// narrowed by `only` (a regex on the point name) when given.
pub fn guest_candidates<'a>(
    symbols: impl Iterator<Item = &'a str>,
    only: Option<&Regex>,
) -> Vec<Candidate> {
    let filter = SymbolFilter::builtin();
    let mut out: Vec<Candidate> = symbols
        .filter(|s| filter.matches(s))
        .map(|s| format!("{GUEST_SYM_PREFIX}{s}"))
        .filter(|p| only.is_none_or(|r| r.is_match(p)))
        .map(|point| Candidate {
            tier: tier_of(&point),
            point,
            defer: false,
        })
        .collect();
    out.sort_by(|a, b| a.point.cmp(&b.point));
    out.dedup_by(|a, b| a.point == b.point);
    out
}

/// The device candidates: every point of the run's models, narrowed by `only`. Hot points
/// (once per I/O) are data path; the others keep their name's tier.
pub fn device_candidates(points: &[DevicePoint], only: Option<&Regex>) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = points
        .iter()
        .filter(|p| !p.name.starts_with(GUEST_SYM_PREFIX))
        .filter(|p| only.is_none_or(|r| r.is_match(&p.name)))
        .map(|p| Candidate {
            point: p.name.clone(),
            defer: p.defer,
            tier: if p.hot {
                Tier::DataPath
            } else {
                tier_of(&p.name)
            },
        })
        .collect();
    out.sort_by(|a, b| a.point.cmp(&b.point));
    out.dedup_by(|a, b| a.point == b.point);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &[&str] = &[
        "bus_iommu_probe",
        "__pfx_bus_iommu_probe",
        "iommu_probe_device",
        "__iommu_probe_device",
        "iommu_dma_map_page",
        "iommu_group_release.cold",
        "amd_iommu_probe",
        "really_probe",
        "__driver_probe_device",
        "vfio_group_fops_release",
        "vfio_pci_core_ioread32",
        "kmalloc",
        "pci_device_probe",
        "pci_device_shutdown",
        "alloc_iova_fast",
    ];

    fn points(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.point.as_str()).collect()
    }

    #[test]
    fn guest_symbols_are_chosen_by_subsystem_without_clones_or_padding() {
        let c = guest_candidates(MAP.iter().copied(), None);
        assert_eq!(
            points(&c),
            [
                "guest.sym.__driver_probe_device",
                "guest.sym.__iommu_probe_device",
                "guest.sym.alloc_iova_fast",
                "guest.sym.bus_iommu_probe",
                "guest.sym.iommu_dma_map_page",
                "guest.sym.iommu_probe_device",
                "guest.sym.pci_device_probe",
                "guest.sym.really_probe",
                "guest.sym.vfio_group_fops_release",
            ]
        );
        let only = Regex::new("iommu").unwrap();
        let narrowed = guest_candidates(MAP.iter().copied(), Some(&only));
        assert_eq!(narrowed.len(), 4, "{:?}", points(&narrowed));
    }

    #[test]
    fn lifecycle_points_rank_before_the_data_path() {
        assert_eq!(tier_of("guest.sym.bus_iommu_probe"), Tier::Lifecycle);
        assert_eq!(tier_of("guest.sym.iommu_group_release"), Tier::Lifecycle);
        assert_eq!(tier_of("guest.sym.iommu_dma_map_page"), Tier::DataPath);
        assert_eq!(tier_of("guest.sym.alloc_iova_fast"), Tier::DataPath);
        assert_eq!(tier_of("guest.sym.iommu_group_get"), Tier::Other);
        assert!(Tier::Lifecycle < Tier::Other && Tier::Other < Tier::DataPath);
    }

    #[test]
    fn device_points_keep_their_defer_flag_and_hot_ones_are_data_path() {
        let pts = [
            DevicePoint {
                name: "virtio-iommu.req.attach".into(),
                defer: true,
                hot: false,
            },
            DevicePoint {
                name: "virtio-iommu.req.map".into(),
                defer: true,
                hot: true,
            },
            DevicePoint {
                name: "virtio.blk0.status".into(),
                defer: false,
                hot: false,
            },
        ];
        let c = device_candidates(&pts, None);
        assert_eq!(c.len(), 3);
        assert!(c[0].defer && c[0].tier == Tier::Lifecycle);
        assert_eq!(c[1].tier, Tier::DataPath);
        assert!(!c[2].defer);
    }
}
