//! zPCI function identity (FID, function handle) and lifecycle: states and the transitions the
//! architecture allows between them.
//!
//! States (QEMU `ZPCI_FS_*`, Linux `zpci_state`): **reserved** (plugged but not usable, or being
//! unplugged), **standby** (present, not configured), and the *configured* meta-state made of
//! **disabled** (configured, not enabled), **enabled**, **error** (a DMA or translation error
//! happened; DMA, loads and stores are refused) and **blocked** (after RESET_BLOCK: loads and
//! stores work again for recovery, DMA stays refused).

use thiserror::Error;

/// Lifecycle state of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FunctionState {
    /// Plugged but reserved (not available to this guest).
    Reserved,
    /// Present but not configured (after SCLP deconfigure).
    Standby,
    /// Configured, not enabled.
    Disabled,
    /// Configured and enabled.
    Enabled,
    /// Configured, enabled, in the error state.
    Error,
    /// Configured, enabled, error state with loads/stores unblocked (after RESET_BLOCK).
    Blocked,
}

impl FunctionState {
    /// Every state, for table-driven tests.
    pub const ALL: [FunctionState; 6] = [
        FunctionState::Reserved,
        FunctionState::Standby,
        FunctionState::Disabled,
        FunctionState::Enabled,
        FunctionState::Error,
        FunctionState::Blocked,
    ];

    /// True in the configured meta-state.
    pub fn is_configured(self) -> bool {
        matches!(
            self,
            FunctionState::Disabled
                | FunctionState::Enabled
                | FunctionState::Error
                | FunctionState::Blocked
        )
    }

    /// True when the function handle carries the enable bit.
    pub fn is_enabled_meta(self) -> bool {
        matches!(
            self,
            FunctionState::Enabled | FunctionState::Error | FunctionState::Blocked
        )
    }

    /// Short name for timelines.
    pub fn name(self) -> &'static str {
        match self {
            FunctionState::Reserved => "reserved",
            FunctionState::Standby => "standby",
            FunctionState::Disabled => "disabled",
            FunctionState::Enabled => "enabled",
            FunctionState::Error => "error",
            FunctionState::Blocked => "blocked",
        }
    }
}

/// What moves a function from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// Hypervisor reserves a standby function (hot-unplug, `HP_EVENT_STANDBY_TO_RESERVED`).
    Reserve,
    /// Hypervisor releases a reserved function to standby (`HP_EVENT_RESERVED_TO_STANDBY`).
    Unreserve,
    /// SCLP configure (`HP_EVENT_TO_CONFIGURED`).
    Configure,
    /// SCLP deconfigure / hot-unplug of a configured function (`HP_EVENT_CONFIGURED_TO_STBRES`).
    Deconfigure,
    /// CLP SET PCI FN enable.
    Enable,
    /// CLP SET PCI FN disable.
    Disable,
    /// A DMA, translation or RPCIT error.
    Fault,
    /// MPCIFC RESET_BLOCK.
    ResetBlock,
    /// MPCIFC RESET_ERROR.
    ResetError,
}

use FunctionState as S;
use Transition as T;

/// Every legal `(from, to, cause)` triple. Anything not listed is illegal.
pub const VALID_TRANSITIONS: &[(FunctionState, FunctionState, Transition)] = &[
    (S::Standby, S::Reserved, T::Reserve),
    (S::Reserved, S::Standby, T::Unreserve),
    (S::Standby, S::Disabled, T::Configure),
    (S::Disabled, S::Standby, T::Deconfigure),
    (S::Enabled, S::Standby, T::Deconfigure),
    (S::Error, S::Standby, T::Deconfigure),
    (S::Blocked, S::Standby, T::Deconfigure),
    (S::Disabled, S::Enabled, T::Enable),
    (S::Enabled, S::Disabled, T::Disable),
    (S::Error, S::Disabled, T::Disable),
    (S::Blocked, S::Disabled, T::Disable),
    (S::Enabled, S::Error, T::Fault),
    (S::Blocked, S::Error, T::Fault),
    (S::Error, S::Blocked, T::ResetBlock),
    (S::Error, S::Enabled, T::ResetError),
    (S::Blocked, S::Enabled, T::ResetError),
];

/// The cause that legally moves `from` to `to`, if any.
pub fn transition_cause(from: FunctionState, to: FunctionState) -> Option<Transition> {
    VALID_TRANSITIONS
        .iter()
        .find(|(f, t, _)| *f == from && *t == to)
        .map(|(_, _, c)| *c)
}

