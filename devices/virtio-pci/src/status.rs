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
    /// A legal step to a new state.
    Step(DeviceStatus),
    /// The driver wants FEATURES_OK; the transport must check the features first.
    RequestFeaturesOk,
    /// The driver set DRIVER_OK: activate.
    Activate,
    /// Not a legal transition; ignored.
    Illegal,
}

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

    /// Classifies a driver write of `value` in this state. Setting FAILED is always allowed.
    pub fn on_write(self, value: u8) -> StatusWrite {
        if value == 0 {
            return StatusWrite::Reset;
        }
        if value & FAILED != 0 {
            return StatusWrite::Step(DeviceStatus::Failed);
        }
        // The driver writes the cumulative status; a write equal to the current bits is a no-op.
        let value = value & !DEVICE_NEEDS_RESET;
        match (self, value) {
            (s, v) if v == s.bits() => StatusWrite::Step(s),
            (DeviceStatus::Reset, ACKNOWLEDGE) => StatusWrite::Step(DeviceStatus::Acknowledged),
            (DeviceStatus::Acknowledged, v) if v == ACKNOWLEDGE | DRIVER => {
                StatusWrite::Step(DeviceStatus::DriverLoaded)
            }
            (DeviceStatus::DriverLoaded, v) if v == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
                StatusWrite::RequestFeaturesOk
            }
            (DeviceStatus::FeaturesOk, v) if v == DeviceStatus::Running.bits() => {
                StatusWrite::Activate
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
    fn every_state_pair_follows_the_table() {
        for from in ALL {
            for to in ALL {
                let got = from.on_write(to.bits());
                let expected = match (from, to) {
                    (_, DeviceStatus::Reset) => StatusWrite::Reset,
                    (_, DeviceStatus::Failed) => StatusWrite::Step(DeviceStatus::Failed),
                    (f, t) if f == t => StatusWrite::Step(f),
                    (DeviceStatus::Reset, DeviceStatus::Acknowledged)
                    | (DeviceStatus::Acknowledged, DeviceStatus::DriverLoaded) => {
                        StatusWrite::Step(to)
                    }
                    (DeviceStatus::DriverLoaded, DeviceStatus::FeaturesOk) => {
                        StatusWrite::RequestFeaturesOk
                    }
                    (DeviceStatus::FeaturesOk, DeviceStatus::Running) => StatusWrite::Activate,
                    _ => StatusWrite::Illegal,
                };
                assert_eq!(got, expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn skipping_steps_is_illegal() {
        assert_eq!(DeviceStatus::Reset.on_write(DeviceStatus::Running.bits()), StatusWrite::Illegal);
        assert_eq!(DeviceStatus::Acknowledged.on_write(DRIVER_OK), StatusWrite::Illegal);
    }
}
