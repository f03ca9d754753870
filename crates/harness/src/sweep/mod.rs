//! `harness sweep`: explore injection points × delays × modes (where the point allows) ×
//! seeds for one scenario, in the spirit of SKI and Snowboard, within a wall-time budget.
//!
//! - [`spec`]: the scenario's optional `[sweep]` table and the command-line overrides,
//!   resolved into a [`SweepConfig`];
//! - [`grid`]: cells (one injection rule each, plus a baseline without it), the rules of each
//!   cell's runs, and the launch order (seed by seed, so a truncated sweep covers the grid);
//! - [`drive`]: running the order within the budget, with an injected clock;
//! - [`judge`]: signals per run (escapes, forbidden console patterns), rates per cell and
//!   variant, how the sweep ended;
//! - [`report`]: the table and JUnit.
//!
//! Backend-free like the rest of the crate: the CLI supplies the [`crate::Runner`] and tells
//! [`grid::expand_grid`] which points exist and which can defer.

pub mod drive;
pub mod grid;
pub mod judge;
pub mod report;
pub mod spec;

pub use drive::{Clock, Driven, WallClock, drive};
pub use grid::{Cell, Grid, SweepCase, expand_grid, order_runs};
pub use judge::{EXIT_JUDGEMENT_FAILED, SweepEnd, SweepReport};
pub use spec::{SweepConfig, SweepError, SweepMode, SweepSpec};
