//! The sweep grid: points × delays × modes (where the point allows) × arrivals, one injection
//! rule per cell, and the order runs are launched in.

use std::sync::Arc;

use serde::Serialize;

use crate::plan::RunCase;
use crate::scenario::Scenario;
use crate::sweep::spec::{SweepConfig, SweepError, SweepMode, is_baseline_delay};

/// One combination of the grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// Position in display order (0-based).
    pub index: usize,
    /// Directory-safe name, unique in the sweep: `c03-virtio-iommu.req.attach@100ms-defer`.
    pub label: String,
    /// Point; `None` for the baseline cell (the scenario without a sweep rule).
    pub point: Option<String>,
    /// Delay as written; `None` for the baseline.
    pub delay: Option<String>,
    /// Mode; `None` for the baseline.
    pub mode: Option<SweepMode>,
    /// Arrival the rule fires at (`nth=`), when the grid sweeps arrivals.
    pub nth: Option<u32>,
    /// The cell's rule in the one-line injection form; `None` for the baseline.
    pub rule: Option<String>,
    /// Where the cell sits within one seed's round (see [`order_runs`]).
    #[serde(skip)]
    round_rank: (usize, usize, usize, usize),
}

impl Cell {
    /// `point @ delay mode` for tables; `baseline` for the baseline cell.
    pub fn describe(&self) -> String {
        match (&self.point, &self.delay, &self.mode) {
            (Some(p), Some(d), Some(m)) => {
                let nth = self.nth.map(|n| format!(" nth={n}")).unwrap_or_default();
                format!("{p} @ {d} {m}{nth}")
            }
            _ => "baseline (no sweep rule)".into(),
        }
    }
}

/// The grid's cells, and the combinations left out because the point cannot take the mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grid {
    /// Cells in display order: the baseline first, then point by point.
    pub cells: Vec<Cell>,
    /// "virtio.blk0.notify: defer not applicable (the point can only stall)", ...
    pub not_applicable: Vec<String>,
}

/// Expands `config` into cells. `can_defer` asks the injection layer about a point: `Ok(true)`
/// if it can defer, `Ok(false)` if it can only stall, `Err(why)` if it does not exist.
pub fn expand_grid(
    config: &SweepConfig,
    can_defer: &dyn Fn(&str) -> Result<bool, String>,
) -> Result<Grid, SweepError> {
    let mut cells = Vec::new();
    let mut not_applicable = Vec::new();
    if config.delays.iter().any(|d| is_baseline_delay(d)) {
        cells.push(Cell {
            index: 0,
            label: String::new(),
            point: None,
            delay: None,
            mode: None,
            nth: None,
            rule: None,
            round_rank: (0, 0, 0, 0),
        });
    }
    let arrivals: Vec<Option<u32>> = if config.nth.is_empty() {
        vec![None]
    } else {
        config.nth.iter().copied().map(Some).collect()
    };
    for (point_rank, point) in config.points.iter().enumerate() {
        let defer_ok = can_defer(point).map_err(|why| SweepError::UnknownPoint {
            point: point.clone(),
            why,
        })?;
        let modes: Vec<(usize, SweepMode)> = config
            .modes
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, m)| *m == SweepMode::Stall || defer_ok)
            .collect();
        if modes.is_empty() {
            return Err(SweepError::NoApplicableMode {
                point: point.clone(),
                requested: join(&config.modes),
            });
        }
        if !defer_ok && config.modes.contains(&SweepMode::Defer) {
            not_applicable.push(format!(
                "{point}: defer not applicable (the point can only stall)"
            ));
        }
        // Baseline delays are the baseline cell above, not one cell per point.
        let delays = config
            .delays
            .iter()
            .enumerate()
            .filter(|(_, d)| !is_baseline_delay(d));
        for (delay_rank, delay) in delays {
            for &(mode_rank, mode) in &modes {
                for (nth_rank, nth) in arrivals.iter().enumerate() {
                    let rule = rule_text(point, delay, mode, *nth, config);
                    cells.push(Cell {
                        index: 0,
                        label: String::new(),
                        point: Some(point.clone()),
                        delay: Some(delay.clone()),
                        mode: Some(mode),
                        nth: *nth,
                        rule: Some(rule),
                        // +1: the baseline (rank 0) opens every round.
                        round_rank: (delay_rank + 1, point_rank, mode_rank, nth_rank),
                    });
                }
            }
        }
    }
    let width = cells.len().to_string().len().max(2);
    for (i, c) in cells.iter_mut().enumerate() {
        c.index = i;
        c.label = format!("c{:0width$}-{}", i + 1, label_body(c));
    }
    Ok(Grid {
        cells,
        not_applicable,
    })
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(", ")
}

