//! Typed state changes: what a model reports through [`crate::Hooks::state`].
//!
//! One enum per family of models ([`DeviceState`] for PCI functions and their transports,
//! [`ViommuState`], [`SmmuState`], [`ZpciState`]), wrapped in [`StateChange`]. Consumers (the
//! escape oracle) match on the variants, so renaming an event is a compile error rather than a
//! silent misclassification, and every value arrives decoded by the crate that owns its format.
//!
//! [`StateChange::name`] and [`StateChange::value`] give the stable display form the timeline,
//! the reports and [`crate::RecordingHooks`] keep (`attach-begin`, `cfgi_ste`, ...).

use std::fmt;

/// A change of device or IOMMU state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    /// A PCI function or its transport (virtio-pci, the DMA engine).
    Device(DeviceState),
    /// A virtio-iommu.
    Viommu(ViommuState),
    /// An Arm SMMUv3.
    Smmu(SmmuState),
    /// An s390 zPCI function.
    Zpci(ZpciState),
}

/// Device and transport events (the event's endpoint is the function).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// The driver reset the device (virtio status 0, the DMA engine's reset register).
    Reset,
    /// The driver set FEATURES_OK with these features (accepted by the device).
    FeaturesOk {
        /// The driver's features.
        features: u64,
    },
    /// The driver set DRIVER_OK.
    DriverOk {
        /// The device activated and is usable (false: activation failed, NEEDS_RESET).
        usable: bool,
    },
    /// The Bus Master Enable bit of the command register changed.
    BusMasterEnable {
        /// New value.
        enabled: bool,
    },
    /// A host-armed probe DMA of the endpoint begins (a "rogue" DMA: the device DMAs on the
    /// host's command, not the guest's). The oracle judges what such a DMA *reached*; a refusal
    /// answers the probe's question ("could this device reach memory now?") with no and is a
    /// fault, not a device-side symptom of the guest.
    RogueDma {
        /// The IOVA it uses.
        iova: u64,
    },
    /// The probe DMA of the endpoint is over.
    RogueDmaDone {
        /// Bytes it moved.
        moved: u64,
    },
}

/// virtio-iommu events (the event's endpoint, if any, is the endpoint concerned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViommuState {
    /// An ATTACH passed every check and starts: the old and the new context are both
    /// legitimate until [`ViommuState::Attach`].
    AttachBegin {
        /// Domain attached to.
        domain: u32,
        /// The domain is a bypass domain.
        bypass: bool,
    },
    /// The ATTACH took effect.
    Attach {
        /// Domain attached to.
        domain: u32,
    },
    /// A DETACH passed every check and starts.
    DetachBegin {
        /// Domain left.
        domain: u32,
    },
    /// The DETACH took effect.
    Detach {
        /// Domain left.
        domain: u32,
    },
    /// A domain lost its last endpoint and was freed with its mappings.
    DomainFree {
        /// The domain.
        domain: u32,
    },
    /// The config space's boot bypass changed.
    Bypass {
        /// New value.
        enabled: bool,
    },
    /// An ATTACH or DETACH request completed (after its completion point), successful or not:
    /// nothing of it is in progress any more.
    RequestDone {
        /// Which request.
        request: ViommuRequest,
        /// The domain it named.
        domain: u32,
        /// The virtio-iommu status written back (0: OK).
        status: u8,
    },
}

/// The virtio-iommu requests that change an endpoint's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViommuRequest {
    /// ATTACH.
    Attach,
    /// DETACH.
    Detach,
}

/// SMMUv3 events (the event's endpoint, if any, is a stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmmuState {
    /// CR0.SMMUEN changed: the guest driver takes (or gives up) control.
    SmmuEn {
        /// New value.
        enabled: bool,
    },
    /// GBPA changed.
    Gbpa {
        /// New register value.
        value: u32,
    },
    /// CFGI_STE of the event's stream executed.
    CfgiSte {
        /// The STE's configuration as memory held it then (`None`: unreadable).
        config: Option<SteConfig>,
    },
    /// CFGI_STE_RANGE executed (the event's stream is the command's StreamID).
    CfgiSteRange {
        /// The command's Range field (the span is `2^(range + 1)` StreamIDs).
        range: u32,
        /// First StreamID covered.
        first_sid: u32,
        /// Last StreamID covered.
        last_sid: u32,
    },
    /// CFGI_CD of the event's stream and substream executed.
    CfgiCd,
    /// CFGI_CD_ALL of the event's stream executed.
    CfgiCdAll,
    /// A CMD_SYNC completed (after its point): every invalidation before it took effect.
    SyncCompleted,
}

