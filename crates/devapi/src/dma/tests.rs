//! The seam with a trivial model: one window of IOVAs mapped onto guest memory.

use std::sync::atomic::AtomicU64;

use vm_memory::{Bytes, GuestMemoryMmap, IommuMemory};

use super::*;
use crate::endpoint::Bdf;
use crate::recording::RecordingHooks;

const WINDOW: u64 = 0x1000_0000;
const WINDOW_LEN: u64 = 0x4000;
const TARGET: u64 = 0x2_0000;

/// Maps `[WINDOW, WINDOW + WINDOW_LEN)` onto `TARGET` (read-write) while `mapped`; the last
/// page is read-only. Everything else faults with reason 2.
#[derive(Debug, Default)]
struct Window {
    mapped: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
}

impl DmaTranslate for Window {
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let end = iova + len;
        if !self.mapped.load(Ordering::Relaxed) || iova < WINDOW || end > WINDOW + WINDOW_LEN {
            return Err(DmaFault::new(2, format!("{iova:#x} not mapped")));
        }
        let ro = WINDOW + WINDOW_LEN - 0x1000;
        if end > ro && matches!(access, Permissions::Write | Permissions::ReadWrite) {
            return Err(DmaFault::new(2, "read-only"));
        }
        fill.set_mapping(
            GuestAddress(WINDOW),
            GuestAddress(TARGET),
            (WINDOW_LEN - 0x1000) as usize,
            Permissions::ReadWrite,
        )
        .map_err(|e| DmaFault::new(0, e.to_string()))?;
        fill.set_mapping(
            GuestAddress(ro),
            GuestAddress(TARGET + WINDOW_LEN - 0x1000),
            0x1000,
            Permissions::Read,
        )
        .map_err(|e| DmaFault::new(0, e.to_string()))?;
        Ok(DmaResolution::Translated { domain: 7 })
    }
}

fn setup() -> (
    IommuMemory<GuestMemoryMmap, EndpointIommu>,
    Arc<Window>,
    Arc<RecordingHooks>,
    EndpointIommu,
) {
    let phys = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let model = Arc::new(Window::default());
    model.mapped.store(true, Ordering::Relaxed);
    let hooks = Arc::new(RecordingHooks::default());
    let ep = EndpointIommu::new(Endpoint::Pci(Bdf(0x10)), model.clone(), hooks.clone());
    let mem = IommuMemory::new(phys, ep.clone(), true, ());
    (mem, model, hooks, ep)
}

#[test]
fn reads_and_writes_go_through_the_translation() {
    let (mem, model, hooks, ep) = setup();
    mem.write_obj(0xdead_beef_u32, GuestAddress(WINDOW + 0x10))
        .unwrap();
    assert_eq!(
        mem.get_backend()
            .read_obj::<u32>(GuestAddress(TARGET + 0x10))
            .unwrap(),
        0xdead_beef
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(WINDOW + 0x10)).unwrap(),
        0xdead_beef
    );
    // One resolve filled the whole mapping; the read was a hit.
    assert_eq!(model.calls.load(Ordering::Relaxed), 1);
    assert_eq!(
        ep.stats(),
        DmaStats {
            hits: 1,
            misses: 1,
            faults: 0
        }
    );
    let recs = hooks.dmas();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].direction, DmaDirection::Write);
    assert_eq!(recs[1].direction, DmaDirection::Read);
    for r in recs.iter() {
        assert_eq!(r.endpoint, Endpoint::Pci(Bdf(0x10)));
        assert_eq!(r.iova, WINDOW + 0x10);
        assert_eq!(r.len, 4);
        assert_eq!(
            r.outcome,
            DmaOutcome::Translated {
                gpa: TARGET + 0x10,
                domain: 7
            }
        );
    }
}

#[test]
fn unmapped_access_faults_and_is_reported() {
    let (mem, _model, hooks, ep) = setup();
    assert!(mem.read_obj::<u64>(GuestAddress(0x5000)).is_err());
    assert!(
        mem.write_obj(1u8, GuestAddress(WINDOW + WINDOW_LEN))
            .is_err()
    );
    // Straddling the end of the window faults as a whole.
    assert!(
        mem.read_obj::<u64>(GuestAddress(WINDOW + WINDOW_LEN - 4))
            .is_err()
    );
    assert_eq!(ep.stats().faults, 3);
    let recs = hooks.dmas();
    assert_eq!(recs.len(), 3);
    assert!(
        recs.iter()
            .all(|r| r.outcome == DmaOutcome::Faulted { reason: 2 })
    );
    // Nothing was written below the window's target either.
    assert_eq!(
        mem.get_backend()
            .read_obj::<u8>(GuestAddress(TARGET + WINDOW_LEN))
            .unwrap(),
        0
    );
}

#[test]
fn write_to_read_only_part_faults_after_a_read_hit() {
    let (mem, _model, _hooks, ep) = setup();
    let ro = WINDOW + WINDOW_LEN - 0x1000;
    mem.read_obj::<u32>(GuestAddress(ro)).unwrap();
    assert!(mem.write_obj(5u32, GuestAddress(ro)).is_err());
    assert_eq!(ep.stats().faults, 1);
}

