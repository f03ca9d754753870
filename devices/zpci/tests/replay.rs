//! Replay of the Linux s390 DMA-API sequence (arch/s390/pci/pci_dma.c, drivers/iommu/s390-iommu.c):
//! CLP enable, REG_IOAT with the region-third table (`zpci_register_ioat`), map pages + RPCIT
//! (`dma_update_trans` with `zdev->tlb_refresh`), DMA, unmap + RPCIT (`iotlb_sync`), DMA refused,
//! DEREG_IOAT (`zpci_unregister_ioat`), CLP disable.

mod common;

use std::sync::Arc;

use common::*;
use sluice_devapi::DmaOutcome;
use sluice_zpci::clp::SetPciFnOp;
use sluice_zpci::guest::GuestTables;
use sluice_zpci::*;

#[test]
fn linux_dma_api_sequence() {
    let rec = Arc::new(RecordingHooks::default());
    let z = model_with(ZpciOptions::default(), cfg(), rec.clone());
    let m = mem();
    // Probe: CLP list + query, then enable.
    let fh0 = z.clp_list()[0].fh;
    assert_eq!(z.clp_query_pci_fn(fh0).unwrap().fid, FID); // query works in standby too
    let fh = enable(&z, FID);
    let q = z.clp_query_pci_fn(fh).unwrap();
    let group = z.clp_query_pci_fn_group(q.pfgid).unwrap();
    assert!(group.refresh);
    // zpci_dma_init_device: aperture [start_dma, end_dma] = [sdma, sdma + 4 GiB).
    let start_dma = q.sdma;
    let end_dma = start_dma + (1 << 32) - 1;
    let mut t = GuestTables::new(&m, ARENA, ARENA + 0x40_0000).unwrap();
    let fib = Fib {
        pba: start_dma,
        pal: end_dma,
        iota: t.iota(),
        ..Fib::default()
    };
    assert_eq!(
        z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::RegIoat, &fib),
        Ok(InsnStatus::OK)
    );
    // dma_map_page of 3 pages, then RPCIT of the range (tlb_refresh).
    let iova = start_dma + 0x5000;
    t.map_range(&m, iova, 0x20_0000, 3, true).unwrap();
    assert_eq!(z.rpcit(&m, fh, iova, 0x3000), InsnStatus::OK);
    let tr = z.translate(&m, fh, iova + 0x800, 0x2000, true).unwrap();
    assert_eq!(tr.pieces.len(), 3);
    assert_eq!(tr.pieces[0].gpa, 0x20_0800);
    // dma_unmap_page: invalidate PTEs, then RPCIT (strict) → DMA refused.
    for i in 0..3 {
        t.unmap(&m, iova + i * 0x1000).unwrap();
    }
    assert_eq!(z.rpcit(&m, fh, iova, 0x3000), InsnStatus::OK);
    assert_eq!(z.budget_used(), 0);
    let e = z.translate(&m, fh, iova, 8, false).unwrap_err();
    assert_eq!(e.kind, RefusalKind::NotMapped);
    // The stray DMA put the function in error: Linux error recovery resets it.
    assert_eq!(z.state_of(FID), Some(FunctionState::Error));
    assert_eq!(
        z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::ResetError, &Fib::default()),
        Ok(InsnStatus::OK)
    );
    // zpci_dma_exit_device: DEREG_IOAT, then disable.
    assert_eq!(
        z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::DeregIoat, &Fib::default()),
        Ok(InsnStatus::OK)
    );
    assert_eq!(
        z.translate(&m, fh, iova, 8, false).unwrap_err().kind,
        RefusalKind::NoIoat
    );
    let off = z.clp_set_pci_fn(fh, SetPciFnOp::Disable).unwrap();
    assert_eq!(
        z.translate(&m, off, iova, 8, false).unwrap_err().kind,
        RefusalKind::NotEnabled
    );
    // Every DMA was reported, in order, with its outcome.
    let d = rec.dmas();
    assert_eq!(d.len(), 4);
    assert!(matches!(
        d[0].outcome,
        DmaOutcome::Translated { gpa: 0x20_0800, .. }
    ));
    assert!(
        d[1..]
            .iter()
            .all(|r| matches!(r.outcome, DmaOutcome::Faulted { .. }))
    );
    let states: Vec<String> = rec.states().into_iter().map(|s| s.what).collect();
    assert_eq!(
        states,
        [
            "configure",
            "enable",
            "reg-ioat",
            "error-event",
            "reset-error",
            "dereg-ioat",
            "disable"
        ]
    );
}
