//! Unit tests: the engine against guest memory, directly and behind a one-window IOMMU.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_devapi::{
    Bdf, DeviceState, DmaFault, DmaOutcome, DmaRecord, DmaResolution, DmaTranslate, Endpoint,
    EndpointIommu, RecordedInterrupt, RecordingHooks, RecordingInterrupts, StateChange,
};
use sluice_pci::PciFunction;
use sluice_pci::config::{CMD_BUS_MASTER, CMD_MEMORY};
use sluice_virtio_pci::{DmaMemory, SharedMemory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Iotlb, Permissions};

use crate::regs::*;
use crate::*;

const EP: Endpoint = Endpoint::Pci(Bdf(0x28));
/// IOVA window the test IOMMU maps (two pages: the first read-write, the second read-only).
const WINDOW: u64 = 0x8000_0000;
/// Where the window lands in guest-physical memory.
const TARGET: u64 = 0x4_0000;

/// Maps `[WINDOW, WINDOW + 2 pages)` onto `TARGET` while `mapped`; the second page read-only.
#[derive(Debug, Default)]
struct TwoPages {
    mapped: AtomicBool,
}

impl DmaTranslate for TwoPages {
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        let end = iova + len;
        if !self.mapped.load(Ordering::Relaxed) || iova < WINDOW || end > WINDOW + 0x2000 {
            return Err(DmaFault::new(4, format!("{iova:#x} not mapped")));
        }
        if end > WINDOW + 0x1000 && matches!(access, Permissions::Write | Permissions::ReadWrite) {
            return Err(DmaFault::new(4, "read-only"));
        }
        let map = |fill: &mut Iotlb, iova, gpa, perm| {
            fill.set_mapping(GuestAddress(iova), GuestAddress(gpa), 0x1000, perm)
                .map_err(|e| DmaFault::new(0, e.to_string()))
        };
        map(fill, WINDOW, TARGET, Permissions::ReadWrite)?;
        map(fill, WINDOW + 0x1000, TARGET + 0x1000, Permissions::Read)?;
        Ok(DmaResolution::Translated { domain: 3 })
    }
}

struct Rig {
    engine: DmaEngine,
    mem: GuestMemoryMmap,
    seen: Arc<RecordingHooks>,
    irq: Arc<RecordingInterrupts>,
    model: Arc<TwoPages>,
}

fn rig(translated: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let seen = Arc::new(RecordingHooks::default());
    let irq = Arc::new(RecordingInterrupts::default());
    let model = Arc::new(TwoPages::default());
    model.mapped.store(true, Ordering::Relaxed);
    let shared = SharedMemory::new(mem.clone());
    let dma = if translated {
        DmaMemory::Translated {
            phys: shared,
            iommu: EndpointIommu::new(EP, model.clone(), seen.clone()),
        }
    } else {
        DmaMemory::Direct(shared)
    };
    let engine = DmaEngine::new("dma0", EP, dma, irq.clone(), seen.clone()).unwrap();
    engine.config_write(4, &(CMD_MEMORY | CMD_BUS_MASTER).to_le_bytes());
    Rig {
        engine,
        mem,
        seen,
        irq,
        model,
    }
}

impl Rig {
    fn w32(&self, off: u64, v: u32) {
        self.engine.bar_write(0, off, &v.to_le_bytes());
    }
    fn w64(&self, off: u64, v: u64) {
        self.engine.bar_write(0, off, &v.to_le_bytes());
    }
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.engine.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn program(&self, src: u64, dst: u64, len: u32, flags: u32) {
        self.w64(SRC, src);
        self.w64(DST, dst);
        self.w32(LEN, len);
        self.w32(FLAGS, flags);
    }
    fn ring(&self) {
        self.w32(DOORBELL, 1);
    }
    fn dmas(&self) -> Vec<DmaRecord> {
        self.seen.dmas()
    }
}

