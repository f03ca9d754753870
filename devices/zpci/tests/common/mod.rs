#![allow(dead_code)]
//! Shared fixtures: guest memory, an enabled function, parking hooks.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

pub use sluice_devapi::RecordingHooks;
use sluice_devapi::{Hooks, PointCtx};
use sluice_zpci::clp::SetPciFnOp;
use sluice_zpci::guest::GuestTables;
use sluice_zpci::{Fib, FunctionConfig, InsnStatus, MpcifcOp, Zpci, ZpciOptions};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

pub const FID: u32 = 0x42;
pub const PBA: u64 = 0x1_0000_0000;
pub const PAL: u64 = 0x1_ffff_ffff;
pub const ARENA: u64 = 0x40_0000;
pub const ARENA2: u64 = 0x80_0000;

pub fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// An `invalidated` report: (kind, context value, first, last, generation, completion).
pub type Inv = (String, u64, u64, u64, Option<u64>, u64);

/// The invalidations `rec` saw, as [`Inv`]s.
pub fn invalidations_of(rec: &RecordingHooks) -> Vec<Inv> {
    rec.invalidations()
        .into_iter()
        .map(|i| {
            (
                i.kind,
                i.contexts.value,
                i.first,
                i.last,
                i.generation,
                i.completion,
            )
        })
        .collect()
}

/// Parks the `nth` arrival (0-based) at an armed point: signals `arrived`, then waits for
/// `resume`.
struct Parking {
    target: Mutex<Option<(String, usize)>>,
    arrived: Mutex<Sender<String>>,
    resume: Mutex<Receiver<()>>,
}

impl Parking {
    fn at(&self, ctx: &PointCtx<'_>) {
        let park = {
            let mut t = self.target.lock().unwrap();
            match t.as_mut() {
                Some((p, n)) if p == ctx.point => {
                    if *n == 0 {
                        *t = None;
                        true
                    } else {
                        *n -= 1;
                        false
                    }
                }
                _ => false,
            }
        };
        if park {
            self.arrived
                .lock()
                .unwrap()
                .send(ctx.point.to_string())
                .unwrap();
            self.resume.lock().unwrap().recv().unwrap();
        }
    }
}

/// The test's side of parking hooks: arm a point, hear the arrival, let it go on.
pub struct ParkControl {
    parking: Arc<Parking>,
    pub arrived: Receiver<String>,
    pub resume: Sender<()>,
}

impl ParkControl {
    /// Parks the `nth` next arrival (0-based) at `point`.
    pub fn arm(&self, point: &str, nth: usize) {
        *self.parking.target.lock().unwrap() = Some((point.to_string(), nth));
    }
}

/// Recording hooks that park at the point [`ParkControl::arm`] names.
pub fn parking_hooks() -> (Arc<RecordingHooks>, ParkControl) {
    let (atx, arx) = channel();
    let (rtx, rrx) = channel();
    let parking = Arc::new(Parking {
        target: Mutex::new(None),
        arrived: Mutex::new(atx),
        resume: Mutex::new(rrx),
    });
    let at = parking.clone();
    let hooks = RecordingHooks::default().with_point_action(move |ctx| at.at(ctx));
    (
        Arc::new(hooks),
        ParkControl {
            parking,
            arrived: arx,
            resume: rtx,
        },
    )
}

pub fn model_with(opts: ZpciOptions, cfg: FunctionConfig, hooks: Arc<dyn Hooks>) -> Zpci {
    Zpci::new(vec![cfg], opts, hooks).unwrap()
}

pub fn cfg() -> FunctionConfig {
    FunctionConfig {
        fid: FID,
        ..FunctionConfig::default()
    }
}

/// Configures and enables `fid`; returns the enabled handle.
pub fn enable(z: &Zpci, fid: u32) -> u32 {
    z.configure(fid).unwrap();
    let fh = z.fh_of(fid).unwrap();
    z.clp_set_pci_fn(fh, SetPciFnOp::Enable { ndas: 1 })
        .unwrap()
}

pub fn ioat_fib(t: &GuestTables) -> Fib {
    Fib {
        pba: PBA,
        pal: PAL,
        iota: t.iota(),
        ..Fib::default()
    }
}

pub fn reg_ioat(z: &Zpci, m: &Mem, fh: u32, t: &GuestTables) -> InsnStatus {
    z.mpcifc_with_fib(m, fh, 0, MpcifcOp::RegIoat, &ioat_fib(t))
        .unwrap()
}

pub fn dereg_ioat(z: &Zpci, m: &Mem, fh: u32) -> InsnStatus {
    z.mpcifc_with_fib(m, fh, 0, MpcifcOp::DeregIoat, &Fib::default())
        .unwrap()
}

/// Model + memory + tables + enabled function with the tables registered.
pub struct Rig {
    pub z: Arc<Zpci>,
    pub m: Mem,
    pub t: GuestTables,
    pub fh: u32,
    pub rec: Arc<RecordingHooks>,
}

pub fn rig_with(opts: ZpciOptions, c: FunctionConfig) -> Rig {
    let rec = Arc::new(RecordingHooks::default());
    let z = model_with(opts, c, rec.clone());
    let m = mem();
    let t = GuestTables::new(&m, ARENA, ARENA + 0x40_0000).unwrap();
    let fh = enable(&z, FID);
    assert_eq!(reg_ioat(&z, &m, fh, &t), InsnStatus::OK);
    Rig {
        z: Arc::new(z),
        m,
        t,
        fh,
        rec,
    }
}

pub fn rig() -> Rig {
    rig_with(ZpciOptions::default(), cfg())
}
