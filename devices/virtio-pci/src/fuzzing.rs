//! The body of the `virtio_pci_transport` fuzz target (`fuzz/fuzz_targets/`): operation
//! sequences of configuration-space and BAR accesses (common config, ISR, device config,
//! doorbells, the `pci_cfg` access window, MSI-X table and PBA), status and queue set-up
//! shortcuts, BAR decoding, function-level resets and device-side interrupts, against one
//! [`VirtioPciFunction`] carrying a recording mock device.
//!
//! BAR accesses respect the bus contract (`offset + size <= BAR size`, 1/2/4/8 bytes), which
//! the bus is responsible for; the `pci_cfg` window is reached with whatever the guest put in
//! the capability.
//!
//! Invariants (`assert!`, so the fuzzer reports a violation as a crash):
//! - the device sees config accesses only inside its 4 KiB window;
//! - the device is activated only once per reset, with acked ⊆ offered, VERSION_1 acked,
//!   queue indices unique and in range, sizes ≤ their maximum; behind an IOMMU only with
//!   ACCESS_PLATFORM acked, a translated DMA view, and rings inside the IOMMU's window (no
//!   DMA without translation);
//! - doorbells reach the device only while it is running; DRIVER_OK without NEEDS_RESET means
//!   activated;
//! - config-space writes change nothing outside the bytes written, and the read-only header
//!   and capability chain never change;
//! - an MSI is delivered only with MSI-X enabled and not function-masked, and carries the
//!   address/data of an unmasked table entry; INTx is asserted only while INTx Disable is
//!   clear;
//! - `decode_bar` answers only for enabled BARs, with an offset inside the BAR.
#![allow(clippy::panic, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex, MutexGuard};

use sluice_devapi::{
    Bdf, DmaFault, DmaResolution, DmaTranslate, Endpoint, EndpointIommu, InterruptSink, NoHooks,
};
use sluice_pci::PciFunction;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, Iotlb, Permissions};

use crate::caps;
use crate::common::reg;
use crate::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use crate::{
    ActivateError, ActivationContext, DmaMemory, SharedMemory, TransportOptions,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, VirtioPciFunction,
};

const MEM_SIZE: usize = 0x1_0000;
/// The IOMMU maps [0, IOMMU_WINDOW) identity and refuses everything else.
const IOMMU_WINDOW: u64 = 0x8000;
const BAR0_BASE: u64 = 0xfe00_0000;
const BAR1_BASE: u64 = 0xfe01_0000;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MAX_OPS: usize = 400;
const QUEUE_MAX: [u16; 3] = [16, 8, 256];

/// What the mock device saw.
#[derive(Default)]
struct Probe {
    active: bool,
    activations: u32,
    notifies: u32,
    interrupt: Option<Arc<VirtioInterrupt>>,
    /// Set by the harness before each op: what activation must satisfy.
    offered: u64,
    behind_iommu: bool,
}

struct MockDevice {
    probe: Arc<Mutex<Probe>>,
    features: u64,
}

