//! Judging sweep runs and cells. A run is a **hit** when it shows a *signal*: an escape of any
//! class, a console pattern one of the scenario's blocks forbids, or — with neither — the
//! scenario's own reproduction conditions met (e.g. a required console line). The rate of a
//! cell is hits over the runs performed. Separately, a run is **unexpected** when it breaks an
//! invariant the scenario sets for its variant (`verdict::judge`), e.g. any escape on a fixed
//! kernel.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::plan::RunCase;
use crate::sweep::drive::{BudgetStop, Driven};
use crate::sweep::grid::{Grid, SweepCase};
use crate::sweep::spec::SweepConfig;
use crate::verdict::{self, CaseResult, Observation};

/// The signal for "the scenario's reproduction conditions held" when no escape or forbidden
/// console pattern says more.
pub const SIGNAL_REPRODUCED: &str = "reproduced";

/// What one run showed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Findings {
    /// Escape classes, `console "<pattern>"`, or [`SIGNAL_REPRODUCED`].
    pub signals: Vec<String>,
    /// Some signal was seen.
    pub hit: bool,
}

/// Judges one run: the harness verdict (expectations of its variant) and the sweep's signals.
pub fn judge_run(case: &RunCase, obs: Observation) -> (CaseResult, Findings) {
    let mut signals: Vec<String> = obs
        .escapes
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(class, _)| class.clone())
        .collect();
    let forbidden: BTreeSet<&String> = case
        .scenario
        .expectations_for(&case.variant)
        .flat_map(|e| &e.console_forbidden)
        .collect();
    for p in forbidden {
        if verdict::matches_any(&obs.console, p) {
            signals.push(format!("console {p:?}"));
        }
    }
    let result = verdict::judge(case, obs);
    if signals.is_empty() && result.reproduced {
        signals.push(SIGNAL_REPRODUCED.into());
    }
    let hit = !signals.is_empty();
    (result, Findings { signals, hit })
}

/// One run of the sweep, judged or not run.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRun {
    /// Run id (its artifact directory under `--out`).
    pub id: String,
    /// Cell index.
    pub cell: usize,
    /// Variant.
    pub variant: String,
    /// Seed (also the injection seed).
    pub seed: u32,
    /// The run's injection rules, one-line form (`sluice run --inject` reproduces it).
    pub rules: Vec<String>,
    /// `false`: not run, the budget stopped the sweep first.
    pub ran: bool,
    /// The sweep's reading (absent if not run).
    pub findings: Option<Findings>,
    /// The harness verdict (absent if not run).
    pub result: Option<CaseResult>,
}

/// One cell on one variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CellOutcome {
    /// Cell index.
    pub cell: usize,
    /// Variant.
    pub variant: String,
    /// Runs in the grid.
    pub planned: usize,
    /// Runs performed and judged (errors excluded).
    pub ran: usize,
    /// Runs that could not be performed.
    pub errors: usize,
    /// Runs with a signal.
    pub hits: usize,
    /// Runs that broke one of the scenario's invariants for this variant.
    pub unexpected: usize,
    /// hits / ran (absent when nothing ran).
    pub rate: Option<f64>,
    /// For each signal, how many runs showed it.
    pub signals: BTreeMap<String, usize>,
}

impl CellOutcome {
    /// Runs the budget left out.
    pub fn not_run(&self) -> usize {
        self.planned - self.ran - self.errors
    }

    /// The table entry: `2/2 bypass-after-takeover`, `0/2`, `1/2 ! wrong-domain`,
    /// `not run (budget)`, `0/1 +1 not run (budget)`, `0/0 +2 errors`.
    pub fn text(&self) -> String {
        if self.ran == 0 && self.errors == 0 {
            return "not run (budget)".into();
        }
        let mut t = format!("{}/{}", self.hits, self.ran);
        if self.unexpected > 0 {
            t += " !";
        }
        let signals: Vec<String> = self
            .signals
            .iter()
            .map(|(s, n)| {
                if *n == self.hits {
                    s.clone()
                } else {
                    format!("{s} ({n})")
                }
            })
            .collect();
        if !signals.is_empty() {
            t += &format!(" {}", signals.join(", "));
        }
        if self.errors > 0 {
            t += &format!(" +{} error(s)", self.errors);
        }
        if self.not_run() > 0 {
            t += &format!(" +{} not run (budget)", self.not_run());
        }
        t
    }
}

