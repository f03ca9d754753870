//! Unit-test helpers: real device-host functions to read layouts from and drive.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_devapi::NoHooks;
use sluice_host::{DeviceSet, DiskSpec, HostOptions};
use sluice_pci::PciFunction;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// A device set with one virtio-blk (with `vectors` MSI-X vectors) on 1 MiB of guest RAM, and
/// the scratch directory holding its image.
pub fn blk_set(tag: &str, vectors: u16) -> (DeviceSet, PathBuf) {
    let dir = std::env::temp_dir().join(format!("sluice-vmm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("d.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let opts = HostOptions {
        msix_vectors: vectors,
        ..Default::default()
    };
    let disk = DiskSpec {
        path,
        read_only: false,
        iommu: false,
    };
    let set = DeviceSet::with_options(&[disk], Arc::new(NoHooks), &opts).unwrap();
    set.mem
        .replace(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    (set, dir)
}

/// The virtio-blk function of [`blk_set`].
pub fn virtio_blk(tag: &str, vectors: u16) -> (Arc<dyn PciFunction>, PathBuf) {
    let (set, dir) = blk_set(tag, vectors);
    (set.devices[0].function.clone(), dir)
}

/// Drives `f` (a virtio-blk) as a driver would up to DRIVER_OK with queue 0 (8 entries) in
/// guest RAM at 0x1000.
pub fn drive_to_driver_ok(f: &dyn PciFunction) {
    let w16 = |off: u64, v: u16| f.bar_write(0, off, &v.to_le_bytes());
    let w32 = |off: u64, v: u32| f.bar_write(0, off, &v.to_le_bytes());
    let w64 = |off: u64, v: u64| f.bar_write(0, off, &v.to_le_bytes());
    f.bar_write(0, 0x14, &[1]);
    f.bar_write(0, 0x14, &[3]);
    w32(0x08, 1); // driver_feature_select: bits 32..63
    w32(0x0c, 1); // VERSION_1
    f.bar_write(0, 0x14, &[0x0b]);
    w16(0x16, 0); // queue_select
    w16(0x18, 8); // queue_size
    w64(0x20, 0x1000); // desc
    w64(0x28, 0x2000); // driver (avail)
    w64(0x30, 0x3000); // device (used)
    w16(0x1c, 1); // queue_enable
    f.bar_write(0, 0x14, &[0x0f]);
}

/// A VM with an in-kernel irqchip, or `None` (printed as SKIPPED) without a usable /dev/kvm.
pub fn vm_or_skip() -> Option<Arc<kvm_ioctls::VmFd>> {
    if crate::kvm_status() == crate::KvmStatus::Absent {
        println!("SKIPPED: no /dev/kvm");
        return None;
    }
    let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    Some(Arc::new(vm))
}
