//! Conformance: entry types with invalid/protection bits, window checks, RPCIT exactness and
//! staleness, budget exhaustion and recovery, every MPCIFC operation, PCILG/PCISTG and CLP.

mod common;

use common::*;
use sluice_zpci::clp::{SetPciFnOp, rc};
use sluice_zpci::codes::{pec, reason, status};
use sluice_zpci::guest::{read_be, write_be};
use sluice_zpci::walk::bits;
use sluice_zpci::*;

const IOVA: u64 = PBA + 0x12_3000;
const GPA: u64 = 0x20_0000;

fn refresh(r: &Rig, iova: u64, len: u64) -> InsnStatus {
    r.z.rpcit(&r.m, r.fh, iova, len)
}

fn kind(r: &Rig, iova: u64, write: bool) -> Result<Translation, RefusalKind> {
    r.z.translate(&r.m, r.fh, iova, 8, write)
        .map_err(|e| e.kind)
}

#[test]
fn mapped_page_translates_read_and_write() {
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    assert_eq!(refresh(&r, IOVA, 0x1000), InsnStatus::OK);
    let t = r.z.translate(&r.m, r.fh, IOVA + 0x10, 8, true).unwrap();
    assert_eq!(
        t.pieces,
        vec![Piece {
            iova: IOVA + 0x10,
            gpa: GPA + 0x10,
            len: 8
        }]
    );
}

#[test]
fn page_invalid_bit_refuses_and_faults() {
    let mut r = rig();
    r.t.unmap(&r.m, IOVA).unwrap();
    assert_eq!(refresh(&r, IOVA, 0x1000), InsnStatus::OK);
    assert_eq!(kind(&r, IOVA, false).unwrap_err(), RefusalKind::NotMapped);
    assert_eq!(r.z.state_of(FID), Some(FunctionState::Error));
    let (ev, _) = r.z.take_error_events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].pec, ev[0].addr), (pec::TPROTE, IOVA));
    // Fail closed: every later DMA is refused while in error.
    assert_eq!(kind(&r, IOVA, false).unwrap_err(), RefusalKind::InError);
}

#[test]
fn page_protection_bit_allows_reads_only() {
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, false).unwrap();
    refresh(&r, IOVA, 0x1000);
    assert!(kind(&r, IOVA, false).is_ok());
    assert_eq!(
        kind(&r, IOVA, true).unwrap_err(),
        RefusalKind::WriteProtected
    );
    assert_eq!(r.z.state_of(FID), Some(FunctionState::Error));
}

#[test]
fn segment_and_region_invalid_and_protection_bits() {
    // Segment invalid.
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    let sa = r.t.ste_addr(&r.m, IOVA).unwrap();
    let ste = read_be(&r.m, sa).unwrap();
    write_be(&r.m, sa, ste | bits::TE_INVALID).unwrap();
    refresh(&r, IOVA, 0x1000);
    assert_eq!(kind(&r, IOVA, false).unwrap_err(), RefusalKind::NotMapped);
    // Segment protection.
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    let sa = r.t.ste_addr(&r.m, IOVA).unwrap();
    write_be(&r.m, sa, read_be(&r.m, sa).unwrap() | bits::PROT).unwrap();
    refresh(&r, IOVA, 0x1000);
    assert!(kind(&r, IOVA, false).is_ok());
    assert_eq!(
        kind(&r, IOVA, true).unwrap_err(),
        RefusalKind::WriteProtected
    );
    // Region invalid.
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    let ra = r.t.rte_addr(IOVA);
    write_be(&r.m, ra, read_be(&r.m, ra).unwrap() | bits::TE_INVALID).unwrap();
    refresh(&r, IOVA, 0x1000);
    assert_eq!(kind(&r, IOVA, false).unwrap_err(), RefusalKind::NotMapped);
    // Region protection.
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    let ra = r.t.rte_addr(IOVA);
    write_be(&r.m, ra, read_be(&r.m, ra).unwrap() | bits::PROT).unwrap();
    refresh(&r, IOVA, 0x1000);
    assert!(kind(&r, IOVA, false).is_ok());
    assert_eq!(
        kind(&r, IOVA, true).unwrap_err(),
        RefusalKind::WriteProtected
    );
}

