//! The DMA escape oracle and the event timeline (`docs/escape-oracle.md`).
//!
//! [`Oracle`] implements `sluice_devapi::Hooks`. Composed with the run's other hooks through
//! `Fanout`, it sees every DMA of every endpoint behind an emulated IOMMU (the translation seam
//! reports each access), every IOMMU state change and every named point. From the state events it
//! keeps a shadow of each endpoint's IOMMU state (attached domain, pending ATTACH/DETACH, release,
//! synced STE, owner window) and of each IOMMU's takeover, and classifies every DMA:
//!
//! - legitimate DMAs take a lock-free fast path (one atomic load and two relaxed increments) and
//!   are sampled into the timeline;
//! - faults and escapes take the slow path, which applies the four rules and logs them in full;
//! - the models' cache-provenance reports (completed invalidations, new mappings, the cached
//!   entries a DMA used, re-derivations) feed the mapping-level `stale-config` and the
//!   re-derivation `unsynced-config` checks.
//!
//! Module map:
//! - [`topology`]: which endpoints firmware declares behind which IOMMU;
//! - `shadow`: the shadow state and the rules common to every IOMMU; `shadow::{virtio, smmu,
//!   zpci}`: each kind's rules, behind one `IommuRules` trait;
//! - `stale`: the invalidated IOVA ranges per IOMMU context, bounded, and the stale-use tests;
//! - [`marker`]: guest marker lines;
//! - [`timeline`]: record types of `timeline.jsonl`;
//! - `oracle`: the `Hooks` implementation, the bounded queue and its writer (`oracle::provenance`:
//!   its cache-provenance side);
//! - [`report`]: what `finish` returns (serde, embedded in `sluice run --report`);
//! - [`render`]: `sluice report RUN_DIR` (table + SVG timelines).
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod marker;
mod oracle;
pub mod render;
pub mod report;
mod shadow;
mod stale;
pub mod timeline;
pub mod topology;

pub use oracle::{
    CONSOLE_MARKER_PREFIX, DEFAULT_RECHECK_EVERY, Oracle, OracleConfig, OracleError, TIMELINE_FILE,
};
pub use render::{RenderError, render_report};
pub use report::{ClassCounts, EndpointReport, EscapeReport, OracleReport, TimelineSummary};
pub use shadow::{ConfigProbe, ZPCI_AFTER_RELEASE};
pub use timeline::{EscapeClass, EventKind, TimelineEvent, Verdict};
pub use topology::{IommuTopo, Key, Topology};
