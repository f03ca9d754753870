//! The oracle's shadow of IOMMU state, built from state events and markers, and the four rules
//! that classify a DMA against it (`docs/escape-oracle.md`).
//!
//! What is common to every IOMMU (release, owner windows, probe DMAs) lives here; what a kind of
//! IOMMU means by its state events, and which DMAs it allows, lives behind [`IommuRules`], one
//! implementation per kind: [`virtio`], [`smmu`], [`zpci`].

mod smmu;
mod virtio;
mod zpci;

use std::collections::HashMap;
use std::sync::Arc;

use sluice_devapi::{
    DeviceState, DmaOutcome, DmaRecord, Endpoint, StateChange, StateEvent, SteConfig,
};

use crate::marker::{MarkerCmd, parse_marker};
use crate::timeline::{EscapeClass, Verdict};
use crate::topology::{IommuTopo, Key, Topology};

/// Reads an endpoint's configuration as guest memory holds it *now*, for `unsynced-config`.
///
/// For SMMUv3: the STE's configuration, decoded by the model's crate
/// (`sluice_smmuv3::ste::ste_config`). `None`: unknown.
pub trait ConfigProbe: Send + Sync {
    /// Current in-memory configuration of `endpoint`.
    fn config_now(&self, endpoint: Endpoint) -> Option<SteConfig>;
}

pub use zpci::ZPCI_AFTER_RELEASE;

/// Fast word: translated in exactly the low 32 bits' domain is legitimate.
pub(crate) const FAST_DOMAIN: u64 = 1 << 63;
/// Fast word: bypassed / direct is legitimate.
pub(crate) const FAST_BYPASS: u64 = 1 << 62;
/// Fast word: translated in any domain is legitimate.
pub(crate) const FAST_ANY_TRANSLATED: u64 = 1 << 61;

/// Formats a timestamp for messages.
pub(crate) fn secs(t: u64) -> String {
    format!("{}.{:06} s", t / 1_000_000_000, (t % 1_000_000_000) / 1000)
}

/// An escape's class and explanation, or `Ok` when a kind's rules allow a DMA.
type RuleResult = Result<(), (EscapeClass, String)>;

/// The rules of one kind of IOMMU: how its state events move the shadow, which outcomes the
/// lock-free fast path may accept for an endpoint behind it, and which DMAs are escapes.
trait IommuRules: Sync {
    /// Applies `ev` if it is one of this kind's events; any other is ignored.
    fn on_state(&self, sh: &mut Shadow, ev: &StateEvent<'_>, t: u64);
    /// The fast word (see `FAST_*`) of `ep`, behind `io`. Released, owned and in-transition
    /// endpoints never get here (their word is 0).
    fn fast_word(&self, sh: &Shadow, io: &IommuShadow, ep: &EpShadow) -> u64;
    /// Whether `rec` of `ep`, behind `io`, is allowed. Refused DMAs and released endpoints are
    /// judged before.
    fn check(&self, sh: &Shadow, io: &IommuShadow, ep: &EpShadow, rec: &DmaRecord) -> RuleResult;
}

/// Every kind's rules, each offered every state event.
const RULES: [&dyn IommuRules; 3] = [&virtio::VirtioRules, &smmu::SmmuRules, &zpci::ZpciRules];

#[derive(Debug, Clone)]
enum IommuKind {
    Virtio { bdf: u16 },
    Smmu { source: String },
    Zpci,
}

impl IommuKind {
    fn rules(&self) -> &'static dyn IommuRules {
        match self {
            IommuKind::Virtio { .. } => &virtio::VirtioRules,
            IommuKind::Smmu { .. } => &smmu::SmmuRules,
            IommuKind::Zpci => &zpci::ZpciRules,
        }
    }
}

#[derive(Debug, Clone)]
struct IommuShadow {
    kind: IommuKind,
    /// When the guest's IOMMU driver took control (virtio DRIVER_OK, SMMUEN=1).
    takeover: Option<u64>,
}

impl IommuShadow {
    fn describe(&self) -> String {
        match &self.kind {
            IommuKind::Virtio { bdf } => format!("virtio-iommu {}", sluice_devapi::Bdf(*bdf)),
            IommuKind::Smmu { source } => format!("SMMUv3 {source}"),
            IommuKind::Zpci => "zPCI".to_string(),
        }
    }
}

#[derive(Debug, Clone)]
struct Release {
    why: String,
    at: u64,
    /// zPCI: the function generation at release (a DMA translated in an older one predates it).
    epoch: Option<u64>,
}

#[derive(Debug, Clone)]
struct Owner {
    ranges: Vec<(u64, u64)>,
    since: u64,
}