#[test]
fn iota_protection_makes_space_read_only() {
    let rec = std::sync::Arc::new(RecordingHooks::default());
    let z = model_with(ZpciOptions::default(), cfg(), rec);
    let m = mem();
    let mut t = sluice_zpci::guest::GuestTables::new(&m, ARENA, ARENA + 0x40_0000).unwrap();
    let fh = enable(&z, FID);
    let fib = Fib {
        iota: t.iota() | bits::PROT,
        ..ioat_fib(&t)
    };
    assert!(
        z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::RegIoat, &fib)
            .unwrap()
            .is_ok()
    );
    t.map(&m, IOVA, GPA, true).unwrap();
    assert!(z.rpcit(&m, fh, IOVA, 0x1000).is_ok());
    assert!(z.translate(&m, fh, IOVA, 8, false).is_ok());
    assert_eq!(
        z.translate(&m, fh, IOVA, 8, true).unwrap_err().kind,
        RefusalKind::WriteProtected
    );
}

fn rpcit_error(setup: impl Fn(&mut Rig), expect_pec: u16) {
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    setup(&mut r);
    assert_eq!(
        refresh(&r, IOVA, 0x1000),
        InsnStatus::error(status::PCI_FUNC_IN_ERR)
    );
    assert_eq!(r.z.state_of(FID), Some(FunctionState::Error));
    let (ev, _) = r.z.take_error_events();
    assert_eq!(
        ev.iter().map(|e| e.pec).collect::<Vec<_>>(),
        vec![expect_pec]
    );
    // Error state: RPCIT now answers "error recovery required".
    assert_eq!(
        refresh(&r, IOVA, 0x1000),
        InsnStatus::error(status::MOD_ERROR_RECOVER)
    );
}

#[test]
fn malformed_entries_are_error_events() {
    rpcit_error(
        |r| write_be(&r.m, r.t.rte_addr(IOVA), 0).unwrap(),
        pec::INVALTE,
    );
    rpcit_error(
        |r| {
            let ra = r.t.rte_addr(IOVA);
            let v = read_be(&r.m, ra).unwrap();
            write_be(&r.m, ra, v & !bits::RTE_LEN_MASK | 1).unwrap();
        },
        pec::INVALTL,
    );
    rpcit_error(
        |r| {
            let ra = r.t.rte_addr(IOVA);
            let v = read_be(&r.m, ra).unwrap();
            write_be(&r.m, ra, v & !bits::TE_TYPE_MASK).unwrap();
        },
        pec::TT,
    );
    rpcit_error(
        |r| {
            let sa = r.t.ste_addr(&r.m, IOVA).unwrap();
            write_be(&r.m, sa, read_be(&r.m, sa).unwrap() | bits::TE_TYPE_RTX).unwrap();
        },
        pec::TT,
    );
    rpcit_error(
        |r| write_be(&r.m, r.t.pte_addr(&r.m, IOVA).unwrap(), 0).unwrap(),
        pec::INVALTE,
    );
    // FC without the 1 MiB capability.
    rpcit_error(
        |r| r.t.map_segment(&r.m, IOVA, 0x10_0000, true).unwrap(),
        pec::TT,
    );
}

#[test]
fn one_meg_frames_behind_capability_split_at_1m() {
    let mut r = rig_with(
        ZpciOptions::default(),
        FunctionConfig {
            one_meg_frames: true,
            ..cfg()
        },
    );
    let seg = PBA + 0x30_0000;
    r.t.map_segment(&r.m, seg, 0x50_0000, true).unwrap();
    r.t.map_segment(&r.m, seg + 0x10_0000, 0x90_0000, false)
        .unwrap();
    assert!(refresh(&r, seg, 0x20_0000).is_ok());
    let t =
        r.z.translate(&r.m, r.fh, seg + 0xf_f000, 0x2000, false)
            .unwrap();
    assert_eq!(
        t.pieces,
        vec![
            Piece {
                iova: seg + 0xf_f000,
                gpa: 0x5f_f000,
                len: 0x1000
            },
            Piece {
                iova: seg + 0x10_0000,
                gpa: 0x90_0000,
                len: 0x1000
            },
        ]
    );
    assert_eq!(
        r.z.translate(&r.m, r.fh, seg + 0x10_0000, 8, true)
            .unwrap_err()
            .kind,
        RefusalKind::WriteProtected
    );
}