#[test]
fn invalidate_makes_the_next_access_re_resolve() {
    let (mem, model, _hooks, ep) = setup();
    mem.read_obj::<u32>(GuestAddress(WINDOW)).unwrap();
    mem.read_obj::<u32>(GuestAddress(WINDOW + 0x100)).unwrap();
    assert_eq!(model.calls.load(Ordering::Relaxed), 1);

    // The model removes its mapping; until the cache is invalidated, hits continue (that is
    // the model's job, and why it must invalidate before completing an UNMAP).
    model.mapped.store(false, Ordering::Relaxed);
    ep.invalidate(WINDOW, 0x1000);
    assert!(mem.read_obj::<u32>(GuestAddress(WINDOW)).is_err());
    // Exact: the other page is still cached.
    let calls = model.calls.load(Ordering::Relaxed);
    mem.read_obj::<u32>(GuestAddress(WINDOW + 0x1000)).unwrap();
    assert_eq!(model.calls.load(Ordering::Relaxed), calls);

    ep.invalidate_all();
    assert!(mem.read_obj::<u32>(GuestAddress(WINDOW + 0x1000)).is_err());
    model.mapped.store(true, Ordering::Relaxed);
    mem.read_obj::<u32>(GuestAddress(WINDOW + 0x1000)).unwrap();
}

#[test]
fn wrapping_and_empty_accesses_do_not_panic() {
    let (mem, _model, hooks, ep) = setup();
    assert!(mem.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
    assert!(
        mem.iommu()
            .translate(GuestAddress(u64::MAX), 0, Permissions::Read)
            .is_ok()
    );
    assert_eq!(ep.stats().faults, 1);
    assert_eq!(hooks.dmas().len(), 1);
}

#[test]
fn bypass_context_is_reported_as_bypassed() {
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
                usize::MAX,
                Permissions::ReadWrite,
            )
            .map_err(|e| DmaFault::new(0, e.to_string()))?;
            Ok(DmaResolution::Bypassed)
        }
    }
    let phys = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let hooks = Arc::new(RecordingHooks::default());
    let ep = EndpointIommu::new(Endpoint::Pci(Bdf(1)), Arc::new(Identity), hooks.clone());
    let mem = IommuMemory::new(phys, ep, true, ());
    mem.write_obj(3u16, GuestAddress(0x4000)).unwrap();
    mem.read_obj::<u16>(GuestAddress(0x4000)).unwrap();
    let recs = hooks.dmas();
    assert!(recs.iter().all(|r| r.outcome == DmaOutcome::Bypassed));
}

#[test]
fn a_model_owned_seam_asks_the_model_every_time_and_reports_only_its_own_refusals() {
    let phys = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let model = Arc::new(Window::default());
    model.mapped.store(true, Ordering::Relaxed);
    let hooks = Arc::new(RecordingHooks::default());
    let ep = EndpointIommu::model_owned(Endpoint::Pci(Bdf(0x10)), model.clone(), hooks.clone());
    assert!(ep.is_model_owned());
    let mem = IommuMemory::new(phys.clone(), ep.clone(), true, ());

    mem.write_slice(&[0x5a; 64], GuestAddress(WINDOW + 0x10))
        .unwrap();
    let mut back = [0u8; 64];
    mem.read_slice(&mut back, GuestAddress(WINDOW + 0x10))
        .unwrap();
    assert_eq!(back, [0x5a; 64]);
    assert_eq!(
        phys.read_obj::<u8>(GuestAddress(TARGET + 0x10)).unwrap(),
        0x5a,
        "the model's mapping was used"
    );
    // no seam cache: the model resolved both accesses
    assert_eq!(model.calls.load(Ordering::Relaxed), 2);
    assert_eq!(
        ep.stats(),
        DmaStats {
            hits: 0,
            misses: 2,
            faults: 0
        }
    );

    // a refusal by the model fails closed and is the model's to report
    assert!(mem.read_slice(&mut back, GuestAddress(0x10)).is_err());
    assert!(
        mem.write_slice(&[1; 16], GuestAddress(WINDOW + WINDOW_LEN - 0x100))
            .is_err(),
        "read-only page"
    );
    assert_eq!(ep.stats().faults, 2);
    assert!(hooks.dmas().is_empty(), "{:?}", hooks.dmas());

    // what the model never saw, the seam reports
    assert!(
        mem.read_slice(&mut back, GuestAddress(u64::MAX - 8))
            .is_err()
    );
    let dmas = hooks.dmas();
    assert_eq!(dmas.len(), 1);
    assert_eq!(
        dmas[0].outcome,
        DmaOutcome::Faulted {
            reason: SEAM_FAULT_REASON
        }
    );
    // invalidation has nothing to drop and must not disturb the next access
    ep.invalidate_all();
    mem.read_slice(&mut back, GuestAddress(WINDOW)).unwrap();
}

/// A model that says yes without mapping anything.
#[derive(Debug)]
struct Liar;

impl DmaTranslate for Liar {
    fn resolve(
        &self,
        _: u64,
        _: u64,
        _: Permissions,
        _: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        Ok(DmaResolution::Bypassed)
    }
}

#[test]
fn a_model_owned_seam_refuses_what_the_model_accepted_but_did_not_map() {
    let phys = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let hooks = Arc::new(RecordingHooks::default());
    let ep = EndpointIommu::model_owned(Endpoint::Pci(Bdf(0x10)), Arc::new(Liar), hooks.clone());
    let mem = IommuMemory::new(phys, ep, true, ());
    let mut b = [0u8; 8];
    assert!(mem.read_slice(&mut b, GuestAddress(0x1000)).is_err());
    assert_eq!(hooks.dmas().len(), 1, "the seam's own refusal is reported");
}