/// How a sweep ended, and its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SweepEnd {
    /// Every run of the grid was performed. Exit 0.
    Complete,
    /// Every run was launched but some could not be performed (image build, host error). Exit 1.
    RunErrors,
    /// The budget stopped launching; some cells are incomplete. Exit 3.
    Budget,
}

impl SweepEnd {
    /// Process exit code (2 is taken by usage and file errors, 4 by a failed judgement:
    /// [`SweepReport::exit_code`]).
    pub fn code(self) -> u8 {
        match self {
            SweepEnd::Complete => 0,
            SweepEnd::RunErrors => 1,
            SweepEnd::Budget => 3,
        }
    }
}

/// Exit code of a sweep whose judgement failed ([`SweepReport::failures`]).
pub const EXIT_JUDGEMENT_FAILED: u8 = 4;

/// Everything a sweep reports (the JSON document).
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Scenario name.
    pub scenario: String,
    /// Variants, in column order.
    pub variants: Vec<String>,
    /// The resolved grid parameters.
    pub config: SweepConfig,
    /// Cells.
    pub grid: Grid,
    /// Cell × variant, cell-major.
    pub outcomes: Vec<CellOutcome>,
    /// Every run in launch order.
    pub runs: Vec<SweepRun>,
    /// Runs in the grid.
    pub planned: usize,
    /// Runs not run (budget).
    pub not_run: usize,
    /// Runs that could not be performed.
    pub errors: usize,
    /// How it ended.
    pub end: SweepEnd,
    /// Set when the budget stopped it.
    pub stopped: Option<BudgetStop>,
    /// Where the sweep's judgement contradicts the scenario: runs that broke an invariant the
    /// scenario sets for their variant, and variants the scenario expects to reproduce on
    /// where no cell with a sweep rule reproduced (judged only when every run of that variant
    /// was performed). Empty: the sweep found what the scenario says it should.
    pub failures: Vec<String>,
    /// Wall time of the runs (image builds before them excluded).
    pub wall_s: f64,
}

impl SweepReport {
    /// Judges every run and gathers cells.
    pub fn build(
        scenario: &str,
        variants: &[String],
        config: &SweepConfig,
        grid: &Grid,
        order: &[SweepCase],
        driven: Driven,
    ) -> SweepReport {
        let runs: Vec<SweepRun> = order
            .iter()
            .zip(driven.observations)
            .map(|(sc, obs)| {
                let judged = obs.map(|o| judge_run(&sc.case, o));
                SweepRun {
                    id: sc.case.id(),
                    cell: sc.cell,
                    variant: sc.case.variant.clone(),
                    seed: sc.case.seed,
                    rules: sc.case.scenario.inject.rules.clone(),
                    ran: judged.is_some(),
                    findings: judged.as_ref().map(|(_, f)| f.clone()),
                    result: judged.map(|(r, _)| r),
                }
            })
            .collect();
        let mut outcomes = Vec::new();
        for cell in &grid.cells {
            for v in variants {
                outcomes.push(cell_outcome(cell.index, v, &runs));
            }
        }
        let not_run = runs.iter().filter(|r| !r.ran).count();
        let errors = outcomes.iter().map(|o| o.errors).sum();
        let failures = judgement_failures(grid, variants, &runs);
        let end = if not_run > 0 {
            SweepEnd::Budget
        } else if errors > 0 {
            SweepEnd::RunErrors
        } else {
            SweepEnd::Complete
        };
        SweepReport {
            scenario: scenario.to_string(),
            variants: variants.to_vec(),
            config: config.clone(),
            grid: grid.clone(),
            outcomes,
            planned: runs.len(),
            runs,
            not_run,
            errors,
            end,
            stopped: driven.stopped,
            failures,
            wall_s: driven.elapsed.as_secs_f64(),
        }
    }

