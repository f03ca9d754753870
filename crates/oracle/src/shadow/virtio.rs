//! virtio-iommu rules: the guest driver takes over at DRIVER_OK of the IOMMU's own transport;
//! from then on an endpoint's DMA must be translated in the domain it is attached to, or bypass
//! in a bypass domain. An ATTACH or DETACH in progress makes both contexts legitimate.

use sluice_devapi::{DeviceState, DmaOutcome, DmaRecord, StateChange, StateEvent, ViommuState};

use super::{
    EpShadow, FAST_BYPASS, FAST_DOMAIN, IommuKind, IommuRules, IommuShadow, RuleResult, Shadow,
    secs, untranslated,
};
use crate::timeline::EscapeClass;
use crate::topology::Key;

/// Domains left kept per endpoint (for the message of a DMA in one of them).
const LEFT_KEPT: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attach {
    domain: u32,
    bypass: bool,
    since: u64,
}

/// An endpoint's virtio-iommu state.
#[derive(Debug, Clone, Default)]
pub(super) struct EpState {
    attached: Option<Attach>,
    /// An ATTACH (Some) or DETACH (None) applied but not yet completed.
    pending: Option<Option<Attach>>,
    /// Domains the endpoint left, with when.
    left: Vec<(u32, u64)>,
}

impl EpState {
    /// An ATTACH or DETACH is in progress: the fast path cannot tell which context a DMA used.
    pub(super) fn in_transition(&self) -> bool {
        self.pending.is_some()
    }

    /// The endpoint leaves its domain (release), and nothing is in progress any more.
    pub(super) fn leave_all(&mut self, t: u64) {
        if let Some(a) = self.attached.take() {
            self.left.push((a.domain, t));
        }
        self.pending = None;
    }
}

/// The virtio-iommu implementation of [`IommuRules`].
pub(super) struct VirtioRules;

impl VirtioRules {
    fn iommu_by_bdf(sh: &Shadow, bdf: u16) -> Option<usize> {
        sh.iommus
            .iter()
            .position(|i| matches!(i.kind, IommuKind::Virtio { bdf: b } if b == bdf))
    }

    /// Its transport's DRIVER_OK or reset: the IOMMU's takeover starts or ends.
    fn on_transport(sh: &mut Shadow, d: DeviceState, bdf: u16, t: u64) {
        let Some(i) = Self::iommu_by_bdf(sh, bdf) else {
            return;
        };
        match d {
            DeviceState::DriverOk { usable: true } => {
                if let Some(io) = sh.iommus.get_mut(i) {
                    io.takeover = Some(t);
                }
            }
            DeviceState::Reset => Self::reset(sh, i, t),
            _ => {}
        }
    }

    fn reset(sh: &mut Shadow, i: usize, t: u64) {
        let was = sh.iommus.get_mut(i).and_then(|io| io.takeover.take());
        let attached: Vec<Key> = sh
            .eps
            .iter()
            .filter(|(_, e)| e.iommu == Some(i) && e.viommu.attached.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in attached {
            if was.is_some() {
                sh.release(k, "virtio-iommu device reset".into(), t, None);
            } else {
                sh.ep(k).viommu.attached = None;
            }
        }
    }

    fn on_model(sh: &mut Shadow, v: ViommuState, k: Key, t: u64) {
        match v {
            ViommuState::AttachBegin { domain, bypass } => {
                sh.ep(k).viommu.pending = Some(Some(Attach {
                    domain,
                    bypass,
                    since: t,
                }));
            }
            ViommuState::DetachBegin { .. } => sh.ep(k).viommu.pending = Some(None),
            ViommuState::Attach { domain } => {
                let ep = sh.ep(k);
                let v = &mut ep.viommu;
                let bypass = match v.pending {
                    Some(Some(a)) if a.domain == domain => a.bypass,
                    _ => false,
                };
                if let Some(old) = v.attached
                    && old.domain != domain
                {
                    v.left.push((old.domain, t));
                }
                v.left.retain(|(d, _)| *d != domain);
                if v.left.len() > LEFT_KEPT {
                    v.left.remove(0);
                }
                v.attached = Some(Attach {
                    domain,
                    bypass,
                    since: t,
                });
                v.pending = None;
                ep.released = None;
            }
            ViommuState::Detach { domain } => {
                sh.release(k, format!("DETACH from domain {domain} completed"), t, None);
            }
            // Completed, successful or not: whatever was in progress is over.
            ViommuState::RequestDone { .. } => sh.ep(k).viommu.pending = None,
            ViommuState::DomainFree { .. } | ViommuState::Bypass { .. } => {}
        }
    }
}

impl IommuRules for VirtioRules {
    fn on_state(&self, sh: &mut Shadow, ev: &StateEvent<'_>, t: u64) {
        let Some(k) = ev.endpoint.map(Key::of) else {
            return;
        };
        match (ev.change, k) {
            (StateChange::Viommu(v), k) => Self::on_model(sh, v, k, t),
            (StateChange::Device(d), Key::Pci(bdf)) => Self::on_transport(sh, d, bdf, t),
            _ => {}
        }
    }

