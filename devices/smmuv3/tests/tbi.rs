//! Top-byte ignore and the IOTLB: a tagged VA translates only when TBI is set for its half
//! (TBI0 for TTB0, TBI1 for TTB1), whether or not its untagged form is already cached. The
//! IOTLB keys stage-1 entries by the canonical (untagged) VA, so the CD's region and top-byte
//! check must come before the lookup.

mod common;

use common::*;
use sluice_smmuv3::walk::Granule;
use sluice_smmuv3::{Access, EventType, Fault, Translation};

const LO_VA: u64 = 0x0000_1234_5678_9000;
const HI_VA: u64 = 0xffff_8765_4321_0000;
const LO_PA: u64 = 0x80_0000;
const HI_PA: u64 = 0x90_0000;
const TAG: u64 = 0x5a;

fn tagged(va: u64) -> u64 {
    (va & !(0xff << 56)) | (TAG << 56)
}

/// Stream 1, one CD with both TTB0 and TTB1 (48-bit, 4 KiB), TBI0/TBI1 as given.
fn rig(tbi0: bool, tbi1: bool) -> Rig {
    let rig = Rig::new();
    rig.enable(8);
    let g = Granule::G4K;
    let root0 = rig.alloc(4096, 4096);
    let root1 = rig.alloc(4096, 4096);
    let d0 = 16
        | (16 << 16)
        | (2 << 22) // TG1 = 4 KiB
        | (1 << 31)
        | (5 << 32)
        | (u64::from(tbi0) << 38)
        | (u64::from(tbi1) << 39)
        | (1 << 41)
        | (1 << 45)
        | (1 << 46)
        | (7 << 48);
    let cdaddr = rig.alloc(64, 64);
    rig.write_words(cdaddr, &[d0, root0, root1, 0, 0, 0, 0, 0]);
    rig.set_ste(1, ste_s1(cdaddr, 0, 0, 0));
    for (root, va, pa) in [(root0, LO_VA, LO_PA), (root1, HI_VA, HI_PA)] {
        let pt = Pt {
            rig: &rig,
            g,
            start_level: 0,
            input_bits: 48,
            root,
        };
        pt.map(va & ((1 << 48) - 1), pa, 3, AF);
    }
    rig
}

fn tr(rig: &Rig, va: u64) -> Result<Translation, Fault> {
    rig.smmu
        .translate(&rig.mem, 1, None, va + 0x10, 8, Access::READ)
}

fn pa(r: Result<Translation, Fault>) -> Result<u64, Option<EventType>> {
    r.map(|t| t.segments[0].pa).map_err(|f| f.event_type())
}

#[test]
fn tagged_addresses_follow_tbi_of_their_half_cold_and_warm() {
    for (half, va, want_pa) in [("TTB0", LO_VA, LO_PA), ("TTB1", HI_VA, HI_PA)] {
        for tbi in [false, true] {
            for warm in [false, true] {
                let (tbi0, tbi1) = if half == "TTB0" {
                    (tbi, !tbi)
                } else {
                    (!tbi, tbi)
                };
                let rig = rig(tbi0, tbi1);
                let what = format!("{half} TBI={tbi} warm={warm}");
                if warm {
                    assert_eq!(pa(tr(&rig, va)), Ok(want_pa + 0x10), "{what}: untagged");
                    assert!(rig.smmu.iotlb_len() > 0, "{what}: cached");
                }
                let want = if tbi {
                    Ok(want_pa + 0x10)
                } else {
                    Err(Some(EventType::FTranslation))
                };
                assert_eq!(pa(tr(&rig, tagged(va))), want, "{what}: tagged");
                // And the other direction: the untagged form after the tagged one.
                assert_eq!(
                    pa(tr(&rig, va)),
                    Ok(want_pa + 0x10),
                    "{what}: untagged after tagged"
                );
                assert_eq!(pa(tr(&rig, tagged(va))), want, "{what}: tagged, warm");
            }
        }
    }
}

#[test]
fn tbi_of_one_half_does_not_open_the_other() {
    // TBI1 only: tagged TTB0 addresses fault even with their untagged form cached.
    let rig = self::rig(false, true);
    assert!(tr(&rig, LO_VA).is_ok());
    assert_eq!(
        pa(tr(&rig, tagged(LO_VA))),
        Err(Some(EventType::FTranslation))
    );
    assert!(tr(&rig, tagged(HI_VA)).is_ok());
    // TBI0 only: the reverse.
    let rig = self::rig(true, false);
    assert!(tr(&rig, HI_VA).is_ok());
    assert_eq!(
        pa(tr(&rig, tagged(HI_VA))),
        Err(Some(EventType::FTranslation))
    );
    assert!(tr(&rig, tagged(LO_VA)).is_ok());
}
