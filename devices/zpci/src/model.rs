//! The model: a fixed set of functions, each behind its own lock, with a generation counter that
//! makes every instruction linearizable even when a hook stalls it in the middle.
//!
//! Every instruction with a race window runs as *prepare → hook → commit*: preconditions are
//! checked under the function's read lock, the hook point is called with no lock held (a test or
//! the race injector may park the thread there), and the effect is committed under the write
//! lock only if the function's generation did not move meanwhile. If it moved (release,
//! re-registration, state change), the default [`CommitOrdering::Revalidate`] re-evaluates the
//! instruction against the new state, so the instruction behaves as if it ran after the
//! concurrent change. [`CommitOrdering::PreFixUnchecked`] instead commits the stale plan and
//! writes back the lifecycle snapshot it started from: the lost update that the seed race
//! ("iommu/s390: Fix race with release_device ops") produced. It exists only so a replay can
//! show which interleaving would let a DMA through.

use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use sluice_devapi::{Endpoint, Hooks, PointCtx, StateEvent, ZpciState};
use thiserror::Error;

use crate::function::{
    FunctionConfig, FunctionState, LifecycleError, Transition, apply_transition, fh,
};
use crate::iotlb::{Budget, Entry, Iotlb};
use crate::pcils::ConfigStore;
use crate::provenance::FaultInjection;
use crate::walk::{Frame, Iota};

/// How DMA is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlbMode {
    /// Through the shadow IOTLB, which only RPCIT changes (hardware and QEMU behaviour).
    #[default]
    Shadow,
    /// Walk the guest tables on every DMA (for comparison: no staleness).
    AlwaysWalk,
}

/// What an instruction does when the function changed while it was parked at its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitOrdering {
    /// Re-check against the current state (correct; the default).
    #[default]
    Revalidate,
    /// Commit the stale plan and write back the lifecycle it started from (emulates the
    /// pre-fix ordering; test use only).
    PreFixUnchecked,
}

/// Default host mapping budget: 2^20 shadow entries (4 GiB of 4 KiB pages mapped for DMA at
/// once, far more than the guests Sluice boots), so a hostile guest cannot grow the shadow
/// IOTLB without bound by aliasing its tables.
pub const DEFAULT_MAPPING_BUDGET: u64 = 1 << 20;

/// Default [`ZpciOptions::rpcit_step_limit`]: a 256 MiB refresh of 4 KiB pages (65 536 frames)
/// still completes in one instruction; a few milliseconds of work at most.
pub const DEFAULT_RPCIT_STEP_LIMIT: u64 = 1 << 16;

/// Model-wide options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZpciOptions {
    /// Translation mode.
    pub tlb_mode: TlbMode,
    /// Host mapping budget (shadow entries across all functions); `None` = unlimited, which
    /// leaves the shadow IOTLB's memory bounded only by the guest's IOVA space (tests only).
    pub mapping_budget: Option<u64>,
    /// Walk steps (frames or invalid stretches) one RPCIT may process per pass before it
    /// answers cc 2 (busy) and resumes on the guest's retry; bounds the work of one instruction
    /// whatever the range and however the guest aliases its tables.
    pub rpcit_step_limit: u64,
    /// Commit ordering.
    pub ordering: CommitOrdering,
    /// Error events kept before older ones are dropped.
    pub max_error_events: usize,
    /// Deliberate bugs, for escape-oracle tests only (default: none).
    pub fault_injection: FaultInjection,
}

impl Default for ZpciOptions {
    fn default() -> Self {
        ZpciOptions {
            tlb_mode: TlbMode::Shadow,
            mapping_budget: Some(DEFAULT_MAPPING_BUDGET),
            rpcit_step_limit: DEFAULT_RPCIT_STEP_LIMIT,
            ordering: CommitOrdering::Revalidate,
            max_error_events: 4096,
            fault_injection: FaultInjection::default(),
        }
    }
}

/// A PCI error event (what CHSC store-event-information would report to the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorEvent {
    /// Function ID.
    pub fid: u32,
    /// Function handle at the time.
    pub fh: u32,
    /// PCI error code ([`crate::codes::pec`]).
    pub pec: u16,
    /// Faulting address.
    pub addr: u64,
}

/// A model that could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BuildError {
    /// Two functions share a FID.
    #[error("duplicate fid {0:#x}")]
    DuplicateFid(u32),
    /// More functions than handle indices.
    #[error("too many functions ({0})")]
    TooMany(usize),
    /// `sdma > edma`.
    #[error("function {0:#x}: empty DMA range")]
    EmptyDmaRange(u32),
}

