//! How a run ended, decided once for every backend.
//!
//! Each backend supervises its guest its own way (the qemu backend waits on a QEMU process and
//! its console pipe, the kvm backend on its vCPU threads) and reports what it saw as an
//! [`Observed`]; [`classify`] turns that into the [`GuestExit`] reports and verdicts use, so
//! that the same guest behaviour gets the same name under both.

use crate::GuestExit;

/// The console line that says the guest's `/init` runs (`guest-images/init/init`).
pub const INIT_STARTED: &str = "SLUICE: init started";
/// What the guest kernel prints when it panics.
pub const KERNEL_PANIC: &str = "Kernel panic";

/// Whether a console line says the guest's `/init` started.
pub fn is_init_line(line: &str) -> bool {
    line.contains(INIT_STARTED)
}

/// Whether a console line says the guest kernel panicked.
pub fn is_panic_line(line: &str) -> bool {
    line.contains(KERNEL_PANIC)
}

/// What ended the run, as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The run's deadline passed and the supervisor stopped the guest.
    Timeout,
    /// The emulator process exited on its own (qemu backend).
    ProcessExited {
        /// Exit code; `None` when a signal ended it.
        code: Option<i32>,
        /// The end of its stderr.
        stderr: String,
    },
    /// Waiting for the emulator process failed, so how it ended is unknown (qemu backend).
    ProcessLost {
        /// The end of its stderr.
        stderr: String,
    },
    /// The guest powered off or reset itself (kvm backend: ACPI S5, 0xCF9, i8042); a reset
    /// ends the run like a power-off (`-no-reboot` does the same under QEMU).
    GuestStopped,
    /// The VMM itself failed (kvm backend).
    VmmFailed(String),
    /// A vCPU stopped without the guest asking and without an error (kvm backend).
    VcpuStopped {
        /// The vCPU.
        vcpu: u8,
    },
}

/// Everything the decision rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// What ended the run.
    pub ending: Ending,
    /// The first device error (a malformed proxy message, unmappable memory); the supervisor
    /// stopped the guest because of it.
    pub device_error: Option<String>,
    /// The console showed a kernel panic.
    pub panic_seen: bool,
    /// The console showed `/init` starting.
    pub init_seen: bool,
}

