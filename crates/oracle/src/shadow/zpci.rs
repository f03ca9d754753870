//! zPCI rules: an enabled function's DMA is translated; deconfigure and reserve release the
//! function (DMAs translated in an older generation predate the release); configure and
//! unreserve bring it back.

use sluice_devapi::{DmaRecord, StateChange, StateEvent, ZpciState};

use super::{
    EpShadow, FAST_ANY_TRANSLATED, FAST_BYPASS, IommuRules, IommuShadow, RuleResult, Shadow,
    untranslated,
};
use crate::timeline::EscapeClass;
use crate::topology::Key;

/// zPCI's refusal reason for a released function (`sluice_zpci::codes::reason::AFTER_RELEASE`).
pub const ZPCI_AFTER_RELEASE: u32 = 0x1000;

/// Whether a refused DMA's reason says the function had been released.
pub(super) fn refused_after_release(reason: u32) -> bool {
    reason == ZPCI_AFTER_RELEASE
}

/// A function's zPCI state.
#[derive(Debug, Clone, Default)]
pub(super) struct EpState {
    /// Enabled (CLP SET PCI FUNCTION): its DMA is translated.
    enabled: bool,
}

/// The zPCI implementation of [`IommuRules`].
pub(super) struct ZpciRules;

impl IommuRules for ZpciRules {
    fn on_state(&self, sh: &mut Shadow, ev: &StateEvent<'_>, t: u64) {
        let (StateChange::Zpci(z), Some(k @ Key::Zpci(_))) = (ev.change, ev.endpoint.map(Key::of))
        else {
            return;
        };
        match z {
            ZpciState::Configure { .. } | ZpciState::Unreserve { .. } => {
                let ep = sh.ep(k);
                ep.released = None;
                ep.zpci.enabled = false;
            }
            ZpciState::Deconfigure { epoch } | ZpciState::Reserve { epoch } => {
                let why = format!("zPCI {} (generation {epoch})", ev.change.name());
                sh.release(k, why, t, Some(epoch));
                sh.ep(k).zpci.enabled = false;
            }
            ZpciState::Enable { .. } => sh.ep(k).zpci.enabled = true,
            ZpciState::Disable { .. } => sh.ep(k).zpci.enabled = false,
            _ => {}
        }
    }

    fn fast_word(&self, _sh: &Shadow, _io: &IommuShadow, ep: &EpShadow) -> u64 {
        if ep.zpci.enabled {
            FAST_ANY_TRANSLATED
        } else {
            FAST_ANY_TRANSLATED | FAST_BYPASS
        }
    }

    fn check(&self, _sh: &Shadow, _io: &IommuShadow, ep: &EpShadow, rec: &DmaRecord) -> RuleResult {
        if untranslated(rec.outcome) && ep.zpci.enabled {
            return Err((
                EscapeClass::BypassAfterTakeover,
                "zPCI function enabled, yet DMA went untranslated".into(),
            ));
        }
        Ok(())
    }
}
