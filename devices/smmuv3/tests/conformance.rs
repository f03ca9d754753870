//! Conformance tests written from the architecture's tables: STE/CD validity, every granule ×
//! level leaf, contiguous hint, AF, permissions, address size, every command, queues, GBPA,
//! CR0ACK, the 2-level span edge, S2AA64=0, stage 2 and nested faults.

mod common;
use common::*;
use sluice_devapi::RecordedInterrupt;
use sluice_smmuv3::regs::{IdRegs, off};
use sluice_smmuv3::walk::Granule;
use sluice_smmuv3::{AbortCause, Access, Delivery, EventType, Fault, FaultClass, SmmuConfig};

fn kind(r: Result<sluice_smmuv3::Translation, Fault>) -> Option<EventType> {
    match r {
        Ok(_) => None,
        Err(f) => f.event_type(),
    }
}

/// Rig with stream `sid` 1 attached to a stage-1 CD built from `cdw`.
fn s1_rig(g: Granule, input_bits: u32) -> (Rig, u64, u64) {
    let rig = Rig::new();
    rig.enable(8);
    let root = rig.alloc(1 << g.bits(), 1 << g.bits());
    let cdaddr = rig.alloc(64, 64);
    rig.write_words(cdaddr, &cd(1, 64 - u64::from(input_bits), g, root));
    rig.set_ste(1, ste_s1(cdaddr, 0, 0, 0));
    (rig, root, cdaddr)
}

fn pt_at(rig: &Rig, g: Granule, input_bits: u32, root: u64) -> Pt<'_> {
    Pt {
        rig,
        g,
        start_level: g.s1_start_level(input_bits),
        input_bits,
        root,
    }
}

#[test]
fn every_granule_and_level_maps_blocks_and_pages() {
    for g in Granule::ALL {
        let (rig, root, _) = s1_rig(g, 48);
        let pt = pt_at(&rig, g, 48, root);
        for level in pt.start_level..=3 {
            let shift = g.level_shift(level);
            let va = (5u64 << shift) & ((1 << 48) - 1);
            let va = if va == 0 { 1 << shift } else { va };
            let pa = 3u64 << shift;
            if pa >> 48 != 0 {
                continue;
            }
            pt.map(va, pa, level, AF);
            let r = rig
                .smmu
                .translate(&rig.mem, 1, None, va + 0x18, 8, Access::READ);
            if level == 3 || g.block_allowed(level) {
                let t = r.unwrap_or_else(|e| panic!("{g:?} L{level}: {e:?}"));
                assert_eq!(t.segments[0].pa, pa + 0x18, "{g:?} L{level}");
            } else {
                assert_eq!(
                    kind(r),
                    Some(EventType::FTranslation),
                    "{g:?} L{level} block not allowed"
                );
            }
        }
    }
}

#[test]
fn translation_crossing_pages_splits() {
    let (rig, root, _) = s1_rig(Granule::G4K, 39);
    let pt = pt_at(&rig, Granule::G4K, 39, root);
    pt.map(0x1000, 0x9000, 3, AF);
    pt.map(0x2000, 0x5000, 3, AF);
    let t = rig
        .smmu
        .translate(&rig.mem, 1, None, 0x1ff0, 0x20, Access::READ)
        .unwrap();
    let v: Vec<_> = t.segments.iter().map(|s| (s.iova, s.pa, s.len)).collect();
    assert_eq!(v, vec![(0x1ff0, 0x9ff0, 0x10), (0x2000, 0x5000, 0x10)]);
    // A partly unmapped range faults as a whole.
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, None, 0x2ff0, 0x20, Access::READ)
        ),
        Some(EventType::FTranslation)
    );
}

#[test]
fn contiguous_hint_caches_one_entry_for_the_run() {
    for (g, level) in [
        (Granule::G4K, 3),
        (Granule::G16K, 3),
        (Granule::G64K, 3),
        (Granule::G4K, 2),
    ] {
        let (rig, root, _) = s1_rig(g, 48);
        let pt = pt_at(&rig, g, 48, root);
        let n = g.contig_count(level);
        let size = 1u64 << g.level_shift(level);
        let base_va = n * size * 4;
        let base_pa = n * size * 2;
        for i in 0..n {
            pt.map(
                base_va + i * size,
                base_pa + i * size,
                level,
                AF | (1 << 52),
            );
        }
        for i in 0..n {
            let t = rig
                .smmu
                .translate(&rig.mem, 1, None, base_va + i * size + 4, 4, Access::READ)
                .unwrap();
            assert_eq!(t.segments[0].pa, base_pa + i * size + 4);
        }
        assert_eq!(rig.smmu.iotlb_len(), 1, "{g:?} L{level}");
    }
}

