//! Wire constants of the virtio-iommu specification (virtio 1.2/1.3 "IOMMU device";
//! `include/uapi/linux/virtio_iommu.h` v0.12). All multi-byte fields are little-endian.

/// Virtio device ID.
pub const VIRTIO_ID_IOMMU: u16 = 23;

/// Feature bits offered by this device.
pub mod features {
    /// `input_range` is valid.
    pub const INPUT_RANGE: u32 = 0;
    /// `domain_range` is valid.
    pub const DOMAIN_RANGE: u32 = 1;
    /// MAP and UNMAP are available.
    pub const MAP_UNMAP: u32 = 2;
    /// Legacy: unattached endpoints bypass. Superseded by BYPASS_CONFIG; never offered.
    pub const BYPASS: u32 = 3;
    /// PROBE is available.
    pub const PROBE: u32 = 4;
    /// MAP_F_MMIO is available.
    pub const MMIO: u32 = 5;
    /// `bypass` in the configuration space and ATTACH_F_BYPASS.
    pub const BYPASS_CONFIG: u32 = 6;
}

/// Request types.
pub const T_ATTACH: u8 = 1;
/// Detach an endpoint from a domain.
pub const T_DETACH: u8 = 2;
/// Map a range.
pub const T_MAP: u8 = 3;
/// Unmap a range.
pub const T_UNMAP: u8 = 4;
/// Probe an endpoint's properties.
pub const T_PROBE: u8 = 5;

/// Request status, as written in the tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Virtio communication error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ];

    /// Wire value.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Short lower-case name for counters and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::IoErr => "ioerr",
            Status::Unsupp => "unsupp",
            Status::DevErr => "deverr",
            Status::Inval => "inval",
            Status::Range => "range",
            Status::NoEnt => "noent",
            Status::Fault => "fault",
            Status::NoMem => "nomem",
        }
    }
}

/// ATTACH flag: the domain is a bypass domain.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;

/// MAP flag: reads allowed.
pub const MAP_F_READ: u32 = 1 << 0;
/// MAP flag: writes allowed.
pub const MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the target is device memory (requires F_MMIO).
pub const MAP_F_MMIO: u32 = 1 << 2;
/// Every MAP flag the spec defines.
pub const MAP_F_MASK: u32 = MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO;

/// `struct virtio_iommu_req_head` size.
pub const HEAD_LEN: usize = 4;
/// `struct virtio_iommu_req_tail` size.
pub const TAIL_LEN: usize = 4;
/// Device-readable size of ATTACH (head + domain + endpoint + flags + reserved[4]).
pub const ATTACH_LEN: usize = 20;
/// Device-readable size of DETACH (head + domain + endpoint + reserved[8]).
pub const DETACH_LEN: usize = 20;
/// Device-readable size of MAP (head + domain + virt_start + virt_end + phys_start + flags).
pub const MAP_LEN: usize = 36;
/// Device-readable size of UNMAP (head + domain + virt_start + virt_end + reserved[4]).
pub const UNMAP_LEN: usize = 28;
/// Device-readable size of PROBE (head + endpoint + reserved[64]).
pub const PROBE_LEN: usize = 72;

/// Probe property type: end of list.
pub const PROBE_T_NONE: u16 = 0;
/// Probe property type: reserved memory region.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// RESV_MEM subtype: the driver must not map it.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: MSI doorbell (not translated).
pub const RESV_MEM_T_MSI: u8 = 1;
/// Size of a RESV_MEM property including its 4-byte header.
pub const RESV_MEM_PROP_LEN: usize = 24;

/// Fault reason: internal error or unknown.
pub const FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint is not attached (and not in bypass).
pub const FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: not mapped, or mapped without the needed permission.
pub const FAULT_R_MAPPING: u8 = 2;
/// Fault flag: read access.
pub const FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: write access.
pub const FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;
/// Size of `struct virtio_iommu_fault`.
pub const FAULT_LEN: usize = 24;

/// The x86 MSI doorbell window, always reported as a RESV_MEM MSI property.
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

/// Size of the configuration structure.
pub const CONFIG_LEN: usize = 40;
/// Offset of `bypass` in the configuration structure.
pub const CONFIG_BYPASS_OFFSET: u64 = 36;
