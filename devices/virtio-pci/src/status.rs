//! The device status field and the transitions the driver may make (virtio 1.x §2.1, §3.1.1).

/// Driver found the device.
pub const ACKNOWLEDGE: u8 = 0x01;
/// Driver knows how to drive it.
pub const DRIVER: u8 = 0x02;
/// Driver is ready.
pub const DRIVER_OK: u8 = 0x04;
/// Feature negotiation complete.
pub const FEATURES_OK: u8 = 0x08;
/// Device hit an error it cannot recover from without reset.
pub const DEVICE_NEEDS_RESET: u8 = 0x40;
/// Driver gave up.
pub const FAILED: u8 = 0x80;

/// Lifecycle of a virtio device as the transport sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    /// After reset.
    Reset,
    /// ACKNOWLEDGE.
    Acknowledged,
    /// ACKNOWLEDGE | DRIVER.
    DriverLoaded,
    /// ACKNOWLEDGE | DRIVER | FEATURES_OK.
    FeaturesOk,
    /// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK: the device runs.
    Running,
    /// FAILED was set by the driver.
    Failed,
}

/// The outcome of a status write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// Write 0: reset the device.
    Reset,
    /// Move forward to `to`. `features_ok` asks the transport to validate the acked features
    /// first (the step stops at DriverLoaded if they are refused); `activate` asks it to start
    /// the device.
    Advance {
        /// Target state.
        to: DeviceStatus,
        /// FEATURES_OK is being set by this write.
        features_ok: bool,
        /// DRIVER_OK is being set by this write.
        activate: bool,
    },
    /// Not a legal transition; ignored.
    Illegal,
}

/// The states a driver walks through, in order (virtio 1.x §3.1.1).
const SEQUENCE: [DeviceStatus; 5] = [
    DeviceStatus::Reset,
    DeviceStatus::Acknowledged,
    DeviceStatus::DriverLoaded,
    DeviceStatus::FeaturesOk,
    DeviceStatus::Running,
];

impl DeviceStatus {
    /// The status byte for this state (without DEVICE_NEEDS_RESET, which the transport ORs in).
    pub fn bits(self) -> u8 {
        match self {
            DeviceStatus::Reset => 0,
            DeviceStatus::Acknowledged => ACKNOWLEDGE,
            DeviceStatus::DriverLoaded => ACKNOWLEDGE | DRIVER,
            DeviceStatus::FeaturesOk => ACKNOWLEDGE | DRIVER | FEATURES_OK,
            DeviceStatus::Running => ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            DeviceStatus::Failed => FAILED,
        }
    }

    fn rank(self) -> Option<usize> {
        SEQUENCE.iter().position(|s| *s == self)
    }

    /// Classifies a driver write of `value` in this state. Setting FAILED is always allowed.
    /// A write may set several of the next bits at once (SeaBIOS writes ACKNOWLEDGE|DRIVER
    /// right after reset), but only in the spec's order and never clearing one: the status is
    /// a record of progress, so anything else is refused.
    pub fn on_write(self, value: u8) -> StatusWrite {
        if value == 0 {
            return StatusWrite::Reset;
        }
        if value & FAILED != 0 {
            return StatusWrite::Advance {
                to: DeviceStatus::Failed,
                features_ok: false,
                activate: false,
            };
        }
        let value = value & !DEVICE_NEEDS_RESET;
        let target = SEQUENCE.iter().copied().find(|s| s.bits() == value);
        match (self.rank(), target.and_then(|t| t.rank().map(|r| (t, r)))) {
            (Some(from), Some((to, to_rank))) if to_rank >= from => {
                let crosses = |s: DeviceStatus| {
                    from < s.rank().unwrap_or(0) && to_rank >= s.rank().unwrap_or(0)
                };
                StatusWrite::Advance {
                    to,
                    features_ok: crosses(DeviceStatus::FeaturesOk),
                    activate: crosses(DeviceStatus::Running),
                }
            }
            _ => StatusWrite::Illegal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [DeviceStatus; 6] = [
        DeviceStatus::Reset,
        DeviceStatus::Acknowledged,
        DeviceStatus::DriverLoaded,
        DeviceStatus::FeaturesOk,
        DeviceStatus::Running,
        DeviceStatus::Failed,
    ];

    #[test]
    fn every_state_pair_follows_the_rules() {
        for from in ALL {
            for to in ALL {
                let got = from.on_write(to.bits());
                let expected = match (from.rank(), to.rank()) {
                    _ if to == DeviceStatus::Reset => StatusWrite::Reset,
                    _ if to == DeviceStatus::Failed => StatusWrite::Advance {
                        to,
                        features_ok: false,
                        activate: false,
                    },
                    (Some(f), Some(t)) if t >= f => StatusWrite::Advance {
                        to,
                        features_ok: f < 3 && t >= 3,
                        activate: f < 4 && t >= 4,
                    },
                    _ => StatusWrite::Illegal,
                };
                assert_eq!(got, expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn compound_and_backward_writes() {
        assert_eq!(
            DeviceStatus::Reset.on_write(ACKNOWLEDGE | DRIVER),
            StatusWrite::Advance {
                to: DeviceStatus::DriverLoaded,
                features_ok: false,
                activate: false
            }
        );
        assert_eq!(
            DeviceStatus::DriverLoaded.on_write(DeviceStatus::Running.bits()),
            StatusWrite::Advance {
                to: DeviceStatus::Running,
                features_ok: true,
                activate: true
            }
        );
        // Bits out of order (DRIVER_OK without FEATURES_OK) or cleared are refused.
        assert_eq!(
            DeviceStatus::Acknowledged.on_write(ACKNOWLEDGE | DRIVER | DRIVER_OK),
            StatusWrite::Illegal
        );
        assert_eq!(
            DeviceStatus::FeaturesOk.on_write(ACKNOWLEDGE | DRIVER),
            StatusWrite::Illegal
        );
        assert_eq!(
            DeviceStatus::Failed.on_write(ACKNOWLEDGE),
            StatusWrite::Illegal
        );
        // DEVICE_NEEDS_RESET echoed back by the driver is ignored.
        assert_eq!(
            DeviceStatus::Running.on_write(DeviceStatus::Running.bits() | DEVICE_NEEDS_RESET),
            StatusWrite::Advance {
                to: DeviceStatus::Running,
                features_ok: false,
                activate: false
            }
        );
    }
}