#[test]
fn access_flag_and_affd() {
    let (rig, root, cdaddr) = s1_rig(Granule::G4K, 48);
    let pt = pt_at(&rig, Granule::G4K, 48, root);
    pt.map(0x4000, 0x8000, 3, 0);
    let r = rig
        .smmu
        .translate(&rig.mem, 1, None, 0x4000, 4, Access::READ);
    assert!(
        matches!(r, Err(Fault::Event { event, delivery: Delivery::Written }) if event.kind == EventType::FAccess)
    );
    // AFFD=1: no access fault.
    let mut c = cd(1, 16, Granule::G4K, root);
    c[0] |= 1 << 35;
    rig.write_words(cdaddr, &c);
    rig.cmd(0x05 | (1 << 32), 0); // CFGI_CD
    rig.sync();
    assert!(
        rig.smmu
            .translate(&rig.mem, 1, None, 0x4000, 4, Access::READ)
            .is_ok()
    );
}

#[test]
fn permissions() {
    let (rig, root, cdaddr) = s1_rig(Granule::G4K, 48);
    let pt = pt_at(&rig, Granule::G4K, 48, root);
    pt.map(0x1000, 0x8000, 3, AF | (2 << 6)); // RO, privileged only
    pt.map(0x2000, 0x9000, 3, AF | (1 << 6) | (1 << 54)); // RW at EL0, UXN
    pt.map(0x3000, 0xa000, 3, AF | (1 << 53)); // PXN
    let user = |write, instruction| Access {
        write,
        privileged: false,
        instruction,
    };
    let priv_ = |write, instruction| Access {
        write,
        privileged: true,
        instruction,
    };
    let t = |va, a| kind(rig.smmu.translate(&rig.mem, 1, None, va, 4, a));
    assert_eq!(t(0x1000, priv_(false, false)), None);
    assert_eq!(t(0x1000, priv_(true, false)), Some(EventType::FPermission));
    assert_eq!(t(0x1000, user(false, false)), Some(EventType::FPermission));
    assert_eq!(t(0x2000, user(true, false)), None);
    assert_eq!(
        t(0x2000, user(false, true)),
        Some(EventType::FPermission),
        "UXN"
    );
    assert_eq!(
        t(0x2000, priv_(false, true)),
        Some(EventType::FPermission),
        "EL0-writable is PXN"
    );
    assert_eq!(
        t(0x3000, priv_(false, true)),
        Some(EventType::FPermission),
        "PXN"
    );
    assert_eq!(t(0x3000, priv_(true, false)), None);
    let evs = rig.events();
    assert!(evs.iter().all(|e| e.kind == EventType::FPermission));
    assert!(
        evs.iter()
            .any(|e| !e.rnw && !e.pnu && e.input_addr == 0x1000)
    );
    // CD.R=0: faults are not recorded.
    let mut c = cd(1, 16, Granule::G4K, root);
    c[0] &= !(1 << 45);
    rig.write_words(cdaddr, &c);
    rig.cmd(0x06 | (1 << 32), 0); // CFGI_CD_ALL
    rig.sync();
    let r = rig
        .smmu
        .translate(&rig.mem, 1, None, 0x1000, 4, Access::WRITE);
    assert!(matches!(
        r,
        Err(Fault::Event {
            delivery: Delivery::Suppressed,
            ..
        })
    ));
    assert!(rig.events().is_empty());
}

#[test]
fn hierarchical_ap_table_limits_unless_had() {
    let (rig, root, cdaddr) = s1_rig(Granule::G4K, 48);
    let pt = pt_at(&rig, Granule::G4K, 48, root);
    pt.map(0x1000, 0x8000, 3, AF);
    // APTable[1] (read-only) on the level-0 table descriptor.
    let l0 = pt.desc_addr(0x1000, 0);
    rig.write_u64(l0, rig.read_u64(l0) | (1 << 62));
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, None, 0x1000, 4, Access::WRITE)
        ),
        Some(EventType::FPermission)
    );
    let mut c = cd(1, 16, Granule::G4K, root | 2); // HAD0
    c[0] |= 0;
    rig.write_words(cdaddr, &c);
    rig.cmd(0x06 | (1 << 32), 0);
    rig.cmd(0x11 | (1 << 48), 0); // TLBI_NH_ASID 1
    rig.sync();
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, None, 0x1000, 4, Access::WRITE)
        ),
        None
    );
}

#[test]
fn address_size_faults() {
    let (rig, root, cdaddr) = s1_rig(Granule::G4K, 48);
    let mut c = cd(1, 16, Granule::G4K, root);
    c[0] &= !(7 << 32); // IPS = 32 bits
    rig.write_words(cdaddr, &c);
    let pt = pt_at(&rig, Granule::G4K, 48, root);
    pt.map(0x1000, 0x1_0000_0000, 3, AF);
    pt.map(0x40_0000, 0x1000_0000, 2, AF);
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, None, 0x1000, 4, Access::READ)
        ),
        Some(EventType::FAddrSize)
    );
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, None, 0x40_0000, 4, Access::READ)
        ),
        None
    );
    // A VA beyond T0SZ's range is a translation fault.
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, None, 1 << 50, 4, Access::READ)
        ),
        Some(EventType::FTranslation)
    );
}

