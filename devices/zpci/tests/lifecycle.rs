//! Walks every (from, to) state pair: each driver action is tried from each state; legal
//! transitions must land where the table says, illegal ones must be refused with the right
//! answer and leave the state alone. Every listed pair must be reached.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use sluice_zpci::clp::{SetPciFnOp, rc};
use sluice_zpci::codes::status;
use sluice_zpci::function::{VALID_TRANSITIONS, apply_transition, transition_cause};
use sluice_zpci::*;

const ACTIONS: [Transition; 9] = [
    Transition::Reserve,
    Transition::Unreserve,
    Transition::Configure,
    Transition::Deconfigure,
    Transition::Enable,
    Transition::Disable,
    Transition::Fault,
    Transition::ResetBlock,
    Transition::ResetError,
];

/// Builds a function in `state` through legal API calls only; returns the model and memory.
fn drive_to(state: FunctionState) -> (Zpci, Mem) {
    let z = model_with(
        ZpciOptions::default(),
        cfg(),
        Arc::new(RecordingHooks::default()),
    );
    let m = mem();
    match state {
        FunctionState::Standby => {}
        FunctionState::Reserved => {
            z.reserve(FID).unwrap();
        }
        FunctionState::Disabled => {
            z.configure(FID).unwrap();
        }
        _ => {
            let fh = enable(&z, FID);
            if state != FunctionState::Enabled {
                act(&z, &m, Transition::Fault);
                if state == FunctionState::Blocked {
                    let s = z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::ResetBlock, &Fib::default());
                    assert_eq!(s, Ok(InsnStatus::OK));
                }
            }
        }
    }
    assert_eq!(z.state_of(FID), Some(state));
    (z, m)
}

/// What the API answered, reduced to success / refusal detail.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Done,
    Lifecycle,
    Clp(u16),
    Insn(InsnStatus),
    DmaRefused,
}

fn act(z: &Zpci, m: &Mem, a: Transition) -> Answer {
    let fh = z.fh_of(FID).unwrap();
    let lc = |r: Result<FunctionState, LifecycleError>| match r {
        Ok(_) => Answer::Done,
        Err(LifecycleError::Illegal { .. }) => Answer::Lifecycle,
        Err(e) => panic!("{e}"),
    };
    let insn = |op| match z.mpcifc_with_fib(m, fh, 0, op, &Fib::default()).unwrap() {
        InsnStatus::OK => Answer::Done,
        s => Answer::Insn(s),
    };
    match a {
        Transition::Reserve => lc(z.reserve(FID)),
        Transition::Unreserve => lc(z.unreserve(FID)),
        Transition::Configure => lc(z.configure(FID)),
        Transition::Deconfigure => lc(z.deconfigure(FID)),
        Transition::Enable => match z.clp_set_pci_fn(fh, SetPciFnOp::Enable { ndas: 1 }) {
            Ok(_) => Answer::Done,
            Err(e) => Answer::Clp(e.0),
        },
        Transition::Disable => match z.clp_set_pci_fn(fh, SetPciFnOp::Disable) {
            Ok(_) => Answer::Done,
            Err(e) => Answer::Clp(e.0),
        },
        // A DMA to an unmapped address (IOAT registered so the DMA reaches translation), or an
        // RPCIT outside the window when blocked.
        Transition::Fault => {
            if z.ioat_of(FID).is_none()
                && z.state_of(FID).is_some_and(FunctionState::is_enabled_meta)
            {
                let t = sluice_zpci::guest::GuestTables::new(m, ARENA, ARENA + 0x10_0000).unwrap();
                let _ = reg_ioat(z, m, fh, &t);
            }
            if z.state_of(FID) == Some(FunctionState::Blocked) {
                // DMA is refused quietly while blocked; RPCIT still runs and can fault.
                let st = z.rpcit(m, fh, PAL + 0x1000, 0x1000);
                return if st.is_ok() {
                    Answer::Done
                } else {
                    Answer::Insn(st)
                };
            }
            match z.translate(m, fh, PBA, 8, false) {
                Ok(_) => Answer::Done,
                Err(_) => Answer::DmaRefused,
            }
        }
        Transition::ResetBlock => insn(MpcifcOp::ResetBlock),
        Transition::ResetError => insn(MpcifcOp::ResetError),
    }
}

#[test]
fn every_from_to_pair_follows_the_transition_table() {
    let mut reached = HashSet::new();
    for from in FunctionState::ALL {
        for a in ACTIONS {
            let (z, m) = drive_to(from);
            let answer = act(&z, &m, a);
            let to = z.state_of(FID).unwrap();
            match apply_transition(from, a) {
                Some(expected) => {
                    assert_eq!(to, expected, "{from:?} --{a:?}-->");
                    if a != Transition::Fault {
                        assert_eq!(answer, Answer::Done, "{from:?} --{a:?}");
                    }
                    reached.insert((from, to));
                }
                None => {
                    assert_eq!(to, from, "illegal {a:?} from {from:?} changed state");
                    let want = match a {
                        Transition::Reserve
                        | Transition::Unreserve
                        | Transition::Configure
                        | Transition::Deconfigure => Answer::Lifecycle,
                        Transition::Enable | Transition::Disable => {
                            // Standby/reserved handles are valid handles of a function that is
                            // not enabled; enabling anything but a disabled function is FHOP.
                            Answer::Clp(rc::SETPCIFN_FHOP)
                        }
                        Transition::Fault => Answer::DmaRefused,
                        Transition::ResetBlock | Transition::ResetError => {
                            if from.is_enabled_meta() {
                                Answer::Insn(InsnStatus::error(status::MOD_SEQUENCE))
                            } else {
                                Answer::Insn(InsnStatus::INVALID_HANDLE)
                            }
                        }
                    };
                    assert_eq!(answer, want, "illegal {a:?} from {from:?}");
                }
            }
        }
    }
    // Every pair: listed pairs were reached, unlisted pairs never.
    for from in FunctionState::ALL {
        for to in FunctionState::ALL {
            if from == to {
                continue;
            }
            assert_eq!(
                reached.contains(&(from, to)),
                transition_cause(from, to).is_some(),
                "{from:?} -> {to:?}"
            );
        }
    }
    assert_eq!(reached.len(), VALID_TRANSITIONS.len());
}

#[test]
fn reconfigure_changes_the_handle_and_old_handles_are_after_release() {
    let z = model_with(
        ZpciOptions::default(),
        cfg(),
        Arc::new(RecordingHooks::default()),
    );
    let m = mem();
    let fh1 = enable(&z, FID);
    z.deconfigure(FID).unwrap();
    let fh2 = enable(&z, FID);
    assert_ne!(fh1, fh2);
    let e = z.translate(&m, fh1, PBA, 8, false).unwrap_err();
    assert_eq!(e.kind, RefusalKind::AfterRelease);
    assert_eq!(
        z.mpcifc_with_fib(&m, fh1, 0, MpcifcOp::DeregIoat, &Fib::default()),
        Ok(InsnStatus::INVALID_HANDLE)
    );
    assert_eq!(z.rpcit(&m, fh1, PBA, 0x1000), InsnStatus::INVALID_HANDLE);
}