/// A registered DMA address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IoatReg {
    pub iota: Iota,
    pub pba: u64,
    pub pal: u64,
}

/// Registered adapter-interrupt parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IrqReg {
    pub aibv: u64,
    pub aisb: u64,
    pub noi: u16,
    pub isc: u8,
}

/// Mutable state of one function.
#[derive(Debug)]
pub(crate) struct FnInner {
    pub state: FunctionState,
    pub instance: u8,
    pub epoch: u64,
    pub released: bool,
    pub ioat: Option<IoatReg>,
    pub iotlb: Iotlb,
    pub irq: Option<IrqReg>,
    pub fmb_addr: u64,
    pub store: ConfigStore,
    /// Refreshes so far (RPCIT commits and drops of every shadow entry): the fill generation of
    /// shadow entries and the completion number reported to the oracle (`provenance`).
    pub refreshes: u64,
    /// A drop of every shadow entry not yet reported: its refresh number and what caused it.
    pub unreported_drop: Option<(u64, &'static str)>,
    /// RPCITs that answered cc 2 (busy) part-way, oldest first, at most
    /// [`crate::rpcit::RESUME_SLOTS`]: the guest's retry continues where they stopped.
    pub rpcit_resume: Vec<crate::rpcit::Resume>,
}

/// The lifecycle part of [`FnInner`] a pre-fix commit writes back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Life {
    state: FunctionState,
    instance: u8,
    released: bool,
}

impl FnInner {
    pub fn fh(&self, idx: u16) -> u32 {
        fh::make(idx, self.instance, self.state.is_enabled_meta())
    }

    pub fn life(&self) -> Life {
        Life {
            state: self.state,
            instance: self.instance,
            released: self.released,
        }
    }

    pub fn restore(&mut self, l: Life) {
        self.state = l.state;
        self.instance = l.instance;
        self.released = l.released;
        self.epoch += 1;
    }

    /// Moves to `to` if `cause` allows it, bumping the generation.
    pub fn transition(&mut self, cause: Transition) -> Result<FunctionState, LifecycleError> {
        let from = self.state;
        let to = apply_transition(from, cause).ok_or(LifecycleError::Illegal { from, cause })?;
        self.state = to;
        self.epoch += 1;
        Ok(to)
    }

    /// Drops the DMA address space and every shadow entry (`why`: the instruction or event, for
    /// the report to the oracle, which `Zpci::report_drops` sends); returns entries freed.
    pub fn drop_translations(&mut self, why: &'static str) -> usize {
        self.ioat = None;
        self.epoch += 1;
        self.refreshes += 1;
        self.unreported_drop = Some((self.refreshes, why));
        self.rpcit_resume.clear();
        self.iotlb.clear()
    }
}

/// One function: static configuration plus its lock.
#[derive(Debug)]
pub(crate) struct Slot {
    pub cfg: FunctionConfig,
    pub idx: u16,
    pub inner: RwLock<FnInner>,
}

impl Slot {
    pub fn read(&self) -> RwLockReadGuard<'_, FnInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
    pub fn write(&self) -> RwLockWriteGuard<'_, FnInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Default)]
struct EventLog {
    events: Vec<ErrorEvent>,
    dropped: u64,
}

/// The s390 zPCI DMA-translation model. `Sync`: share it between vCPU and device threads.
pub struct Zpci {
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) opts: ZpciOptions,
    pub(crate) slots: Vec<Slot>,
    pub(crate) budget: Budget,
    events: Mutex<EventLog>,
    /// Called after an error event is recorded (a backend wakes the guest's side with it).
    error_listener: OnceLock<ErrorListener>,
}

/// What [`Zpci::set_error_listener`] takes.
pub type ErrorListener = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Zpci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zpci")
            .field("opts", &self.opts)
            .field("slots", &self.slots)
            .finish()
    }
}

/// How a windowed instruction's prepare step answers.
pub(crate) type Prepared<P, R> = Result<P, R>;