#[test]
fn ste_validity_rules() {
    let mut idr = IdRegs::default();
    idr.idr[1] = (idr.idr[1] & !(0x1f << 6)) | (4 << 6); // SSIDSIZE=4
    let rig = Rig::with(SmmuConfig {
        idr,
        ..SmmuConfig::default()
    });
    rig.enable(6);
    let root = rig.alloc(0x1000, 0x1000);
    let cdaddr = rig.alloc(0x1000, 0x1000);
    rig.write_words(cdaddr, &cd(1, 16, Granule::G4K, root));
    let bad_s2 = |f: &dyn Fn(&mut [u64; 8])| {
        let mut s = ste_s2(1, 24, 1, 0, 0x80_0000);
        f(&mut s);
        s
    };
    let cases: Vec<([u64; 8], Option<EventType>, &str)> = vec![
        ([0, 0, 0, 0, 0, 0, 0, 0], Some(EventType::CBadSte), "V=0"),
        (
            ste_s1(cdaddr, 5, 0, 2),
            Some(EventType::CBadSte),
            "S1CDMax > SSIDSIZE",
        ),
        (
            ste_s1(cdaddr, 2, 0, 3),
            Some(EventType::CBadSte),
            "S1DSS reserved",
        ),
        (
            ste_s1(1 << 50, 0, 0, 0),
            Some(EventType::CBadSte),
            "S1ContextPtr beyond OAS",
        ),
        (
            bad_s2(&|s| s[2] &= !(1 << 51)),
            Some(EventType::CBadSte),
            "S2AA64=0",
        ),
        (
            bad_s2(&|s| s[2] |= 1 << 52),
            Some(EventType::CBadSte),
            "S2ENDI",
        ),
        (
            bad_s2(&|s| s[2] |= 1 << 57),
            Some(EventType::CBadSte),
            "S2S without stall",
        ),
        (
            bad_s2(&|s| s[2] |= 3 << 46),
            Some(EventType::CBadSte),
            "S2TG reserved",
        ),
        (
            bad_s2(&|s| s[2] = (s[2] & !(0x3f << 32)) | (40 << 32)),
            Some(EventType::CBadSte),
            "S2T0SZ",
        ),
        (
            bad_s2(&|s| s[2] |= 3 << 38),
            Some(EventType::CBadSte),
            "S2SL0 reserved",
        ),
        (
            bad_s2(&|s| s[2] &= !(3 << 38)),
            Some(EventType::CBadSte),
            "SL0 vs T0SZ (32 tables)",
        ),
        (
            bad_s2(&|s| s[3] = 1 << 49),
            Some(EventType::CBadSte),
            "S2TTB beyond PS",
        ),
        ([1, 0, 0, 0, 0, 0, 0, 0], None, "Config=0 aborts silently"),
        (
            [1 | (2 << 1), 0, 0, 0, 0, 0, 0, 0],
            None,
            "Config=0b010 behaves as abort",
        ),
    ];
    for (ste, want, what) in cases {
        rig.set_ste(3, ste);
        rig.cfgi_ste(3);
        rig.sync();
        let r = rig
            .smmu
            .translate(&rig.mem, 3, None, 0x1000, 4, Access::READ);
        match want {
            Some(k) => assert_eq!(kind(r), Some(k), "{what}"),
            None => assert_eq!(r, Err(Fault::Abort(AbortCause::SteAbort)), "{what}"),
        }
    }
    // S1 on an SMMU without stage 1, 2-level CDs without CD2L.
    let mut idr2 = IdRegs::default();
    idr2.idr[0] &= !((1 << 1) | (1 << 19));
    let rig2 = Rig::with(SmmuConfig {
        idr: idr2,
        ..SmmuConfig::default()
    });
    rig2.enable(6);
    rig2.set_ste(0, ste_s1(0x1000, 0, 0, 0));
    assert_eq!(
        kind(rig2.smmu.translate(&rig2.mem, 0, None, 0, 4, Access::READ)),
        Some(EventType::CBadSte)
    );
    // StreamID beyond LOG2SIZE; STE fetch from outside RAM.
    assert_eq!(
        kind(rig.smmu.translate(&rig.mem, 64, None, 0, 4, Access::READ)),
        Some(EventType::CBadStreamid)
    );
    rig.w32(off::CR0, 0xc);
    rig.w64(off::STRTAB_BASE, 0x8000_0000_0000);
    rig.w32(off::CR0, 0xd);
    let r = rig.smmu.translate(&rig.mem, 5, None, 0, 4, Access::READ);
    assert!(
        matches!(r, Err(Fault::Event { event, .. }) if event.kind == EventType::FSteFetch && event.addr2 == 0x8000_0000_0000 + 5 * 64)
    );
}