/// What an STE does with a stream's transactions, decoded by the SMMUv3 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteMode {
    /// Transactions are aborted (also the reserved configurations).
    Abort,
    /// Transactions pass untranslated.
    Bypass,
    /// Stage 1 translation only.
    Stage1,
    /// Stage 2 translation only.
    Stage2,
    /// Both stages.
    Nested,
}

/// An STE's configuration as the SMMUv3 model decoded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteConfig {
    /// STE.V.
    pub valid: bool,
    /// What a valid STE does.
    pub mode: SteMode,
    /// The encoded bits the model decoded (for display only: consumers use `valid` and `mode`).
    pub raw: u8,
}

impl SteConfig {
    /// Whether the STE lets a DMA through untranslated.
    pub fn allows_untranslated(&self) -> bool {
        self.valid && self.mode == SteMode::Bypass
    }

    /// Whether the STE lets a DMA through translated.
    pub fn allows_translated(&self) -> bool {
        self.valid
            && matches!(
                self.mode,
                SteMode::Stage1 | SteMode::Stage2 | SteMode::Nested
            )
    }
}

impl fmt::Display for SteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.mode {
            _ if !self.valid => "invalid",
            SteMode::Abort => "abort",
            SteMode::Bypass => "bypass",
            SteMode::Stage1 => "stage-1",
            SteMode::Stage2 => "stage-2",
            SteMode::Nested => "nested",
        };
        write!(f, "{what} ({:#x})", self.raw)
    }
}

/// zPCI events (the event's endpoint is the function handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZpciState {
    /// An error event was recorded.
    ErrorEvent {
        /// Its PCI event code.
        pec: u16,
    },
    /// SCLP configure: the function is available again.
    Configure {
        /// The function generation after it.
        epoch: u64,
    },
    /// SCLP deconfigure: the function is released.
    Deconfigure {
        /// The function generation at release (DMAs translated in older ones predate it).
        epoch: u64,
    },
    /// Reserve: the function is released.
    Reserve {
        /// The function generation at release.
        epoch: u64,
    },
    /// Unreserve: the function is available again.
    Unreserve {
        /// The function generation after it.
        epoch: u64,
    },
    /// CLP SET PCI FUNCTION enable: DMA is translated from now on.
    Enable {
        /// The function generation.
        epoch: u64,
    },
    /// CLP SET PCI FUNCTION disable.
    Disable {
        /// The function generation.
        epoch: u64,
    },
    /// MPCIFC register I/O address translation.
    RegIoat {
        /// The IOTA registered.
        iota: u64,
    },
    /// MPCIFC deregister I/O address translation.
    DeregIoat,
    /// MPCIFC re-register I/O address translation.
    ReregIoat {
        /// The IOTA registered.
        iota: u64,
    },
    /// MPCIFC reset error state.
    ResetError,
    /// MPCIFC reset load/store blocked state.
    ResetBlock,
    /// MPCIFC register interruptions.
    RegInt,
    /// MPCIFC deregister interruptions.
    DeregInt,
    /// MPCIFC set measurement parameters.
    SetMeasure,
}

impl StateChange {
    /// The stable name of the event on the timeline and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            StateChange::Device(d) => d.name(),
            StateChange::Viommu(v) => v.name(),
            StateChange::Smmu(s) => s.name(),
            StateChange::Zpci(z) => z.name(),
        }
    }

    /// The event's value as the timeline shows it (a domain, a register value, ...).
    pub fn value(&self) -> u64 {
        match self {
            StateChange::Device(d) => d.value(),
            StateChange::Viommu(v) => v.value(),
            StateChange::Smmu(s) => s.value(),
            StateChange::Zpci(z) => z.value(),
        }
    }

    /// Whether the event only repeats, typed, a named point that the hooks already saw just
    /// before (a request's or a CMD_SYNC's completion). A timeline that records points need
    /// not record it again.
    pub fn echoes_point(&self) -> bool {
        matches!(
            self,
            StateChange::Viommu(ViommuState::RequestDone { .. })
                | StateChange::Smmu(SmmuState::SyncCompleted)
        )
    }
}

