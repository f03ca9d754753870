//! SMMUv3 rules: the guest driver takes over at SMMUEN=1; from then on a stream's DMA must be
//! allowed by the STE configuration that CFGI_STE + CMD_SYNC made effective (or by one just
//! invalidated and not yet synced). With a [`super::ConfigProbe`], a DMA allowed only by the
//! effective configuration while memory holds one that refuses it is `unsynced-config`.

use sluice_devapi::{
    DmaOutcome, DmaRecord, Endpoint, SmmuState, StateChange, StateEvent, SteConfig,
};

use super::{
    EpShadow, FAST_ANY_TRANSLATED, FAST_BYPASS, IommuKind, IommuRules, IommuShadow, RuleResult,
    Shadow, secs, untranslated,
};
use crate::timeline::EscapeClass;
use crate::topology::Key;

/// A stream's SMMUv3 state.
#[derive(Debug, Clone, Default)]
pub(super) struct EpState {
    /// STE configuration made effective by CFGI_STE + CMD_SYNC, and when.
    synced: Option<(SteConfig, u64)>,
    /// Invalidated, waiting for the CMD_SYNC (None inside: unknown configuration).
    pending: Option<Option<SteConfig>>,
}

/// Whether an STE configuration lets `o` reach memory (a refusal is always allowed).
fn permits(c: &SteConfig, o: DmaOutcome) -> bool {
    match o {
        DmaOutcome::Faulted { .. } => true,
        DmaOutcome::Bypassed | DmaOutcome::Direct => c.allows_untranslated(),
        DmaOutcome::Translated { .. } => c.allows_translated(),
    }
}

/// The SMMUv3 implementation of [`IommuRules`].
pub(super) struct SmmuRules;

impl SmmuRules {
    fn index(sh: &Shadow, source: &str) -> Option<usize> {
        sh.iommus
            .iter()
            .position(|i| matches!(&i.kind, IommuKind::Smmu { source: s } if s == source))
    }

    /// CMD_SYNC: every invalidated STE takes effect, as the event said or as memory holds it.
    fn sync(sh: &mut Shadow, t: u64) {
        let probe = sh.probe.clone();
        for (k, e) in sh.eps.iter_mut() {
            let Some(p) = e.smmu.pending.take() else {
                continue;
            };
            let config = p.or_else(|| {
                let Key::Sid(sid) = *k else { return None };
                probe
                    .as_ref()
                    .and_then(|pr| pr.config_now(Endpoint::Stream { sid, ssid: None }))
            });
            e.smmu.synced = config.map(|c| (c, t));
        }
    }
}

impl IommuRules for SmmuRules {
    fn on_state(&self, sh: &mut Shadow, ev: &StateEvent<'_>, t: u64) {
        let StateChange::Smmu(s) = ev.change else {
            return;
        };
        // A sync completes every stream's pending invalidation, whichever SMMU announced it.
        if s == SmmuState::SyncCompleted {
            Self::sync(sh, t);
            return;
        }
        let Some(i) = Self::index(sh, ev.source) else {
            return;
        };
        match (s, ev.endpoint) {
            (SmmuState::SmmuEn { enabled }, _) => {
                if let Some(io) = sh.iommus.get_mut(i) {
                    io.takeover = enabled.then_some(t);
                }
            }
            (SmmuState::CfgiSte { config }, Some(Endpoint::Stream { sid, .. })) => {
                sh.ep(Key::Sid(sid)).smmu.pending = Some(config);
            }
            (
                SmmuState::CfgiSteRange {
                    first_sid,
                    last_sid,
                    ..
                },
                Some(Endpoint::Stream { .. }),
            ) => {
                for (k, e) in sh.eps.iter_mut() {
                    if let Key::Sid(s) = k
                        && (first_sid..=last_sid).contains(s)
                        && e.iommu == Some(i)
                    {
                        e.smmu.pending = Some(None);
                    }
                }
            }
            _ => {}
        }
    }

    fn fast_word(&self, sh: &Shadow, io: &IommuShadow, ep: &EpShadow) -> u64 {
        if sh.probe.is_some() || ep.smmu.pending.is_some() {
            0
        } else if io.takeover.is_none() {
            FAST_ANY_TRANSLATED | FAST_BYPASS
        } else {
            match ep.smmu.synced {
                Some((c, _)) if c.allows_untranslated() => FAST_BYPASS,
                Some((c, _)) if c.allows_translated() => FAST_ANY_TRANSLATED,
                Some(_) => 0,
                None => FAST_ANY_TRANSLATED,
            }
        }
    }

    fn check(&self, sh: &Shadow, io: &IommuShadow, ep: &EpShadow, rec: &DmaRecord) -> RuleResult {
        let Some(took) = io.takeover else {
            return Ok(()); // SMMUEN=0: GBPA decides, before the driver took over.
        };
        if let Some(Some(p)) = ep.smmu.pending
            && permits(&p, rec.outcome)
        {
            return Ok(());
        }
        let now = sh.probe.as_ref().and_then(|p| p.config_now(rec.endpoint));
        match ep.smmu.synced {
            Some((s, at)) if permits(&s, rec.outcome) => match now {
                Some(m) if m != s && !permits(&m, rec.outcome) => Err((
                    EscapeClass::UnsyncedConfig,
                    format!(
                        "used STE config {s} made effective at {}; memory now holds {m} with no CFGI_STE + CMD_SYNC",
                        secs(at),
                    ),
                )),
                _ => Ok(()),
            },
            Some((s, at)) => match now {
                Some(m) if m != s && permits(&m, rec.outcome) => Ok(()),
                _ => Err((
                    EscapeClass::StaleConfig,
                    format!(
                        "STE config {s} was invalidated and synced at {}; it does not allow this",
                        secs(at)
                    ),
                )),
            },
            None if untranslated(rec.outcome) && !now.is_some_and(|m| permits(&m, rec.outcome)) => {
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
