//! Race injection (`docs/injection.md`): named points where a plan stalls the calling thread
//! or defers a device's completion, deterministic from a seed, every firing reported.
//!
//! - [`plan`]: the one-line CLI form and TOML, parsed into [`RuleSpec`]s;
//! - [`registry`]: which points exist in a run (models + device instances + the guest's
//!   System.map) and which can defer; [`PointRegistry::validate`] turns a [`Plan`] into a
//!   [`ValidPlan`] or a clear error;
//! - [`engine`]: [`Injector`], the [`sluice_devapi::Hooks`] implementation (stall in `point`,
//!   defer in `defer`), markers, the firing sink;
//! - [`plugin`]: [`PluginServer`], the host side of the `guest.sym.*` TCG plugin;
//! - [`delay`]: delay distributions and the per-rule PRNG.
#![forbid(unsafe_code)]

pub mod delay;
pub mod engine;
pub mod plan;
pub mod plugin;
pub mod registry;

pub use delay::{Delay, MAX_DELAY, WATCHDOG_BUDGET};
pub use engine::{Firing, FiringSink, Injector};
pub use plan::{EndpointFilter, Mode, Plan, PlanError, RULE_KEYS, RuleSpec};
pub use plugin::{GuestHit, PluginServer, find_plugin, qemu_args};
pub use registry::{ModelPoints, PointInfo, PointRegistry, Rule, SymbolMap, ValidPlan};