impl DeviceState {
    fn name(&self) -> &'static str {
        match self {
            DeviceState::Reset => "reset",
            DeviceState::FeaturesOk { .. } => "features-ok",
            DeviceState::DriverOk { .. } => "driver-ok",
            DeviceState::BusMasterEnable { .. } => "bus-master-enable",
            DeviceState::RogueDma { .. } => "rogue-dma",
            DeviceState::RogueDmaDone { .. } => "rogue-dma-done",
        }
    }

    fn value(&self) -> u64 {
        match *self {
            DeviceState::Reset => 0,
            DeviceState::FeaturesOk { features } => features,
            DeviceState::DriverOk { usable: b } | DeviceState::BusMasterEnable { enabled: b } => {
                u64::from(b)
            }
            DeviceState::RogueDma { iova } => iova,
            DeviceState::RogueDmaDone { moved } => moved,
        }
    }
}

impl ViommuState {
    fn name(&self) -> &'static str {
        match self {
            ViommuState::AttachBegin { .. } => "attach-begin",
            ViommuState::Attach { .. } => "attach",
            ViommuState::DetachBegin { .. } => "detach-begin",
            ViommuState::Detach { .. } => "detach",
            ViommuState::DomainFree { .. } => "domain-free",
            ViommuState::Bypass { .. } => "bypass",
            ViommuState::RequestDone {
                request: ViommuRequest::Attach,
                ..
            } => "attach-done",
            ViommuState::RequestDone {
                request: ViommuRequest::Detach,
                ..
            } => "detach-done",
        }
    }

    fn value(&self) -> u64 {
        match *self {
            ViommuState::AttachBegin { domain, bypass } => {
                u64::from(domain) | (u64::from(bypass) << 32)
            }
            ViommuState::Attach { domain }
            | ViommuState::DetachBegin { domain }
            | ViommuState::Detach { domain }
            | ViommuState::DomainFree { domain } => u64::from(domain),
            ViommuState::Bypass { enabled } => u64::from(enabled),
            ViommuState::RequestDone { status, .. } => u64::from(status),
        }
    }
}

impl SmmuState {
    fn name(&self) -> &'static str {
        match self {
            SmmuState::SmmuEn { .. } => "smmuen",
            SmmuState::Gbpa { .. } => "gbpa",
            SmmuState::CfgiSte { .. } => "cfgi_ste",
            SmmuState::CfgiSteRange { .. } => "cfgi_ste_range",
            SmmuState::CfgiCd => "cfgi_cd",
            SmmuState::CfgiCdAll => "cfgi_cd_all",
            SmmuState::SyncCompleted => "cmd_sync",
        }
    }

    fn value(&self) -> u64 {
        match *self {
            SmmuState::SmmuEn { enabled } => u64::from(enabled),
            SmmuState::Gbpa { value } => u64::from(value),
            // Unreadable shows as all ones, as before the events were typed.
            SmmuState::CfgiSte { config } => config.map_or(u64::MAX, |c| u64::from(c.raw)),
            SmmuState::CfgiSteRange { range, .. } => u64::from(range),
            SmmuState::CfgiCd | SmmuState::CfgiCdAll | SmmuState::SyncCompleted => 0,
        }
    }
}