impl Zpci {
    /// Builds a model with `functions` (handle index = position in the list).
    pub fn new(
        functions: Vec<FunctionConfig>,
        opts: ZpciOptions,
        hooks: Arc<dyn Hooks>,
    ) -> Result<Zpci, BuildError> {
        if functions.len() > usize::from(u16::MAX) {
            return Err(BuildError::TooMany(functions.len()));
        }
        let mut slots = Vec::with_capacity(functions.len());
        for (i, cfg) in functions.into_iter().enumerate() {
            if slots.iter().any(|s: &Slot| s.cfg.fid == cfg.fid) {
                return Err(BuildError::DuplicateFid(cfg.fid));
            }
            if cfg.sdma > cfg.edma {
                return Err(BuildError::EmptyDmaRange(cfg.fid));
            }
            let inner = FnInner {
                state: cfg.initial_state,
                instance: 1,
                epoch: 1,
                released: false,
                ioat: None,
                iotlb: Iotlb::default(),
                irq: None,
                fmb_addr: 0,
                store: ConfigStore::new(&cfg),
                refreshes: 0,
                unreported_drop: None,
                rpcit_resume: Vec::new(),
            };
            let idx = u16::try_from(i).map_err(|_| BuildError::TooMany(i))?;
            slots.push(Slot {
                cfg,
                idx,
                inner: RwLock::new(inner),
            });
        }
        let budget = Budget::new(opts.mapping_budget);
        Ok(Zpci {
            hooks,
            opts,
            slots,
            budget,
            events: Mutex::new(EventLog::default()),
            error_listener: OnceLock::new(),
        })
    }

    /// Options the model was built with.
    pub fn options(&self) -> &ZpciOptions {
        &self.opts
    }

    pub(crate) fn slot_by_fh(&self, fh: u32) -> Option<&Slot> {
        self.slots.get(usize::from(fh::index(fh)))
    }

    pub(crate) fn slot_by_fid(&self, fid: u32) -> Option<&Slot> {
        self.slots.iter().find(|s| s.cfg.fid == fid)
    }

    /// Current function handle of `fid`.
    pub fn fh_of(&self, fid: u32) -> Option<u32> {
        self.slot_by_fid(fid).map(|s| s.read().fh(s.idx))
    }

    /// Current state of `fid`.
    pub fn state_of(&self, fid: u32) -> Option<FunctionState> {
        self.slot_by_fid(fid).map(|s| s.read().state)
    }

    /// Current generation of `fid` (bumped by every lifecycle or registration change).
    pub fn generation_of(&self, fid: u32) -> Option<u64> {
        self.slot_by_fid(fid).map(|s| s.read().epoch)
    }

    /// Registered `(iota, pba, pal)` of `fid`, if any.
    pub fn ioat_of(&self, fid: u32) -> Option<(u64, u64, u64)> {
        self.slot_by_fid(fid)
            .and_then(|s| s.read().ioat.map(|r| (r.iota.raw, r.pba, r.pal)))
    }

