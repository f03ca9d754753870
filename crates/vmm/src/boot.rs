//! Loading the kernel and building the state the boot protocols expect: the identity page
//! tables, the GDT, Linux `boot_params` (64-bit bzImage/ELF entry) or PVH `hvm_start_info`
//! (32-bit entry), and the vCPU registers for each.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, Cmdline, KernelLoader, load_cmdline};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Loading the guest failed.
#[derive(Debug, Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("{what} {path}: {source}")]
    Input {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF (vmlinux, PVH or 64-bit entry) nor a bzImage.
    #[error("kernel {path}: neither a loadable ELF ({elf}) nor a bzImage ({bz})")]
    KernelFormat {
        /// Path.
        path: PathBuf,
        /// Why the ELF loader refused.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused.
        bz: linux_loader::loader::Error,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit below the kernel's limit.
    #[error("initrd of {size} bytes does not fit in guest RAM below {limit:#x}")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// Highest address allowed.
        limit: u64,
    },
    /// Writing guest memory failed (a layout bug or too little RAM).
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::Memory { what, source }
}

/// How the boot CPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode at `rip`, `rsi` = boot_params (Linux 64-bit boot protocol; also the
    /// bare-metal test guest).
    Long64 {
        /// Entry point.
        rip: u64,
    },
    /// PVH: 32-bit protected mode, paging off, `ebx` = hvm_start_info.
    Pvh32 {
        /// Entry point.
        rip: u64,
    },
}

/// What loading produced.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// How to enter.
    pub entry: Entry,
    /// First byte after the kernel.
    pub kernel_end: u64,
}

/// GDT entry from flags, base and limit (the classic encoding).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Selectors of the boot GDT (Linux's __BOOT_CS/__BOOT_DS are 0x10/0x18).
pub const CODE32_SEL: u16 = 0x08;
/// 64-bit code.
pub const CODE64_SEL: u16 = 0x10;
/// Flat data.
pub const DATA_SEL: u16 = 0x18;
/// TSS.
pub const TSS_SEL: u16 = 0x20;

/// The boot GDT: null, code32, code64, data, TSS.
pub fn gdt() -> [u64; 5] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The KVM segment a GDT entry describes.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Identity page tables for the first 4 GiB with 2 MiB pages: (address, bytes) to write.
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    let mut out = Vec::new();
    out.push((PML4_ADDR, (PDPT_ADDR | P_RW).to_le_bytes().to_vec()));
    let mut pdpt = Vec::new();
    for gib in 0..4u64 {
        pdpt.extend_from_slice(&((PD_ADDR + gib * 0x1000) | P_RW).to_le_bytes());
    }
    out.push((PDPT_ADDR, pdpt));
    let mut pd = Vec::with_capacity(4 * 4096);
    for i in 0..2048u64 {
        pd.extend_from_slice(&((i << 21) | P_RW | PS).to_le_bytes());
    }
    out.push((PD_ADDR, pd));
    out
}

/// Writes the GDT, an empty IDT and the page tables.
pub fn write_cpu_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let gdt: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(GDT_ADDR))
        .map_err(mem_err("GDT"))?;
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err("IDT"))?;
    for (addr, bytes) in page_tables() {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(mem_err("page tables"))?;
    }
    Ok(())
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Input {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads `kernel` (ELF first, then bzImage), the command line and the initramfs, and writes
/// the boot-protocol structures. Returns how to enter the kernel.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_mib: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    elf_64bit: bool,
) -> Result<Loaded, BootError> {
    let mut f = open("kernel", kernel)?;
    let (entry, kernel_end, hdr) =
        match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => {
                let entry = match r.pvh_boot_cap {
                    PvhBootCapability::PvhEntryPresent(a) if !elf_64bit => {
                        Entry::Pvh32 { rip: a.raw_value() }
                    }
                    _ => Entry::Long64 {
                        rip: r.kernel_load.raw_value(),
                    },
                };
                (entry, r.kernel_end, None)
            }
            Err(elf) => match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
                Ok(r) => (
                    Entry::Long64 {
                        rip: r.kernel_load.raw_value() + 0x200,
                    },
                    r.kernel_end,
                    r.setup_header,
                ),
                Err(bz) => {
                    return Err(BootError::KernelFormat {
                        path: kernel.to_path_buf(),
                        elf,
                        bz,
                    });
                }
            },
        };
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.len() as u32;

    let max_initrd = hdr
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(0x37ff_ffff);
    let initrd_at = match initrd {
        Some(p) => Some(load_initrd(mem, mem_mib, p, kernel_end, max_initrd)?),
        None => None,
    };
    write_cpu_tables(mem)?;
    match entry {
        Entry::Long64 { .. } => {
            let bp = boot_params_for(hdr, mem_mib, cmdline_len, initrd_at);
            mem.write_obj(bp, GuestAddress(BOOT_PARAMS_ADDR))
                .map_err(mem_err("boot_params"))?;
        }
        Entry::Pvh32 { .. } => {
            for (addr, bytes) in pvh_start_info(mem_mib, initrd_at) {
                mem.write_slice(&bytes, GuestAddress(addr))
                    .map_err(mem_err("PVH start info"))?;
            }
        }
    }
    Ok(Loaded { entry, kernel_end })
}