#[test]
fn identity_registers_read_back() {
    let r = rig(false);
    assert_eq!(r.r32(MAGIC), MAGIC_VALUE);
    assert_eq!(r.r32(VERSION), VERSION_VALUE);
    let mut cfg = [0u8; 4];
    r.engine.config_read(0, &mut cfg);
    assert_eq!(
        u32::from_le_bytes(cfg),
        u32::from(DMA_ENGINE_DEVICE) << 16 | u32::from(DMA_ENGINE_VENDOR)
    );
}

#[test]
fn any_width_programs_the_same_registers() {
    let r = rig(false);
    r.w64(SRC, 0x1122_3344_5566_7788);
    assert_eq!(r.r32(SRC), 0x5566_7788);
    assert_eq!(r.r32(SRC + 4), 0x1122_3344);
    r.w32(DST, 0xaabb_ccdd);
    r.w32(DST + 4, 0x1);
    for (i, b) in 0x0102_0304u32.to_le_bytes().iter().enumerate() {
        r.engine.bar_write(0, LEN + i as u64, &[*b]);
    }
    let p = r.engine.registers().program;
    assert_eq!(
        (p.src, p.dst, p.len),
        (0x1122_3344_5566_7788, 0x1_aabb_ccdd, 0x0102_0304)
    );
    // Read-only registers ignore writes; offsets past the file read 0; a straddling read gets
    // the file's bytes and zeros.
    r.w32(MAGIC, 0);
    r.w32(STATUS, 0xffff_ffff);
    assert_eq!(r.r32(MAGIC), MAGIC_VALUE);
    assert_eq!(r.r32(STATUS), 0);
    assert_eq!(r.r32(0x800), 0);
    let mut b = [0xffu8; 8];
    r.engine.bar_read(0, 0x3e, &mut b);
    assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0]);
    r.engine.bar_read(0, u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 8]);
    r.engine.bar_write(0, u64::MAX - 1, &[1; 8]);
}

#[test]
fn direct_copy_moves_the_bytes_and_reports_direct_dmas() {
    let r = rig(false);
    let data: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(0x1_0800)).unwrap();
    r.program(0x1_0800, 0x3_0100, 6000, 0);
    r.ring();
    let mut out = vec![0u8; 6000];
    r.mem.read_slice(&mut out, GuestAddress(0x3_0100)).unwrap();
    assert_eq!(out, data);
    assert_eq!(r.r32(STATUS), Status::Ok.code());
    assert_eq!(r.r32(DONE), 1);
    assert_eq!(r.r32(ERRORS), 0);
    let dmas = r.dmas();
    assert!(
        dmas.iter()
            .all(|d| d.outcome == DmaOutcome::Direct && d.endpoint == EP)
    );
    let read: u64 = dmas
        .iter()
        .filter(|d| d.direction == sluice_devapi::DmaDirection::Read)
        .map(|d| d.len)
        .sum();
    assert_eq!(read, 6000, "every byte read is reported once");
    // Steps never cross a 4 KiB page on either side.
    for d in &dmas {
        assert!(d.iova % 4096 + d.len <= 4096, "{d:?}");
    }
    let points = r.seen.point_values();
    assert_eq!(
        points,
        vec![
            ("dma.dma0.doorbell".into(), 6000),
            ("dma.dma0.complete".into(), 0)
        ]
    );
}

#[test]
fn translated_fill_lands_at_the_mapped_address() {
    let r = rig(true);
    r.w32(PATTERN, 0x5a);
    r.program(0, WINDOW + 0x10, 0x100, FLAG_FILL);
    r.ring();
    assert_eq!(r.r32(STATUS), Status::Ok.code());
    let mut out = [0u8; 0x100];
    r.mem
        .read_slice(&mut out, GuestAddress(TARGET + 0x10))
        .unwrap();
    assert!(out.iter().all(|&b| b == 0x5a));
    // Nothing at the IOVA taken as a physical address (it is outside memory anyway) and the
    // write was reported as translated in domain 3.
    let dmas = r.dmas();
    assert!(!dmas.is_empty());
    assert!(
        dmas.iter()
            .all(|d| matches!(d.outcome, DmaOutcome::Translated { domain: 3, .. }))
    );
}

