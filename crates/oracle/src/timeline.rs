//! The timeline's record types (one JSON object per line of `timeline.jsonl`) and the
//! per-thread identity every record carries.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

/// Version of the `timeline.jsonl` format (in the first, `meta`, record).
pub const TIMELINE_VERSION: u32 = 1;

/// The escape classes (`docs/escape-oracle.md` has one section per class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EscapeClass {
    /// Untranslated DMA from a declared endpoint after its IOMMU's driver took control.
    BypassAfterTakeover,
    /// The translation contradicts configuration the guest had changed *and* invalidated/synced
    /// (a model bug; must never fire).
    StaleConfig,
    /// The translation used configuration the guest had changed in memory but not yet
    /// invalidated (a guest-driver bug, or a DMA inside the driver's own update window).
    UnsyncedConfig,
    /// Translated in a domain the endpoint had been moved away from, or outside the IOVA window a
    /// guest marker declared for its new owner.
    WrongDomain,
    /// DMA from an endpoint after the guest released it.
    AfterRelease,
}

impl EscapeClass {
    /// Every class, in report order.
    pub const ALL: [EscapeClass; 5] = [
        EscapeClass::BypassAfterTakeover,
        EscapeClass::StaleConfig,
        EscapeClass::UnsyncedConfig,
        EscapeClass::WrongDomain,
        EscapeClass::AfterRelease,
    ];

    /// The rule's name as written in messages and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            EscapeClass::BypassAfterTakeover => "bypass-after-takeover",
            EscapeClass::StaleConfig => "stale-config",
            EscapeClass::UnsyncedConfig => "unsynced-config",
            EscapeClass::WrongDomain => "wrong-domain",
            EscapeClass::AfterRelease => "after-release",
        }
    }

    /// Index into per-class counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for EscapeClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the oracle concluded about one DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Legitimate (translated as configured, explicit bypass, firmware-era bypass, ...).
    Ok,
    /// Refused by the IOMMU (not an escape).
    Fault,
    /// An escape; the record carries its class and message.
    Escape,
}

/// One line of `timeline.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEvent {
    /// Nanoseconds since the oracle was created (monotonic clock).
    pub t: u64,
    /// Small per-thread id (see the `thread` records for names).
    pub tid: u32,
    /// The event.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of timeline records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventKind {
    /// First record: format version and wall-clock start.
    Meta {
        /// [`TIMELINE_VERSION`].
        version: u32,
        /// Wall-clock time of `t = 0`, milliseconds since the Unix epoch.
        unix_ms: u64,
        /// Sampling period of legitimate DMAs (1 = every DMA logged).
        sample_every: u64,
    },
    /// A thread's first appearance: its name.
    Thread {
        /// Thread name (`<unnamed>` when it has none).
        name: String,
    },
    /// A model reached a named point (`Hooks::point`).
    Point {
        /// Point name.
        name: String,
        /// Endpoint concerned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Domain concerned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        domain: Option<u32>,
        /// Point-specific value.
        value: u64,
    },
    /// A state change (`Hooks::state`).
    State {
        /// Who changed.
        source: String,
        /// What happened.
        what: String,
        /// Endpoint concerned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Value.
        value: u64,
    },
    /// A DMA and its verdict. Legitimate DMAs are sampled (`sampled` = how many DMAs of this
    /// endpoint this record stands for); faults and escapes are always logged.
    Dma(DmaEvent),
    /// A guest console line.
    Console {
        /// The line, without its newline.
        line: String,
    },
    /// A guest marker line.
    Marker {
        /// The line.
        line: String,
        /// How the oracle understood it (`phase`, `owner`, `release`, `note`, or `error: ...`).
        effect: String,
    },
    /// An injected delay at a point: the bar runs from `t - dur_ns` to `t`.
    Delay {
        /// Point name.
        point: String,
        /// Endpoint concerned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Length of the stall.
        dur_ns: u64,
    },
    /// An invalidation or unmap completed (`Hooks::invalidated`).
    Invalidated {
        /// The model.
        source: String,
        /// What the guest asked for (`UNMAP`, `TLBI_NH_VA`, `CFGI_STE`, `RPCIT`, ...).
        what: String,
        /// `translation` or `config`.
        cache: String,
        /// Endpoint concerned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Contexts covered: those with `tag & context_mask == context & context_mask`.
        context: u64,
        /// See `context`.
        context_mask: u64,
        /// First address (or config slot) covered.
        first: u64,
        /// Last one, inclusive.
        last: u64,
        /// The model's cache generation at which it took effect, if it reports them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        /// The model's completion number.
        completion: u64,
    },
    /// A mapping about to become visible (`Hooks::mapped`).
    Mapped {
        /// The model.
        source: String,
        /// Context (domain).
        context: u64,
        /// First IOVA.
        first: u64,
        /// Last IOVA, inclusive.
        last: u64,
    },
    /// Last record: counters and losses.
    Summary(Box<crate::report::TimelineSummary>),
}

/// A DMA record on the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DmaEvent {
    /// Endpoint (`pci:0000:00:03.0`, `sid:0x10`, `fh:0x80020001`).
    pub endpoint: String,
    /// Address the device used.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// `read` (device reads memory) or `write`.
    pub dir: String,
    /// `translated`, `bypassed`, `faulted` or `direct`.
    pub outcome: String,
    /// Guest-physical address of the first byte (translated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpa: Option<u64>,
    /// Domain / context id (translated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<u32>,
    /// Fault reason (faulted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<u32>,
    /// The oracle's verdict.
    pub verdict: Verdict,
    /// Escape class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<EscapeClass>,
    /// Escape explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For sampled legitimate DMAs: the sampling period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled: Option<u64>,
    /// For `stale-config` escapes: the invalidation the DMA contradicts (also when it is older
    /// than the events kept before the escape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Box<TimelineEvent>>,
}

static NEXT_TID: AtomicU32 = AtomicU32::new(1);

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
    static SEEN_BY: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// This thread's small id, and whether oracle `oracle_id` sees this thread for the first time
/// (so the caller logs its name).
pub(crate) fn thread_id(oracle_id: u64) -> (u32, bool) {
    let tid = TID.with(|c| {
        let v = c.get();
        if v != 0 {
            return v;
        }
        let v = NEXT_TID.fetch_add(1, Ordering::Relaxed);
        c.set(v);
        v
    });
    let first = SEEN_BY.with(|s| {
        let mut s = s.borrow_mut();
        if s.contains(&oracle_id) {
            false
        } else {
            // Bounded: a long-lived thread that sees many oracles (tests) forgets old ones.
            if s.len() >= 16 {
                s.remove(0);
            }
            s.push(oracle_id);
            true
        }
    });
    (tid, first)
}

/// This thread's name for the `thread` record.
pub(crate) fn thread_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string()
}