#[test]
fn dma_pieces_split_at_4k() {
    let mut r = rig();
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    r.t.map(&r.m, IOVA + 0x1000, 0x70_0000, true).unwrap();
    refresh(&r, IOVA, 0x2000);
    let t =
        r.z.translate(&r.m, r.fh, IOVA + 0xff0, 0x20, false)
            .unwrap();
    assert_eq!(
        t.pieces,
        vec![
            Piece {
                iova: IOVA + 0xff0,
                gpa: GPA + 0xff0,
                len: 0x10
            },
            Piece {
                iova: IOVA + 0x1000,
                gpa: 0x70_0000,
                len: 0x10
            },
        ]
    );
}

#[test]
fn window_is_enforced_with_oorange() {
    for (iova, len) in [
        (PBA - 0x1000, 8u64),
        (PAL + 1, 8),
        (PAL - 3, 8),
        (u64::MAX - 2, 8),
    ] {
        let mut r = rig();
        r.t.map(&r.m, PAL & !0xfff, GPA, true).unwrap();
        refresh(&r, PAL & !0xfff, 0x1000);
        let e = r.z.translate(&r.m, r.fh, iova, len, false).unwrap_err();
        assert_eq!(
            (e.kind, e.reason),
            (RefusalKind::OutOfWindow, u32::from(pec::OORANGE)),
            "{iova:#x}"
        );
        assert_eq!(r.z.state_of(FID), Some(FunctionState::Error));
    }
    // RPCIT entirely outside the window.
    let r = rig();
    assert_eq!(
        refresh(&r, PAL + 1, 0x1000),
        InsnStatus::error(status::PCI_FUNC_IN_ERR)
    );
    assert_eq!(r.z.take_error_events().0[0].pec, pec::OORANGE);
}

#[test]
fn rpcit_covers_exactly_its_range_and_stale_entries_stay_outside() {
    let mut r = rig();
    let (a, b, c) = (IOVA, IOVA + 0x1000, IOVA + 0x2000);
    r.t.map(&r.m, a, 0x10_0000, true).unwrap();
    r.t.map(&r.m, b, 0x11_0000, true).unwrap();
    r.t.map(&r.m, c, 0x12_0000, true).unwrap();
    assert!(refresh(&r, b, 0x1000).is_ok());
    assert_eq!(
        r.z.iotlb_entries(FID)
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        vec![b]
    );
    assert!(refresh(&r, a, 0x3000).is_ok());
    // Remap b and c, refresh only c: b keeps its stale translation.
    r.t.map(&r.m, b, 0x21_0000, true).unwrap();
    r.t.map(&r.m, c, 0x22_0000, true).unwrap();
    assert!(refresh(&r, c, 0x1000).is_ok());
    assert_eq!(kind(&r, b, false).unwrap().pieces[0].gpa, 0x11_0000);
    assert_eq!(kind(&r, c, false).unwrap().pieces[0].gpa, 0x22_0000);
    // Unmap a without RPCIT: still translates (stale) until refreshed.
    r.t.unmap(&r.m, a).unwrap();
    assert!(kind(&r, a, false).is_ok());
    assert!(refresh(&r, a, 0x1000).is_ok());
    assert_eq!(kind(&r, a, false).unwrap_err(), RefusalKind::NotMapped);
}

#[test]
fn always_walk_mode_sees_table_edits_without_rpcit() {
    let mut r = rig_with(
        ZpciOptions {
            tlb_mode: TlbMode::AlwaysWalk,
            ..Default::default()
        },
        cfg(),
    );
    r.t.map(&r.m, IOVA, GPA, true).unwrap();
    assert!(kind(&r, IOVA, false).is_ok());
    r.t.map(&r.m, IOVA, 0x60_0000, true).unwrap();
    assert_eq!(kind(&r, IOVA, false).unwrap().pieces[0].gpa, 0x60_0000);
    r.t.unmap(&r.m, IOVA).unwrap();
    assert_eq!(kind(&r, IOVA, false).unwrap_err(), RefusalKind::NotMapped);
}