#[test]
fn cd_validity_and_substreams() {
    let rig = Rig::new();
    rig.enable(6);
    let root = rig.alloc(0x1000, 0x1000);
    let pt = pt_at(&rig, Granule::G4K, 48, root);
    pt.map(0x1000, 0x7000, 3, AF);
    let good = cd(1, 16, Granule::G4K, root);
    type Mutate = Box<dyn Fn(&mut [u64; 8])>;
    let cases: Vec<(Mutate, &str)> = vec![
        (Box::new(|c| c[0] &= !(1 << 31)), "V=0"),
        (Box::new(|c| c[0] &= !(1 << 41)), "AA64=0"),
        (Box::new(|c| c[0] |= 1 << 15), "ENDI"),
        (Box::new(|c| c[0] = (c[0] & !0x3f) | 40), "T0SZ=40"),
        (Box::new(|c| c[0] = (c[0] & !0x3f) | 15), "T0SZ=15"),
        (Box::new(|c| c[0] |= 3 << 6), "TG0 reserved"),
        (Box::new(|c| c[0] &= !(1 << 46)), "A=0 with TERM_MODEL"),
        (Box::new(|c| c[0] |= 1 << 44), "S=1 without stall"),
        (
            Box::new(|c| c[0] &= !(1 << 30)),
            "TTB1 enabled with TG1=0 (reserved)",
        ),
    ];
    let cdaddr = rig.alloc(64, 64);
    rig.set_ste(1, ste_s1(cdaddr, 0, 0, 0));
    for (f, what) in cases {
        let mut c = good;
        f(&mut c);
        rig.write_words(cdaddr, &c);
        rig.cfgi_ste(1);
        rig.sync();
        assert_eq!(
            kind(
                rig.smmu
                    .translate(&rig.mem, 1, None, 0x1000, 4, Access::READ)
            ),
            Some(EventType::CBadCd),
            "{what}"
        );
    }
    // CD outside RAM: F_CD_FETCH.
    rig.set_ste(2, ste_s1(0x7000_0000_0000, 0, 0, 0));
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 2, None, 0x1000, 4, Access::READ)
        ),
        Some(EventType::FCdFetch)
    );

    // Linear CD table of 4 (S1CDMax=2), S1DSS variants.
    let tab = rig.alloc(4 * 64, 256);
    for ssid in 0..4u64 {
        rig.write_words(tab + ssid * 64, &cd(10 + ssid, 16, Granule::G4K, root));
    }
    for (dss, want) in [(0, Some(EventType::FStreamDisabled)), (1, None), (2, None)] {
        rig.set_ste(4, ste_s1(tab, 2, 0, dss));
        rig.cfgi_ste(4);
        rig.sync();
        let r = rig
            .smmu
            .translate(&rig.mem, 4, None, 0x1000, 4, Access::READ);
        assert_eq!(kind(r.clone()), want, "S1DSS={dss}");
        if dss == 1 {
            assert_eq!(r.unwrap().segments[0].pa, 0x1000, "stage 1 bypassed");
        }
    }
    let ok = rig
        .smmu
        .translate(&rig.mem, 4, Some(3), 0x1000, 4, Access::READ)
        .unwrap();
    assert_eq!(ok.segments[0].pa, 0x7000);
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 4, Some(4), 0x1000, 4, Access::READ)
        ),
        Some(EventType::CBadSubstreamid)
    );
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, Some(1), 0x1000, 4, Access::READ)
        ),
        Some(EventType::CBadSubstreamid)
    );
    // 2-level CD table (64K leaves): SSID 1030 = L1 index 1, leaf 6.
    let l1 = rig.alloc(64, 64);
    let leaf = rig.alloc(1024 * 64, 0x1_0000);
    rig.write_u64(l1 + 8, leaf | 1);
    rig.write_words(leaf + 6 * 64, &cd(9, 16, Granule::G4K, root));
    rig.set_ste(5, ste_s1(l1, 11, 2, 0));
    assert!(
        rig.smmu
            .translate(&rig.mem, 5, Some(1030), 0x1000, 4, Access::READ)
            .is_ok()
    );
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 5, Some(6), 0x1000, 4, Access::READ)
        ),
        Some(EventType::CBadSubstreamid),
        "L1CD invalid"
    );
}

