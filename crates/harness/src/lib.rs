//! The regression harness, without any backend.
//!
//! - [`scenario`]: the scenario file format (TOML) with strict validation;
//! - [`plan`]: scenarios × variants × seeds → run cases, and deterministic sharding;
//! - [`artifact`]: guest failures the guest kernel attributes to its timer not firing (host
//!   starvation under TCG), which earn a run a second attempt;
//! - [`verdict`]: what one run observed against what the scenario expects, and reproduction
//!   rates over seeds;
//! - [`junit`]: JUnit XML that any CI reads;
//! - [`sweep`]: `harness sweep`, a grid of injection points × delays × modes × seeds for one
//!   scenario, bounded by a wall-time budget;
//! - [`explore`]: `harness explore`, a hunt that picks its own points, groups anomalies by
//!   signature and minimizes each finding.
//!
//! The CLI implements [`Runner`] (boot the guest, inject, run the oracle).
#![forbid(unsafe_code)]

pub mod artifact;
pub mod explore;
pub mod junit;
pub mod plan;
pub mod scenario;
pub mod sweep;
pub mod verdict;

use std::path::Path;

pub use plan::{RunCase, Shard};
pub use scenario::{IommuKind, Scenario, ScenarioError};
pub use verdict::{CaseResult, Observation, SuiteSummary};

/// Executes one run case and reports what happened.
pub trait Runner {
    /// Runs `case`, keeping its artifacts in `dir`.
    fn run(&self, case: &RunCase, dir: &Path) -> Observation;
}
