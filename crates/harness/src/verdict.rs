//! Judging runs against expectations, and reproduction rates per scenario/variant.
//!
//! Each expectation block splits into *reproduction conditions* (escapes_required,
//! console_required, min_faults), which must hold in at least `min_rate` of the seeds, and
//! *invariants* (escapes_forbidden, console_forbidden, max_faults, exit), which must hold in
//! every run. An infrastructure error (the run could not be performed) always fails.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::RunCase;
use crate::scenario::Expect;

/// What one run observed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observation {
    /// Exit reason (`powered-off`, `timeout`, ...).
    pub exit: String,
    /// Escapes by class.
    pub escapes: BTreeMap<String, u64>,
    /// Translation faults.
    pub faults: u64,
    /// Guest console.
    #[serde(skip)]
    pub console: Vec<String>,
    /// The run could not be performed (build failure, bad plan, ...).
    pub error: Option<String>,
    /// Host wall time.
    pub wall_s: f64,
}

/// One run's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case id.
    pub id: String,
    /// scenario/variant.
    pub group: String,
    /// Seed.
    pub seed: u32,
    /// Every reproduction condition held.
    pub reproduced: bool,
    /// Invariant violations and errors (empty: clean).
    pub violations: Vec<String>,
    /// Reproduction conditions that did not hold.
    pub missing: Vec<String>,
    /// What was observed.
    pub observation: Observation,
    /// The rate this group must reach.
    pub min_rate: f64,
}

fn matches_any(lines: &[String], pattern: &str) -> bool {
    match regex::Regex::new(pattern) {
        Ok(re) => lines.iter().any(|l| re.is_match(l)),
        Err(_) => false,
    }
}

/// Judges one run.
pub fn judge(case: &RunCase, obs: Observation) -> CaseResult {
    let mut violations = Vec::new();
    let mut missing = Vec::new();
    let mut min_rate: f64 = 0.0;
    if let Some(e) = &obs.error {
        violations.push(format!("run failed: {e}"));
    }
    for e in case.scenario.expectations_for(&case.variant) {
        // A block's min_rate only means something when it has reproduction conditions.
        if reproduces_something(e) {
            min_rate = min_rate.max(e.min_rate);
        }
        check_invariants(e, &obs, &mut violations);
        check_reproduction(e, &obs, &mut missing);
    }
    // Several blocks may state the same invariant (every block defaults to exit = powered-off).
    let mut seen = std::collections::BTreeSet::new();
    violations.retain(|v| seen.insert(v.clone()));
    CaseResult {
        id: case.id(),
        group: case.group(),
        seed: case.seed,
        reproduced: missing.is_empty() && obs.error.is_none(),
        violations,
        missing,
        observation: obs,
        min_rate,
    }
}

fn reproduces_something(e: &Expect) -> bool {
    !e.escapes_required.is_empty() || !e.console_required.is_empty() || e.min_faults.is_some()
}

fn check_invariants(e: &Expect, obs: &Observation, out: &mut Vec<String>) {
    if e.exit != "any" && obs.error.is_none() && obs.exit != e.exit {
        out.push(format!("exit {} (expected {})", obs.exit, e.exit));
    }
    for c in &e.escapes_forbidden {
        let n: u64 = if c == "*" {
            obs.escapes.values().sum()
        } else {
            obs.escapes.get(c).copied().unwrap_or(0)
        };
        if n > 0 {
            out.push(format!("forbidden escape {c}: {n}"));
        }
    }
    for p in &e.console_forbidden {
        if matches_any(&obs.console, p) {
            out.push(format!("forbidden console pattern {p:?} seen"));
        }
    }
    if let Some(max) = e.max_faults
        && obs.faults > max
    {
        out.push(format!("{} faults (at most {max} allowed)", obs.faults));
    }
}

fn check_reproduction(e: &Expect, obs: &Observation, out: &mut Vec<String>) {
    for c in &e.escapes_required {
        if obs.escapes.get(c).copied().unwrap_or(0) == 0 {
            out.push(format!("no {c} escape"));
        }
    }
    for p in &e.console_required {
        if !matches_any(&obs.console, p) {
            out.push(format!("console pattern {p:?} not seen"));
        }
    }
    if let Some(min) = e.min_faults
        && obs.faults < min
    {
        out.push(format!("{} faults (at least {min} expected)", obs.faults));
    }
}

/// A scenario/variant group over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct GroupSummary {
    /// scenario/variant.
    pub group: String,
    /// Runs.
    pub runs: usize,
    /// Runs that reproduced.
    pub reproduced: usize,
    /// reproduced / runs.
    pub rate: f64,
    /// Required rate.
    pub min_rate: f64,
    /// Runs with invariant violations.
    pub violating: usize,
    /// The group met its expectations.
    pub pass: bool,
}

