//! `harness explore`: a hunt for interleavings nobody named, in the spirit of SKI, Snowboard
//! and DataCollider. Given a base scenario (workload, module order, IOMMU, variant) it
//! chooses the points itself, runs them over a delay ladder and in pairs, groups what it sees
//! by signature, and shrinks each new finding to a small reproducible plan.
//!
//! - [`candidates`]: guest-code points from System.map by subsystem, and the run's device
//!   points;
//! - [`plan`]: the probe (which points a run reaches), the ranked trials, sharding;
//! - [`signature`]: anomalies of one run and their signatures;
//! - [`findings`]: grouping, `explore.json`, merging shards, JUnit, finding scenarios;
//! - [`minimize`]: delta debugging of a finding's plan, and its rate;
//! - [`progress`]: the live line.
//!
//! Backend-free: the CLI boots the guests.

pub mod candidates;
pub mod findings;
pub mod minimize;
pub mod plan;
pub mod progress;
pub mod signature;

pub use candidates::{Candidate, DevicePoint, Tier};
pub use findings::{ExploreReport, Finding, FindingSet, MergeError, Origin, TrialRun};
pub use minimize::{MinimizeConfig, Minimized, minimize};
pub use plan::{PlanConfig, Trial, TrialRule};
pub use signature::{Anomaly, AnomalyKind, anomalies};