/// Places the initramfs page-aligned at the top of low RAM below `max` (and above the kernel).
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_mib: u64,
    path: &Path,
    kernel_end: u64,
    max: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = open("initrd", path)?;
    let size = f
        .metadata()
        .map_err(|source| BootError::Input {
            what: "initrd",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let low_end = ram_regions(mem_mib)
        .first()
        .map(|r| r.1)
        .unwrap_or(0)
        .min(max + 1);
    let addr = low_end.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end.max(HIMEM_START) => a,
        _ => {
            return Err(BootError::InitrdTooBig {
                size,
                limit: low_end,
            });
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(mem_err("initrd"))?;
    Ok((addr, size))
}

/// Linux `boot_params` for the 64-bit boot protocol.
pub fn boot_params_for(
    hdr: Option<setup_header>,
    mem_mib: u64,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut bp = boot_params::default();
    if let Some(h) = hdr {
        bp.hdr = h;
    }
    bp.hdr.type_of_loader = 0xff;
    bp.hdr.boot_flag = 0xaa55;
    bp.hdr.header = 0x5372_6448; // "HdrS"
    bp.hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH | CAN_USE_HEAP
    bp.hdr.heap_end_ptr = 0xfe00;
    bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    bp.hdr.cmdline_size = cmdline_len;
    if bp.hdr.kernel_alignment == 0 {
        bp.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    bp.acpi_rsdp_addr = RSDP_ADDR;
    let map = memory_map(mem_mib);
    for (slot, (addr, size, type_)) in bp.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = *type_;
    }
    bp.e820_entries = map.len().min(bp.e820_table.len()) as u8;
    bp
}

/// PVH `hvm_start_info`, module list and memory map, as (address, bytes).
pub fn pvh_start_info(mem_mib: u64, initrd: Option<(u64, u64)>) -> Vec<(u64, Vec<u8>)> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let map = memory_map(mem_mib);
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes());
    info.extend_from_slice(&PVH_MODLIST_ADDR.to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&RSDP_ADDR.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    let mut out = vec![(PVH_INFO_ADDR, info)];
    if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        out.push((PVH_MODLIST_ADDR, m));
    }
    let mut mm = Vec::with_capacity(24 * map.len());
    for (addr, size, type_) in map {
        mm.extend_from_slice(&addr.to_le_bytes());
        mm.extend_from_slice(&size.to_le_bytes());
        mm.extend_from_slice(&type_.to_le_bytes());
        mm.extend_from_slice(&0u32.to_le_bytes());
    }
    out.push((PVH_MEMMAP_ADDR, mm));
    out
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Special registers for `entry` on top of the vCPU's reset state `base`.
pub fn sregs_for(entry: Entry, mut base: kvm_sregs) -> kvm_sregs {
    let g = gdt();
    base.gdt.base = GDT_ADDR;
    base.gdt.limit = (std::mem::size_of_val(&g) - 1) as u16;
    base.idt.base = IDT_ADDR;
    base.idt.limit = 7;
    let data = segment_from_gdt(g[3], DATA_SEL);
    let code = match entry {
        Entry::Long64 { .. } => segment_from_gdt(g[2], CODE64_SEL),
        Entry::Pvh32 { .. } => segment_from_gdt(g[1], CODE32_SEL),
    };
    base.cs = code;
    base.ds = data;
    base.es = data;
    base.fs = data;
    base.gs = data;
    base.ss = data;
    base.tr = segment_from_gdt(g[4], TSS_SEL);
    match entry {
        Entry::Long64 { .. } => {
            base.cr3 = PML4_ADDR;
            base.cr4 |= CR4_PAE;
            base.cr0 |= CR0_PE | CR0_PG | CR0_ET | CR0_NE;
            base.efer |= EFER_LME | EFER_LMA;
        }
        Entry::Pvh32 { .. } => {
            base.cr0 = (base.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            base.cr4 = 0;
            base.efer = 0;
        }
    }
    base
}

/// General registers for `entry`.
pub fn regs_for(entry: Entry) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 2,
        ..Default::default()
    };
    match entry {
        Entry::Long64 { rip } => {
            r.rip = rip;
            r.rsp = BOOT_STACK;
            r.rbp = BOOT_STACK;
            r.rsi = BOOT_PARAMS_ADDR;
        }
        Entry::Pvh32 { rip } => {
            r.rip = rip;
            r.rbx = PVH_INFO_ADDR;
        }
    }
    r
}