fn lock(p: &Mutex<Probe>) -> MutexGuard<'_, Probe> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device's config window is 4 KiB: the transport must never hand it an access that runs
/// past its end.
fn check_window(offset: u64, len: usize, what: &str) {
    let end = offset.checked_add(len as u64);
    let inside = end.is_some_and(|e| e <= caps::DEVICE_SIZE);
    assert!(
        inside,
        "device config {what} outside its window: offset {offset:#x}, {len} bytes"
    );
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u16 {
        2
    }
    fn name(&self) -> &str {
        "fuzz0"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        check_window(offset, data.len(), "read");
        data.iter_mut().for_each(|b| *b = 0x5a);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        check_window(offset, data.len(), "write");
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        let mut p = lock(&self.probe);
        assert!(!p.active, "activated twice without a reset");
        let acked = ctx.acked_features;
        // DRIVER_FEATURE is frozen after FEATURES_OK and re-checked at DRIVER_OK, so what
        // activates is what FEATURES_OK accepted (a dropped ACCESS_PLATFORM would be a bypass).
        assert_eq!(
            acked & !p.offered,
            0,
            "acked {acked:#x} beyond offered {:#x}",
            p.offered
        );
        assert!(
            acked & (1 << VIRTIO_F_VERSION_1) != 0,
            "activated without VERSION_1"
        );
        let mut seen = Vec::new();
        for (i, q) in &ctx.queues {
            assert!(!seen.contains(i), "queue {i} twice");
            seen.push(*i);
            let max = QUEUE_MAX.get(usize::from(*i)).copied();
            assert!(max.is_some(), "queue {i} does not exist");
            assert!(
                q.size() <= max.unwrap_or(0),
                "queue {i} larger than its maximum"
            );
            if p.behind_iommu {
                for (what, addr, len) in [
                    ("desc", q.desc_table(), 16 * u64::from(q.size())),
                    ("avail", q.avail_ring(), 6 + 2 * u64::from(q.size())),
                    ("used", q.used_ring(), 6 + 8 * u64::from(q.size())),
                ] {
                    assert!(
                        addr.checked_add(len).is_some_and(|e| e <= IOMMU_WINDOW),
                        "queue {i} {what} ring at {addr:#x} outside the IOMMU window reached the device"
                    );
                }
            }
        }
        if p.behind_iommu {
            assert!(
                acked & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0,
                "behind an IOMMU without ACCESS_PLATFORM"
            );
            assert!(
                matches!(ctx.dma, DmaMemory::Translated { .. }),
                "behind an IOMMU with untranslated DMA"
            );
        }
        p.active = true;
        p.activations += 1;
        p.interrupt = Some(ctx.interrupt);
        Ok(())
    }
    fn queue_notify(&self, queue: u16) {
        let mut p = lock(&self.probe);
        assert!(
            p.active,
            "doorbell for queue {queue} reached an inactive device"
        );
        p.notifies += 1;
    }
    fn reset(&mut self) {
        let mut p = lock(&self.probe);
        p.active = false;
        p.interrupt = None;
    }
}

/// Records interrupts.
#[derive(Default)]
struct Sink {
    msi: Mutex<Vec<(u64, u32)>>,
    intx_raised: Mutex<u32>,
}

impl InterruptSink for Sink {
    fn set_level(&self, _line: u32, asserted: bool) {
        if asserted {
            *self.intx_raised.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
    }
    fn msi(&self, address: u64, data: u32) {
        self.msi
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((address, data));
    }
}

/// Identity below the window, faults above.
#[derive(Debug)]
struct WindowIommu;

impl DmaTranslate for WindowIommu {
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        _access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        if iova.checked_add(len).is_none_or(|e| e > IOMMU_WINDOW) {
            return Err(DmaFault::new(1, "outside the window"));
        }
        fill.set_mapping(
            GuestAddress(0),
            GuestAddress(0),
            IOMMU_WINDOW as usize,
            Permissions::ReadWrite,
        )
        .map_err(|e| DmaFault::new(0, e.to_string()))?;
        Ok(DmaResolution::Translated { domain: 1 })
    }
}

use sluice_devapi::fuzz_support::FuzzInput as Input;

fn size_of(sel: u8) -> usize {
    [1usize, 2, 4, 8][usize::from(sel & 3)]
}

struct Rig {
    f: VirtioPciFunction,
    probe: Arc<Mutex<Probe>>,
    sink: Arc<Sink>,
    msix_vectors: u16,
    /// Config offsets that must never change, with their values.
    read_only: Vec<(u16, u8)>,
    /// `pci_cfg_data`: reading it performs a BAR access, so snapshots skip it.
    window: u16,
    msix_cap: Option<u16>,
}

