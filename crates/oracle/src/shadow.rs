//! The oracle's shadow of IOMMU state, built from state events, points and markers, and the four
//! rules that classify a DMA against it (`docs/escape-oracle.md`).

use std::collections::HashMap;
use std::sync::Arc;

use sluice_devapi::{Bdf, DmaOutcome, DmaRecord, Endpoint, PointCtx, StateEvent, probe_state};

use crate::marker::{MarkerCmd, parse_marker};
use crate::timeline::{EscapeClass, Verdict};
use crate::topology::{IommuTopo, Key, Topology};

/// Reads an endpoint's configuration as guest memory holds it *now*, for `unsynced-config`.
///
/// The value uses the encoding of the model's sync state event: for SMMUv3 the `cfgi_ste` value,
/// STE word 0 bits 3:0 (`V | Config << 1`). `None`: unknown.
pub trait ConfigProbe: Send + Sync {
    /// Current in-memory configuration of `endpoint`.
    fn config_now(&self, endpoint: Endpoint) -> Option<u64>;
}

/// zPCI's refusal reason for a released function (`sluice_zpci::codes::reason::AFTER_RELEASE`).
pub const ZPCI_AFTER_RELEASE: u32 = 0x1000;

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

#[derive(Debug, Clone)]
enum IommuKind {
    Virtio { bdf: u16 },
    Smmu { source: String },
    Zpci,
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
            IommuKind::Virtio { bdf } => format!("virtio-iommu {}", Bdf(*bdf)),
            IommuKind::Smmu { source } => format!("SMMUv3 {source}"),
            IommuKind::Zpci => "zPCI".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attach {
    domain: u32,
    bypass: bool,
    since: u64,
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

/// One endpoint's shadow.
#[derive(Debug, Clone, Default)]
struct EpShadow {
    iommu: Option<usize>,
    attached: Option<Attach>,
    /// virtio-iommu: an ATTACH (Some) or DETACH (None) applied but not yet completed.
    pending: Option<Option<Attach>>,
    /// Domains the endpoint left, with when.
    left: Vec<(u32, u64)>,
    released: Option<Release>,
    owner: Option<Owner>,
    /// SMMU: STE config (cfgi_ste value) made effective by CFGI + CMD_SYNC, and when.
    ste_synced: Option<(u64, u64)>,
    /// SMMU: invalidated, waiting for the CMD_SYNC (None inside = unknown value).
    ste_pending: Option<Option<u64>>,
    /// zPCI: enabled.
    enabled: bool,
    /// A host-armed probe DMA of this endpoint is in progress (`probe_state`): its refusals are
    /// answers, not device-side symptoms.
    probing: bool,
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

/// Whether an SMMU STE config value (`V | Config << 1`) lets `o` reach memory.
fn ste_permits(v: u64, o: DmaOutcome) -> bool {
    let cfg = (v >> 1) & 7;
    match o {
        DmaOutcome::Faulted { .. } => true,
        _ if v & 1 == 0 || cfg < 4 => false,
        DmaOutcome::Bypassed | DmaOutcome::Direct => cfg == 4,
        DmaOutcome::Translated { .. } => cfg >= 5,
    }
}

fn ste_name(v: u64) -> String {
    let cfg = (v >> 1) & 7;
    let what = match cfg {
        _ if v & 1 == 0 => "invalid",
        0..=3 => "abort",
        4 => "bypass",
        5 => "stage-1",
        6 => "stage-2",
        _ => "nested",
    };
    format!("{what} ({v:#x})")
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
        if ep.released.is_some() || ep.pending.is_some() || ep.owner.is_some() {
            return 0;
        }
        let Some(io) = self.kind_of(ep) else {
            return FAST_ANY_TRANSLATED | FAST_BYPASS;
        };
        match &io.kind {
            IommuKind::Virtio { .. } => match ep.attached {
                Some(a) if a.bypass => FAST_BYPASS,
                Some(a) => FAST_DOMAIN | u64::from(a.domain),
                None if io.takeover.is_none() => FAST_BYPASS,
                None => 0,
            },
            IommuKind::Smmu { .. } => {
                if self.probe.is_some() || ep.ste_pending.is_some() {
                    0
                } else if io.takeover.is_none() {
                    FAST_ANY_TRANSLATED | FAST_BYPASS
                } else {
                    match ep.ste_synced {
                        Some((v, _)) if ste_permits(v, DmaOutcome::Bypassed) => FAST_BYPASS,
                        Some((v, _)) if ste_permits(v, DmaOutcome::Direct) => FAST_BYPASS,
                        Some((v, _)) if (v >> 1) & 7 >= 5 && v & 1 == 1 => FAST_ANY_TRANSLATED,
                        Some(_) => 0,
                        None => FAST_ANY_TRANSLATED,
                    }
                }
            }
            IommuKind::Zpci => {
                if ep.enabled {
                    FAST_ANY_TRANSLATED
                } else {
                    FAST_ANY_TRANSLATED | FAST_BYPASS
                }
            }
        }
    }

    fn iommu_index_by_virtio_bdf(&self, bdf: u16) -> Option<usize> {
        self.iommus
            .iter()
            .position(|i| matches!(i.kind, IommuKind::Virtio { bdf: b } if b == bdf))
    }

    fn smmu_index(&self, source: &str) -> Option<usize> {
        self.iommus
            .iter()
            .position(|i| matches!(&i.kind, IommuKind::Smmu { source: s } if s == source))
    }

    fn release(&mut self, key: Key, why: String, t: u64, epoch: Option<u64>) {
        let ep = self.ep(key);
        if let Some(a) = ep.attached.take() {
            ep.left.push((a.domain, t));
        }
        ep.pending = None;
        ep.released = Some(Release { why, at: t, epoch });
    }

    /// Applies a state event.
    pub(crate) fn on_state(&mut self, ev: &StateEvent<'_>, t: u64) {
        let key = ev.endpoint.map(Key::of);
        match (ev.what, key) {
            ("attach-begin", Some(k)) => {
                let a = Attach {
                    domain: ev.value as u32,
                    bypass: ev.value >> 32 & 1 == 1,
                    since: t,
                };
                self.ep(k).pending = Some(Some(a));
            }
            ("detach-begin", Some(k)) => self.ep(k).pending = Some(None),
            ("attach", Some(k)) => {
                let ep = self.ep(k);
                let bypass = match ep.pending {
                    Some(Some(a)) if a.domain == ev.value as u32 => a.bypass,
                    _ => false,
                };
                if let Some(old) = ep.attached
                    && old.domain != ev.value as u32
                {
                    ep.left.push((old.domain, t));
                }
                ep.left.retain(|(d, _)| *d != ev.value as u32);
                if ep.left.len() > 32 {
                    ep.left.remove(0);
                }
                ep.attached = Some(Attach {
                    domain: ev.value as u32,
                    bypass,
                    since: t,
                });
                ep.pending = None;
                ep.released = None;
            }
            ("detach", Some(k)) => {
                self.release(
                    k,
                    format!("DETACH from domain {} completed", ev.value),
                    t,
                    None,
                );
            }
            ("driver-ok", Some(Key::Pci(b))) => {
                if let Some(i) = self.iommu_index_by_virtio_bdf(b)
                    && ev.value == 1
                    && let Some(io) = self.iommus.get_mut(i)
                {
                    io.takeover = Some(t);
                }
            }
            ("reset", Some(Key::Pci(b))) => self.virtio_iommu_reset(b, t),
            (probe_state::BEGIN, Some(k)) => self.ep(k).probing = true,
            (probe_state::END, Some(k)) => self.ep(k).probing = false,
            ("removed" | "release", Some(k)) => {
                self.release(
                    k,
                    format!("{} {} by {}", ev.what, ev.value, ev.source),
                    t,
                    None,
                );
            }
            _ => self.on_model_state(ev, key, t),
        }
    }

    fn virtio_iommu_reset(&mut self, bdf: u16, t: u64) {
        let Some(i) = self.iommu_index_by_virtio_bdf(bdf) else {
            return;
        };
        let was = self.iommus.get_mut(i).and_then(|io| io.takeover.take());
        let attached: Vec<Key> = self
            .eps
            .iter()
            .filter(|(_, e)| e.iommu == Some(i) && e.attached.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in attached {
            if was.is_some() {
                self.release(k, "virtio-iommu device reset".into(), t, None);
            } else {
                self.ep(k).attached = None;
            }
        }
    }

    fn on_model_state(&mut self, ev: &StateEvent<'_>, key: Option<Key>, t: u64) {
        if let Some(i) = self.smmu_index(ev.source) {
            self.on_smmu_state(i, ev, t);
            return;
        }
        let Some(k @ Key::Zpci(_)) = key else {
            return;
        };
        match ev.what {
            "configure" | "unreserve" => {
                let ep = self.ep(k);
                ep.released = None;
                ep.enabled = false;
            }
            "deconfigure" | "reserve" => {
                let why = format!("zPCI {} (generation {})", ev.what, ev.value);
                self.release(k, why, t, Some(ev.value));
                self.ep(k).enabled = false;
            }
            "enable" => self.ep(k).enabled = true,
            "disable" => self.ep(k).enabled = false,
            _ => {}
        }
    }

    fn on_smmu_state(&mut self, i: usize, ev: &StateEvent<'_>, t: u64) {
        match (ev.what, ev.endpoint) {
            ("smmuen", _) => {
                if let Some(io) = self.iommus.get_mut(i) {
                    io.takeover = (ev.value != 0).then_some(t);
                }
            }
            ("cfgi_ste", Some(Endpoint::Stream { sid, .. })) => {
                self.ep(Key::Sid(sid)).ste_pending = Some(Some(ev.value));
            }
            ("cfgi_ste_range", Some(Endpoint::Stream { sid, .. })) => {
                let mask = if ev.value >= 31 {
                    u32::MAX
                } else {
                    (1u32 << (ev.value + 1)) - 1
                };
                let (lo, hi) = (sid & !mask, sid | mask);
                for (k, e) in self.eps.iter_mut() {
                    if let Key::Sid(s) = k
                        && (lo..=hi).contains(s)
                        && e.iommu == Some(i)
                    {
                        e.ste_pending = Some(None);
                    }
                }
            }
            _ => {}
        }
    }

    /// Applies a point (request completions, CMD_SYNC).
    pub(crate) fn on_point(&mut self, ctx: &PointCtx<'_>, t: u64) {
        match ctx.point {
            "virtio-iommu.req.attach" | "virtio-iommu.req.detach" => {
                if let Some(e) = ctx.endpoint {
                    self.ep(Key::of(e)).pending = None;
                }
            }
            "smmuv3.cmd.CMD_SYNC" => {
                let probe = self.probe.clone();
                for (k, e) in self.eps.iter_mut() {
                    let Some(p) = e.ste_pending.take() else {
                        continue;
                    };
                    let value = p.or_else(|| {
                        let Key::Sid(sid) = *k else { return None };
                        probe
                            .as_ref()
                            .and_then(|pr| pr.config_now(Endpoint::Stream { sid, ssid: None }))
                    });
                    e.ste_synced = value.map(|v| (v, t));
                }
            }
            _ => {}
        }
    }

    /// Applies a marker line; returns how it was understood.
    pub(crate) fn on_marker(&mut self, line: &str, t: u64) -> String {
        match parse_marker(line) {
            Ok(MarkerCmd::Phase) => "phase".into(),
            Ok(MarkerCmd::Note) => "note".into(),
            Ok(MarkerCmd::OwnerUser { endpoint, ranges }) => {
                let n = ranges.len();
                self.ep(endpoint).owner = Some(Owner { ranges, since: t });
                format!("owner {endpoint} user, {n} IOVA range(s)")
            }
            Ok(MarkerCmd::OwnerKernel { endpoint }) => {
                self.ep(endpoint).owner = None;
                format!("owner {endpoint} kernel")
            }
            Ok(MarkerCmd::Release { endpoint }) => {
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
                _ if zpci && reason == ZPCI_AFTER_RELEASE => what(
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
        let verdict = match io.map(|i| &i.kind) {
            Some(IommuKind::Virtio { .. }) => self.virtio_rules(ep, io, rec),
            Some(IommuKind::Smmu { .. }) => self.smmu_rules(ep, io, rec),
            Some(IommuKind::Zpci) if untranslated(rec.outcome) && ep.enabled => Err((
                EscapeClass::BypassAfterTakeover,
                "zPCI function enabled, yet DMA went untranslated".into(),
            )),
            _ => Ok(()),
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

    fn virtio_rules(
        &self,
        ep: &EpShadow,
        io: Option<&IommuShadow>,
        rec: &DmaRecord,
    ) -> Result<(), (EscapeClass, String)> {
        // An ATTACH/DETACH in progress: its new context is already legitimate.
        if let Some(next) = ep.pending {
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
        let left = |d: u32| ep.left.iter().rev().find(|(x, _)| *x == d).map(|(_, t)| *t);
        match (ep.attached, rec.outcome) {
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
            (None, _) => match io.and_then(|i| i.takeover.map(|t| (i, t))) {
                Some((i, t)) => Err((
                    EscapeClass::BypassAfterTakeover,
                    format!(
                        "{} took over (DRIVER_OK) at {} and the endpoint {}",
                        i.describe(),
                        secs(t),
                        if ep.left.is_empty() {
                            "was never attached".to_string()
                        } else {
                            "is not attached".to_string()
                        }
                    ),
                )),
                None => Ok(()),
            },
        }
    }

    fn smmu_rules(
        &self,
        ep: &EpShadow,
        io: Option<&IommuShadow>,
        rec: &DmaRecord,
    ) -> Result<(), (EscapeClass, String)> {
        let Some((io, took)) = io.and_then(|i| i.takeover.map(|t| (i, t))) else {
            return Ok(()); // SMMUEN=0: GBPA decides, before the driver took over.
        };
        if let Some(Some(p)) = ep.ste_pending
            && ste_permits(p, rec.outcome)
        {
            return Ok(());
        }
        let now = self.probe.as_ref().and_then(|p| p.config_now(rec.endpoint));
        match ep.ste_synced {
            Some((s, at)) if ste_permits(s, rec.outcome) => match now {
                Some(m) if m != s && !ste_permits(m, rec.outcome) => Err((
                    EscapeClass::UnsyncedConfig,
                    format!(
                        "used STE config {} made effective at {}; memory now holds {} with no CFGI_STE + CMD_SYNC",
                        ste_name(s),
                        secs(at),
                        ste_name(m)
                    ),
                )),
                _ => Ok(()),
            },
            Some((s, at)) => match now {
                Some(m) if m != s && ste_permits(m, rec.outcome) => Ok(()),
                _ => Err((
                    EscapeClass::StaleConfig,
                    format!(
                        "STE config {} was invalidated and synced at {}; it does not allow this",
                        ste_name(s),
                        secs(at)
                    ),
                )),
            },
            None if untranslated(rec.outcome)
                && !now.is_some_and(|m| ste_permits(m, rec.outcome)) =>
            {
                Err((
                    EscapeClass::BypassAfterTakeover,
                    format!(
                        "{} enabled (SMMUEN=1) at {} and no STE of this stream allows bypass",
                        io.describe(),
                        secs(took)
                    ),
                ))
            }
            None => Ok(()),
        }
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
