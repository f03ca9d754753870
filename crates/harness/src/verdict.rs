//! Judging runs against expectations, and reproduction rates per scenario/variant.
//!
//! Each expectation block splits into *reproduction conditions* (escapes_required,
//! console_required, min_faults), which must hold in at least `min_rate` of the seeds, and
//! *invariants* (escapes_forbidden, console_forbidden, max_faults, exit), which must hold in
//! every run. An infrastructure error (the run could not be performed) always fails.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::RunCase;
use crate::scenario::Expect;

/// What one run observed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// Firings per injection rule, in the order of the run's rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firings: Vec<u64>,
    /// Escapes by class: the devices they came from (`blk0`, or the endpoint when no device
    /// of the run has that address).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub escape_sites: BTreeMap<String, Vec<String>>,
    /// Devices with refused DMAs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fault_sites: Vec<String>,
    /// Why the run's own verdict failed (guest RESULT, disk verification, exit), if it did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// One run's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    /// Case id.
    pub id: String,
    /// scenario/variant.
    pub group: String,
    /// Seed.
    pub seed: u32,
    /// Some expectation block of this variant has reproduction conditions (escapes_required,
    /// console_required, min_faults). Without any, the run has nothing to reproduce: a clean
    /// run is "clean as expected", never "reproduced".
    pub expects_reproduction: bool,
    /// There were reproduction conditions, and every one of them held.
    pub reproduced: bool,
    /// Invariant violations and errors (empty: clean).
    pub violations: Vec<String>,
    /// Reproduction conditions that did not hold.
    pub missing: Vec<String>,
    /// What was observed.
    pub observation: Observation,
    /// The rate this group must reach.
    pub min_rate: f64,
    /// This is a second attempt: the first broke an invariant with a host artifact on its
    /// console (`crate::artifact`). What the first attempt showed, and where its artifacts are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_after: Option<String>,
}

pub(crate) fn matches_any(lines: &[String], pattern: &str) -> bool {
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
    let mut expects_reproduction = false;
    if let Some(e) = &obs.error {
        violations.push(format!("run failed: {e}"));
    }
    for e in case.scenario.expectations_for(&case.variant) {
        // A block's min_rate only means something when it has reproduction conditions.
        if reproduces_something(e) {
            expects_reproduction = true;
            min_rate = min_rate.max(e.min_rate);
        }
        check_invariants(e, &obs, &mut violations);
        check_reproduction(e, &obs, &mut missing);
    }
    if obs.error.is_none() {
        for exit in case.scenario.exits_for(&case.variant) {
            if exit != "any" && obs.exit != exit {
                violations.push(format!("exit {} (expected {exit})", obs.exit));
            }
        }
    }
    // Several blocks may state the same invariant.
    let mut seen = std::collections::BTreeSet::new();
    violations.retain(|v| seen.insert(v.clone()));
    CaseResult {
        id: case.id(),
        group: case.group(),
        seed: case.seed,
        expects_reproduction,
        reproduced: expects_reproduction && missing.is_empty() && obs.error.is_none(),
        violations,
        missing,
        observation: obs,
        min_rate,
        retried_after: None,
    }
}

impl CaseResult {
    /// One phrase for a progress line: what this run means against its expectations.
    pub fn label(&self) -> String {
        match &self.retried_after {
            Some(first) => format!("{} (second attempt; the first: {first})", self.verdict()),
            None => self.verdict(),
        }
    }

    /// What this attempt means, without the retry note.
    fn verdict(&self) -> String {
        if let Some(e) = &self.observation.error {
            return format!("ERROR: run failed: {e}");
        }
        if !self.violations.is_empty() {
            return format!("UNEXPECTED: {}", self.violations.join("; "));
        }
        match (self.expects_reproduction, self.reproduced) {
            (false, _) => "clean as expected".into(),
            (true, true) => "reproduced as expected".into(),
            // One seed that misses is not a failure by itself: the group's rate decides.
            (true, false) => format!("not reproduced ({})", self.missing.join("; ")),
        }
    }
}

/// Whether an expectation block asks for something to be reproduced.
pub fn reproduces_something(e: &Expect) -> bool {
    !e.escapes_required.is_empty() || !e.console_required.is_empty() || e.min_faults.is_some()
}

fn check_invariants(e: &Expect, obs: &Observation, out: &mut Vec<String>) {
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Runs with invariant violations (errors included).
    pub violating: usize,
    /// Runs that could not be performed (image build failed, host error).
    pub errors: usize,
    /// Runs judged on a second attempt after a host artifact (`crate::artifact`).
    #[serde(default)]
    pub retried: usize,
    /// Some run of the group had reproduction conditions to meet.
    pub expects_reproduction: bool,
    /// The group met its expectations.
    pub pass: bool,
    /// What the group's outcome means, e.g. "clean as expected" (see [`GroupSummary::label`]).
    pub label: String,
}

impl GroupSummary {
    /// "reproduced as expected", "clean as expected", or "UNEXPECTED: ..." / "ERROR: ...".
    pub fn label(&self) -> String {
        match self.retried {
            0 => self.outcome(),
            n => format!(
                "{}; {n} run(s) judged on a second attempt after a host artifact",
                self.outcome()
            ),
        }
    }