/// `POINT:delay=D,mode=M,count=C[,extra]` or `...,nth=N[,extra]`.
fn rule_text(
    point: &str,
    delay: &str,
    mode: SweepMode,
    nth: Option<u32>,
    config: &SweepConfig,
) -> String {
    let limit = match nth {
        Some(n) => format!("nth={n}"),
        None => format!("count={}", config.count),
    };
    let extra = config.rule_options.trim();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(",{extra}")
    };
    format!("{point}:delay={},mode={mode},{limit}{extra}", delay.trim())
}

/// Keeps letters, digits and `._+@-`: the label names a directory.
fn label_body(c: &Cell) -> String {
    let raw = match (&c.point, &c.delay, &c.mode) {
        (Some(p), Some(d), Some(m)) => {
            let nth = c.nth.map(|n| format!("-n{n}")).unwrap_or_default();
            format!("{p}@{d}-{m}{nth}")
        }
        _ => "baseline".into(),
    };
    raw.chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || "._+@-".contains(ch) {
                ch
            } else {
                '_'
            }
        })
        .collect()
}

/// The point a one-line rule applies to (the text before the first `:`).
fn rule_point(rule: &str) -> &str {
    rule.split_once(':').map_or(rule, |(p, _)| p).trim()
}

/// The injection rules of a run of `cell`: the scenario's rules, except those on the swept
/// point (two rules on one point would fire together and the longest delay would win, so the
/// cell would not be measuring its own delay) or all of them with `replace`; then the cell's.
pub fn cell_rules(scenario_rules: &[String], cell: &Cell, replace: bool) -> Vec<String> {
    let mut rules: Vec<String> = if replace {
        Vec::new()
    } else {
        scenario_rules
            .iter()
            .filter(|r| Some(rule_point(r)) != cell.point.as_deref())
            .cloned()
            .collect()
    };
    rules.extend(cell.rule.clone());
    rules
}

/// One run of a sweep: its cell and the case the runner executes (its scenario carries the
/// cell's rules, its id names the cell).
#[derive(Debug, Clone)]
pub struct SweepCase {
    /// Index into [`Grid::cells`].
    pub cell: usize,
    /// The run.
    pub case: RunCase,
}