/// The one place a run's end gets its name. In order: a device error (it stopped the guest,
/// so it explains everything after it), the timeout, a VMM failure, a kernel panic, then how
/// the guest or its emulator stopped. A QEMU that exits with status 0 before `/init` ran did
/// not run the guest (bad arguments swallowed by a wrapper, a stand-in binary, a kernel that
/// returned): that is a QEMU failure, not a power-off.
pub fn classify(obs: Observed) -> GuestExit {
    if let Some(e) = obs.device_error {
        return GuestExit::DeviceError(e);
    }
    match obs.ending {
        Ending::Timeout => GuestExit::Timeout,
        Ending::VmmFailed(e) => GuestExit::VmmError(e),
        _ if obs.panic_seen => GuestExit::Panicked,
        Ending::GuestStopped => GuestExit::PoweredOff,
        Ending::VcpuStopped { vcpu } => {
            GuestExit::VmmError(format!("vCPU {vcpu} stopped unexpectedly"))
        }
        Ending::ProcessExited { code: Some(0), .. } if obs.init_seen => GuestExit::PoweredOff,
        Ending::ProcessExited {
            code: Some(0),
            stderr,
        } => GuestExit::QemuFailed {
            code: Some(0),
            stderr: format!(
                "QEMU exited with status 0 before the guest's /init started{}",
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {stderr}")
                }
            ),
        },
        Ending::ProcessExited { code, stderr } => GuestExit::QemuFailed { code, stderr },
        Ending::ProcessLost { stderr } => GuestExit::QemuFailed { code: None, stderr },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ending: Ending) -> Observed {
        Observed {
            ending,
            device_error: None,
            panic_seen: false,
            init_seen: true,
        }
    }

    fn exited(code: Option<i32>) -> Ending {
        Ending::ProcessExited {
            code,
            stderr: "qemu: oops".into(),
        }
    }

    #[test]
    fn clean_ends_are_power_offs() {
        assert_eq!(classify(obs(exited(Some(0)))), GuestExit::PoweredOff);
        assert_eq!(classify(obs(Ending::GuestStopped)), GuestExit::PoweredOff);
        // The kvm backend's guests power off without /init too (bare-metal test guests).
        let bare = Observed {
            init_seen: false,
            ..obs(Ending::GuestStopped)
        };
        assert_eq!(classify(bare), GuestExit::PoweredOff);
    }

    #[test]
    fn qemu_exiting_zero_before_init_failed() {
        let o = Observed {
            init_seen: false,
            ..obs(exited(Some(0)))
        };
        assert_eq!(
            classify(o.clone()),
            GuestExit::QemuFailed {
                code: Some(0),
                stderr: "QEMU exited with status 0 before the guest's /init started; stderr: \
                         qemu: oops"
                    .into()
            }
        );
        let quiet = Observed {
            ending: Ending::ProcessExited {
                code: Some(0),
                stderr: String::new(),
            },
            ..o
        };
        assert_eq!(
            classify(quiet),
            GuestExit::QemuFailed {
                code: Some(0),
                stderr: "QEMU exited with status 0 before the guest's /init started".into()
            }
        );
    }

    #[test]
    fn qemu_errors_keep_code_and_stderr() {
        assert_eq!(
            classify(obs(exited(Some(1)))),
            GuestExit::QemuFailed {
                code: Some(1),
                stderr: "qemu: oops".into()
            }
        );
        assert_eq!(
            classify(obs(exited(None))),
            GuestExit::QemuFailed {
                code: None,
                stderr: "qemu: oops".into()
            }
        );
        assert_eq!(
            classify(obs(Ending::ProcessLost { stderr: "x".into() })),
            GuestExit::QemuFailed {
                code: None,
                stderr: "x".into()
            }
        );
    }

    #[test]
    fn panics_beat_how_the_guest_stopped_but_not_timeouts_or_vmm_errors() {
        let panicked = |ending| Observed {
            panic_seen: true,
            ..obs(ending)
        };
        assert_eq!(classify(panicked(exited(Some(0)))), GuestExit::Panicked);
        assert_eq!(classify(panicked(exited(Some(1)))), GuestExit::Panicked);
        assert_eq!(
            classify(panicked(Ending::GuestStopped)),
            GuestExit::Panicked
        );
        assert_eq!(
            classify(panicked(Ending::VcpuStopped { vcpu: 1 })),
            GuestExit::Panicked
        );
        assert_eq!(classify(panicked(Ending::Timeout)), GuestExit::Timeout);
        assert_eq!(
            classify(panicked(Ending::VmmFailed("KVM_RUN failed".into()))),
            GuestExit::VmmError("KVM_RUN failed".into())
        );
    }

    #[test]
    fn device_errors_come_first_then_timeouts() {
        let broken = Observed {
            device_error: Some("blk0: bad message".into()),
            panic_seen: true,
            ..obs(Ending::Timeout)
        };
        assert_eq!(
            classify(broken),
            GuestExit::DeviceError("blk0: bad message".into())
        );
        assert_eq!(classify(obs(Ending::Timeout)), GuestExit::Timeout);
    }

    #[test]
    fn vmm_failures() {
        assert_eq!(
            classify(obs(Ending::VmmFailed("all vCPU threads gone".into()))),
            GuestExit::VmmError("all vCPU threads gone".into())
        );
        assert_eq!(
            classify(obs(Ending::VcpuStopped { vcpu: 3 })),
            GuestExit::VmmError("vCPU 3 stopped unexpectedly".into())
        );
    }

    #[test]
    fn console_markers() {
        assert!(is_init_line("[    1.0] SLUICE: init started"));
        assert!(is_panic_line("Kernel panic - not syncing: VFS"));
        assert!(!is_panic_line("SLUICE: RESULT PASS"));
    }
}