/// One endpoint's shadow: what every kind shares, and each kind's own part.
#[derive(Debug, Clone, Default)]
struct EpShadow {
    iommu: Option<usize>,
    released: Option<Release>,
    owner: Option<Owner>,
    /// A host-armed probe DMA of this endpoint is in progress (`DeviceState::RogueDma`): its
    /// refusals are answers, not device-side symptoms.
    probing: bool,
    viommu: virtio::EpState,
    smmu: smmu::EpState,
    zpci: zpci::EpState,
}

/// A verdict with its class and explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Classified {
    pub verdict: Verdict,
    pub class: Option<EscapeClass>,
    pub message: Option<String>,
}

impl Classified {
    /// An escape of `class` by `rec` of `key`: the message names the rule, the endpoint, the
    /// direction, the address, the length and the outcome, then says why.
    pub(crate) fn escape(class: EscapeClass, key: Key, rec: &DmaRecord, why: &str) -> Self {
        Classified {
            verdict: Verdict::Escape,
            class: Some(class),
            message: Some(format!(
                "{class}: {} {} iova {:#x} len {} {}: {why}",
                key,
                dir(rec),
                rec.iova,
                rec.len,
                outcome_words(rec.outcome)
            )),
        }
    }

    fn ok() -> Self {
        Classified {
            verdict: Verdict::Ok,
            class: None,
            message: None,
        }
    }
    fn fault() -> Self {
        Classified {
            verdict: Verdict::Fault,
            class: None,
            message: None,
        }
    }
}

/// Everything the slow path knows.
pub(crate) struct Shadow {
    iommus: Vec<IommuShadow>,
    eps: HashMap<Key, EpShadow>,
    probe: Option<Arc<dyn ConfigProbe>>,
}

fn dir(rec: &DmaRecord) -> &'static str {
    match rec.direction {
        sluice_devapi::DmaDirection::Read => "read",
        sluice_devapi::DmaDirection::Write => "write",
    }
}

fn reached(o: DmaOutcome) -> bool {
    !matches!(o, DmaOutcome::Faulted { .. })
}

fn untranslated(o: DmaOutcome) -> bool {
    matches!(o, DmaOutcome::Bypassed | DmaOutcome::Direct)
}

impl Shadow {
    pub(crate) fn new(topology: &Topology) -> Self {
        let iommus = topology
            .iommus
            .iter()
            .map(|t| IommuShadow {
                kind: match t {
                    IommuTopo::Virtio { bdf, .. } => IommuKind::Virtio { bdf: bdf.0 },
                    IommuTopo::Smmu { source, .. } => IommuKind::Smmu {
                        source: source.clone(),
                    },
                    IommuTopo::Zpci { .. } => IommuKind::Zpci,
                },
                takeover: None,
            })
            .collect();
        let eps = topology
            .declared()
            .into_iter()
            .map(|(k, i)| {
                (
                    k,
                    EpShadow {
                        iommu: Some(i),
                        ..EpShadow::default()
                    },
                )
            })
            .collect();
        Shadow {
            iommus,
            eps,
            probe: None,
        }
    }

    pub(crate) fn set_probe(&mut self, probe: Arc<dyn ConfigProbe>) {
        self.probe = Some(probe);
    }

    fn ep(&mut self, key: Key) -> &mut EpShadow {
        self.eps.entry(key).or_default()
    }

    fn kind_of(&self, ep: &EpShadow) -> Option<&IommuShadow> {
        ep.iommu.and_then(|i| self.iommus.get(i))
    }

    /// The fast-path word of `key` (see `FAST_*`): which outcomes need no slow-path look.
    pub(crate) fn fast_word(&self, key: Key) -> u64 {
        let Some(ep) = self.eps.get(&key) else {
            return FAST_ANY_TRANSLATED | FAST_BYPASS;
        };
        if ep.released.is_some() || ep.viommu.in_transition() || ep.owner.is_some() {
            return 0;
        }
        let Some(io) = self.kind_of(ep) else {
            return FAST_ANY_TRANSLATED | FAST_BYPASS;
        };
        io.kind.rules().fast_word(self, io, ep)
    }

    /// The endpoint is released: nothing it does from now on is legitimate (until a kind's
    /// rules bring it back).
    fn release(&mut self, key: Key, why: String, t: u64, epoch: Option<u64>) {
        let ep = self.ep(key);
        ep.viommu.leave_all(t);
        ep.released = Some(Release { why, at: t, epoch });
    }

    /// Applies a state event.
    pub(crate) fn on_state(&mut self, ev: &StateEvent<'_>, t: u64) {
        if let (StateChange::Device(d), Some(e)) = (ev.change, ev.endpoint) {
            let key = self.marker_key(Key::of(e));
            match d {
                DeviceState::RogueDma { .. } => self.ep(key).probing = true,
                DeviceState::RogueDmaDone { .. } => self.ep(key).probing = false,
                _ => {}
            }
        }
        for rules in RULES {
            rules.on_state(self, ev, t);
        }
    }