#[test]
fn a_refused_write_stops_at_the_page_and_leaves_it_untouched() {
    let r = rig(true);
    r.mem
        .write_slice(&[0xee; 0x2000], GuestAddress(TARGET))
        .unwrap();
    // Fill across the read-write page into the read-only one.
    r.w32(PATTERN, 0x11);
    r.program(0, WINDOW + 0x800, 0x1000, FLAG_FILL | FLAG_IRQ);
    r.ring();
    assert_eq!(r.r32(STATUS), Status::WriteFault.code());
    assert_eq!(
        u64::from(r.r32(FAULT)) | u64::from(r.r32(FAULT + 4)) << 32,
        WINDOW + 0x1000
    );
    assert_eq!(r.r32(ERRORS), 1);
    let mut out = [0u8; 0x2000];
    r.mem.read_slice(&mut out, GuestAddress(TARGET)).unwrap();
    assert!(out[..0x800].iter().all(|&b| b == 0xee));
    assert!(
        out[0x800..0x1000].iter().all(|&b| b == 0x11),
        "first page written"
    );
    assert!(
        out[0x1000..].iter().all(|&b| b == 0xee),
        "read-only page untouched"
    );
    assert!(
        r.dmas()
            .iter()
            .any(|d| matches!(d.outcome, DmaOutcome::Faulted { reason: 4 }))
    );
    // Completion with FLAG_IRQ raises INTx even on error; write-1-to-clear drops it.
    assert_eq!(r.r32(IRQ_STATUS), IRQ_DONE);
    assert_eq!(
        r.irq.take(),
        vec![RecordedInterrupt::Level {
            line: 0,
            asserted: true
        }]
    );
    r.w32(IRQ_STATUS, IRQ_DONE);
    assert_eq!(r.r32(IRQ_STATUS), 0);
    assert_eq!(
        r.irq.take(),
        vec![RecordedInterrupt::Level {
            line: 0,
            asserted: false
        }]
    );
}

#[test]
fn an_unmapped_source_faults_on_read_and_writes_nothing() {
    let r = rig(true);
    r.model.mapped.store(false, Ordering::Relaxed);
    r.mem
        .write_slice(&[0xee; 0x100], GuestAddress(TARGET))
        .unwrap();
    r.program(WINDOW + 0x1000, WINDOW, 0x100, 0);
    r.ring();
    assert_eq!(r.r32(STATUS), Status::ReadFault.code());
    let mut out = [0u8; 0x100];
    r.mem.read_slice(&mut out, GuestAddress(TARGET)).unwrap();
    assert!(out.iter().all(|&b| b == 0xee));
    assert!(r.irq.take().is_empty(), "no FLAG_IRQ, no interrupt");
}

#[test]
fn bad_registers_give_a_status_and_no_dma() {
    let r = rig(false);
    let cases = [
        ((0x1000, 0x2000, 0, 0), Status::BadLength),
        ((0x1000, 0x2000, MAX_LEN + 1, 0), Status::BadLength),
        ((0x1000, 0x2000, 16, 1 << 7), Status::BadFlags),
        ((u64::MAX - 4, 0x2000, 16, 0), Status::RangeWraps),
        ((0, u64::MAX - 4, 16, FLAG_FILL), Status::RangeWraps),
        // A fill ignores SRC, so a wrapping SRC is fine there.
        ((u64::MAX, 0x2000, 16, FLAG_FILL), Status::Ok),
        // Outside guest memory, no IOMMU: refused by memory, as a read fault.
        ((0x1_0000_0000, 0x2000, 16, 0), Status::ReadFault),
    ];
    for (i, ((src, dst, len, flags), want)) in cases.into_iter().enumerate() {
        let before = r.dmas().len();
        r.program(src, dst, len, flags);
        r.ring();
        assert_eq!(r.r32(STATUS), want.code(), "case {i}");
        if want != Status::Ok {
            assert_eq!(r.dmas().len(), before, "case {i}: no DMA reported");
        }
    }
    assert_eq!(r.r32(DONE), cases.len() as u32);
    assert_eq!(r.r32(ERRORS), cases.len() as u32 - 1);
}