#[test]
fn two_level_span_edge_is_two_to_span_minus_one() {
    let rig = Rig::new();
    rig.w64(off::STRTAB_BASE, STRTAB);
    rig.w32(off::STRTAB_BASE_CFG, (1 << 16) | (8 << 6) | 12);
    rig.w64(off::CMDQ_BASE, CMDQ | CMDQ_LOG2);
    rig.w64(off::EVENTQ_BASE, EVTQ | EVTQ_LOG2);
    rig.w32(off::CR2, 2);
    rig.w32(off::CR0, 0xd);
    let l2 = rig.alloc(0x4000, 0x4000);
    for i in 0..4u64 {
        rig.write_words(l2 + i * 64, &ste_bypass());
    }
    // L1[2]: Span=2 → 2 STEs (SIDs 0x200, 0x201). QEMU would also accept 0x202, 0x203.
    rig.write_u64(STRTAB + 2 * 8, l2 | 2);
    let t = |sid| {
        kind(
            rig.smmu
                .translate(&rig.mem, sid, None, 0x1000, 4, Access::READ),
        )
    };
    assert_eq!(t(0x200), None);
    assert_eq!(t(0x201), None);
    assert_eq!(t(0x202), Some(EventType::CBadStreamid));
    assert_eq!(t(0x203), Some(EventType::CBadStreamid));
    // Span=0 (invalid), Span>SPLIT+1, beyond LOG2SIZE.
    assert_eq!(t(0x300), Some(EventType::CBadStreamid));
    rig.write_u64(STRTAB + 4 * 8, l2 | 10);
    assert_eq!(t(0x400), Some(EventType::CBadStreamid));
    assert_eq!(t(0x1000), Some(EventType::CBadStreamid));
    // Span=9 covers all 256.
    let l2b = rig.alloc(256 * 64, 256 * 64);
    rig.write_words(l2b + 255 * 64, &ste_bypass());
    rig.write_u64(STRTAB + 5 * 8, l2b | 9);
    assert_eq!(t(0x5ff), None);
    // CR2.RECINVSID=0: C_BAD_STREAMID not recorded.
    rig.events();
    rig.w32(off::CR2, 0);
    let r = rig
        .smmu
        .translate(&rig.mem, 0x202, None, 0, 4, Access::READ);
    assert!(matches!(
        r,
        Err(Fault::Event {
            delivery: Delivery::Suppressed,
            ..
        })
    ));
}

#[test]
fn every_command_opcode() {
    let rig = Rig::new();
    rig.enable(6);
    let valid: &[(u64, &str)] = &[
        (0x01, "PREFETCH_CONFIG"),
        (0x02, "PREFETCH_ADDR"),
        (0x03, "CFGI_STE"),
        (0x04, "CFGI_STE_RANGE"),
        (0x05, "CFGI_CD"),
        (0x06, "CFGI_CD_ALL"),
        (0x10, "TLBI_NH_ALL"),
        (0x11, "TLBI_NH_ASID"),
        (0x12, "TLBI_NH_VA"),
        (0x13, "TLBI_NH_VAA"),
        (0x28, "TLBI_S12_VMALL"),
        (0x2a, "TLBI_S2_IPA"),
        (0x30, "TLBI_NSNH_ALL"),
        (0x44, "RESUME"),
        (0x45, "STALL_TERM"),
        (0x46, "CMD_SYNC"),
    ];
    for (op, name) in valid {
        let before = rig.r32(off::CMDQ_CONS);
        rig.cmd(*op, 0);
        assert_eq!(rig.r32(off::CMDQ_CONS), before + 1, "{name}");
        let pts = rig.hooks.point_names();
        assert_eq!(pts.last().unwrap(), &format!("smmuv3.cmd.{name}"));
    }
    let illegal = [
        0x00u64,
        0x07,
        0x18,
        0x1a,
        0x20,
        0x21,
        0x22,
        0x23,
        0x40,
        0x41,
        0x7f,
        0xff,
        0x46 | (3 << 12),
        0x03 | (1 << 10),
    ];
    for op in illegal {
        let cons = rig.r32(off::CMDQ_CONS);
        rig.cmd(op, 0);
        let c = rig.r32(off::CMDQ_CONS);
        assert_eq!(
            c & 0xfff,
            cons & 0xfff,
            "{op:#x}: CONS stays on the bad command"
        );
        assert_eq!((c >> 24) & 0x7f, 1, "{op:#x}: CERROR_ILL");
        assert_eq!(
            rig.r32(off::GERROR) ^ rig.r32(off::GERRORN),
            1,
            "GERROR.CMDQ_ERR active"
        );
        // Halted: a following SYNC is not consumed until acknowledged.
        rig.cmd(0x46, 0);
        assert_eq!(rig.r32(off::CMDQ_CONS) & 0xfff, cons & 0xfff);
        // Like Linux: replace the bad command with a SYNC, then acknowledge.
        rig.write_words(CMDQ + u64::from(cons as u32 & 0xff) * 16, &[0x46, 0]);
        rig.w32(off::GERRORN, rig.r32(off::GERROR));
        assert_eq!(
            rig.r32(off::CMDQ_CONS) & 0xfff,
            (cons + 2) & 0xfff,
            "{op:#x}: resumed"
        );
    }
    assert!(rig.irq.take().iter().any(|i| matches!(
        i,
        RecordedInterrupt::Level {
            line: 3,
            asserted: true
        }
    )));
    // With HYP/ATS/PRI advertised, those opcodes are legal.
    let mut idr = IdRegs::default();
    idr.idr[0] |= (1 << 9) | (1 << 10) | (1 << 16);
    let rig2 = Rig::with(SmmuConfig {
        idr,
        ..SmmuConfig::default()
    });
    rig2.enable(6);
    for op in [0x20u64, 0x21, 0x22, 0x23, 0x40, 0x41] {
        rig2.cmd(op, 0);
    }
    assert_eq!(rig2.r32(off::CMDQ_CONS), 6);
    // Command fetch abort: CERROR_ABT.
    let rig3 = Rig::new();
    rig3.w64(off::CMDQ_BASE, 0x4000_0000_0000 | 4);
    rig3.w32(off::CR0, 8);
    rig3.w32(off::CMDQ_PROD, 1);
    assert_eq!((rig3.r32(off::CMDQ_CONS) >> 24) & 0x7f, 2);
}

