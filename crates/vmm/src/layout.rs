//! The guest-physical address map of a Sluice kvm-backend VM.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_6000  PVH start_info (+ modlist, memmap)
//! 0x0000_7000  Linux boot_params        0x0000_8ff0  initial stack (boot CPU)
//! 0x0000_9000  PML4, PDPT, 4 x PD       (identity map of the first 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line      0x0009_fc00..0x0010_0000 reserved (EBDA, ACPI)
//! 0x000e_0000  RSDP, then the other ACPI tables
//! 0x0010_0000  kernel (bzImage protected-mode part; ELF/PVH at its own p_paddr)
//! RAM up to min(size, 3 GiB), the rest from 4 GiB
//! 0xc000_0000..0xe000_0000  32-bit PCI MMIO window (BARs programmed by the VMM)
//! 0xe000_0000..0xe010_0000  ECAM for bus 0 (MCFG)
//! 0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC
//! ```

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty; the guest installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux zero page.
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Boot stack top.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (one per GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum command line, including the NUL.
pub const CMDLINE_MAX: usize = 0x10000;
/// End of low conventional memory (start of the EBDA hole).
pub const EBDA_START: u64 = 0x9fc00;
/// RSDP (inside the BIOS area Linux scans).
pub const RSDP_ADDR: u64 = 0xe0000;
/// Where the tables after the RSDP start.
pub const ACPI_TABLES_ADDR: u64 = 0xe0040;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// bzImage load address and lowest address for ELF kernels.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; low RAM ends here at the latest.
pub const MMIO32_START: u64 = 0xc000_0000;
/// End of the BAR window.
pub const MMIO32_BAR_END: u64 = 0xe000_0000;
/// ECAM base (bus 0 only).
pub const ECAM_BASE: u64 = 0xe000_0000;
/// ECAM size for one bus.
pub const ECAM_SIZE: u64 = 1 << 20;
/// IOAPIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// RAM above the hole starts here.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// KVM TSS (three pages), below the identity-map page near the top of the 32-bit space.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM identity-map page (needed on Intel for real mode; harmless elsewhere).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// ACPI SCI.
pub const SCI_GSI: u32 = 9;
/// First IOAPIC pin used for PCI INTx (pins 16..23).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;

/// ACPI PM1a event block (status + enable).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// SLP_TYP value the DSDT's `\_S5_` declares.
pub const S5_SLP_TYP: u16 = 5;
/// Reset control register (as on q35), also the FADT reset register.
pub const RESET_PORT: u16 = 0xcf9;

/// Guest RAM regions for `mem_mib` MiB: below the 32-bit hole, then above 4 GiB.
pub fn ram_regions(mem_mib: u64) -> Vec<(u64, u64)> {
    let total = mem_mib << 20;
    let low = total.min(MMIO32_START);
    let mut v = vec![(0, low)];
    if total > low {
        v.push((HIGH_RAM_START, total - low));
    }
    v
}

/// The e820 / PVH memory map: (start, size, type) with type 1 = RAM, 2 = reserved.
pub fn memory_map(mem_mib: u64) -> Vec<(u64, u64, u32)> {
    let mut m = Vec::new();
    for (start, size) in ram_regions(mem_mib) {
        if start == 0 {
            m.push((0, EBDA_START, 1));
            m.push((EBDA_START, HIMEM_START - EBDA_START, 2));
            if size > HIMEM_START {
                m.push((HIMEM_START, size - HIMEM_START, 1));
            }
        } else {
            m.push((start, size, 1));
        }
    }
    m.push((ECAM_BASE, ECAM_SIZE, 2));
    m.sort_by_key(|e| e.0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_regions(512), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_regions(4096),
            vec![
                (0, MMIO32_START),
                (HIGH_RAM_START, (4096 << 20) - MMIO32_START)
            ]
        );
        let map = memory_map(512);
        assert_eq!(map[0], (0, EBDA_START, 1));
        assert_eq!(map[1], (EBDA_START, HIMEM_START - EBDA_START, 2));
        assert_eq!(map[2], (HIMEM_START, (512 << 20) - HIMEM_START, 1));
        assert_eq!(map[3], (ECAM_BASE, ECAM_SIZE, 2));
    }
}