/// The state `cause` leads to from `from`, if legal.
pub fn apply_transition(from: FunctionState, cause: Transition) -> Option<FunctionState> {
    VALID_TRANSITIONS
        .iter()
        .find(|(f, _, c)| *f == from && *c == cause)
        .map(|(_, t, _)| *t)
}

/// A host-side lifecycle request the model refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LifecycleError {
    /// No function with this FID.
    #[error("no zPCI function with fid {0:#x}")]
    NoSuchFid(u32),
    /// The transition is not legal from the current state.
    #[error("illegal zPCI transition {cause:?} from {from:?}")]
    Illegal {
        /// State the function was in.
        from: FunctionState,
        /// What was asked.
        cause: Transition,
    },
}

/// Function-handle layout (QEMU `FH_MASK_*`).
pub mod fh {
    /// Enable bit: set while the function is enabled.
    pub const ENABLE: u32 = 0x8000_0000;
    /// Instance number, bumped on every configure so stale handles are detectable.
    pub const INSTANCE: u32 = 0x7f00_0000;
    /// Shift of the instance field.
    pub const INSTANCE_SHIFT: u32 = 24;
    /// "Emulated function" shared-memory designation.
    pub const SHM_EMUL: u32 = 0x0002_0000;
    /// Function index.
    pub const INDEX: u32 = 0x0000_ffff;

    /// Builds a handle.
    pub const fn make(index: u16, instance: u8, enabled: bool) -> u32 {
        let en = if enabled { ENABLE } else { 0 };
        en | (((instance as u32) << INSTANCE_SHIFT) & INSTANCE) | SHM_EMUL | index as u32
    }

    /// Index part of a handle.
    pub const fn index(fh: u32) -> u16 {
        (fh & INDEX) as u16
    }
}

/// Static description of one function, fixed when the model is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionConfig {
    /// Function ID (FID), the guest-visible name used by SCLP configure/deconfigure.
    pub fid: u32,
    /// User-defined ID (UID).
    pub uid: u32,
    /// PCI vendor ID (config space 0x00).
    pub vendor_id: u16,
    /// PCI device ID (config space 0x02).
    pub device_id: u16,
    /// Start of the DMA address range the function may register (CLP `sdma`).
    pub sdma: u64,
    /// End (inclusive) of that range (CLP `edma`).
    pub edma: u64,
    /// Function group ID (CLP `pfgid`).
    pub pfgid: u8,
    /// Capability: segment-table entries with the format-control bit map 1 MiB frames.
    pub one_meg_frames: bool,
    /// CLP "refresh required" flag: translations must be refreshed with RPCIT on map too
    /// (Linux `zdev->tlb_refresh`). Always true for this model: it shadows the tables.
    pub refresh_required: bool,
    /// Memory BAR sizes in bytes (0 = absent). Each backing store is capped at 64 KiB.
    pub bar_sizes: [u32; 6],
    /// State after construction.
    pub initial_state: FunctionState,
}

impl Default for FunctionConfig {
    fn default() -> Self {
        FunctionConfig {
            fid: 0,
            uid: 0,
            vendor_id: 0x1af4,
            device_id: 0x1041,
            sdma: 0x1_0000_0000,
            edma: 0x01ff_ffff_ffff_ffff,
            pfgid: 1,
            one_meg_frames: false,
            refresh_required: true,
            bar_sizes: [0x1000, 0, 0, 0, 0, 0],
            initial_state: FunctionState::Standby,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_is_either_listed_or_illegal_and_unique() {
        for from in FunctionState::ALL {
            for to in FunctionState::ALL {
                let n = VALID_TRANSITIONS
                    .iter()
                    .filter(|(f, t, _)| *f == from && *t == to)
                    .count();
                assert!(n <= 1, "{from:?}->{to:?} listed twice");
                let cause = transition_cause(from, to);
                assert_eq!(cause.is_some(), n == 1);
                if let Some(c) = cause {
                    assert_eq!(apply_transition(from, c), Some(to));
                }
            }
        }
    }

    #[test]
    fn handle_layout() {
        let h = fh::make(7, 3, true);
        assert_eq!(h, 0x8302_0007);
        assert_eq!(fh::index(h), 7);
        assert_eq!(fh::make(7, 3, false), 0x0302_0007);
    }
}
