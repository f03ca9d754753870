//! Device configuration: what the VMM chooses ([`ViommuConfig`]) and the configuration
//! structure the driver reads (`struct virtio_iommu_config`).

use crate::spec::{CONFIG_LEN, MSI_WINDOW, RESV_MEM_PROP_LEN};

/// Largest `probe_size` (keeps a PROBE reply within what the device answers).
pub const MAX_PROBE_SIZE: u32 = 60 * 1024;

/// How a virtio-iommu instance is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViommuConfig {
    /// Initial (and system-reset) value of `config.bypass`: unattached endpoints bypass the
    /// IOMMU until the driver writes 0. Kept across device reset, as the spec asks.
    pub boot_bypass: bool,
    /// Extra RESV_MEM_T_RESERVED regions reported by PROBE for every endpoint, as inclusive
    /// `(start, end)` IOVA pairs. MAP requests overlapping them (or the MSI window) fail.
    pub reserved: Vec<(u64, u64)>,
    /// Endpoint IDs (PCI requester IDs) behind this IOMMU. Requests naming others get NOENT.
    pub endpoints: Vec<u32>,
    /// `page_size_mask`: the lowest set bit is the mapping granule, higher bits are hints.
    pub page_size_mask: u64,
    /// Inclusive IOVA range mappings may use (`input_range`).
    pub input_range: (u64, u64),
    /// Inclusive range of valid domain IDs (`domain_range`).
    pub domain_range: (u32, u32),
    /// `probe_size`: bytes of properties in a PROBE reply. Raised if the properties need more.
    pub probe_size: u32,
    /// Most domains alive at once (ATTACH creating one more gets NOMEM).
    pub max_domains: usize,
    /// Most mappings in one domain (MAP gets NOMEM).
    pub max_mappings_per_domain: usize,
    /// Most mappings over all domains (MAP gets NOMEM).
    pub max_mappings_total: usize,
    /// Faults waiting for an event buffer; beyond this they are dropped (and counted).
    pub fault_queue_len: usize,
    /// Size of each of the two virtqueues.
    pub queue_size: u16,
    /// Refuse (S_FAULT) a MAP without MAP_F_MMIO whose physical range is not guest RAM.
    pub check_phys_ram: bool,
    /// Answer the request queue on the thread that rang its doorbell (the vCPU's, through the
    /// backend) instead of handing it to the device worker. Linux polls for each request, so
    /// this is much faster; the worker still serves the event queue.
    pub inline_requests: bool,
}

impl Default for ViommuConfig {
    /// QEMU's defaults where they exist (4 KiB granule with every larger size as a hint,
    /// 64-bit input range, 32-bit domain IDs, probe_size 512, boot bypass on), Cloud
    /// Hypervisor's table bounds.
    fn default() -> Self {
        ViommuConfig {
            boot_bypass: true,
            reserved: Vec::new(),
            endpoints: Vec::new(),
            page_size_mask: !0xfff,
            input_range: (0, u64::MAX),
            domain_range: (0, u32::MAX),
            probe_size: 512,
            max_domains: 1 << 16,
            max_mappings_per_domain: 1 << 20,
            max_mappings_total: 1 << 21,
            fault_queue_len: 256,
            queue_size: 256,
            check_phys_ram: true,
            inline_requests: true,
        }
    }
}

impl ViommuConfig {
    /// The configuration with nonsense replaced by something the spec allows: a zero page
    /// mask becomes 4 KiB, reversed ranges are swapped, inverted reserved regions dropped,
    /// `probe_size` raised to fit every property, zero bounds raised to 1.
    pub fn normalized(mut self) -> Self {
        if self.page_size_mask == 0 {
            self.page_size_mask = !0xfff;
        }
        if self.input_range.0 > self.input_range.1 {
            self.input_range = (self.input_range.1, self.input_range.0);
        }
        if self.domain_range.0 > self.domain_range.1 {
            self.domain_range = (self.domain_range.1, self.domain_range.0);
        }
        self.reserved.retain(|(s, e)| s <= e);
        let fit = (MAX_PROBE_SIZE as usize / RESV_MEM_PROP_LEN).saturating_sub(1);
        self.reserved.truncate(fit);
        let needed = (self.reserved.len() + 1).saturating_mul(RESV_MEM_PROP_LEN);
        let needed = u32::try_from(needed).unwrap_or(u32::MAX);
        self.probe_size = self.probe_size.max(needed).min(MAX_PROBE_SIZE);
        self.endpoints.sort_unstable();
        self.endpoints.dedup();
        self.max_domains = self.max_domains.max(1);
        self.max_mappings_per_domain = self.max_mappings_per_domain.max(1);
        self.max_mappings_total = self.max_mappings_total.max(1);
        self.fault_queue_len = self.fault_queue_len.max(1);
        self.queue_size = self.queue_size.clamp(2, 32768);
        self
    }

    /// The mapping granule (lowest set bit of `page_size_mask`).
    pub fn granule(&self) -> u64 {
        1u64 << self.page_size_mask.trailing_zeros().min(63)
    }

    /// Every RESV_MEM region as `(start, end, subtype)`: the MSI window first.
    pub fn resv_regions(&self) -> impl Iterator<Item = (u64, u64, u8)> + '_ {
        std::iter::once((MSI_WINDOW.0, MSI_WINDOW.1, crate::spec::RESV_MEM_T_MSI)).chain(
            self.reserved
                .iter()
                .map(|&(s, e)| (s, e, crate::spec::RESV_MEM_T_RESERVED)),
        )
    }

    /// The configuration structure with the current `bypass` value.
    pub fn config_bytes(&self, bypass: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let fields: [(usize, &[u8]); 6] = [
            (0, &self.page_size_mask.to_le_bytes()),
            (8, &self.input_range.0.to_le_bytes()),
            (16, &self.input_range.1.to_le_bytes()),
            (24, &self.domain_range.0.to_le_bytes()),
            (28, &self.domain_range.1.to_le_bytes()),
            (32, &self.probe_size.to_le_bytes()),
        ];
        for (off, bytes) in fields {
            if let Some(dst) = c.get_mut(off..off + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        }
        if let Some(b) = c.get_mut(36) {
            *b = u8::from(bypass);
        }
        c
    }
}