/// x87/SSE state at reset as Linux expects it.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_long_mode_code_and_flat_data() {
        let g = gdt();
        assert_eq!(g[2], 0x00af_9b00_0000_ffff);
        assert_eq!(g[3], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(g[2], CODE64_SEL);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.s), (1, 0, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment_from_gdt(g[1], CODE32_SEL);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let tss = segment_from_gdt(g[4], TSS_SEL);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_4gib_with_2mib_pages() {
        let t = page_tables();
        assert_eq!(t[0], (PML4_ADDR, (PDPT_ADDR | 3).to_le_bytes().to_vec()));
        let pdpt = &t[1].1;
        for gib in 0..4 {
            let e = u64::from_le_bytes(pdpt[gib * 8..gib * 8 + 8].try_into().unwrap());
            assert_eq!(e, (PD_ADDR + gib as u64 * 0x1000) | 3);
        }
        let pd = &t[2].1;
        assert_eq!(pd.len(), 4 * 4096);
        // The entry for the LAPIC page maps it 1:1.
        let idx = (LAPIC_ADDR >> 21) as usize;
        let e = u64::from_le_bytes(pd[idx * 8..idx * 8 + 8].try_into().unwrap());
        assert_eq!(e & !0xfff, LAPIC_ADDR & !0x1f_ffff);
        assert_eq!(e & 0x83, 0x83);
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_e820_and_rsdp() {
        let bp = boot_params_for(None, 512, 42, Some((0x1f00_0000, 0x1234)));
        let hdr = bp.hdr;
        assert_eq!(
            (hdr.boot_flag, hdr.header, hdr.type_of_loader),
            (0xaa55, 0x5372_6448, 0xff)
        );
        assert_eq!(
            (hdr.cmd_line_ptr, hdr.cmdline_size),
            (CMDLINE_ADDR as u32, 42)
        );
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0x1f00_0000, 0x1234));
        let rsdp = bp.acpi_rsdp_addr;
        assert_eq!(rsdp, RSDP_ADDR);
        assert_eq!(bp.e820_entries, 4);
        let e = bp.e820_table[2];
        let (a, s, t) = (e.addr, e.size, e.r#type);
        assert_eq!((a, s, t), (HIMEM_START, (512 << 20) - HIMEM_START, 1));
    }

    #[test]
    fn pvh_start_info_layout() {
        let parts = pvh_start_info(256, Some((0x0f00_0000, 0x1000)));
        let info = &parts[0].1;
        assert_eq!(parts[0].0, PVH_INFO_ADDR);
        assert_eq!(info.len(), 56);
        assert_eq!(
            u32::from_le_bytes(info[0..4].try_into().unwrap()),
            0x336e_c578
        );
        assert_eq!(u32::from_le_bytes(info[12..16].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(info[24..32].try_into().unwrap()),
            CMDLINE_ADDR
        );
        assert_eq!(
            u64::from_le_bytes(info[32..40].try_into().unwrap()),
            RSDP_ADDR
        );
        assert_eq!(u32::from_le_bytes(info[48..52].try_into().unwrap()), 4);
        assert_eq!(parts[1].0, PVH_MODLIST_ADDR);
        assert_eq!(parts[2].1.len(), 4 * 24);
    }

    #[test]
    fn registers_for_each_entry() {
        let s = sregs_for(Entry::Long64 { rip: 0x20_0000 }, kvm_sregs::default());
        assert_eq!(s.cr3, PML4_ADDR);
        assert!(s.cr0 & CR0_PG != 0 && s.cr4 & CR4_PAE != 0 && s.efer & EFER_LMA != 0);
        assert_eq!(s.cs.selector, CODE64_SEL);
        let r = regs_for(Entry::Long64 { rip: 0x20_0000 });
        assert_eq!((r.rip, r.rsi, r.rflags), (0x20_0000, BOOT_PARAMS_ADDR, 2));
        let s = sregs_for(Entry::Pvh32 { rip: 0x100_0000 }, kvm_sregs::default());
        assert_eq!((s.cr0 & CR0_PG, s.efer, s.cs.db), (0, 0, 1));
        assert_eq!(regs_for(Entry::Pvh32 { rip: 1 }).rbx, PVH_INFO_ADDR);
    }
}
