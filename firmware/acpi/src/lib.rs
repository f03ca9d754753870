//! ACPI tables that describe Sluice's platform to the guest.
//!
//! [`viot_virtio_pci`] builds the VIOT (ACPI 6.4 §5.2.31 "Virtual I/O Translation Table") that
//! tells Linux which PCI functions sit behind a virtio-iommu on PCI: one virtio-pci-IOMMU node and
//! one PCI-range node per translated endpoint, whose endpoint ID is the function's requester ID
//! (the ID virtio-iommu requests carry).
#![forbid(unsafe_code)]

use acpi_tables::Aml;
use acpi_tables::viot::{PciDevice, PciRange, VIOT, VirtIoPciIommu};
use sluice_devapi::Bdf;

const OEM_ID: [u8; 6] = *b"SLUICE";
const OEM_TABLE_ID: [u8; 8] = *b"SLUICEVT";

fn pci(bdf: Bdf) -> PciDevice {
    PciDevice::new(0, bdf.bus(), bdf.dev(), bdf.func())
}

/// A complete VIOT (header included, checksummed) for a virtio-iommu at `iommu` translating
/// `endpoints` on PCI segment 0.
pub fn viot_virtio_pci(iommu: Bdf, endpoints: &[Bdf]) -> Vec<u8> {
    let mut viot = VIOT::new(OEM_ID, OEM_TABLE_ID, 1);
    // The IOMMU node first: ranges refer to it by its offset in the table.
    let handle = viot.add_virtio_pci_iommu(VirtIoPciIommu::new(pci(iommu)));
    for ep in endpoints {
        viot.add_pci_range(PciRange::new(pci(*ep), pci(*ep), &handle));
    }
    let mut bytes = Vec::new();
    viot.to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    /// Decodes the table the way Linux's drivers/acpi/viot.c walks it.
    #[test]
    fn viot_layout_matches_the_spec() {
        let t = viot_virtio_pci(Bdf::new(0, 2, 0), &[Bdf::new(0, 3, 0), Bdf::new(0, 5, 0)]);
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        let count = u16_at(&t, 36);
        let first = u16_at(&t, 38) as usize;
        assert_eq!((count, first), (3, 48));
        // Node 1: virtio-pci IOMMU (type 3), length 16, segment 0, BDF 00:02.0.
        assert_eq!((t[48], u16_at(&t, 50)), (3, 16));
        assert_eq!(u16_at(&t, 54), 0x10);
        // Nodes 2 and 3: PCI ranges (type 1, length 24) with endpoint ID = BDF, output = node 1.
        for (i, bdf) in [(0, 0x18u16), (1, 0x28u16)] {
            let o = 64 + 24 * i;
            assert_eq!((t[o], u16_at(&t, o + 2)), (1, 24));
            assert_eq!(u32_at(&t, o + 4), u32::from(bdf), "endpoint start");
            assert_eq!(
                (u16_at(&t, o + 12), u16_at(&t, o + 14)),
                (bdf, bdf),
                "BDF range"
            );
            assert_eq!(u16_at(&t, o + 16), 48, "output node");
        }
    }
}