impl Rig {
    fn cfg_read(&self, off: u16, len: usize) -> u64 {
        let mut b = [0u8; 8];
        let b = &mut b[..len.min(8)];
        self.f.config_read(off, b);
        sluice_pci::le_value(b)
    }

    /// The 256 config bytes, read a dword at a time; the `pci_cfg` data window (dword
    /// aligned) reads as 0.
    fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; 256];
        for (i, dw) in out.chunks_mut(4).enumerate() {
            let o = 4 * i as u16;
            if o != self.window {
                self.f.config_read(o, dw);
            }
        }
        out
    }

    fn bar0_write(&self, off: u64, size: usize, v: u64) {
        self.f.bar_write(0, off, &v.to_le_bytes()[..size]);
    }

    fn status(&self, v: u8) {
        self.bar0_write(reg::DEVICE_STATUS, 1, u64::from(v));
    }

    /// Checks everything that must hold between operations.
    fn check(&self, before_msi: usize, before_intx: u32) {
        // Read-only header and capability chain: the dwords holding them, read as `snapshot`
        // reads them (the `pci_cfg` data window as 0), each once (`read_only` is sorted).
        let mut dword: Option<(u16, [u8; 4])> = None;
        for (o, v) in &self.read_only {
            let base = o & !3;
            let bytes = match dword {
                Some((b, bytes)) if b == base => bytes,
                _ => {
                    let mut bytes = [0u8; 4];
                    if base != self.window {
                        self.f.config_read(base, &mut bytes);
                    }
                    dword = Some((base, bytes));
                    bytes
                }
            };
            let got = (*o < 256).then(|| bytes[usize::from(o & 3)]);
            assert_eq!(got, Some(*v), "read-only config byte {o:#x} changed");
        }
        // Activation state agrees with the status byte.
        let status = self.f.status();
        let p = lock(&self.probe);
        if status & DRIVER_OK != 0 && status & DEVICE_NEEDS_RESET == 0 {
            assert!(
                p.active,
                "status {status:#x} says running but the device is not activated"
            );
        }
        if p.active {
            assert!(
                status & (DRIVER_OK | FAILED) != 0,
                "device active with status {status:#x}"
            );
        }
        drop(p);
        // Interrupts.
        let command = self.cfg_read(0x04, 2) as u16;
        let raised = *self
            .sink
            .intx_raised
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if raised != before_intx {
            assert!(
                command & (1 << 10) == 0,
                "INTx asserted while INTx Disable is set"
            );
        }
        let msis: Vec<(u64, u32)> = self
            .sink
            .msi
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(before_msi..)
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        if !msis.is_empty() {
            let cap = self.msix_cap;
            assert!(cap.is_some(), "MSI without MSI-X");
            let ctrl = self.cfg_read(cap.unwrap_or(0) + 2, 2) as u16;
            assert!(ctrl & 0x8000 != 0, "MSI with MSI-X disabled");
            assert!(ctrl & 0x4000 == 0, "MSI while function-masked");
            for (addr, data) in msis {
                let found = (0..u64::from(self.msix_vectors)).any(|v| {
                    let word = |i: u64| {
                        let mut b = [0u8; 4];
                        self.f.bar_read(1, v * 16 + 4 * i, &mut b);
                        u32::from_le_bytes(b)
                    };
                    let a = u64::from(word(1)) << 32 | u64::from(word(0));
                    a == addr && word(2) == data && word(3) & 1 == 0
                });
                assert!(
                    found,
                    "MSI {addr:#x}/{data:#x} matches no unmasked table entry"
                );
            }
        }
    }
}

