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
//! s390 zPCI DMA-translation model.
//!
//! A pure model of what an s390 guest sees of zPCI functions and their I/O translation:
//!
//! - functions with FID and function handle, and the lifecycle
//!   reserved / standby / disabled / enabled / error / blocked ([`function`]);
//! - CLP LIST / QUERY / QUERY GROUP / SET PCI FN ([`Zpci::clp_list`] and friends);
//! - MPCIFC with the FIB ([`Zpci::mpcifc`], [`fib::Fib`]), PCILG/PCISTG ([`Zpci::pcilg`]);
//! - region-third → segment → page table translation ([`walk`]) through a shadow IOTLB that
//!   only RPCIT refreshes ([`Zpci::rpcit`]), with an optional always-walk mode and a host mapping
//!   budget;
//! - release (SCLP deconfigure) at any instant, also while MPCIFC or RPCIT runs on another
//!   thread; afterwards every DMA is refused with [`codes::reason::AFTER_RELEASE`].
//!
//! The hot path is [`Zpci::translate`]. Every instruction with a race window calls a named hook
//! point ([`POINTS`]) with no lock held, so a race injector can park it there. Every DMA is
//! reported through [`sluice_devapi::Hooks::dma`] and state changes through
//! [`sluice_devapi::Hooks::state`]. Tables are big-endian in guest memory.

pub mod clp;
pub mod codes;
pub mod fib;
pub mod function;
pub mod fuzzing;
pub mod guest;
pub mod iotlb;
mod model;
pub mod mpcifc;
pub mod pcils;
mod provenance;
pub mod rpcit;
pub mod seam;
mod translate;
pub mod walk;

pub use codes::{Cc, InsnStatus, ProgramException};
pub use fib::Fib;
pub use function::{FunctionConfig, FunctionState, LifecycleError, Transition};
pub use model::{
    BuildError, CommitOrdering, DEFAULT_MAPPING_BUDGET, DEFAULT_RPCIT_STEP_LIMIT, ErrorEvent,
    ErrorListener, TlbMode, Zpci, ZpciOptions,
};
pub use mpcifc::{MpcifcOp, MpcifcRequest};
pub use provenance::{FaultInjection, MAX_LISTED_USES, SOURCE};
pub use translate::{DmaRefusal, Piece, RefusalKind, Translation};

/// Hook point of MPCIFC REG_INT.
pub const POINT_REG_INT: &str = "zpci.mpcifc.reg_int";
/// Hook point of MPCIFC DEREG_INT.
pub const POINT_DEREG_INT: &str = "zpci.mpcifc.dereg_int";
/// Hook point of MPCIFC REG_IOAT (attach).
pub const POINT_REG_IOAT: &str = "zpci.mpcifc.reg_ioat";
/// Hook point of MPCIFC DEREG_IOAT (detach).
pub const POINT_DEREG_IOAT: &str = "zpci.mpcifc.dereg_ioat";
/// Hook point of MPCIFC REREG_IOAT.
pub const POINT_REREG_IOAT: &str = "zpci.mpcifc.rereg_ioat";
/// Hook point of MPCIFC RESET_ERROR.
pub const POINT_RESET_ERROR: &str = "zpci.mpcifc.reset_error";
/// Hook point of MPCIFC RESET_BLOCK.
pub const POINT_RESET_BLOCK: &str = "zpci.mpcifc.reset_block";
/// Hook point of MPCIFC SET_MEASURE.
pub const POINT_SET_MEASURE: &str = "zpci.mpcifc.set_measure";
/// Hook point of RPCIT (before the walk and commit).
pub const POINT_RPCIT: &str = "zpci.rpcit";
/// Hook point of deconfigure (before it takes effect).
pub const POINT_DECONFIGURE: &str = "zpci.deconfigure";
/// Hook point of CLP SET PCI FN enable (before it takes effect).
pub const POINT_ENABLE: &str = "zpci.clp.enable";
/// Hook point of CLP SET PCI FN disable (before it takes effect).
pub const POINT_DISABLE: &str = "zpci.clp.disable";

/// [`POINTS`] as declarations: none defers, none is reached inside a device's doorbell.
pub fn point_decls() -> Vec<sluice_devapi::PointDecl> {
    POINTS
        .iter()
        .map(|&n| sluice_devapi::PointDecl::new(n))
        .collect()
}

/// Every hook point this model calls.
pub const POINTS: &[&str] = &[
    POINT_REG_INT,
    POINT_DEREG_INT,
    POINT_REG_IOAT,
    POINT_DEREG_IOAT,
    POINT_REREG_IOAT,
    POINT_RESET_ERROR,
    POINT_RESET_BLOCK,
    POINT_SET_MEASURE,
    POINT_RPCIT,
    POINT_DECONFIGURE,
    POINT_ENABLE,
    POINT_DISABLE,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_match_ops_and_model_is_sync() {
        for op in MpcifcOp::ALL {
            assert!(POINTS.contains(&op.point()), "{op:?}");
            assert_eq!(MpcifcOp::from_code(op.code()), Some(op));
        }
        fn is_sync<T: Sync + Send>() {}
        is_sync::<Zpci>();
    }
}
