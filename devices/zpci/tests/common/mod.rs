#![allow(dead_code)]
//! Shared fixtures: guest memory, an enabled function, recording/parking hooks.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use sluice_devapi::{
    CacheUse, CachedTranslation, DmaOutcome, DmaRecord, Hooks, Invalidation, PointCtx, StateEvent,
};
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

#[derive(Default)]
pub struct Recorder {
    pub dmas: Mutex<Vec<DmaRecord>>,
    pub states: Mutex<Vec<(String, u64)>>,
    pub points: Mutex<Vec<String>>,
    pub invalidations: Mutex<Vec<Inv>>,
    /// `dma_cached`: (entries used, refresh count seen).
    pub cached: Mutex<Vec<(Vec<CacheUse>, u64)>>,
}

impl Hooks for Recorder {
    fn point(&self, ctx: &PointCtx<'_>) {
        self.points.lock().unwrap().push(ctx.point.to_string());
    }
    fn dma(&self, rec: &DmaRecord) {
        self.dmas.lock().unwrap().push(*rec);
    }
    fn state(&self, ev: &StateEvent<'_>) {
        self.states
            .lock()
            .unwrap()
            .push((ev.what.to_string(), ev.value));
    }
    fn invalidated(&self, inv: &Invalidation<'_>) {
        self.invalidations.lock().unwrap().push((
            inv.kind.to_string(),
            inv.contexts.value,
            inv.first,
            inv.last,
            inv.generation,
            inv.completion,
        ));
    }
    fn dma_cached(&self, rec: &DmaRecord, via: &CachedTranslation<'_>) {
        self.dmas.lock().unwrap().push(*rec);
        self.cached
            .lock()
            .unwrap()
            .push((via.uses.to_vec(), via.completions_seen));
    }
}

impl Recorder {
    pub fn faulted_reasons(&self) -> Vec<u32> {
        self.dmas
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r.outcome {
                DmaOutcome::Faulted { reason } => Some(reason),
                _ => None,
            })
            .collect()
    }
}

/// Parks the `nth` arrival (0-based) at `point`: signals `arrived`, then waits for `resume`.
pub struct Parking {
    pub inner: Recorder,
    target: Mutex<Option<(String, usize)>>,
    arrived: Mutex<Sender<String>>,
    resume: Mutex<Receiver<()>>,
}

pub struct ParkControl {
    pub arrived: Receiver<String>,
    pub resume: Sender<()>,
}

impl Parking {
    pub fn new() -> (Arc<Parking>, ParkControl) {
        let (atx, arx) = channel();
        let (rtx, rrx) = channel();
        let p = Parking {
            inner: Recorder::default(),
            target: Mutex::new(None),
            arrived: Mutex::new(atx),
            resume: Mutex::new(rrx),
        };
        (
            Arc::new(p),
            ParkControl {
                arrived: arx,
                resume: rtx,
            },
        )
    }
    pub fn arm(&self, point: &str, nth: usize) {
        *self.target.lock().unwrap() = Some((point.to_string(), nth));
    }
}

impl Hooks for Parking {
    fn point(&self, ctx: &PointCtx<'_>) {
        self.inner.point(ctx);
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
    fn dma(&self, rec: &DmaRecord) {
        self.inner.dma(rec)
    }
    fn state(&self, ev: &StateEvent<'_>) {
        self.inner.state(ev)
    }
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
    pub z: Zpci,
    pub m: Mem,
    pub t: GuestTables,
    pub fh: u32,
    pub rec: Arc<Recorder>,
}

pub fn rig_with(opts: ZpciOptions, c: FunctionConfig) -> Rig {
    let rec = Arc::new(Recorder::default());
    let z = model_with(opts, c, rec.clone());
    let m = mem();
    let t = GuestTables::new(&m, ARENA, ARENA + 0x40_0000).unwrap();
    let fh = enable(&z, FID);
    assert_eq!(reg_ioat(&z, &m, fh, &t), InsnStatus::OK);
    Rig { z, m, t, fh, rec }
}

pub fn rig() -> Rig {
    rig_with(ZpciOptions::default(), cfg())
}