#[test]
fn cmd_sync_signals() {
    let rig = Rig::new();
    rig.enable(6);
    rig.irq.take();
    rig.cmd(0x46 | (1 << 12), 0); // CS=IRQ, no MSI address → wired line
    assert_eq!(
        rig.irq.take(),
        vec![
            RecordedInterrupt::Level {
                line: 2,
                asserted: true
            },
            RecordedInterrupt::Level {
                line: 2,
                asserted: false
            }
        ]
    );
    let word = rig.alloc(8, 8);
    rig.write_u64(word, u64::MAX);
    rig.cmd(0x46 | (1 << 12) | (0x1234_5678 << 32), word);
    assert_eq!(
        rig.read_u64(word),
        0xffff_ffff_1234_5678,
        "32-bit MSI write into RAM"
    );
    rig.cmd(0x46 | (1 << 12) | (7 << 32), 0xfee0_0000);
    assert_eq!(
        rig.irq.take().last(),
        Some(&RecordedInterrupt::Msi {
            address: 0xfee0_0000,
            data: 7
        })
    );
    // MSI to a hole in the address space: GERROR.MSI_CMDQ_ABT_ERR.
    rig.cmd(0x46 | (1 << 12), 0x7000_0000_0000);
    assert_ne!((rig.r32(off::GERROR) ^ rig.r32(off::GERRORN)) & (1 << 4), 0);
}

#[test]
fn command_queue_wraps_and_work_per_doorbell_is_bounded() {
    let rig = Rig::new();
    rig.enable(6);
    for i in 0..600u64 {
        rig.cmd(0x01, 0);
        let expect = (i + 1) & ((2 << CMDQ_LOG2) - 1);
        assert_eq!(u64::from(rig.r32(off::CMDQ_CONS) as u32), expect);
    }
    // A full queue of commands with one doorbell: all 256 processed, then it stops.
    let cons = rig.r32(off::CMDQ_CONS);
    let list: Vec<[u64; 2]> = (0..256).map(|_| [0x01u64, 0]).collect();
    rig.cmds(&list);
    let c = rig.r32(off::CMDQ_CONS);
    assert_eq!(c, cons ^ (1 << CMDQ_LOG2), "wrapped once, empty again");
}

#[test]
fn event_queue_wrap_overflow_and_msi() {
    let rig = Rig::new();
    rig.enable(6);
    let evq_msi = rig.alloc(8, 8);
    rig.w64(off::EVENTQ_IRQ_CFG0, evq_msi);
    rig.w32(off::EVENTQ_IRQ_CFG1, 0xabcd);
    // 32 entries: fill it, then one more overflows.
    for _ in 0..32 {
        let r = rig.smmu.translate(&rig.mem, 63, None, 0, 4, Access::READ);
        assert!(matches!(
            r,
            Err(Fault::Event {
                delivery: Delivery::Written,
                ..
            })
        ));
    }
    assert_eq!(
        rig.read_u32(evq_msi),
        0xabcd,
        "event-queue MSI written into RAM"
    );
    let r = rig.smmu.translate(&rig.mem, 63, None, 0, 4, Access::READ);
    assert!(matches!(
        r,
        Err(Fault::Event {
            delivery: Delivery::Overflow,
            ..
        })
    ));
    assert_ne!(rig.r32(0x1_0000 + off::EVENTQ_PROD) & (1 << 31), 0, "OVFLG");
    let evs = rig.events();
    assert_eq!(evs.len(), 32);
    assert!(
        evs.iter()
            .all(|e| e.kind == EventType::CBadSte && e.sid == 63)
    );
    // After acknowledging, records flow again and wrap.
    for _ in 0..40 {
        rig.smmu
            .translate(&rig.mem, 63, None, 0, 4, Access::READ)
            .ok();
        assert_eq!(rig.events().len(), 1);
    }
    // Disabled queue: dropped.
    rig.w32(off::CR0, 0x9);
    let r = rig.smmu.translate(&rig.mem, 63, None, 0, 4, Access::READ);
    assert!(matches!(
        r,
        Err(Fault::Event {
            delivery: Delivery::QueueDisabled,
            ..
        })
    ));
}