impl ZpciState {
    fn name(&self) -> &'static str {
        match self {
            ZpciState::ErrorEvent { .. } => "error-event",
            ZpciState::Configure { .. } => "configure",
            ZpciState::Deconfigure { .. } => "deconfigure",
            ZpciState::Reserve { .. } => "reserve",
            ZpciState::Unreserve { .. } => "unreserve",
            ZpciState::Enable { .. } => "enable",
            ZpciState::Disable { .. } => "disable",
            ZpciState::RegIoat { .. } => "reg-ioat",
            ZpciState::DeregIoat => "dereg-ioat",
            ZpciState::ReregIoat { .. } => "rereg-ioat",
            ZpciState::ResetError => "reset-error",
            ZpciState::ResetBlock => "reset-block",
            ZpciState::RegInt => "reg-int",
            ZpciState::DeregInt => "dereg-int",
            ZpciState::SetMeasure => "set-measure",
        }
    }

    fn value(&self) -> u64 {
        match *self {
            ZpciState::ErrorEvent { pec } => u64::from(pec),
            ZpciState::Configure { epoch }
            | ZpciState::Deconfigure { epoch }
            | ZpciState::Reserve { epoch }
            | ZpciState::Unreserve { epoch }
            | ZpciState::Enable { epoch }
            | ZpciState::Disable { epoch } => epoch,
            ZpciState::RegIoat { iota } | ZpciState::ReregIoat { iota } => iota,
            ZpciState::DeregIoat
            | ZpciState::ResetError
            | ZpciState::ResetBlock
            | ZpciState::RegInt
            | ZpciState::DeregInt
            | ZpciState::SetMeasure => 0,
        }
    }
}

impl From<DeviceState> for StateChange {
    fn from(s: DeviceState) -> Self {
        StateChange::Device(s)
    }
}

impl From<ViommuState> for StateChange {
    fn from(s: ViommuState) -> Self {
        StateChange::Viommu(s)
    }
}

impl From<SmmuState> for StateChange {
    fn from(s: SmmuState) -> Self {
        StateChange::Smmu(s)
    }
}

impl From<ZpciState> for StateChange {
    fn from(s: ZpciState) -> Self {
        StateChange::Zpci(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_keep_the_untyped_form() {
        let cases: [(StateChange, &str, u64); 8] = [
            (
                ViommuState::AttachBegin {
                    domain: 2,
                    bypass: true,
                }
                .into(),
                "attach-begin",
                2 | 1 << 32,
            ),
            (
                DeviceState::DriverOk { usable: true }.into(),
                "driver-ok",
                1,
            ),
            (
                DeviceState::RogueDma { iova: 0x2000 }.into(),
                "rogue-dma",
                0x2000,
            ),
            (
                DeviceState::RogueDmaDone { moved: 0x100 }.into(),
                "rogue-dma-done",
                0x100,
            ),
            (
                SmmuState::CfgiSte {
                    config: Some(SteConfig {
                        valid: true,
                        mode: SteMode::Stage1,
                        raw: 0xb,
                    }),
                }
                .into(),
                "cfgi_ste",
                0xb,
            ),
            (
                SmmuState::CfgiSte { config: None }.into(),
                "cfgi_ste",
                u64::MAX,
            ),
            (ZpciState::Reserve { epoch: 7 }.into(), "reserve", 7),
            (
                ZpciState::ErrorEvent { pec: 0x3a }.into(),
                "error-event",
                0x3a,
            ),
        ];
        for (c, name, value) in cases {
            assert_eq!((c.name(), c.value()), (name, value), "{c:?}");
        }
    }

    #[test]
    fn ste_config_permissions_and_display() {
        let ste = |valid, mode, raw| SteConfig { valid, mode, raw };
        let bypass = ste(true, SteMode::Bypass, 9);
        assert!(bypass.allows_untranslated() && !bypass.allows_translated());
        let s2 = ste(true, SteMode::Stage2, 0xd);
        assert!(!s2.allows_untranslated() && s2.allows_translated());
        let invalid = ste(false, SteMode::Bypass, 8);
        assert!(!invalid.allows_untranslated() && !invalid.allows_translated());
        assert_eq!(invalid.to_string(), "invalid (0x8)");
        assert_eq!(ste(true, SteMode::Abort, 1).to_string(), "abort (0x1)");
        assert_eq!(ste(true, SteMode::Stage1, 0xb).to_string(), "stage-1 (0xb)");
    }

    #[test]
    fn only_completions_echo_points() {
        assert!(StateChange::Smmu(SmmuState::SyncCompleted).echoes_point());
        assert!(
            StateChange::Viommu(ViommuState::RequestDone {
                request: ViommuRequest::Detach,
                domain: 1,
                status: 0
            })
            .echoes_point()
        );
        assert!(!StateChange::Viommu(ViommuState::Detach { domain: 1 }).echoes_point());
    }
}