fn rig(flags: u8, features: u64) -> Option<Rig> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let probe = Arc::new(Mutex::new(Probe::default()));
    let sink = Arc::new(Sink::default());
    let msix_vectors = u16::from(flags & 7).min(4);
    let behind_iommu = flags & 8 != 0;
    let iommu = behind_iommu.then(|| {
        EndpointIommu::new(
            Endpoint::Pci(Bdf::new(0, 3, 0)),
            Arc::new(WindowIommu),
            Arc::new(NoHooks),
        )
    });
    let device_features = features & !((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM));
    let f = VirtioPciFunction::new(
        Box::new(MockDevice {
            probe: probe.clone(),
            features: device_features,
        }),
        TransportOptions {
            bdf: Bdf::new(0, 3, 0),
            access_platform: flags & 0x10 != 0,
            msix_vectors,
            class_code: 0x01_00_00,
            iommu,
        },
        SharedMemory::new(mem),
        sink.clone(),
        Arc::new(NoHooks),
    )
    .ok()?;
    let mut offered = device_features | (1 << VIRTIO_F_VERSION_1);
    if behind_iommu || flags & 0x10 != 0 {
        offered |= 1 << VIRTIO_F_ACCESS_PLATFORM;
    }
    {
        let mut p = lock(&probe);
        p.offered = offered;
        p.behind_iommu = behind_iommu;
    }
    let mut rig = Rig {
        f,
        probe,
        sink,
        msix_vectors,
        read_only: Vec::new(),
        window: 0x100,
        msix_cap: None,
    };
    // Walk the capability chain: remember the fixed bytes, the pci_cfg window, the MSI-X cap.
    let mut ro: Vec<u16> = vec![
        0, 1, 2, 3, 8, 9, 10, 11, 0x0e, 0x2c, 0x2d, 0x2e, 0x2f, 0x34, 0x3d,
    ];
    let mut cap = rig.cfg_read(0x34, 1) as u16;
    let mut hops = 0;
    while cap != 0 && hops < 48 {
        hops += 1;
        ro.extend([cap, cap + 1]);
        let id = rig.cfg_read(cap, 1) as u8;
        if id == 0x09 {
            let cfg_type = rig.cfg_read(cap + 3, 1) as u8;
            if cfg_type == 5 {
                rig.window = cap + 16;
            } else {
                ro.extend(cap + 2..cap + 16);
            }
        } else if id == sluice_pci::msix::CAP_ID_MSIX {
            rig.msix_cap = Some(cap);
            ro.extend(cap + 4..cap + 12);
        }
        cap = rig.cfg_read(cap + 1, 1) as u16;
    }
    ro.sort_unstable();
    ro.dedup();
    rig.read_only = ro
        .into_iter()
        .map(|o| (o, rig.cfg_read(o, 1) as u8))
        .collect();
    Some(rig)
}

/// Interesting BAR 0 offsets the structured ops pick from.
const BAR0_OFFSETS: [u64; 24] = [
    reg::DEVICE_FEATURE_SELECT,
    reg::DEVICE_FEATURE,
    reg::DRIVER_FEATURE_SELECT,
    reg::DRIVER_FEATURE,
    reg::CONFIG_MSIX_VECTOR,
    reg::NUM_QUEUES,
    reg::DEVICE_STATUS,
    reg::CONFIG_GENERATION,
    reg::QUEUE_SELECT,
    reg::QUEUE_SIZE,
    reg::QUEUE_MSIX_VECTOR,
    reg::QUEUE_ENABLE,
    reg::QUEUE_NOTIFY_OFF,
    reg::QUEUE_DESC,
    reg::QUEUE_DRIVER,
    reg::QUEUE_DEVICE,
    0x24,
    0x2c,
    0x34,
    caps::ISR_OFFSET,
    caps::ISR_OFFSET + 4,
    caps::DEVICE_OFFSET,
    caps::NOTIFY_OFFSET,
    caps::NOTIFY_OFFSET + 4,
];