#[test]
fn budget_exhaustion_answers_16_then_global_refresh_recovers() {
    let mut r = rig_with(
        ZpciOptions {
            mapping_budget: Some(4),
            ..Default::default()
        },
        cfg(),
    );
    r.t.map_range(&r.m, IOVA, GPA, 4, true).unwrap();
    assert!(refresh(&r, IOVA, 0x4000).is_ok());
    assert_eq!(r.z.budget_used(), 4);
    // Lazy unmap: tables cleared, no RPCIT, budget still held.
    for i in 0..4 {
        r.t.unmap(&r.m, IOVA + i * 0x1000).unwrap();
    }
    let new = IOVA + 0x10_0000;
    r.t.map_range(&r.m, new, 0x80_0000, 4, true).unwrap();
    assert_eq!(
        refresh(&r, new, 0x4000),
        InsnStatus::error(status::RPCIT_INSUFF_RES)
    );
    assert_eq!(kind(&r, new, false).unwrap_err(), RefusalKind::NotMapped);
    // The function went to error on that DMA; recover it, then do what Linux does: global RPCIT.
    assert!(
        r.z.mpcifc_with_fib(&r.m, r.fh, 0, MpcifcOp::ResetError, &Fib::default())
            .unwrap()
            .is_ok()
    );
    assert_eq!(refresh(&r, PBA, PAL - PBA + 1), InsnStatus::OK);
    assert_eq!(r.z.budget_used(), 4);
    assert!(kind(&r, new + 0x3000, true).is_ok());
    assert_eq!(kind(&r, IOVA, false).unwrap_err(), RefusalKind::NotMapped);
}

#[test]
fn rpcit_preconditions() {
    let r = rig();
    assert_eq!(
        r.z.rpcit(&r.m, r.fh ^ 0x0100_0000, IOVA, 0x1000),
        InsnStatus::INVALID_HANDLE
    );
    assert_eq!(
        r.z.rpcit(&r.m, r.fh | 0x7777, IOVA, 0x1000),
        InsnStatus::INVALID_HANDLE
    );
    assert!(dereg_ioat(&r.z, &r.m, r.fh).is_ok());
    assert_eq!(
        refresh(&r, IOVA, 0x1000),
        InsnStatus::error(status::PCI_FUNC_IN_ERR)
    );
    assert_eq!(r.z.take_error_events().0[0].pec, pec::INVALAS);
    let fh2 = r.z.clp_set_pci_fn(r.fh, SetPciFnOp::Disable).unwrap();
    assert_eq!(
        r.z.rpcit(&r.m, fh2, IOVA, 0x1000),
        InsnStatus::INVALID_HANDLE
    );
    assert_eq!(
        RpcitRequest::from_regs(0, 3, 0, 0),
        Err(ProgramException::Specification)
    );
    assert_eq!(RpcitRequest::from_regs(5 << 32, 2, 7, 8).unwrap().fh, 5);
}
use sluice_zpci::rpcit::RpcitRequest;

fn op(r: &Rig, op: MpcifcOp, fib: &Fib) -> Result<InsnStatus, ProgramException> {
    r.z.mpcifc_with_fib(&r.m, r.fh, 0, op, fib)
}