#[test]
fn bus_master_off_blocks_programmed_dmas_but_not_a_rogue_one() {
    let r = rig(false);
    r.engine.config_write(4, &CMD_MEMORY.to_le_bytes());
    r.program(0x1000, 0x2000, 16, 0);
    r.ring();
    assert_eq!(r.r32(STATUS), Status::NoBusMaster.code());
    assert!(r.dmas().is_empty());
    let out = r.engine.rogue(RogueDma {
        iova: 0x2000,
        len: 16,
        write: Some(1),
    });
    assert_eq!(out.status, Status::Ok);
    assert_eq!(r.dmas().len(), 1);
    let states = r.seen.state_values();
    assert!(
        states.contains(&("bus-master-enable".into(), 0)),
        "{states:?}"
    );
}

#[test]
fn rogue_dmas_go_through_the_iommu_and_say_what_they_reached() {
    let r = rig(true);
    let read = r.engine.rogue(RogueDma {
        iova: WINDOW + 0x1800,
        len: 0x100,
        write: None,
    });
    assert_eq!(
        read,
        RogueOutcome {
            status: Status::Ok,
            moved: 0x100,
            fault: None
        }
    );
    // The read-only page refuses a write; the registers never change.
    let regs = r.engine.registers();
    let write = r.engine.rogue(RogueDma {
        iova: WINDOW + 0x1800,
        len: 0x100,
        write: Some(0x66),
    });
    assert_eq!(write.status, Status::WriteFault);
    assert_eq!((write.moved, write.fault), (0, Some(WINDOW + 0x1800)));
    // A write across the writable page into the read-only one moves the first part only.
    let split = r.engine.rogue(RogueDma {
        iova: WINDOW + 0xf00,
        len: 0x200,
        write: Some(0x66),
    });
    assert_eq!((split.moved, split.fault), (0x100, Some(WINDOW + 0x1000)));
    assert_eq!(r.engine.registers(), regs);
    let states = r.seen.state_values();
    let probes: Vec<&str> = states
        .iter()
        .map(|(w, _)| w.as_str())
        .filter(|w| w.starts_with("rogue-dma"))
        .collect();
    // every probe DMA is bracketed, so the oracle knows which DMAs the host asked for
    assert_eq!(probes, ["rogue-dma", "rogue-dma-done"].repeat(3));
    let probe_ends: Vec<DeviceState> = r
        .seen
        .states()
        .into_iter()
        .filter_map(|s| match s.change {
            StateChange::Device(d @ DeviceState::RogueDmaDone { .. }) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(
        probe_ends.last(),
        Some(&DeviceState::RogueDmaDone { moved: 0x100 }),
        "the last probe moved 0x100 bytes before its fault"
    );
    let points = r.seen.point_values();
    assert_eq!(
        points.first(),
        Some(&("dma.dma0.rogue".into(), WINDOW + 0x1800))
    );
}

#[test]
fn reset_clears_the_register_file_and_the_interrupt() {
    let r = rig(false);
    r.program(0x1000, 0x2000, 16, FLAG_IRQ);
    r.ring();
    assert_eq!(r.r32(IRQ_STATUS), IRQ_DONE);
    r.engine.reset();
    assert_eq!(r.engine.registers(), Registers::default());
    assert_eq!(
        r.irq.take().last(),
        Some(&RecordedInterrupt::Level {
            line: 0,
            asserted: false
        })
    );
}

/// Deterministic pseudo-random register traffic: nothing panics, every operation is bounded,
/// and DONE counts every doorbell.
#[test]
fn hostile_register_traffic_is_bounded() {
    let r = rig(true);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut rings = 0u32;
    for _ in 0..2000 {
        let v = next();
        let off = v % 0x48;
        let width = [1usize, 2, 4, 8][(v >> 8) as usize % 4];
        let val = next();
        if (off..off + width as u64).any(|a| (DOORBELL..STATUS).contains(&a)) {
            rings += 1;
        }
        r.engine.bar_write(0, off, &val.to_le_bytes()[..width]);
        let mut b = [0u8; 8];
        r.engine.bar_read(0, next() % 0x1000, &mut b[..width]);
    }
    assert_eq!(r.r32(DONE), rings);
}
