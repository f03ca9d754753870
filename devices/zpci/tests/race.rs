//! Two-thread replays of the seed race "iommu/s390: Fix race with release_device ops": the
//! function is released (SCLP deconfigure) while the guest attaches or detaches a DMA domain
//! (pre-6.2 `s390_iommu_attach_device` / `detach_device`: DEREG_IOAT, REG_IOAT, map + RPCIT).
//!
//! Every interleaving a test can force is enumerated: release before each operation, release
//! while the operation is parked at its hook point (inside its completion window), and the
//! operation running while release is parked at `zpci.deconfigure`. With the model's correct
//! ordering no DMA gets through after release; with `CommitOrdering::PreFixUnchecked` (the
//! lost update the fix removed) the replay shows exactly which interleavings let one through.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use common::*;
use sluice_zpci::guest::GuestTables;
use sluice_zpci::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    DeregIoat,
    /// Register table set 0 (default DMA tables) or 1 (VFIO domain).
    RegIoat(usize),
    /// Map `iova` in table set `t`, then RPCIT it.
    MapRpcit(usize, u64),
}

impl Op {
    fn point(self) -> &'static str {
        match self {
            Op::DeregIoat => POINT_DEREG_IOAT,
            Op::RegIoat(_) => POINT_REG_IOAT,
            Op::MapRpcit(..) => POINT_RPCIT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Interleaving {
    /// Release completes before op k (k = n: after the last op).
    Before(usize),
    /// Op k is parked at its hook point while release runs to completion.
    Inside(usize),
    /// Release is parked at its own hook while op k runs to completion.
    ReleaseParkedDuring(usize),
}

const X: u64 = PBA + 0x10_0000;
const Y: u64 = PBA + 0x20_0000;

struct Scenario {
    name: &'static str,
    /// Table set registered (and `X`/`Y` mapped + refreshed) before the sequence starts.
    initial: (usize, u64),
    ops: [Op; 3],
}

const ATTACH: Scenario = Scenario {
    name: "attach",
    initial: (0, Y),
    ops: [Op::DeregIoat, Op::RegIoat(1), Op::MapRpcit(1, X)],
};
const DETACH: Scenario = Scenario {
    name: "detach",
    initial: (1, X),
    ops: [Op::DeregIoat, Op::RegIoat(0), Op::MapRpcit(0, Y)],
};

struct Run {
    /// Answers of the guest's operations, in order.
    answers: Vec<InsnStatus>,
    /// Probe DMAs after everything settled that were translated.
    escaped: Vec<u64>,
    /// Refusal kinds of the probes.
    refusals: Vec<RefusalKind>,
}

fn exec(z: &Zpci, m: &Mem, fh: u32, tables: &mut [GuestTables; 2], op: Op) -> InsnStatus {
    match op {
        Op::DeregIoat => dereg_ioat(z, m, fh),
        Op::RegIoat(t) => reg_ioat(z, m, fh, &tables[t]),
        Op::MapRpcit(t, iova) => {
            tables[t]
                .map(m, iova, 0x20_0000 + (iova & 0xff_f000), true)
                .unwrap();
            z.rpcit(m, fh, iova, 0x1000)
        }
    }
}

fn run(sc: &Scenario, il: Interleaving, ordering: CommitOrdering) -> Run {
    let (hooks, ctl) = parking_hooks();
    let z = model_with(
        ZpciOptions {
            ordering,
            ..Default::default()
        },
        cfg(),
        hooks.clone(),
    );
    let m = mem();
    let mut tables = [
        GuestTables::new(&m, ARENA, ARENA + 0x40_0000).unwrap(),
        GuestTables::new(&m, ARENA2, ARENA2 + 0x40_0000).unwrap(),
    ];
    let fh = enable(&z, FID);
    let (t0, iova0) = sc.initial;
    assert!(reg_ioat(&z, &m, fh, &tables[t0]).is_ok());
    tables[t0].map(&m, iova0, 0x30_0000, true).unwrap();
    assert!(z.rpcit(&m, fh, iova0, 0x1000).is_ok());
    assert!(z.translate(&m, fh, iova0, 8, false).is_ok());

    let mut answers = Vec::new();
    let n = sc.ops.len();
    let release = |z: &Zpci| z.deconfigure(FID).unwrap();
    match il {
        Interleaving::Before(k) => {
            for (i, op) in sc.ops.iter().enumerate() {
                if i == k {
                    release(&z);
                }
                answers.push(exec(&z, &m, fh, &mut tables, *op));
            }
            if k == n {
                release(&z);
            }
        }
        Interleaving::Inside(k) => {
            ctl.arm(sc.ops[k].point(), 0);
            thread::scope(|s| {
                let (zr, mr) = (&z, &m);
                let mut tabs = tables.clone();
                let guest = s.spawn(move || {
                    sc.ops
                        .iter()
                        .map(|op| exec(zr, mr, fh, &mut tabs, *op))
                        .collect::<Vec<_>>()
                });
                assert_eq!(ctl.arrived.recv().unwrap(), sc.ops[k].point());
                release(&z);
                // While the guest is still parked, the released function refuses DMA.
                for iova in [X, Y] {
                    let e = z.translate(&m, fh, iova, 8, false).unwrap_err();
                    assert_eq!(e.kind, RefusalKind::AfterRelease);
                }
                ctl.resume.send(()).unwrap();
                answers = guest.join().unwrap();
            });
        }
        Interleaving::ReleaseParkedDuring(k) => {
            for op in &sc.ops[..k] {
                answers.push(exec(&z, &m, fh, &mut tables, *op));
            }
            ctl.arm(POINT_DECONFIGURE, 0);
            thread::scope(|s| {
                let zr = &z;
                let rel = s.spawn(move || release(zr));
                assert_eq!(ctl.arrived.recv().unwrap(), POINT_DECONFIGURE);
                answers.push(exec(&z, &m, fh, &mut tables, sc.ops[k]));
                ctl.resume.send(()).unwrap();
                rel.join().unwrap();
            });
            for op in &sc.ops[k + 1..] {
                answers.push(exec(&z, &m, fh, &mut tables, *op));
            }
        }
    }
    let mut escaped = Vec::new();
    let mut refusals = Vec::new();
    for iova in [X, Y] {
        match z.translate(&m, fh, iova, 8, false) {
            Ok(_) => escaped.push(iova),
            Err(e) => {
                refusals.push(e.kind);
                // A stray probe puts a live function into error; recover so the next probe
                // is judged on its own.
                let _ = z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::ResetError, &Fib::default());
            }
        }
    }
    Run {
        answers,
        escaped,
        refusals,
    }
}

fn interleavings(n: usize) -> Vec<Interleaving> {
    let mut v: Vec<_> = (0..=n).map(Interleaving::Before).collect();
    v.extend((0..n).map(Interleaving::Inside));
    v.extend((0..n).map(Interleaving::ReleaseParkedDuring));
    v
}

/// Index of the first op that linearizes after the release.
fn first_after_release(il: Interleaving) -> usize {
    match il {
        Interleaving::Before(k) | Interleaving::Inside(k) => k,
        Interleaving::ReleaseParkedDuring(k) => k + 1,
    }
}

#[test]
fn fixed_ordering_no_dma_after_release_at_any_interleaving() {
    for sc in [&ATTACH, &DETACH] {
        for il in interleavings(sc.ops.len()) {
            let r = run(sc, il, CommitOrdering::Revalidate);
            assert!(
                r.escaped.is_empty(),
                "{} {il:?}: DMA got through after release",
                sc.name
            );
            assert_eq!(
                r.refusals,
                vec![RefusalKind::AfterRelease; 2],
                "{} {il:?}",
                sc.name
            );
            // Operations that linearize after the release answer cc 3.
            for (i, a) in r.answers.iter().enumerate() {
                if i >= first_after_release(il) {
                    assert_eq!(*a, InsnStatus::INVALID_HANDLE, "{} {il:?} op {i}", sc.name);
                } else {
                    assert_eq!(*a, InsnStatus::OK, "{} {il:?} op {i}", sc.name);
                }
            }
        }
    }
}

#[test]
fn unfixed_ordering_shows_which_interleavings_escape() {
    for sc in [&ATTACH, &DETACH] {
        let mut escaping = Vec::new();
        for il in interleavings(sc.ops.len()) {
            let r = run(sc, il, CommitOrdering::PreFixUnchecked);
            if !r.escaped.is_empty() {
                escaping.push(il);
            }
        }
        // Release landing inside the DEREG_IOAT or REG_IOAT completion window resurrects the
        // function (lost update of its lifecycle); the following REG_IOAT + RPCIT then succeed
        // and the DMA after release is translated. Release inside RPCIT also loses the update
        // but leaves no IOAT registered, so nothing translates.
        assert_eq!(
            escaping,
            vec![Interleaving::Inside(0), Interleaving::Inside(1)],
            "{}",
            sc.name
        );
    }
}

/// A free-running soak: one thread attaches/detaches/refreshes, one issues DMA, the main thread
/// releases. The verdict is deterministic: any DMA *started* after `deconfigure` returned must
/// be refused as after-release.
#[test]
fn concurrent_soak_no_dma_after_release() {
    for round in 0..20 {
        let z = model_with(
            ZpciOptions::default(),
            cfg(),
            Arc::new(RecordingHooks::default()),
        );
        let m = mem();
        let mut t = GuestTables::new(&m, ARENA, ARENA + 0x40_0000).unwrap();
        t.map_range(&m, X, 0x40_0000, 4, true).unwrap();
        let fh = enable(&z, FID);
        let released = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let translated_before = AtomicUsize::new(0);
        thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..400 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = reg_ioat(&z, &m, fh, &t);
                    let _ = z.rpcit(&m, fh, X, 0x4000);
                    let _ = dereg_ioat(&z, &m, fh);
                }
            });
            s.spawn(|| {
                for i in 0..4000u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let was_released = released.load(Ordering::SeqCst);
                    match z.translate(&m, fh, X + (i % 4) * 0x1000, 8, false) {
                        Ok(_) => {
                            assert!(!was_released, "round {round}: DMA after release");
                            translated_before.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if was_released => assert_eq!(e.kind, RefusalKind::AfterRelease),
                        Err(_) => {
                            // Recover from DMA errors so the attach loop keeps working.
                            let _ =
                                z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::ResetError, &Fib::default());
                        }
                    }
                }
            });
            for _ in 0..(round * 50) {
                std::hint::spin_loop();
                thread::yield_now();
            }
            z.deconfigure(FID).unwrap();
            released.store(true, Ordering::SeqCst);
            for _ in 0..200 {
                thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
        });
        assert_eq!(z.state_of(FID), Some(FunctionState::Standby));
        assert_eq!(z.budget_used(), 0);
    }
}
