//! How a guest run ended, in terms every CPU backend shares.

use std::time::Duration;

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off.
    PoweredOff,
    /// The guest kernel panicked.
    Panicked,
    /// The guest did not power off in time; QEMU was killed.
    Timeout,
    /// QEMU exited with an error.
    QemuFailed {
        /// Exit code (None if killed by a signal).
        code: Option<i32>,
        /// The end of QEMU's stderr.
        stderr: String,
    },
    /// A device connection failed (malformed message, unmappable memory); the guest was stopped.
    DeviceError(String),
    /// Sluice's own VMM (kvm backend) failed.
    VmmError(String),
}

impl GuestExit {
    /// Short stable name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            GuestExit::PoweredOff => "powered-off",
            GuestExit::Panicked => "guest-panic",
            GuestExit::Timeout => "timeout",
            GuestExit::QemuFailed { .. } => "qemu-failed",
            GuestExit::DeviceError(_) => "device-error",
            GuestExit::VmmError(_) => "vmm-error",
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How it ended.
    pub exit: GuestExit,
    /// Host wall time from QEMU start to exit.
    pub wall: Duration,
    /// Host time from QEMU start to the first `SLUICE: init started` line.
    pub boot_to_init: Option<Duration>,
    /// Every console line, in order.
    pub console: Vec<String>,
}