    /// Process exit code: [`EXIT_JUDGEMENT_FAILED`] when the judgement failed (whatever else
    /// happened: a broken invariant is a finding even in a sweep cut short), else how the
    /// sweep ended ([`SweepEnd::code`]).
    pub fn exit_code(&self) -> u8 {
        if self.failures.is_empty() {
            self.end.code()
        } else {
            EXIT_JUDGEMENT_FAILED
        }
    }

    /// The outcome of `cell` on `variant`.
    pub fn outcome(&self, cell: usize, variant: &str) -> Option<&CellOutcome> {
        self.outcomes
            .iter()
            .find(|o| o.cell == cell && o.variant == variant)
    }
}

/// See [`SweepReport::failures`].
fn judgement_failures(grid: &Grid, variants: &[String], runs: &[SweepRun]) -> Vec<String> {
    let mut failures = Vec::new();
    for r in runs {
        let Some(res) = &r.result else { continue };
        if res.observation.error.is_none() && !res.violations.is_empty() {
            failures.push(format!(
                "{}: broke an invariant of the scenario: {}",
                r.id,
                res.violations.join("; ")
            ));
        }
    }
    let with_rule = |cell: usize| grid.cells.get(cell).is_some_and(|c| c.point.is_some());
    for v in variants {
        let mine: Vec<&SweepRun> = runs.iter().filter(|r| &r.variant == v).collect();
        let results = || mine.iter().filter_map(|r| r.result.as_ref());
        let expects = results().any(|res| res.expects_reproduction);
        let all_performed = mine.iter().all(|r| {
            r.result
                .as_ref()
                .is_some_and(|res| res.observation.error.is_none())
        });
        let rule_runs = mine.iter().filter(|r| with_rule(r.cell)).count();
        let reproduced = mine
            .iter()
            .filter(|r| with_rule(r.cell))
            .filter_map(|r| r.result.as_ref())
            .filter(|res| res.reproduced)
            .count();
        if expects && all_performed && rule_runs > 0 && reproduced == 0 {
            failures.push(format!(
                "{v}: the scenario expects a reproduction, and none of the {rule_runs} run(s) \
                 with a sweep rule reproduced it"
            ));
        }
    }
    failures
}