/// The whole suite.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteSummary {
    /// Per group.
    pub groups: Vec<GroupSummary>,
    /// Every group passed.
    pub pass: bool,
}

/// Groups results and judges reproduction rates.
pub fn summarize(results: &[CaseResult]) -> SuiteSummary {
    let mut by: BTreeMap<String, Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        by.entry(r.group.clone()).or_default().push(r);
    }
    let groups: Vec<GroupSummary> = by
        .into_iter()
        .map(|(group, rs)| {
            let runs = rs.len();
            let reproduced = rs.iter().filter(|r| r.reproduced).count();
            let violating = rs.iter().filter(|r| !r.violations.is_empty()).count();
            let min_rate = rs.iter().map(|r| r.min_rate).fold(0.0, f64::max);
            let rate = if runs == 0 {
                0.0
            } else {
                reproduced as f64 / runs as f64
            };
            // A tiny epsilon so 3/10 meets 0.3.
            let pass = violating == 0 && rate + 1e-9 >= min_rate;
            GroupSummary {
                group,
                runs,
                reproduced,
                rate,
                min_rate,
                violating,
                pass,
            }
        })
        .collect();
    let pass = groups.iter().all(|g| g.pass);
    SuiteSummary { groups, pass }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;
    use std::path::Path;
    use std::sync::Arc;

    fn case(text: &str, variant: &str) -> RunCase {
        let s = Scenario::parse(Path::new("t"), text, &|_| true).unwrap();
        RunCase {
            scenario: Arc::new(s),
            variant: variant.into(),
            seed: 1,
        }
    }

    const RACE: &str = r#"
name = "race"
variants = ["fixed", "unfixed"]
[[expect]]
console_forbidden = ["BUG:"]
[[expect]]
variants = ["unfixed"]
escapes_required = ["bypass-after-takeover"]
min_rate = 0.3
[[expect]]
variants = ["fixed"]
escapes_forbidden = ["*"]
max_faults = 0
"#;

    fn obs(escapes: &[(&str, u64)], faults: u64, console: &[&str]) -> Observation {
        Observation {
            exit: "powered-off".into(),
            escapes: escapes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            faults,
            console: console.iter().map(|s| s.to_string()).collect(),
            error: None,
            wall_s: 1.0,
        }
    }

    #[test]
    fn reproduction_conditions_and_invariants() {
        let r = judge(
            &case(RACE, "unfixed"),
            obs(&[("bypass-after-takeover", 2)], 0, &[]),
        );
        assert!(r.reproduced && r.violations.is_empty());
        assert_eq!(r.min_rate, 0.3);
        let r = judge(&case(RACE, "unfixed"), obs(&[], 0, &[]));
        assert!(
            !r.reproduced && r.violations.is_empty(),
            "not reproducing is not a violation"
        );
        let r = judge(
            &case(RACE, "unfixed"),
            obs(&[("bypass-after-takeover", 1)], 0, &["[ 1.0] BUG: oops"]),
        );
        assert_eq!(r.violations, ["forbidden console pattern \"BUG:\" seen"]);
        let r = judge(&case(RACE, "fixed"), obs(&[("wrong-domain", 1)], 2, &[]));
        assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
        let mut o = obs(&[], 0, &[]);
        o.exit = "timeout".into();
        assert_eq!(
            judge(&case(RACE, "fixed"), o).violations,
            ["exit timeout (expected powered-off)"]
        );
        let mut o = obs(&[], 0, &[]);
        o.error = Some("image build failed".into());
        let r = judge(&case(RACE, "fixed"), o);
        assert!(!r.reproduced && r.violations[0].contains("image build failed"));
    }

    #[test]
    fn rates_per_group() {
        let mut results = Vec::new();
        for i in 0..10 {
            let e: &[(&str, u64)] = if i < 3 {
                &[("bypass-after-takeover", 1)]
            } else {
                &[]
            };
            results.push(judge(&case(RACE, "unfixed"), obs(e, 0, &[])));
            results.push(judge(&case(RACE, "fixed"), obs(&[], 0, &[])));
        }
        let s = summarize(&results);
        assert!(s.pass, "{s:?}");
        let unfixed = s.groups.iter().find(|g| g.group == "race/unfixed").unwrap();
        assert_eq!((unfixed.runs, unfixed.reproduced), (10, 3));
        results.pop();
        results.push(judge(
            &case(RACE, "fixed"),
            obs(&[("after-release", 1)], 0, &[]),
        ));
        assert!(
            !summarize(&results).pass,
            "one escape on the fixed kernel fails the suite"
        );
        let two_of_ten: Vec<_> = results
            .iter()
            .filter(|r| r.group == "race/unfixed")
            .skip(1)
            .cloned()
            .collect();
        assert!(!summarize(&two_of_ten).pass, "2/9 < 0.3");
    }
}