    /// The group's outcome, without the retry count.
    fn outcome(&self) -> String {
        let pct = |r: f64| format!("{:.0} %", r * 100.0);
        let mut problems = Vec::new();
        if self.errors > 0 {
            problems.push(format!("{} run(s) could not be performed", self.errors));
        }
        let broke = self.violating - self.errors;
        if broke > 0 {
            problems.push(format!("{broke} run(s) broke an invariant"));
        }
        if self.expects_reproduction && self.rate + RATE_EPSILON < self.min_rate {
            problems.push(format!(
                "reproduced {}/{} ({}), needed {}",
                self.reproduced,
                self.runs,
                pct(self.rate),
                pct(self.min_rate)
            ));
        }
        if !problems.is_empty() {
            let head = if self.errors > 0 && broke == 0 {
                "ERROR"
            } else {
                "UNEXPECTED"
            };
            return format!("{head}: {}", problems.join("; "));
        }
        if self.expects_reproduction {
            format!(
                "reproduced as expected ({}/{}, needed {})",
                self.reproduced,
                self.runs,
                pct(self.min_rate)
            )
        } else {
            format!("clean as expected ({}/{} clean)", self.runs, self.runs)
        }
    }
}

/// Slack in rate comparisons so that 3/10 meets 0.3.
const RATE_EPSILON: f64 = 1e-9;

/// The whole suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
            let errors = rs.iter().filter(|r| r.observation.error.is_some()).count();
            let retried = rs.iter().filter(|r| r.retried_after.is_some()).count();
            let expects_reproduction = rs.iter().any(|r| r.expects_reproduction);
            let min_rate = rs.iter().map(|r| r.min_rate).fold(0.0, f64::max);
            let rate = if runs == 0 {
                0.0
            } else {
                reproduced as f64 / runs as f64
            };
            let pass = violating == 0 && rate + RATE_EPSILON >= min_rate;
            let mut g = GroupSummary {
                group,
                runs,
                reproduced,
                rate,
                min_rate,
                violating,
                errors,
                retried,
                expects_reproduction,
                pass,
                label: String::new(),
            };
            g.label = g.label();
            g
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
            cell: None,
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
            ..Default::default()
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
    fn a_variant_block_that_allows_any_exit_is_not_overruled_by_a_common_block() {
        // The common block names no exit; the unfixed kernel's block allows any; the fixed
        // kernel's names none, so it must power off. (race1-probe-phases failed CI on this.)
        let text = RACE.replace("min_rate = 0.3", "min_rate = 0.3\nexit = \"any\"");
        let timed_out = || {
            let mut o = obs(&[("bypass-after-takeover", 1)], 0, &[]);
            o.exit = "timeout".into();
            o
        };
        let r = judge(&case(&text, "unfixed"), timed_out());
        assert!(
            r.reproduced && r.violations.is_empty(),
            "{:?}",
            r.violations
        );
        let r = judge(&case(&text, "fixed"), timed_out());
        assert!(
            r.violations
                .contains(&"exit timeout (expected powered-off)".to_string()),
            "{:?}",
            r.violations
        );
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

    #[test]
    fn labels_say_what_was_expected() {
        let clean = judge(&case(RACE, "fixed"), obs(&[], 0, &[]));
        assert!(!clean.expects_reproduction && !clean.reproduced);
        assert_eq!(clean.label(), "clean as expected");
        let hit = judge(
            &case(RACE, "unfixed"),
            obs(&[("bypass-after-takeover", 3)], 0, &[]),
        );
        assert_eq!(hit.label(), "reproduced as expected");
        let miss = judge(&case(RACE, "unfixed"), obs(&[], 0, &[]));
        assert_eq!(
            miss.label(),
            "not reproduced (no bypass-after-takeover escape)"
        );
        let leak = judge(&case(RACE, "fixed"), obs(&[("wrong-domain", 1)], 0, &[]));
        assert_eq!(leak.label(), "UNEXPECTED: forbidden escape *: 1");

        let group = |rs: Vec<CaseResult>| summarize(&rs).groups.remove(0).label;
        assert_eq!(
            group(vec![clean.clone(), clean.clone()]),
            "clean as expected (2/2 clean)"
        );
        assert_eq!(
            group(vec![hit.clone(), miss.clone(), miss.clone()]),
            "reproduced as expected (1/3, needed 30 %)"
        );
        assert_eq!(
            group(vec![hit.clone(), miss.clone(), miss.clone(), miss.clone()]),
            "UNEXPECTED: reproduced 1/4 (25 %), needed 30 %"
        );
        assert_eq!(
            group(vec![clean.clone(), leak]),
            "UNEXPECTED: 1 run(s) broke an invariant"
        );
        let mut o = obs(&[], 0, &[]);
        o.error = Some("image build failed".into());
        let failed = judge(&case(RACE, "fixed"), o);
        assert!(
            failed
                .label()
                .starts_with("ERROR: run failed: image build failed")
        );
        assert_eq!(
            group(vec![clean.clone(), failed]),
            "ERROR: 1 run(s) could not be performed"
        );

        // A second attempt says so, on the run and on its group, whatever it showed.
        let mut again = clean.clone();
        again.retried_after = Some("RCU: timer did not fire; UNEXPECTED: exit timeout".into());
        assert_eq!(
            again.label(),
            "clean as expected (second attempt; the first: RCU: timer did not fire; \
             UNEXPECTED: exit timeout)"
        );
        assert_eq!(
            group(vec![clean.clone(), again.clone()]),
            "clean as expected (2/2 clean); 1 run(s) judged on a second attempt after a host \
             artifact"
        );
        let mut again_leak = judge(&case(RACE, "fixed"), obs(&[("wrong-domain", 1)], 0, &[]));
        again_leak.retried_after = again.retried_after.clone();
        assert!(
            group(vec![clean, again_leak])
                .starts_with("UNEXPECTED: 1 run(s) broke an invariant; 1 run(s) judged")
        );
    }
}