/// Every run of the sweep, in launch order. Seed by seed: round `k` runs every cell once
/// with seed `k` before any cell gets seed `k + 1`, so a sweep cut short by its budget still
/// covers the whole grid at the seeds it reached. Within a round, the baseline comes first
/// (the control), then delay by delay in the order given, every point at each delay, then
/// modes and arrivals; every variant of a cell runs back to back, in the order given.
/// The per-run seed is the round number, so the same arguments give the same runs.
pub fn order_runs(
    scenario: &Scenario,
    grid: &Grid,
    config: &SweepConfig,
    variants: &[String],
) -> Vec<SweepCase> {
    let cell_scenarios: Vec<Arc<Scenario>> = grid
        .cells
        .iter()
        .map(|cell| {
            let mut s = scenario.clone();
            s.inject.rules = cell_rules(&scenario.inject.rules, cell, config.replace);
            Arc::new(s)
        })
        .collect();
    let mut round: Vec<&Cell> = grid.cells.iter().collect();
    round.sort_by_key(|c| (c.round_rank, c.index));
    let mut runs = Vec::new();
    for seed in 1..=config.seeds {
        for cell in &round {
            for variant in variants {
                runs.push(SweepCase {
                    cell: cell.index,
                    case: RunCase {
                        scenario: cell_scenarios[cell.index].clone(),
                        variant: variant.clone(),
                        seed,
                        cell: Some(cell.label.clone()),
                    },
                });
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::spec::SweepSpec;
    use std::path::Path;

    fn config(points: &[&str], delays: &[&str], modes: &[SweepMode], seeds: u32) -> SweepConfig {
        SweepConfig::resolve(
            None,
            &SweepSpec {
                points: Some(points.iter().map(|s| s.to_string()).collect()),
                delays: Some(delays.iter().map(|s| s.to_string()).collect()),
                modes: Some(modes.to_vec()),
                seeds: Some(seeds),
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// Points named `*.attach` can defer; `guest.sym.*` and the rest can only stall; `nope`
    /// does not exist.
    fn catalog(point: &str) -> Result<bool, String> {
        match point {
            "nope" => Err("unknown point `nope`; valid points: ...".into()),
            p => Ok(p.ends_with(".attach")),
        }
    }

    fn scenario(rules: &[&str]) -> Scenario {
        let mut text = String::from("name = \"race\"\nvariants = [\"fixed\", \"unfixed\"]\n");
        text += &format!(
            "[inject]\nrules = [{}]\n",
            rules
                .iter()
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Scenario::parse(Path::new("t"), &text, &|_| true).unwrap()
    }

    const BOTH: &[SweepMode] = &[SweepMode::Stall, SweepMode::Defer];

    #[test]
    fn cells_are_baseline_then_point_by_point() {
        let c = config(
            &["guest.sym.bus_iommu_probe", "virtio-iommu.req.attach"],
            &["0ms", "100ms", "300ms"],
            BOTH,
            2,
        );
        let g = expand_grid(&c, &catalog).unwrap();
        let labels: Vec<&str> = g.cells.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "c01-baseline",
                "c02-guest.sym.bus_iommu_probe@100ms-stall",
                "c03-guest.sym.bus_iommu_probe@300ms-stall",
                "c04-virtio-iommu.req.attach@100ms-stall",
                "c05-virtio-iommu.req.attach@100ms-defer",
                "c06-virtio-iommu.req.attach@300ms-stall",
                "c07-virtio-iommu.req.attach@300ms-defer",
            ]
        );
        assert_eq!(
            g.not_applicable,
            ["guest.sym.bus_iommu_probe: defer not applicable (the point can only stall)"]
        );
        assert_eq!(
            g.cells[4].rule.as_deref(),
            Some("virtio-iommu.req.attach:delay=100ms,mode=defer,count=1")
        );
        assert_eq!(g.cells[0].rule, None);
    }

    #[test]
    fn arrivals_options_and_labels() {
        let mut c = config(
            &["a.attach"],
            &["uniform(1ms..5ms)"],
            &[SweepMode::Defer],
            1,
        );
        c.nth = vec![1, 2];
        c.rule_options = "after=SLUICE: insmod virtio_iommu".into();
        let g = expand_grid(&c, &catalog).unwrap();
        assert_eq!(g.cells.len(), 2, "no baseline delay, no baseline cell");
        assert_eq!(g.cells[1].label, "c02-a.attach@uniform_1ms..5ms_-defer-n2");
        assert_eq!(
            g.cells[1].rule.as_deref(),
            Some(
                "a.attach:delay=uniform(1ms..5ms),mode=defer,nth=2,after=SLUICE: insmod virtio_iommu"
            )
        );
        assert_eq!(
            g.cells[1].describe(),
            "a.attach @ uniform(1ms..5ms) defer nth=2"
        );
    }

    #[test]
    fn unknown_points_and_impossible_modes_are_errors() {
        let c = config(&["nope"], &["1ms"], BOTH, 1);
        let e = expand_grid(&c, &catalog).unwrap_err();
        assert!(matches!(e, SweepError::UnknownPoint { .. }), "{e}");
        assert!(e.to_string().contains("valid points"));
        let c = config(&["guest.sym.x"], &["1ms"], &[SweepMode::Defer], 1);
        let e = expand_grid(&c, &catalog).unwrap_err().to_string();
        assert!(
            e.contains("supports none of the requested modes (defer)"),
            "{e}"
        );
    }

    #[test]
    fn launch_order_is_round_robin_by_seed_and_deterministic() {
        let s = scenario(&[]);
        let c = config(&["p.attach", "q"], &["0ms", "300ms", "100ms"], BOTH, 2);
        let g = expand_grid(&c, &catalog).unwrap();
        let variants = vec!["unfixed".to_string(), "fixed".to_string()];
        let runs = order_runs(&s, &g, &c, &variants);
        // 1 baseline + p: 2 delays x 2 modes + q: 2 delays x stall = 7 cells.
        assert_eq!(runs.len(), 7 * 2 * 2);
        let round1: Vec<String> = runs
            .iter()
            .take(14)
            .map(|r| {
                format!(
                    "{} {}",
                    r.case.cell.clone().unwrap_or_default(),
                    r.case.variant
                )
            })
            .collect();
        assert_eq!(
            round1,
            [
                "c01-baseline unfixed",
                "c01-baseline fixed",
                // 300ms is the first delay given: every point at 300ms first.
                "c02-p.attach@300ms-stall unfixed",
                "c02-p.attach@300ms-stall fixed",
                "c03-p.attach@300ms-defer unfixed",
                "c03-p.attach@300ms-defer fixed",
                "c06-q@300ms-stall unfixed",
                "c06-q@300ms-stall fixed",
                "c04-p.attach@100ms-stall unfixed",
                "c04-p.attach@100ms-stall fixed",
                "c05-p.attach@100ms-defer unfixed",
                "c05-p.attach@100ms-defer fixed",
                "c07-q@100ms-stall unfixed",
                "c07-q@100ms-stall fixed",
            ]
        );
        assert!(runs[..14].iter().all(|r| r.case.seed == 1));
        assert!(runs[14..].iter().all(|r| r.case.seed == 2));
        let again: Vec<String> = order_runs(&s, &g, &c, &variants)
            .iter()
            .map(|r| r.case.id())
            .collect();
        let first: Vec<String> = runs.iter().map(|r| r.case.id()).collect();
        assert_eq!(first, again, "same arguments, same order and seeds");
        assert_eq!(first[2], "race--c02-p.attach@300ms-stall--unfixed--s1");
        let mut unique = first.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), first.len(), "every run has its own directory");
    }

    #[test]
    fn cell_rules_replace_the_swept_point_only() {
        let s = scenario(&[
            "guest.sym.bus_iommu_probe:delay=300ms,count=2",
            "virtio.blk0.complete:delay=1ms,mode=defer",
        ]);
        let c = config(&["guest.sym.bus_iommu_probe"], &["0", "50ms"], BOTH, 1);
        let g = expand_grid(&c, &catalog).unwrap();
        let runs = order_runs(&s, &g, &c, &["fixed".to_string()]);
        assert_eq!(
            runs[0].case.scenario.inject.rules, s.inject.rules,
            "the baseline is the scenario as written"
        );
        assert_eq!(
            runs[1].case.scenario.inject.rules,
            [
                "virtio.blk0.complete:delay=1ms,mode=defer",
                "guest.sym.bus_iommu_probe:delay=50ms,mode=stall,count=1"
            ]
        );
        let mut c = c;
        c.replace = true;
        let runs = order_runs(&s, &g, &c, &["fixed".to_string()]);
        assert!(runs[0].case.scenario.inject.rules.is_empty());
        assert_eq!(
            runs[1].case.scenario.inject.rules,
            ["guest.sym.bus_iommu_probe:delay=50ms,mode=stall,count=1"]
        );
    }
}
