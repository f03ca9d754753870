//! What a run's oracle hands back: escapes in full, per-endpoint counters, timeline losses.

use serde::{Deserialize, Serialize};

use crate::timeline::{EscapeClass, TimelineEvent};

/// Escape counts by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClassCounts {
    /// `bypass-after-takeover`.
    pub bypass_after_takeover: u64,
    /// `stale-config`.
    pub stale_config: u64,
    /// `unsynced-config`.
    pub unsynced_config: u64,
    /// `wrong-domain`.
    pub wrong_domain: u64,
    /// `after-release`.
    pub after_release: u64,
}

impl ClassCounts {
    /// From counters indexed by [`EscapeClass::index`].
    pub fn from_array(a: [u64; 5]) -> Self {
        let [
            bypass_after_takeover,
            stale_config,
            unsynced_config,
            wrong_domain,
            after_release,
        ] = a;
        ClassCounts {
            bypass_after_takeover,
            stale_config,
            unsynced_config,
            wrong_domain,
            after_release,
        }
    }

    /// The count of `class`.
    pub fn get(&self, class: EscapeClass) -> u64 {
        match class {
            EscapeClass::BypassAfterTakeover => self.bypass_after_takeover,
            EscapeClass::StaleConfig => self.stale_config,
            EscapeClass::UnsyncedConfig => self.unsynced_config,
            EscapeClass::WrongDomain => self.wrong_domain,
            EscapeClass::AfterRelease => self.after_release,
        }
    }

    /// Sum over classes.
    pub fn total(&self) -> u64 {
        EscapeClass::ALL.iter().map(|c| self.get(*c)).sum()
    }
}

/// Counters of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointReport {
    /// Endpoint (`pci:0000:00:03.0`, `sid:0x10`, `zpci:0x0001`).
    pub endpoint: String,
    /// The IOMMU firmware declares it behind (`virtio-iommu 0000:00:02.0`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<String>,
    /// DMAs translated.
    pub translated: u64,
    /// DMAs that went untranslated (bypass or no IOMMU in the path).
    pub bypassed: u64,
    /// DMAs refused.
    pub faulted: u64,
    /// Escapes by class.
    pub escapes: ClassCounts,
}

/// One escape, as `sluice run --report` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscapeReport {
    /// The rule.
    pub class: EscapeClass,
    /// Endpoint.
    pub endpoint: String,
    /// Address the device used.
    pub iova: u64,
    /// Guest-physical address reached (translated: the mapping's; bypassed: the IOVA itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpa: Option<u64>,
    /// Length.
    pub len: u64,
    /// `read` or `write` (from the device's side).
    pub direction: String,
    /// `translated`, `bypassed`, `faulted` or `direct`.
    pub outcome: String,
    /// Whether the access reached guest memory (false: the IOMMU refused it, but the endpoint
    /// should not have issued it).
    pub reached_memory: bool,
    /// Nanoseconds since run start.
    pub t_ns: u64,
    /// Thread that reported it.
    pub thread: String,
    /// The rule, endpoint, address and reason in one sentence.
    pub message: String,
    /// The events logged just before it (oldest first).
    pub preceding: Vec<TimelineEvent>,
}

/// Timeline bookkeeping (also the last line of `timeline.jsonl`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineSummary {
    /// Records written.
    pub events: u64,
    /// Records lost because the buffer was full (the hot path never waits).
    pub dropped: u64,
    /// Legitimate DMAs not logged one by one (counted only).
    pub unsampled_dmas: u64,
    /// High-frequency point arrivals (doorbells, completions, MAP/UNMAP) not written.
    #[serde(default)]
    pub unsampled_points: u64,
    /// Sampling period of legitimate DMAs.
    pub sample_every: u64,
    /// Per-endpoint counters at the end of the run.
    pub endpoints: Vec<EndpointReport>,
    /// Escapes over all endpoints.
    pub escape_count: u64,
    /// Invalidated ranges (`stale-config`) evicted or never kept for lack of room: the rule
    /// could not look at them.
    #[serde(default)]
    pub stale_ranges_dropped: u64,
}

/// What [`crate::Oracle::finish`] returns; the lead embeds `escapes` and `endpoints` in the
/// run's `--report` JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OracleReport {
    /// Escapes in full (the first `OracleConfig::max_escape_reports`), in time order.
    pub escapes: Vec<EscapeReport>,
    /// Escapes over all endpoints, including those not listed in full.
    pub escape_count: u64,
    /// Per-endpoint counters, sorted by endpoint.
    pub endpoints: Vec<EndpointReport>,
    /// Timeline bookkeeping.
    pub timeline: TimelineSummary,
    /// Where the timeline was written.
    pub timeline_path: Option<std::path::PathBuf>,
}
