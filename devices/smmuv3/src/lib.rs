//! Arm SMMUv3 device model.
//!
//! A pure model: guest memory through `vm-memory`, interrupts and hook points through
//! `sluice-devapi`, no KVM. It implements the register file (page 0 and page 1), linear and
//! 2-level stream tables, linear and 2-level CD tables, stage-1, stage-2 and nested walks in all
//! three granules, the command queue (every opcode, CERROR_ILL/ABT with halt until GERRORN
//! acknowledges), the event queue (overflow flag, wired IRQ and MSI), CMD_SYNC MSI completion,
//! a config cache kept until CFGI, and a bounded IOTLB with range invalidation in time
//! proportional to what it removes. Guest mistakes become events or GERROR bits, never panics.
//!
//! Entry points: [`SmmuV3::mmio_read`], [`SmmuV3::mmio_write`] and [`SmmuV3::translate`].
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
#![forbid(unsafe_code)]

pub mod cd;
mod cfgcache;
pub mod cmdq;
mod device;
pub mod evtq;
mod exec;
#[doc(hidden)]
pub mod fuzzing;
pub mod guest;
pub mod iotlb;
mod provenance;
pub mod regs;
pub mod seam;
pub mod ste;
mod translate;
pub mod walk;

pub use device::{
    CacheMode, DEFAULT_CMDQ_BATCH, IRQ_CMD_SYNC, IRQ_EVENTQ, IRQ_GERROR, IRQ_PRIQ, SmmuConfig,
    SmmuV3,
};
pub use evtq::{Delivery, Event, EventType, FaultClass};
pub use exec::ILLEGAL_POINT;
pub use provenance::{FaultInjection, MAX_LISTED_USES, MAX_PENDING_INVALIDATIONS, SOURCE};
pub use regs::IdRegs;
pub use translate::{AbortCause, Access, Fault, Segment, Translation};

/// [`points`] as declarations: none defers, none is reached inside a doorbell of a device.
pub fn point_decls() -> Vec<sluice_devapi::PointDecl> {
    points()
        .into_iter()
        .map(sluice_devapi::PointDecl::new)
        .collect()
}

/// Every hook point name this model announces: `smmuv3.mmio.write.<REG>` before a register
/// write takes effect, `smmuv3.cmd.<OPCODE>` when a command has taken effect but before its
/// completion (CONS advance, CMD_SYNC signal) is visible, and `smmuv3.cmd.ILLEGAL`.
pub fn points() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = regs::WRITE_POINTS.to_vec();
    v.extend_from_slice(cmdq::CMD_POINTS);
    v.push(ILLEGAL_POINT);
    v
}