    fn fast_word(&self, _sh: &Shadow, io: &IommuShadow, ep: &EpShadow) -> u64 {
        match ep.viommu.attached {
            Some(a) if a.bypass => FAST_BYPASS,
            Some(a) => FAST_DOMAIN | u64::from(a.domain),
            None if io.takeover.is_none() => FAST_BYPASS,
            None => 0,
        }
    }

    fn check(&self, _sh: &Shadow, io: &IommuShadow, ep: &EpShadow, rec: &DmaRecord) -> RuleResult {
        let v = &ep.viommu;
        // An ATTACH/DETACH in progress: its new context is already legitimate.
        if let Some(next) = v.pending {
            let fits = match (next, rec.outcome) {
                (None, o) => untranslated(o),
                (Some(a), o) if a.bypass => untranslated(o),
                (Some(a), DmaOutcome::Translated { domain, .. }) => domain == a.domain,
                _ => false,
            };
            if fits {
                return Ok(());
            }
        }
        let left = |d: u32| v.left.iter().rev().find(|(x, _)| *x == d).map(|(_, t)| *t);
        match (v.attached, rec.outcome) {
            (Some(a), o) if a.bypass && untranslated(o) => Ok(()),
            (Some(a), DmaOutcome::Translated { domain, .. }) if !a.bypass && domain == a.domain => {
                Ok(())
            }
            (Some(a), DmaOutcome::Translated { domain, .. }) => {
                let why = match left(domain) {
                    Some(t) => format!(
                        "the endpoint left domain {domain} at {} and is attached to {}domain {} since {}",
                        secs(t),
                        if a.bypass { "bypass " } else { "" },
                        a.domain,
                        secs(a.since)
                    ),
                    None => format!(
                        "the endpoint was never attached to domain {domain}; it is in domain {} since {}",
                        a.domain,
                        secs(a.since)
                    ),
                };
                Err((EscapeClass::WrongDomain, why))
            }
            (Some(a), _) => Err((
                EscapeClass::StaleConfig,
                format!(
                    "the endpoint is attached to translating domain {} since {} (ATTACH completed)",
                    a.domain,
                    secs(a.since)
                ),
            )),
            (None, DmaOutcome::Translated { domain, .. }) => Err((
                EscapeClass::WrongDomain,
                match left(domain) {
                    Some(t) => format!("the endpoint left domain {domain} at {}", secs(t)),
                    None => format!("the endpoint is not attached (domain {domain})"),
                },
            )),
            (None, _) => match io.takeover {
                Some(t) => Err((
                    EscapeClass::BypassAfterTakeover,
                    format!(
                        "{} took over (DRIVER_OK) at {} and the endpoint {}",
                        io.describe(),
                        secs(t),
                        if v.left.is_empty() {
                            "was never attached"
                        } else {
                            "is not attached"
                        }
                    ),
                )),
                None => Ok(()),
            },
        }
    }
}
