//! Property test: random map / unmap / RPCIT / DMA sequences against a reference model of the
//! shadow IOTLB (and, in always-walk mode, of the tables), with and without a mapping budget.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use sluice_zpci::codes::status;
use sluice_zpci::guest::GuestTables;
use sluice_zpci::*;

#[derive(Debug, Clone)]
enum Op {
    Map {
        page: u64,
        frame: u64,
        writable: bool,
    },
    Unmap {
        page: u64,
    },
    Rpcit {
        page: u64,
        pages: u64,
    },
    Global,
    Dma {
        page: u64,
        pages: u64,
        write: bool,
    },
}

/// Pages span three segments so refreshes cross segment boundaries.
const PAGES: u64 = 600;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES, 0..2048u64, any::<bool>()).prop_map(|(page, frame, writable)| Op::Map { page, frame, writable }),
        2 => (0..PAGES).prop_map(|page| Op::Unmap { page }),
        3 => (0..PAGES, 1..300u64).prop_map(|(page, pages)| Op::Rpcit { page, pages }),
        1 => Just(Op::Global),
        4 => (0..PAGES, 1..4u64, any::<bool>()).prop_map(|(page, pages, write)| Op::Dma { page, pages, write }),
    ]
}

type Map = BTreeMap<u64, (u64, bool)>;

fn iova(page: u64) -> u64 {
    PBA + page * 0x1000
}

fn check(ops: &[Op], mode: TlbMode, budget: Option<u64>) -> Result<(), TestCaseError> {
    let opts = ZpciOptions {
        tlb_mode: mode,
        mapping_budget: budget,
        ..Default::default()
    };
    let z = model_with(opts, cfg(), Arc::new(RecordingHooks::default()));
    let m = mem();
    let mut t = GuestTables::new(&m, ARENA, ARENA + 0x40_0000).unwrap();
    let fh = enable(&z, FID);
    prop_assert!(reg_ioat(&z, &m, fh, &t).is_ok());
    let mut tables = Map::new();
    let mut shadow = Map::new();
    for op in ops {
        match *op {
            Op::Map {
                page,
                frame,
                writable,
            } => {
                let gpa = 0x100_0000 + frame * 0x1000;
                t.map(&m, iova(page), gpa, writable).unwrap();
                tables.insert(page, (gpa, writable));
            }
            Op::Unmap { page } => {
                t.unmap(&m, iova(page)).unwrap();
                tables.remove(&page);
            }
            Op::Rpcit { .. } | Op::Global => {
                let (first, n, st) = match *op {
                    Op::Rpcit { page, pages } => {
                        (page, pages, z.rpcit(&m, fh, iova(page), pages * 0x1000))
                    }
                    _ => (0, PAGES, z.rpcit(&m, fh, PBA, PAL - PBA + 1)),
                };
                // Reference: unmaps first, then maps in IOVA order within the budget.
                let range = first..first + n;
                shadow.retain(|p, _| !range.contains(p) || tables.contains_key(p));
                let mut deferred = false;
                for p in range {
                    let Some(v) = tables.get(&p) else { continue };
                    let new = !shadow.contains_key(&p);
                    if new && budget.is_some_and(|b| shadow.len() as u64 >= b) {
                        deferred = true;
                        continue;
                    }
                    shadow.insert(p, *v);
                }
                let want = if deferred {
                    InsnStatus::error(status::RPCIT_INSUFF_RES)
                } else {
                    InsnStatus::OK
                };
                prop_assert_eq!(st, want, "{:?}", op);
                prop_assert_eq!(z.budget_used(), shadow.len() as u64);
            }
            Op::Dma { page, pages, write } => {
                let view = if mode == TlbMode::Shadow {
                    &shadow
                } else {
                    &tables
                };
                let expect: Option<Vec<u64>> = (page..page + pages)
                    .map(|p| view.get(&p).filter(|(_, w)| *w || !write).map(|(g, _)| *g))
                    .collect();
                let got = z.translate(&m, fh, iova(page), pages * 0x1000, write);
                match (expect, got) {
                    (Some(gpas), Ok(tr)) => {
                        prop_assert_eq!(tr.pieces.iter().map(|p| p.gpa).collect::<Vec<_>>(), gpas);
                    }
                    (None, Err(e)) => {
                        prop_assert!(matches!(
                            e.kind,
                            RefusalKind::NotMapped | RefusalKind::WriteProtected
                        ));
                        prop_assert_eq!(z.state_of(FID), Some(FunctionState::Error));
                        let r = z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::ResetError, &Fib::default());
                        prop_assert_eq!(r, Ok(InsnStatus::OK));
                    }
                    (e, g) => prop_assert!(false, "{:?}: expected {:?}, got {:?}", op, e, g),
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x2a2a_5eed),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn shadow_matches_reference(ops in proptest::collection::vec(op(), 1..40)) {
        check(&ops, TlbMode::Shadow, None)?;
    }

    #[test]
    fn shadow_with_budget_matches_reference(ops in proptest::collection::vec(op(), 1..40), b in 1..64u64) {
        check(&ops, TlbMode::Shadow, Some(b))?;
    }

    #[test]
    fn always_walk_matches_tables(ops in proptest::collection::vec(op(), 1..40)) {
        check(&ops, TlbMode::AlwaysWalk, None)?;
    }
}
