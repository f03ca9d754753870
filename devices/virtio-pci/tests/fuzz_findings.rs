//! Regression tests for what the `virtio_pci_transport` fuzz target found (reproducers in
//! `fuzz/artifacts-found/`): the ISR-window read underflow, device-config accesses past the
//! window, and an IOMMU bypass by rewriting DRIVER_FEATURE after FEATURES_OK. All three are
//! fixed in `transport.rs`; these tests keep them fixed.

use std::sync::{Arc, Mutex};

use sluice_devapi::{
    Bdf, DmaFault, DmaResolution, DmaTranslate, Endpoint, EndpointIommu, NoHooks, NullInterrupts,
};
use sluice_pci::PciFunction;
use sluice_virtio_pci::{
    ActivateError, ActivationContext, DmaMemory, SharedMemory, TransportOptions, VirtioDevice,
    VirtioPciFunction,
};
use vm_memory::{GuestAddress, GuestMemoryMmap, Iotlb, Permissions};

#[derive(Default)]
struct Seen {
    config: Vec<(u64, usize)>,
    translated: Option<bool>,
}

struct Probe(Arc<Mutex<Seen>>);

impl VirtioDevice for Probe {
    fn device_type(&self) -> u16 {
        2
    }
    fn name(&self) -> &str {
        "probe0"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap().config.push((offset, data.len()));
        data.fill(0);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().config.push((offset, data.len()));
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.0.lock().unwrap().translated = Some(matches!(ctx.dma, DmaMemory::Translated { .. }));
        Ok(())
    }
    fn queue_notify(&self, _queue: u16) {}
    fn reset(&mut self) {}
}

#[derive(Debug)]
struct Identity;

impl DmaTranslate for Identity {
    fn resolve(
        &self,
        _iova: u64,
        _len: u64,
        _access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        fill.set_mapping(
            GuestAddress(0),
            GuestAddress(0),
            0x10_0000,
            Permissions::ReadWrite,
        )
        .map_err(|e| DmaFault::new(0, e.to_string()))?;
        Ok(DmaResolution::Translated { domain: 1 })
    }
}

fn function(iommu: bool) -> (VirtioPciFunction, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let iommu = iommu.then(|| {
        EndpointIommu::new(
            Endpoint::Pci(Bdf::new(0, 3, 0)),
            Arc::new(Identity),
            Arc::new(NoHooks),
        )
    });
    let f = VirtioPciFunction::new(
        Box::new(Probe(seen.clone())),
        TransportOptions {
            bdf: Bdf::new(0, 3, 0),
            access_platform: false,
            msix_vectors: 0,
            class_code: 0x01_00_00,
            iommu,
        },
        SharedMemory::new(mem),
        Arc::new(NullInterrupts),
        Arc::new(NoHooks),
    )
    .unwrap();
    (f, seen)
}

fn w(f: &VirtioPciFunction, off: u64, size: usize, v: u64) {
    f.bar_write(0, off, &v.to_le_bytes()[..size]);
}

#[test]
fn a_read_inside_the_isr_window_but_past_its_first_byte_reaches_nothing() {
    let (f, seen) = function(false);
    let mut b = [0xaau8; 4];
    f.bar_read(0, 0x1004, &mut b);
    assert_eq!(b, [0; 4]);
    assert!(seen.lock().unwrap().config.is_empty());
}

#[test]
fn a_device_config_access_never_runs_past_its_window() {
    let (f, seen) = function(false);
    w(&f, 0x2fff, 8, u64::MAX);
    let mut b = [0u8; 8];
    f.bar_read(0, 0x2ffc, &mut b);
    for (off, len) in &seen.lock().unwrap().config {
        assert!(off + *len as u64 <= 0x1000, "device saw {off:#x}/{len}");
    }
}

#[test]
fn features_cannot_change_after_features_ok_so_dma_stays_translated() {
    let (f, seen) = function(true);
    // A queue inside memory, then ACK | DRIVER, VERSION_1 | ACCESS_PLATFORM, FEATURES_OK.
    w(&f, 0x16, 2, 0);
    w(&f, 0x18, 2, 16);
    w(&f, 0x20, 8, 0x1000);
    w(&f, 0x28, 8, 0x2000);
    w(&f, 0x30, 8, 0x3000);
    w(&f, 0x1c, 2, 1);
    w(&f, 0x14, 1, 0x1);
    w(&f, 0x14, 1, 0x3);
    w(&f, 0x08, 4, 1);
    w(&f, 0x0c, 4, 0b11);
    w(&f, 0x14, 1, 0xb);
    assert_eq!(f.status() & 0x8, 0x8, "FEATURES_OK accepted");
    // The hostile part: drop ACCESS_PLATFORM after FEATURES_OK, then DRIVER_OK.
    w(&f, 0x0c, 4, 0b01);
    w(&f, 0x14, 1, 0xf);
    let translated = seen.lock().unwrap().translated;
    assert!(
        translated.is_none_or(|t| t),
        "the device was activated with untranslated DMA behind an IOMMU"
    );
}