#[test]
fn mpcifc_ioat_operations() {
    let r = rig();
    let fib = ioat_fib(&r.t);
    assert_eq!(
        op(&r, MpcifcOp::RegIoat, &fib),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    assert_eq!(
        r.z.mpcifc_with_fib(&r.m, r.fh, 1, MpcifcOp::RegIoat, &fib),
        Ok(InsnStatus::error(status::MOD_DMAAS_INVAL))
    );
    assert_eq!(
        r.z.mpcifc_with_fib(&r.m, r.fh, 2, MpcifcOp::DeregIoat, &fib),
        Ok(InsnStatus::error(status::MOD_DMAAS_INVAL))
    );
    let narrow = Fib {
        pba: PBA + 0x1000,
        pal: PBA + 0x1_ffff,
        ..fib
    };
    assert_eq!(op(&r, MpcifcOp::ReregIoat, &narrow), Ok(InsnStatus::OK));
    assert_eq!(
        r.z.ioat_of(FID),
        Some((fib.iota, PBA + 0x1000, PBA + 0x1_ffff))
    );
    assert_eq!(op(&r, MpcifcOp::DeregIoat, &fib), Ok(InsnStatus::OK));
    assert_eq!(
        op(&r, MpcifcOp::DeregIoat, &fib),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    assert_eq!(
        op(&r, MpcifcOp::ReregIoat, &fib),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    assert_eq!(
        r.z.translate(&r.m, r.fh, IOVA, 8, false).unwrap_err().kind,
        RefusalKind::NoIoat
    );
    // Bad windows and IOTAs are operand exceptions.
    for bad in [
        Fib {
            pba: PBA - 0x1000,
            ..fib
        },
        Fib {
            pal: u64::MAX,
            ..fib
        },
        Fib {
            pba: PAL + 1,
            pal: PBA,
            ..fib
        },
        Fib {
            iota: fib.iota & !bits::IOTA_T,
            ..fib
        },
        Fib {
            iota: (fib.iota & !0x1c) | (2 << 2),
            ..fib
        },
        Fib {
            iota: fib.iota & !0x1c,
            ..fib
        },
    ] {
        assert_eq!(
            op(&r, MpcifcOp::RegIoat, &bad),
            Err(ProgramException::Operand),
            "{bad:x?}"
        );
    }
    assert_eq!(
        op(&r, MpcifcOp::RegIoat, &Fib { fmt: 1, ..fib }),
        Err(ProgramException::Operand)
    );
    assert_eq!(op(&r, MpcifcOp::RegIoat, &fib), Ok(InsnStatus::OK));
}

#[test]
fn mpcifc_raw_instruction_decoding() {
    let r = rig();
    let fiba = 0x10_0000u64;
    vm_memory::Bytes::write_slice(
        &r.m,
        &ioat_fib(&r.t).to_bytes(),
        vm_memory::GuestAddress(fiba),
    )
    .unwrap();
    let r1 = |oc: u64| (u64::from(r.fh) << 32) | oc;
    assert_eq!(
        r.z.mpcifc(&r.m, r1(5), fiba + 4),
        Err(ProgramException::Specification)
    );
    assert_eq!(
        r.z.mpcifc(&r.m, r1(5), 1 << 40),
        Err(ProgramException::Addressing { addr: 1 << 40 })
    );
    assert_eq!(
        r.z.mpcifc(&r.m, r1(8), fiba),
        Err(ProgramException::Operand)
    );
    assert_eq!(r.z.mpcifc(&r.m, r1(5), fiba), Ok(InsnStatus::OK));
    assert_eq!(r.z.mpcifc(&r.m, r1(4), fiba), Ok(InsnStatus::OK));
    assert_eq!(
        r.z.mpcifc(&r.m, r1(4) | (1 << 16), fiba),
        Ok(InsnStatus::error(status::MOD_DMAAS_INVAL))
    );
    // cc 3 comes before the FIB is looked at.
    let stale = (u64::from(r.fh & !0x8000_0000) << 32) | 5;
    assert_eq!(
        r.z.mpcifc(&r.m, stale, 1 << 40),
        Ok(InsnStatus::INVALID_HANDLE)
    );
}

#[test]
fn mpcifc_state_operations() {
    let r = rig();
    let f = Fib::default();
    assert_eq!(
        op(&r, MpcifcOp::ResetError, &f),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    assert_eq!(
        op(&r, MpcifcOp::ResetBlock, &f),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    let _ = r.z.translate(&r.m, r.fh, IOVA, 8, false); // unmapped → error state
    assert_eq!(r.z.state_of(FID), Some(FunctionState::Error));
    assert_eq!(op(&r, MpcifcOp::ResetBlock, &f), Ok(InsnStatus::OK));
    assert_eq!(r.z.state_of(FID), Some(FunctionState::Blocked));
    assert_eq!(
        r.z.translate(&r.m, r.fh, IOVA, 8, false).unwrap_err().kind,
        RefusalKind::Blocked
    );
    assert_eq!(
        op(&r, MpcifcOp::ResetBlock, &f),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    assert_eq!(op(&r, MpcifcOp::ResetError, &f), Ok(InsnStatus::OK));
    assert_eq!(r.z.state_of(FID), Some(FunctionState::Enabled));
}

#[test]
fn mpcifc_interrupts_and_measurement() {
    let r = rig();
    let irq = Fib {
        aibv: 0x1000,
        aisb: 0x2000,
        data: (3 << 28) | (64 << 16),
        ..Fib::default()
    };
    assert_eq!(
        op(&r, MpcifcOp::DeregInt, &irq),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    assert_eq!(
        op(
            &r,
            MpcifcOp::RegInt,
            &Fib {
                aibv: 1 << 40,
                ..irq
            }
        ),
        Ok(InsnStatus::error(status::MOD_RES_NOT_AVAIL))
    );
    assert_eq!(op(&r, MpcifcOp::RegInt, &irq), Ok(InsnStatus::OK));
    assert_eq!(
        op(&r, MpcifcOp::RegInt, &irq),
        Ok(InsnStatus::error(status::MOD_SEQUENCE))
    );
    assert_eq!(op(&r, MpcifcOp::DeregInt, &irq), Ok(InsnStatus::OK));
    assert_eq!(
        op(
            &r,
            MpcifcOp::SetMeasure,
            &Fib {
                fmb_addr: 0x3000,
                ..irq
            }
        ),
        Ok(InsnStatus::OK)
    );
    assert_eq!(
        op(&r, MpcifcOp::SetMeasure, &Fib { fmb_addr: 0, ..irq }),
        Ok(InsnStatus::OK)
    );
    assert_eq!(
        op(
            &r,
            MpcifcOp::SetMeasure,
            &Fib {
                fmb_addr: 0x3003,
                ..irq
            }
        ),
        Ok(InsnStatus::error(0))
    );
    assert_eq!(r.z.take_error_events().0[0].pec, pec::FMBPRO);
    // Every operation announced its hook point.
    let points = r.rec.point_names();
    for p in [
        POINT_REG_INT,
        POINT_DEREG_INT,
        POINT_SET_MEASURE,
        POINT_REG_IOAT,
    ] {
        assert!(points.iter().any(|x| x == p), "{p}");
    }
}

#[test]
fn mpcifc_answers_cc3_unless_enabled() {
    let rec = std::sync::Arc::new(RecordingHooks::default());
    let z = model_with(ZpciOptions::default(), cfg(), rec);
    let m = mem();
    let f = Fib::default();
    let standby = z.fh_of(FID).unwrap();
    for o in MpcifcOp::ALL {
        assert_eq!(
            z.mpcifc_with_fib(&m, standby, 0, o, &f),
            Ok(InsnStatus::INVALID_HANDLE)
        );
    }
    z.configure(FID).unwrap();
    let disabled = z.fh_of(FID).unwrap();
    assert_eq!(
        z.mpcifc_with_fib(&m, disabled, 0, MpcifcOp::RegIoat, &f),
        Ok(InsnStatus::INVALID_HANDLE)
    );
}

#[test]
fn pcilg_pcistg() {
    let r = rig();
    assert_eq!(r.z.pcilg(r.fh, 15, 0, 2), Ok((InsnStatus::OK, 0xf41a)));
    assert_eq!(
        r.z.pcistg(r.fh, 0, 8, 8, 0x1122_3344_5566_7788),
        Ok(InsnStatus::OK)
    );
    assert_eq!(
        r.z.pcilg(r.fh, 0, 8, 8),
        Ok((InsnStatus::OK, 0x1122_3344_5566_7788))
    );
    assert_eq!(r.z.pcilg(r.fh, 0, 12, 2), Ok((InsnStatus::OK, 0x5566)));
    assert_eq!(r.z.pcilg(r.fh, 0, 12, 8), Err(ProgramException::Operand));
    assert_eq!(r.z.pcilg(r.fh, 15, 1, 4), Err(ProgramException::Operand));
    assert_eq!(r.z.pcilg(r.fh, 15, 0, 3), Err(ProgramException::Operand));
    assert_eq!(r.z.pcilg(r.fh, 1, 0, 4), Err(ProgramException::Operand));
    assert_eq!(
        r.z.pcilg(r.fh, 0, 0x2000, 4),
        Err(ProgramException::Operand)
    );
    assert_eq!(
        r.z.pcilg(r.fh, 7, 0, 4),
        Ok((InsnStatus::error(status::PCI_INVAL_AS), 0))
    );
    assert_eq!(
        r.z.pcilg(r.fh & !0x8000_0000, 15, 0, 4).unwrap().0,
        InsnStatus::INVALID_HANDLE
    );
    let _ = r.z.translate(&r.m, r.fh, IOVA, 8, false);
    assert_eq!(
        r.z.pcilg(r.fh, 15, 0, 4).unwrap().0,
        InsnStatus::error(status::PCI_BLOCKED)
    );
    r.z.mpcifc_with_fib(&r.m, r.fh, 0, MpcifcOp::ResetBlock, &Fib::default())
        .unwrap();
    assert_eq!(r.z.pcilg(r.fh, 15, 0, 4).unwrap().0, InsnStatus::OK);
}

#[test]
fn clp_list_query_set() {
    let rec = std::sync::Arc::new(RecordingHooks::default());
    let z = Zpci::new(
        vec![
            cfg(),
            FunctionConfig {
                fid: 7,
                initial_state: FunctionState::Reserved,
                ..cfg()
            },
        ],
        ZpciOptions::default(),
        rec,
    )
    .unwrap();
    let l = z.clp_list();
    assert_eq!(l.len(), 1);
    assert!(!l[0].configured);
    let fh = enable(&z, FID);
    assert_eq!(z.clp_list()[0].fh, fh);
    assert!(fh & 0x8000_0000 != 0);
    let q = z.clp_query_pci_fn(fh).unwrap();
    assert_eq!(
        (q.sdma, q.edma, q.fid, q.bar_size[0]),
        (0x1_0000_0000, 0x01ff_ffff_ffff_ffff, FID, 12)
    );
    let g = z.clp_query_pci_fn_group(q.pfgid).unwrap();
    assert_eq!(g.dasm, 0x01ff_ffff_ffff_ffff);
    assert_eq!(
        z.clp_query_pci_fn_group(99).unwrap_err().0,
        rc::QUERYPCIFG_PFGID
    );
    assert_eq!(
        z.clp_set_pci_fn(fh, SetPciFnOp::Enable { ndas: 1 })
            .unwrap_err()
            .0,
        rc::SETPCIFN_FHOP
    );
    let off = z.clp_set_pci_fn(fh, SetPciFnOp::Disable).unwrap();
    assert_eq!(
        z.clp_set_pci_fn(off, SetPciFnOp::Disable).unwrap_err().0,
        rc::SETPCIFN_FHOP
    );
    assert_eq!(
        z.clp_set_pci_fn(off, SetPciFnOp::Enable { ndas: 0 })
            .unwrap_err()
            .0,
        rc::SETPCIFN_DMAAS
    );
    assert_eq!(
        z.clp_set_pci_fn(off, SetPciFnOp::Enable { ndas: 2 })
            .unwrap_err()
            .0,
        rc::SETPCIFN_RES
    );
    assert_eq!(
        z.clp_set_pci_fn(fh, SetPciFnOp::Disable).unwrap_err().0,
        rc::SETPCIFN_FH
    );
    assert_eq!(z.clp_query_pci_fn(0x1234).unwrap_err().0, rc::SETPCIFN_FH);
}

#[test]
fn refusal_reason_codes_are_distinct() {
    let all = [
        reason::AFTER_RELEASE,
        reason::NO_SUCH_FUNCTION,
        reason::NOT_ENABLED,
        reason::IN_ERROR,
        reason::BLOCKED,
        reason::NO_IOAT,
        reason::ZERO_LENGTH,
    ];
    for (i, a) in all.iter().enumerate() {
        assert!(*a >= 0x100);
        assert!(!all[i + 1..].contains(a));
    }
}
