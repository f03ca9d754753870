//! ACPI tables for the kvm backend: RSDP, XSDT, FADT (PM1a blocks, reset register), FACS,
//! MADT, DSDT (PCI root with `_CRS` windows and `_PRT`, COM1, `\_S5_`), MCFG, and any extra
//! tables the caller passes (the VIOT from `sluice-acpi`).

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name,
    Package, Path, ResourceTemplate, Scope,
};
use acpi_tables::facs::FACS;
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use thiserror::Error;

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"SLUICE";
const OEM_TABLE_ID: [u8; 8] = *b"SLUICEVM";

/// The tables cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AcpiError {
    /// An extra table has no valid header.
    #[error("extra ACPI table #{0} is not a table (too short or length field wrong)")]
    BadExtraTable(usize),
    /// Everything does not fit the BIOS area.
    #[error("ACPI tables need {0} bytes, more than the {1} available")]
    TooBig(u64, u64),
}

/// Tables and where they go.
pub struct AcpiImage {
    /// (guest-physical address, bytes), RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bits;
    g[3] = match bits {
        8 => 1,
        16 => 2,
        _ => 3,
    };
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// FADT revision 6.5 with PM1a event/control blocks and the 0xCF9 reset register.
pub fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE_ID, 1);
    t.write_u32(36, facs as u32);
    t.write_u32(40, dsdt as u32);
    t.write_u8(45, 0); // unspecified PM profile
    t.write_u16(46, SCI_GSI as u16);
    t.write_u32(48, 0); // no SMI command port: ACPI mode is always on
    t.write_u32(56, u32::from(PM1A_EVT_PORT));
    t.write_u32(64, u32::from(PM1A_CNT_PORT));
    t.write_u8(88, 4);
    t.write_u8(89, 2);
    t.write_u16(96, 101); // no C2
    t.write_u16(98, 1001); // no C3
    // IAPC_BOOT_ARCH: VGA not present, CMOS RTC not present.
    t.write_u16(109, (1 << 2) | (1 << 5));
    // Flags: WBINVD, PROC_C1, PWR_BUTTON, SLP_BUTTON, RESET_REG_SUP.
    t.write_u32(112, 1 | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 10));
    t.write_bytes(116, &gas_io(RESET_PORT, 8));
    t.write_u8(128, 6);
    t.write_u8(131, 5); // minor version
    t.write_u64(132, facs);
    t.write_u64(140, dsdt);
    t.write_bytes(148, &gas_io(PM1A_EVT_PORT, 32));
    t.write_bytes(172, &gas_io(PM1A_CNT_PORT, 16));
    t.update_checksum();
    t.as_slice().to_vec()
}

/// MADT: one LAPIC per CPU, the IOAPIC, LINT1 as NMI on every CPU.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, 1);
    t.write_u32(36, LAPIC_ADDR as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present
    for id in 0..cpus {
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    let mut io = vec![1, 12, 0, 0];
    io.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&io);
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// DSDT for a PCI root on bus 0 with the given device slots.
pub fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, 1);
    // _PRT: INTA of every slot to its IOAPIC pin (what pci::intx_gsi programs).
    let prt_vals: Vec<(u32, u32)> = (1..32u32)
        .map(|dev| ((dev << 16) | 0xffff, PCI_INTX_GSI_BASE + dev % 8))
        .collect();
    let zero = 0u8;
    let prt_entries: Vec<Package> = prt_vals
        .iter()
        .map(|(addr, gsi)| Package::new(vec![addr, &zero, &zero, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_entries.iter().map(|p| p as &dyn Aml).collect();
    let prt = Package::new(prt_refs);
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_hi = AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let mem32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        MMIO32_START as u32,
        (MMIO32_BAR_END - 1) as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cf8, &io_lo, &io_hi, &mem32]);
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &zero);
    let seg = Name::new(Path::new("_SEG"), &zero);
    let uid = Name::new(Path::new("_UID"), &zero);
    let bbn = Name::new(Path::new("_BBN"), &zero);
    let crs_n = Name::new(Path::new("_CRS"), &crs);
    let prt_n = Name::new(Path::new("_PRT"), &prt);
    let pci0 = Device::new(
        Path::new("PCI0"),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs_n, &prt_n],
    );
    let com_io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let com_irq = Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com_crs = ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let com_crs_n = Name::new(Path::new("_CRS"), &com_crs);
    let com1 = Device::new(Path::new("COM1"), vec![&com_hid, &uid, &com_crs_n]);
    let ecam = Memory32Fixed::new(false, ECAM_BASE as u32, ECAM_SIZE as u32);
    let res_crs = ResourceTemplate::new(vec![&ecam]);
    let res_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
    let res_crs_n = Name::new(Path::new("_CRS"), &res_crs);
    let mres = Device::new(Path::new("MRES"), vec![&res_hid, &uid, &res_crs_n]);
    Scope::new(Path::new("\\_SB_"), vec![&pci0, &com1, &mres]).to_aml_bytes(&mut t);
    let s5 = S5_SLP_TYP as u8;
    let s5_pkg = Package::new(vec![&s5, &zero, &zero, &zero]);
    Name::new(Path::new("_S5_"), &s5_pkg).to_aml_bytes(&mut t);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// MCFG with ECAM for bus 0.
pub fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
    m.add_ecam(ECAM_BASE, 0, 0, 0);
    let mut v = Vec::new();
    m.to_aml_bytes(&mut v);
    v
}

fn valid_table(t: &[u8]) -> bool {
    t.len() >= 36
        && t.get(4..8)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]))
            == Some(t.len() as u32)
}