#[test]
fn gbpa_update_and_cr0ack() {
    let rig = Rig::new();
    assert_eq!(
        rig.smmu
            .translate(&rig.mem, 9, None, 0x1234, 8, Access::READ)
            .unwrap()
            .segments[0]
            .pa,
        0x1234
    );
    rig.w32(off::GBPA, 1 << 20); // no UPDATE: ignored
    assert_eq!(rig.r32(off::GBPA), 0);
    rig.w32(off::GBPA, (1 << 31) | (1 << 20));
    assert_eq!(rig.r32(off::GBPA), 1 << 20, "applied, UPDATE reads 0");
    assert_eq!(
        rig.smmu
            .translate(&rig.mem, 9, None, 0x1234, 8, Access::READ),
        Err(Fault::Abort(AbortCause::Gbpa))
    );
    assert!(
        rig.hooks
            .state_values()
            .iter()
            .any(|(w, v)| w == "gbpa" && *v == 1 << 20)
    );
    for v in [0u64, 1, 4, 8, 0xd, 0xffff_ffff] {
        rig.w32(off::CR0, v);
        assert_eq!(rig.r32(off::CR0ACK), rig.r32(off::CR0), "{v:#x}");
    }
    assert_eq!(rig.r32(off::CR0), 0x1cd, "RES0 bits dropped (no PRI/ATS)");
    rig.w32(off::IRQ_CTRL, 7);
    assert_eq!(rig.r32(off::IRQ_CTRLACK), 5, "no PRIQ_IRQEN without PRI");
    // ID registers are read-only; unknown offsets RAZ/WI; bad sizes ignored.
    rig.w32(off::IDR0, 0);
    assert_ne!(rig.r32(off::IDR0), 0);
    rig.w32(0xe00, 5);
    assert_eq!(rig.r32(0xe00), 0);
    assert_eq!(rig.smmu.mmio_read(off::CR0, 2), 0);
    assert_eq!(
        rig.smmu.mmio_read(0x1_0000 + off::CR0, 4),
        0,
        "page 1 holds only queue pointers"
    );
}

#[test]
fn stage2_and_nested() {
    let rig = Rig::new();
    rig.enable(6);
    // Stage 2: 4K, 40-bit IPA, SL0=1 (start level 1), VMID 7.
    let s2 = Pt::s2(&rig, Granule::G4K, 40, 1, 1);
    s2.map(0x4000_0000, 0x20_0000, 2, AF | S2RW); // 2M block IPA 1G → PA 2M... (aligned)
    rig.set_ste(2, ste_s2(7, 24, 1, 0, s2.root));
    let t = rig
        .smmu
        .translate(&rig.mem, 2, None, 0x4000_1234, 4, Access::WRITE)
        .unwrap();
    assert_eq!(t.segments[0].pa, 0x20_1234);
    let r = rig
        .smmu
        .translate(&rig.mem, 2, None, 0x5000_0000, 4, Access::READ);
    assert!(
        matches!(r, Err(Fault::Event { event, .. }) if event.kind == EventType::FTranslation && event.s2 && event.class == FaultClass::In && event.addr2 == 0x5000_0000)
    );
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 2, None, 1 << 41, 4, Access::READ)
        ),
        Some(EventType::FTranslation),
        "IPA beyond S2T0SZ"
    );
    // Concatenated start tables: 4K, SL0=0 (level 2), 32-bit IPA → 4 tables.
    let s2c = Pt::s2(&rig, Granule::G4K, 32, 2, 4);
    s2c.map(0xc000_0000, 0x40_0000, 2, AF | S2RW);
    rig.set_ste(3, ste_s2(8, 32, 0, 0, s2c.root));
    assert_eq!(
        rig.smmu
            .translate(&rig.mem, 3, None, 0xc000_0010, 4, Access::READ)
            .unwrap()
            .segments[0]
            .pa,
        0x40_0010
    );
    // Stage-2 read-only: write fault with S2=1.
    s2.map(0x4020_0000, 0x60_0000, 2, AF | (1 << 6));
    let r = rig
        .smmu
        .translate(&rig.mem, 2, None, 0x4020_0000, 4, Access::WRITE);
    assert!(
        matches!(r, Err(Fault::Event { event, .. }) if event.kind == EventType::FPermission && event.s2)
    );

    // Nested: S1 tables and CD live in IPA space at 1G + x, identity-offset to PA via S2.
    let ipa_base = 0x4000_0000u64;
    let ns2 = Pt::s2(&rig, Granule::G4K, 40, 1, 1);
    let pa_pool = rig.alloc(0x20_0000, 0x20_0000); // 2M of PA for S1 tables and CD
    ns2.map(ipa_base, pa_pool, 2, AF | S2RW);
    ns2.map(0x8000_0000, 0x80_0000, 2, AF | S2RW); // data IPA → PA
    // S1 tables in the pool, written with IPAs.
    let cd_ipa = ipa_base;
    let root_ipa = ipa_base + 0x1000;
    let mut next = 0x2000u64;
    let ipa_to_pa = |ipa: u64| ipa - ipa_base + pa_pool;
    // 39-bit VA: levels 1..3.
    let mut table_ipa = root_ipa;
    for level in 1..3u32 {
        let idx = (0x1000u64 >> Granule::G4K.level_shift(level)) & 0x1ff;
        let new = ipa_base + next;
        next += 0x1000;
        rig.write_u64(ipa_to_pa(table_ipa) + idx * 8, new | 3);
        table_ipa = new;
    }
    rig.write_u64(ipa_to_pa(table_ipa) + 8, 0x8000_0000 | AF | 3);
    rig.write_words(ipa_to_pa(cd_ipa), &cd(4, 25, Granule::G4K, root_ipa));
    rig.set_ste(4, ste_nested(cd_ipa, 9, 24, 1, 0, ns2.root));
    let t = rig
        .smmu
        .translate(&rig.mem, 4, None, 0x1abc, 4, Access::READ)
        .unwrap();
    assert_eq!(t.segments[0].pa, 0x80_0abc);
    // Nested faults: S1 table IPA unmapped at S2 → CLASS=TT; CD IPA unmapped → CLASS=CD.
    rig.write_words(
        ipa_to_pa(cd_ipa) + 0x100,
        &cd(5, 25, Granule::G4K, 0x9000_0000),
    );
    rig.set_ste(5, ste_nested(cd_ipa + 0x100, 9, 24, 1, 0, ns2.root));
    let r = rig
        .smmu
        .translate(&rig.mem, 5, None, 0x1000, 4, Access::READ);
    assert!(
        matches!(r, Err(Fault::Event { event, .. }) if event.s2 && event.class == FaultClass::Tt && event.kind == EventType::FTranslation),
        "{r:?}"
    );
    rig.set_ste(6, ste_nested(0x9000_0000, 9, 24, 1, 0, ns2.root));
    let r = rig
        .smmu
        .translate(&rig.mem, 6, None, 0x1000, 4, Access::READ);
    assert!(
        matches!(r, Err(Fault::Event { event, .. }) if event.s2 && event.class == FaultClass::Cd),
        "{r:?}"
    );
    // Stage-2 change of a nested data page: TLBI_S2_IPA + TLBI_NH_ALL (as Linux) drop it.
    ns2.map(0x8000_0000, 0xa0_0000, 2, AF | S2RW);
    rig.cmds(&[
        [0x2a | (9 << 32), 0x8000_0000],
        [0x10 | (9 << 32), 0],
        [0x46, 0],
    ]);
    assert_eq!(
        rig.smmu
            .translate(&rig.mem, 4, None, 0x1abc, 4, Access::READ)
            .unwrap()
            .segments[0]
            .pa,
        0xa0_0abc
    );
}