    /// Shadow IOTLB content of `fid`: `(iova, gpa, writable, frame)` sorted by IOVA.
    pub fn iotlb_entries(&self, fid: u32) -> Vec<(u64, u64, bool, Frame)> {
        self.slot_by_fid(fid)
            .map(|s| {
                s.read()
                    .iotlb
                    .entries()
                    .into_iter()
                    .map(|(i, Entry { gpa, writable }, f)| (i, gpa, writable, f))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Budget units in use across all functions.
    pub fn budget_used(&self) -> u64 {
        self.budget.used()
    }

    /// Calls `listener` (with no lock held) after every error event the model records, so a
    /// backend can tell the guest's side that [`Zpci::take_error_events`] has something.
    /// Only the first listener set is kept; false if one was set already.
    pub fn set_error_listener(&self, listener: ErrorListener) -> bool {
        self.error_listener.set(listener).is_ok()
    }

    /// Takes the recorded error events (and how many were dropped for lack of room).
    pub fn take_error_events(&self) -> (Vec<ErrorEvent>, u64) {
        let mut log = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = std::mem::take(&mut log.dropped);
        (std::mem::take(&mut log.events), dropped)
    }

    /// Puts the function into the error state (if it may enter it) and builds the event.
    pub(crate) fn fault_locked(slot: &Slot, g: &mut FnInner, pec: u16, addr: u64) -> ErrorEvent {
        let fh = g.fh(slot.idx);
        let _ = g.transition(Transition::Fault);
        ErrorEvent {
            fid: slot.cfg.fid,
            fh,
            pec,
            addr,
        }
    }

    /// Records an error event and announces it. Call with no function lock held.
    pub(crate) fn emit_error(&self, ev: ErrorEvent) {
        {
            let mut log = self.events.lock().unwrap_or_else(|p| p.into_inner());
            if log.events.len() >= self.opts.max_error_events {
                log.dropped += 1;
            } else {
                log.events.push(ev);
            }
        }
        self.emit_state(ZpciState::ErrorEvent { pec: ev.pec }, ev.fh);
        if let Some(listener) = self.error_listener.get() {
            listener();
        }
    }

    /// Announces a change of the function with handle `fh`.
    pub(crate) fn emit_state(&self, change: ZpciState, fh: u32) {
        self.hooks.state(&StateEvent {
            source: "zpci",
            endpoint: Some(Endpoint::Zpci { fh }),
            change: change.into(),
        });
    }

    /// Runs one instruction as prepare → hook → commit (see the module documentation).
    pub(crate) fn windowed<P, R>(
        &self,
        slot: &Slot,
        point: &str,
        value: u64,
        prepare: &dyn Fn(&FnInner) -> Prepared<P, R>,
        commit: &dyn Fn(&mut FnInner, P) -> R,
    ) -> R {
        let (epoch, life, fh0, first) = {
            let g = slot.read();
            (g.epoch, g.life(), g.fh(slot.idx), prepare(&g))
        };
        self.hooks.point(&PointCtx {
            point,
            endpoint: Some(Endpoint::Zpci { fh: fh0 }),
            domain: None,
            value,
        });
        let mut g = slot.write();
        if g.epoch == epoch {
            return match first {
                Ok(p) => commit(&mut g, p),
                Err(r) => r,
            };
        }
        match self.opts.ordering {
            CommitOrdering::Revalidate => match prepare(&g) {
                Ok(p) => commit(&mut g, p),
                Err(r) => r,
            },
            CommitOrdering::PreFixUnchecked => match first {
                Ok(p) => {
                    g.restore(life);
                    commit(&mut g, p)
                }
                Err(r) => r,
            },
        }
    }

    fn lifecycle(
        &self,
        fid: u32,
        cause: Transition,
        what: fn(u64) -> ZpciState,
        reset: bool,
    ) -> Result<FunctionState, LifecycleError> {
        let slot = self
            .slot_by_fid(fid)
            .ok_or(LifecycleError::NoSuchFid(fid))?;
        let (to, fh, epoch) = {
            let mut g = slot.write();
            let to = g.transition(cause)?;
            match cause {
                Transition::Configure => {
                    g.instance = (g.instance % 0x7f) + 1;
                    g.released = false;
                }
                Transition::Deconfigure | Transition::Reserve => g.released = true,
                _ => {}
            }
            if reset {
                let freed = g.drop_translations(if cause == Transition::Reserve {
                    "RESERVE"
                } else {
                    "DECONFIGURE"
                });
                self.budget.give(freed);
                g.irq = None;
                g.fmb_addr = 0;
            }
            (to, g.fh(slot.idx), g.epoch)
        };
        self.emit_state(what(epoch), fh);
        self.report_drops(slot);
        Ok(to)
    }

    /// SCLP configure: standby → disabled, with a new handle instance.
    pub fn configure(&self, fid: u32) -> Result<FunctionState, LifecycleError> {
        self.lifecycle(
            fid,
            Transition::Configure,
            |epoch| ZpciState::Configure { epoch },
            false,
        )
    }

    /// SCLP deconfigure / hot-unplug: any configured state → standby. Can happen at any instant,
    /// including while another thread is inside MPCIFC or RPCIT for the same function. The IOAT,
    /// every shadow translation and the interrupt registration are dropped; afterwards every DMA
    /// of the function is refused with [`crate::codes::reason::AFTER_RELEASE`].
    pub fn deconfigure(&self, fid: u32) -> Result<FunctionState, LifecycleError> {
        let fh0 = self.fh_of(fid).ok_or(LifecycleError::NoSuchFid(fid))?;
        self.hooks.point(&PointCtx {
            point: crate::POINT_DECONFIGURE,
            endpoint: Some(Endpoint::Zpci { fh: fh0 }),
            domain: None,
            value: u64::from(fid),
        });
        self.lifecycle(
            fid,
            Transition::Deconfigure,
            |epoch| ZpciState::Deconfigure { epoch },
            true,
        )
    }

    /// Hypervisor reserves a standby function.
    pub fn reserve(&self, fid: u32) -> Result<FunctionState, LifecycleError> {
        self.lifecycle(
            fid,
            Transition::Reserve,
            |epoch| ZpciState::Reserve { epoch },
            true,
        )
    }

    /// Hypervisor returns a reserved function to standby.
    pub fn unreserve(&self, fid: u32) -> Result<FunctionState, LifecycleError> {
        self.lifecycle(
            fid,
            Transition::Unreserve,
            |epoch| ZpciState::Unreserve { epoch },
            false,
        )
    }
}