    /// The key a marker's (or a device's own) endpoint is tracked under. Guest tools and device
    /// models name PCI functions; an SMMUv3
    /// reports a function's DMA under its StreamID, which every topology Sluice builds makes
    /// equal to the requester ID (virt's `iommu-map` is the identity over the whole bus). So a
    /// PCI function that no IOMMU declares by RID, but whose RID is a declared StreamID, is
    /// that stream: otherwise an owner window or a release marker would never meet the DMA it
    /// is about.
    fn marker_key(&self, key: Key) -> Key {
        let declared = |k: &Key| self.eps.get(k).is_some_and(|e| e.iommu.is_some());
        match key {
            Key::Pci(rid) if !declared(&key) => {
                let sid = Key::Sid(u32::from(rid));
                if declared(&sid) { sid } else { key }
            }
            other => other,
        }
    }

    /// Applies a marker line; returns how it was understood.
    pub(crate) fn on_marker(&mut self, line: &str, t: u64) -> String {
        match parse_marker(line) {
            Ok(MarkerCmd::Phase) => "phase".into(),
            Ok(MarkerCmd::Note) => "note".into(),
            Ok(MarkerCmd::OwnerUser { endpoint, ranges }) => {
                let endpoint = self.marker_key(endpoint);
                let n = ranges.len();
                self.ep(endpoint).owner = Some(Owner { ranges, since: t });
                format!("owner {endpoint} user, {n} IOVA range(s)")
            }
            Ok(MarkerCmd::OwnerKernel { endpoint }) => {
                let endpoint = self.marker_key(endpoint);
                self.ep(endpoint).owner = None;
                format!("owner {endpoint} kernel")
            }
            Ok(MarkerCmd::Release { endpoint }) => {
                let endpoint = self.marker_key(endpoint);
                self.release(endpoint, format!("marker \"{line}\""), t, None);
                format!("release {endpoint}")
            }
            Err(e) => format!("error: {e}"),
        }
    }

    /// Classifies one DMA of `key` at `t`.
    pub(crate) fn classify(&self, key: Key, rec: &DmaRecord) -> Classified {
        let empty = EpShadow::default();
        let ep = self.eps.get(&key).unwrap_or(&empty);
        let io = self.kind_of(ep);
        let what = |class: EscapeClass, why: String| Classified::escape(class, key, rec, &why);
        if let DmaOutcome::Faulted { reason } = rec.outcome {
            let zpci = matches!(key, Key::Zpci(_));
            return match &ep.released {
                // the host asked "can it reach memory?" and the IOMMU said no
                _ if ep.probing => Classified::fault(),
                _ if zpci && zpci::refused_after_release(reason) => what(
                    EscapeClass::AfterRelease,
                    "the device still issues DMA after the function was released (refused)".into(),
                ),
                Some(r) if !zpci => what(
                    EscapeClass::AfterRelease,
                    format!("released at {} ({}); refused", secs(r.at), r.why),
                ),
                _ => Classified::fault(),
            };
        }
        if let Some(r) = &ep.released {
            let before = match (r.epoch, rec.outcome) {
                (Some(e), DmaOutcome::Translated { domain, .. }) => {
                    (domain.wrapping_sub(e as u32) as i32) < 0
                }
                _ => false,
            };
            if !before {
                return what(
                    EscapeClass::AfterRelease,
                    format!("released at {} ({})", secs(r.at), r.why),
                );
            }
        }
        let verdict = match io {
            Some(io) => io.kind.rules().check(self, io, ep, rec),
            None => Ok(()),
        };
        if let Err((class, why)) = verdict {
            return what(class, why);
        }
        if let Some(o) = &ep.owner
            && reached(rec.outcome)
            && !o.ranges.is_empty()
            && !o.ranges.iter().any(|(a, b)| {
                rec.iova >= *a && rec.iova.checked_add(rec.len).is_some_and(|e| e <= *b)
            })
        {
            return what(
                EscapeClass::WrongDomain,
                format!(
                    "outside the IOVA window(s) {} a marker declared for its user owner at {}",
                    ranges_text(&o.ranges),
                    secs(o.since)
                ),
            );
        }
        Classified::ok()
    }
}

fn outcome_words(o: DmaOutcome) -> String {
    match o {
        DmaOutcome::Translated { gpa, domain } => {
            format!("translated in domain {domain} to gpa {gpa:#x}")
        }
        DmaOutcome::Bypassed => "went untranslated (bypass)".into(),
        DmaOutcome::Direct => "went untranslated (no IOMMU in the path)".into(),
        DmaOutcome::Faulted { reason } => format!("was refused (reason {reason:#x})"),
    }
}

fn ranges_text(r: &[(u64, u64)]) -> String {
    r.iter()
        .map(|(a, b)| format!("[{a:#x}, {b:#x})"))
        .collect::<Vec<_>>()
        .join(" ")
}