fn cell_outcome(cell: usize, variant: &str, runs: &[SweepRun]) -> CellOutcome {
    let mine: Vec<&SweepRun> = runs
        .iter()
        .filter(|r| r.cell == cell && r.variant == variant)
        .collect();
    let mut o = CellOutcome {
        cell,
        variant: variant.to_string(),
        planned: mine.len(),
        ran: 0,
        errors: 0,
        hits: 0,
        unexpected: 0,
        rate: None,
        signals: BTreeMap::new(),
    };
    for r in &mine {
        let (Some(result), Some(f)) = (&r.result, &r.findings) else {
            continue;
        };
        if result.observation.error.is_some() {
            o.errors += 1;
            continue;
        }
        o.ran += 1;
        if f.hit {
            o.hits += 1;
        }
        if !result.violations.is_empty() {
            o.unexpected += 1;
        }
        for s in &f.signals {
            *o.signals.entry(s.clone()).or_insert(0) += 1;
        }
    }
    o.rate = (o.ran > 0).then(|| o.hits as f64 / o.ran as f64);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;
    use crate::sweep::grid::{Grid, expand_grid, order_runs};
    use crate::sweep::spec::{SweepMode, SweepSpec};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    const RACE: &str = r#"
name = "race"
variants = ["fixed", "unfixed"]
[[expect]]
console_forbidden = ["BUG:", "WARNING:"]
[[expect]]
variants = ["unfixed"]
escapes_required = ["bypass-after-takeover"]
[[expect]]
variants = ["fixed"]
escapes_forbidden = ["*"]
[[expect]]
variants = ["fixed"]
console_required = ["Adding to iommu group"]
"#;

    fn case(variant: &str) -> RunCase {
        RunCase {
            scenario: Arc::new(Scenario::parse(Path::new("t"), RACE, &|_| true).unwrap()),
            variant: variant.into(),
            seed: 1,
            cell: Some("c01-baseline".into()),
        }
    }

    fn obs(escapes: &[(&str, u64)], console: &[&str]) -> Observation {
        Observation {
            exit: "powered-off".into(),
            escapes: escapes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            console: console.iter().map(|s| s.to_string()).collect(),
            wall_s: 3.0,
            ..Default::default()
        }
    }

    #[test]
    fn signals_of_a_run() {
        let (r, f) = judge_run(&case("unfixed"), obs(&[("bypass-after-takeover", 9)], &[]));
        assert!(r.reproduced && r.violations.is_empty());
        assert_eq!(f.signals, ["bypass-after-takeover"]);
        assert!(f.hit);
        let (_, f) = judge_run(
            &case("unfixed"),
            obs(&[], &["[ 2.1] BUG: kernel NULL pointer"]),
        );
        assert_eq!(
            f.signals,
            ["console \"BUG:\""],
            "a forbidden pattern is a hit"
        );
        let (r, f) = judge_run(&case("fixed"), obs(&[("wrong-domain", 1)], &[]));
        assert_eq!(f.signals, ["wrong-domain"]);
        assert_eq!(
            r.violations,
            ["forbidden escape *: 1"],
            "a missing required line is not a violation"
        );
        let (r, f) = judge_run(
            &case("fixed"),
            obs(&[], &["pci 0000:00:03.0: Adding to iommu group 0"]),
        );
        assert!(r.reproduced);
        assert_eq!(
            f.signals,
            [SIGNAL_REPRODUCED],
            "the scenario's own condition"
        );
        let (_, f) = judge_run(&case("unfixed"), obs(&[], &["all good"]));
        assert!(!f.hit && f.signals.is_empty());
        let mut failed = obs(&[], &[]);
        failed.error = Some("qemu failed".into());
        let (_, f) = judge_run(&case("unfixed"), failed);
        assert!(!f.hit, "a run that did not happen shows nothing");
    }

    /// RACE swept over point `p` at 0 and 100 ms (stall), `seeds` seeds, on both variants.
    fn race_plan(seeds: u32) -> (Scenario, crate::sweep::spec::SweepConfig, Grid, Vec<String>) {
        let scenario = Scenario::parse(Path::new("t"), RACE, &|_| true).unwrap();
        let config = crate::sweep::spec::SweepConfig::resolve(
            None,
            &SweepSpec {
                points: Some(vec!["p".into()]),
                delays: Some(vec!["0ms".into(), "100ms".into()]),
                modes: Some(vec![SweepMode::Stall]),
                seeds: Some(seeds),
                ..Default::default()
            },
        )
        .unwrap();
        let grid = expand_grid(&config, &|_| Ok(false)).unwrap();
        let variants = vec!["unfixed".to_string(), "fixed".to_string()];
        (scenario, config, grid, variants)
    }

    #[test]
    fn cells_rates_and_end() {
        let (scenario, config, grid, variants) = race_plan(2);
        let order = order_runs(&scenario, &grid, &config, &variants);
        // Launch order: s1 (baseline u, f; p u, f), s2 (same). The budget stops before s2's p.
        let esc = |n| obs(&[("bypass-after-takeover", n)], &[]);
        let mut broken = obs(&[], &[]);
        broken.error = Some("image build failed".into());
        let observations = vec![
            Some(obs(&[], &[])),
            Some(obs(&[], &[])),
            Some(esc(5)),
            Some(esc(2)),
            Some(obs(&[], &[])),
            Some(broken),
            None,
            None,
        ];
        let driven = Driven {
            observations,
            stopped: Some(BudgetStop {
                first_not_run: 6,
                at_s: 10.0,
                estimate_s: Some(4.0),
            }),
            elapsed: Duration::from_secs(10),
        };
        let rep = SweepReport::build("race", &variants, &config, &grid, &order, driven);
        assert_eq!(rep.end, SweepEnd::Budget);
        assert_eq!(rep.end.code(), 3);
        assert_eq!(
            rep.exit_code(),
            EXIT_JUDGEMENT_FAILED,
            "the escape on the fixed kernel outranks the budget"
        );
        assert_eq!((rep.planned, rep.not_run, rep.errors), (8, 2, 1));
        let base_u = rep.outcome(0, "unfixed").unwrap();
        assert_eq!((base_u.ran, base_u.hits, base_u.rate), (2, 0, Some(0.0)));
        assert_eq!(base_u.text(), "0/2");
        let base_f = rep.outcome(0, "fixed").unwrap();
        assert_eq!(base_f.text(), "0/1 +1 error(s)");
        let p_u = rep.outcome(1, "unfixed").unwrap();
        assert_eq!(p_u.text(), "1/1 bypass-after-takeover +1 not run (budget)");
        let p_f = rep.outcome(1, "fixed").unwrap();
        assert_eq!(
            p_f.unexpected, 1,
            "an escape on the fixed kernel breaks its invariant"
        );
        assert_eq!(
            p_f.text(),
            "1/1 ! bypass-after-takeover +1 not run (budget)"
        );
        assert!(
            rep.runs[6]
                .rules
                .iter()
                .any(|r| r.starts_with("p:delay=100ms"))
        );
        assert!(!rep.runs[6].ran);
    }

    fn sweep(observations: Vec<Option<Observation>>) -> SweepReport {
        let (scenario, config, grid, variants) = race_plan(1);
        let order = order_runs(&scenario, &grid, &config, &variants);
        let driven = Driven {
            observations,
            stopped: None,
            elapsed: Duration::from_secs(4),
        };
        SweepReport::build("race", &variants, &config, &grid, &order, driven)
    }

    /// The sweep's exit code follows its judgement: 0 when it found what the scenario says,
    /// 4 when a run broke an invariant or the unfixed kernel never reproduced.
    #[test]
    fn a_wrong_judgement_fails_the_sweep() {
        let esc = || obs(&[("bypass-after-takeover", 1)], &[]);
        let fixed_ok = || obs(&[], &["Adding to iommu group 0"]);
        // Launch order: baseline (unfixed, fixed), then p@100ms (unfixed, fixed).
        let good = sweep(vec![
            Some(obs(&[], &[])),
            Some(fixed_ok()),
            Some(esc()),
            Some(fixed_ok()),
        ]);
        assert!(good.failures.is_empty(), "{:?}", good.failures);
        assert_eq!(good.exit_code(), 0);
        // The race seen only in the baseline does not count for the sweep's cells.
        let missed = sweep(vec![
            Some(esc()),
            Some(fixed_ok()),
            Some(obs(&[], &[])),
            Some(fixed_ok()),
        ]);
        assert_eq!(
            missed.failures,
            [
                "unfixed: the scenario expects a reproduction, and none of the 1 run(s) with a \
              sweep rule reproduced it"
            ]
        );
        assert_eq!(missed.exit_code(), EXIT_JUDGEMENT_FAILED);
        let broken = sweep(vec![
            Some(obs(&[], &[])),
            Some(fixed_ok()),
            Some(esc()),
            Some(obs(
                &[("bypass-after-takeover", 1)],
                &["Adding to iommu group 0"],
            )),
        ]);
        assert_eq!(broken.failures.len(), 1, "{:?}", broken.failures);
        assert!(
            broken.failures[0]
                .ends_with("broke an invariant of the scenario: forbidden escape *: 1"),
            "{:?}",
            broken.failures
        );
        assert_eq!(broken.exit_code(), EXIT_JUDGEMENT_FAILED);
        // Cut short before the unfixed kernel's rule run: nothing to conclude, the budget's code.
        let cut = sweep(vec![Some(obs(&[], &[])), Some(fixed_ok()), None, None]);
        assert!(cut.failures.is_empty(), "{:?}", cut.failures);
        assert_eq!(cut.exit_code(), 3);
    }

    #[test]
    fn never_run_cells_say_so_and_signal_counts_show_when_partial() {
        let o = CellOutcome {
            cell: 0,
            variant: "v".into(),
            planned: 3,
            ran: 0,
            errors: 0,
            hits: 0,
            unexpected: 0,
            rate: None,
            signals: BTreeMap::new(),
        };
        assert_eq!(o.text(), "not run (budget)");
        let o = CellOutcome {
            ran: 3,
            hits: 2,
            signals: [
                ("after-release".to_string(), 1),
                ("console \"BUG:\"".to_string(), 2),
            ]
            .into(),
            ..o
        };
        assert_eq!(o.text(), "2/3 after-release (1), console \"BUG:\"");
    }
}