#[test]
fn never_cache_mode_sees_changes_immediately() {
    let (rig, root, _) = s1_rig(Granule::G4K, 48);
    let pt = pt_at(&rig, Granule::G4K, 48, root);
    pt.map(0x1000, 0x8000, 3, AF);
    assert!(
        rig.smmu
            .translate(&rig.mem, 1, None, 0x1000, 4, Access::READ)
            .is_ok()
    );
    rig.write_u64(pt.desc_addr(0x1000, 3), 0);
    assert!(
        rig.smmu
            .translate(&rig.mem, 1, None, 0x1000, 4, Access::READ)
            .is_ok(),
        "stale like hardware"
    );
    rig.smmu
        .set_cache_mode(sluice_smmuv3::CacheMode::NeverCache);
    pt.map(0x1000, 0x8000, 3, AF);
    assert!(
        rig.smmu
            .translate(&rig.mem, 1, None, 0x1000, 4, Access::READ)
            .is_ok()
    );
    rig.write_u64(pt.desc_addr(0x1000, 3), 0);
    assert_eq!(
        kind(
            rig.smmu
                .translate(&rig.mem, 1, None, 0x1000, 4, Access::READ)
        ),
        Some(EventType::FTranslation)
    );
    assert_eq!(rig.smmu.iotlb_len(), 0);
}

#[test]
fn concurrent_translations_and_invalidations() {
    let (rig, root, _) = s1_rig(Granule::G4K, 48);
    let pt = pt_at(&rig, Granule::G4K, 48, root);
    for i in 0..64u64 {
        pt.map(i << 12, 0x100_0000 + (i << 12), 3, AF);
    }
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let rig = &rig;
            s.spawn(move || {
                for i in 0..2000u64 {
                    let va = ((i * 7 + t) % 64) << 12;
                    let r = rig
                        .smmu
                        .translate(&rig.mem, 1, None, va, 8, Access::READ)
                        .unwrap();
                    assert_eq!(r.segments[0].pa, 0x100_0000 + va);
                }
            });
        }
        for i in 0..200u64 {
            rig.cmd(tlbi_va(1, (i % 64) << 12)[0], tlbi_va(1, (i % 64) << 12)[1]);
        }
    });
}

#[test]
fn points_list_covers_what_is_announced() {
    let all = sluice_smmuv3::points();
    let rig = Rig::new();
    rig.enable(6);
    rig.cmd(0x7f, 0);
    for p in rig.hooks.point_names() {
        assert!(all.contains(&p.as_str()), "{p}");
    }
}