/// Builds every table and lays them out from [`RSDP_ADDR`].
pub fn build(cpus: u8, extra: &[Vec<u8>]) -> Result<AcpiImage, AcpiError> {
    for (i, t) in extra.iter().enumerate() {
        if !valid_table(t) {
            return Err(AcpiError::BadExtraTable(i));
        }
    }
    let mut next = ACPI_TABLES_ADDR;
    let mut blobs = Vec::new();
    let mut place = |bytes: Vec<u8>, blobs: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = (at + bytes.len() as u64).div_ceil(16) * 16;
        blobs.push((at, bytes));
        at
    };
    let mut facs = Vec::new();
    FACS::new().to_aml_bytes(&mut facs);
    let facs_at = place(facs, &mut blobs);
    let dsdt_at = place(dsdt(), &mut blobs);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(place(fadt(dsdt_at, facs_at), &mut blobs));
    xsdt.add_entry(place(madt(cpus), &mut blobs));
    xsdt.add_entry(place(mcfg(), &mut blobs));
    for t in extra {
        xsdt.add_entry(place(t.clone(), &mut blobs));
    }
    let mut xb = Vec::new();
    xsdt.to_aml_bytes(&mut xb);
    let xsdt_at = place(xb, &mut blobs);
    if next > ACPI_END {
        return Err(AcpiError::TooBig(next - RSDP_ADDR, ACPI_END - RSDP_ADDR));
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp);
    blobs.insert(0, (RSDP_ADDR, rsdp));
    Ok(AcpiImage { blobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn at(img: &AcpiImage, addr: u64) -> &[u8] {
        &img.blobs
            .iter()
            .find(|b| b.0 == addr)
            .expect("table at address")
            .1
    }

    /// Walks RSDP -> XSDT -> tables the way an OS does and checks every checksum.
    #[test]
    fn tables_parse_back_with_valid_checksums() {
        let viot = sluice_acpi::viot_virtio_pci(
            sluice_devapi::Bdf::new(0, 1, 0),
            &[sluice_devapi::Bdf::new(0, 3, 0)],
        );
        let img = build(2, std::slice::from_ref(&viot)).unwrap();
        let rsdp = &img.blobs[0].1;
        assert_eq!(img.blobs[0].0, RSDP_ADDR);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp[..36]), 0);
        let xsdt = at(&img, u64_at(rsdp, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let n = (xsdt.len() - 36) / 8;
        let sigs: Vec<&[u8]> = (0..n)
            .map(|i| {
                let t = at(&img, u64_at(xsdt, 36 + 8 * i));
                assert_eq!(sum(t), 0, "checksum of {:?}", &t[0..4]);
                assert_eq!(u32_at(t, 4) as usize, t.len());
                &t[0..4]
            })
            .collect();
        assert_eq!(sigs, [&b"FACP"[..], b"APIC", b"MCFG", b"VIOT"]);
        let fadt = at(&img, u64_at(xsdt, 36));
        assert_eq!(fadt.len(), 276);
        let dsdt = at(&img, u64_at(fadt, 140));
        assert_eq!(u32_at(fadt, 40) as u64, u64_at(fadt, 140));
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert_eq!(u32_at(fadt, 64), u32::from(PM1A_CNT_PORT));
        assert_eq!(u64_at(fadt, 116 + 4), u64::from(RESET_PORT));
        let facs = at(&img, u64_at(fadt, 132));
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(at(&img, u64_at(xsdt, 36 + 24)), &viot[..]);
        // Every blob lies inside the BIOS area, none overlapping.
        let mut spans: Vec<(u64, u64)> = img
            .blobs
            .iter()
            .map(|b| (b.0, b.0 + b.1.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert!(spans.last().unwrap().1 <= ACPI_END);
    }

    #[test]
    fn madt_lists_cpus_ioapic_and_nmi() {
        let m = madt(3);
        assert_eq!(sum(&m), 0);
        assert_eq!(u32_at(&m, 36), LAPIC_ADDR as u32);
        let mut o = 44;
        let mut kinds = Vec::new();
        while o < m.len() {
            kinds.push((m[o], m[o + 2], m[o + 3]));
            o += usize::from(m[o + 1]);
        }
        assert_eq!(o, m.len());
        assert_eq!(
            kinds.iter().map(|k| k.0).collect::<Vec<_>>(),
            [0, 0, 0, 1, 4]
        );
        assert_eq!(kinds[2], (0, 2, 2), "uid and APIC ID of CPU 2");
        assert_eq!(u32_at(&m, 44 + 24 + 4), IOAPIC_ADDR as u32);
    }

    #[test]
    fn dsdt_and_mcfg_contents() {
        let d = dsdt();
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"_PRT") && has(b"_S5_") && has(b"COM1"));
        // EISA ID of PNP0A08 as AML encodes it.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        // The 32-bit window's bounds appear in the DWordMemory descriptor.
        assert!(has(&(MMIO32_START as u32).to_le_bytes()));
        assert!(has(&((MMIO32_BAR_END - 1) as u32).to_le_bytes()));
        let m = mcfg();
        assert_eq!(&m[0..4], b"MCFG");
        assert_eq!(sum(&m), 0);
        assert_eq!(u64_at(&m, 44), ECAM_BASE);
        assert_eq!((m[54], m[55]), (0, 0), "bus range 0..=0");
    }

    #[test]
    fn bad_extra_tables_are_refused() {
        assert_eq!(
            build(1, &[vec![0u8; 10]]).err(),
            Some(AcpiError::BadExtraTable(0))
        );
        let huge = {
            let mut t = Sdt::new(*b"HUGE", 0x20000, 1, OEM_ID, OEM_TABLE_ID, 1);
            t.update_checksum();
            t.as_slice().to_vec()
        };
        assert!(matches!(build(1, &[huge]), Err(AcpiError::TooBig(..))));
    }
}