/// Runs one input; panics when an invariant is violated.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let (Some(flags), Some(features)) = (inp.u8(), inp.u64()) else {
        return;
    };
    let Some(r) = rig(flags, features) else {
        return;
    };
    // Program the BARs and enable decoding, as firmware would, unless the input says not to.
    if flags & 0x20 == 0 {
        r.f.config_write(0x10, &(BAR0_BASE as u32).to_le_bytes());
        r.f.config_write(0x14, &(BAR1_BASE as u32).to_le_bytes());
        r.f.config_write(0x04, &0x6u16.to_le_bytes());
    }
    for _ in 0..MAX_OPS {
        let Some(op) = inp.u8() else { break };
        let before_msi = r.sink.msi.lock().map(|m| m.len()).unwrap_or(0);
        let before_intx = *r.sink.intx_raised.lock().unwrap_or_else(|e| e.into_inner());
        match op % 14 {
            0 => {
                // Config write anywhere (the window included); only the bytes written change.
                let (Some(o), Some(v)) = (inp.u8(), inp.u32()) else {
                    break;
                };
                let len = [1usize, 2, 4][usize::from(op >> 6) % 3];
                let off = u16::from(o);
                let before = r.snapshot();
                r.f.config_write(off, &v.to_le_bytes()[..len]);
                let after = r.snapshot();
                if before != after {
                    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
                        let i = i as u16;
                        let written = (off..off + len as u16).contains(&i);
                        assert!(
                            a == b || written,
                            "config write at {off:#x}/{len} changed byte {i:#x}: {a:#x} -> {b:#x}"
                        );
                    }
                }
            }
            1 => {
                let Some(o) = inp.u8() else { break };
                let len = [1usize, 2, 4][usize::from(op >> 6) % 3];
                let _ = r.cfg_read(u16::from(o), len);
            }
            2 | 3 => {
                // BAR 0 write, offset from the list or raw.
                let (Some(o), Some(v)) = (inp.u16(), inp.u64()) else {
                    break;
                };
                let size = size_of(op >> 5);
                let off = if op & 0x80 != 0 {
                    u64::from(o) % crate::BAR_SIZE
                } else {
                    BAR0_OFFSETS[usize::from(o) % BAR0_OFFSETS.len()] + u64::from(o >> 12)
                };
                let off = off.min(crate::BAR_SIZE - size as u64);
                r.bar0_write(off, size, v);
            }
            4 => {
                let Some(o) = inp.u16() else { break };
                let size = size_of(op >> 5);
                let off = (u64::from(o) % crate::BAR_SIZE).min(crate::BAR_SIZE - size as u64);
                let mut b = vec![0u8; size];
                r.f.bar_read(0, off, &mut b);
            }
            5 => {
                // MSI-X table / PBA.
                let (Some(o), Some(v)) = (inp.u16(), inp.u64()) else {
                    break;
                };
                let size = size_of(op >> 5);
                let off = (u64::from(o) % MSIX_BAR_SIZE).min(MSIX_BAR_SIZE - size as u64);
                if op & 0x80 != 0 {
                    let mut b = vec![0u8; size];
                    r.f.bar_read(1, off, &mut b);
                } else {
                    r.f.bar_write(1, off, &v.to_le_bytes()[..size]);
                }
            }
            6 => {
                // Queue set-up shortcut: select, size, rings, vector, enable.
                let (Some(q), Some(size), Some(base)) = (inp.u8(), inp.u16(), inp.u16()) else {
                    break;
                };
                let base = u64::from(base) & !0xf;
                r.bar0_write(reg::QUEUE_SELECT, 2, u64::from(q % 4));
                r.bar0_write(reg::QUEUE_SIZE, 2, u64::from(size % 300));
                r.bar0_write(reg::QUEUE_DESC, 8, base);
                r.bar0_write(reg::QUEUE_DRIVER, 8, base + 0x1000);
                r.bar0_write(reg::QUEUE_DEVICE, 8, base + 0x2000);
                r.bar0_write(reg::QUEUE_MSIX_VECTOR, 2, u64::from(q >> 4));
                if op & 0x80 == 0 {
                    r.bar0_write(reg::QUEUE_ENABLE, 2, 1);
                }
            }
            7 => {
                // Driver bring-up shortcut with features from the input.
                let Some(feat) = inp.u64() else { break };
                r.status(0);
                r.status(ACKNOWLEDGE);
                r.status(ACKNOWLEDGE | DRIVER);
                r.bar0_write(reg::DRIVER_FEATURE_SELECT, 4, 0);
                r.bar0_write(reg::DRIVER_FEATURE, 4, feat & 0xffff_ffff);
                r.bar0_write(reg::DRIVER_FEATURE_SELECT, 4, 1);
                r.bar0_write(reg::DRIVER_FEATURE, 4, feat >> 32);
                r.status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
            }
            8 => {
                let Some(v) = inp.u8() else { break };
                let v = if op & 0x80 != 0 {
                    v
                } else {
                    ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
                };
                r.status(v);
            }
            9 => {
                // The pci_cfg access window: program bar/offset/length, then access data.
                let (Some(bar), Some(off), Some(len), Some(v)) =
                    (inp.u8(), inp.u32(), inp.u8(), inp.u32())
                else {
                    break;
                };
                let cap = r.window - 16;
                r.f.config_write(cap + 4, &[bar % 3]);
                r.f.config_write(cap + 8, &off.to_le_bytes());
                r.f.config_write(cap + 12, &u32::from(len % 9).to_le_bytes());
                if op & 0x80 != 0 {
                    let _ = r.cfg_read(r.window, 4);
                } else {
                    r.f.config_write(r.window, &v.to_le_bytes());
                }
            }
            10 => {
                // MSI-X control through config space.
                let Some(v) = inp.u16() else { break };
                if let Some(c) = r.msix_cap {
                    r.f.config_write(c + 2, &(v & 0xc000).to_le_bytes());
                }
            }
            11 => {
                // The device raises an interrupt.
                let Some(q) = inp.u8() else { break };
                let irq = lock(&r.probe).interrupt.clone();
                if let Some(i) = irq {
                    if q == 0xff {
                        i.signal_config();
                    } else {
                        i.signal_queue(u16::from(q % 4));
                    }
                }
            }
            12 => {
                let (Some(addr), Some(mem)) = (inp.u32(), inp.u8()) else {
                    break;
                };
                let addr = u64::from(addr).wrapping_add(if op & 0x80 != 0 { BAR0_BASE } else { 0 });
                let memory = mem & 1 != 0;
                if let Some((bar, off)) = r.f.decode_bar(addr, memory) {
                    let cmd = r.cfg_read(0x04, 2);
                    assert!(memory && cmd & 2 != 0, "decode with memory space disabled");
                    let size = match bar {
                        0 => crate::BAR_SIZE,
                        1 => MSIX_BAR_SIZE,
                        _ => 0,
                    };
                    assert!(
                        off < size,
                        "decode_bar gave offset {off:#x} in BAR {bar} of {size:#x}"
                    );
                    let base = u64::from(r.cfg_read(0x10 + 4 * u16::from(bar), 4) as u32 & !0xf);
                    assert_eq!(
                        base + off,
                        addr,
                        "decode_bar offset does not match the BAR base"
                    );
                }
            }
            _ => {
                if op & 0x80 != 0 {
                    r.f.reset();
                } else {
                    // ISR read (clears it and deasserts INTx).
                    let mut b = [0u8];
                    r.f.bar_read(0, caps::ISR_OFFSET, &mut b);
                }
            }
        }
        r.check(before_msi, before_intx);
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz body on fixed-seed pseudo-random inputs (the corpus replays in
    /// `tests/fuzz-replay.sh`).
    #[test]
    fn fuzz_body_on_pseudo_random_inputs() {
        for data in sluice_devapi::fuzz_support::pseudo_random_inputs(0x5eed, 500, 700) {
            super::run(&data);
        }
    }
}
