//! Grouping anomalies into findings by signature, the hunt's report (`explore.json`), merging
//! the reports of shards, and the outputs made from it: JUnit, a summary table, and a ready
//! scenario file per minimized finding.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::explore::minimize::Minimized;
use crate::explore::plan::{PlanConfig, TrialRule};
use crate::explore::signature::{Anomaly, AnomalyKind};
use crate::junit::{Case, Counts, Problem, Report, Suite, render_report};
use crate::scenario::{Expect, Scenario};

/// One search run, as the report keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRun {
    /// Index in the whole plan.
    pub index: usize,
    /// Run id (its artifact directory).
    pub id: String,
    /// Variant.
    pub variant: String,
    /// Rules, one-line form.
    pub rules: Vec<String>,
    /// Firings per rule.
    pub firings: Vec<u64>,
    /// Signatures it showed (baseline ones included).
    pub signatures: Vec<String>,
    /// The run could not be performed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Host seconds.
    pub wall_s: f64,
}

/// Whether a signature is the hunt's, or already there without perturbation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Seen in search runs, and not in every unperturbed baseline run (a race the host's load
    /// opens now and then is still the hunt's to report, with its baseline rate beside it).
    Found,
    /// Seen in every baseline run, or only in baseline runs: the base's own behaviour.
    Baseline,
}

/// A signature and everything the hunt knows about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The grouping key.
    pub signature: String,
    /// Kind.
    pub kind: AnomalyKind,
    /// Found by the search or present without it.
    pub origin: Origin,
    /// First raw evidence.
    pub evidence: String,
    /// Variants it was seen on.
    pub variants: BTreeSet<String>,
    /// The earliest trial (plan index) that showed it, and its rules.
    pub first_trial: Option<usize>,
    /// Rules of that trial.
    pub first_rules: Vec<String>,
    /// Trials (plan indices) that showed it, in order (the first 20): where minimization
    /// may start.
    #[serde(default)]
    pub trials: Vec<usize>,
    /// Search runs that showed it.
    pub hits: u32,
    /// Unperturbed baseline runs that showed it (of the report's `baseline_runs`).
    #[serde(default)]
    pub baseline_hits: u32,
    /// Search runs in which no rule fired that showed it (of the report's `unfired_runs`):
    /// not the plan's doing, but not a fair baseline sample either (a race that closes the
    /// path to the plan's point, e.g. a disk bound without IOMMU never reaching the DMA-API
    /// points, is over-represented among them).
    #[serde(default)]
    pub unfired_hits: u32,
    /// Their ids (the first 20).
    pub runs: Vec<String>,
    /// The minimized plan, when minimization ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimized: Option<Minimized>,
    /// Another finding that showed in every search run this one showed in, and ranks above it
    /// (a kernel report over an escape over a hang over an exit over a fault over a workload
    /// failure): this one is its consequence (a panic's "no RESULT line", an escape's disk
    /// check) and is not minimized on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consequence_of: Option<String>,
    /// The scenario file written for it, relative to the output directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario_file: Option<String>,
}

/// Ids kept per finding.
const RUN_IDS_KEPT: usize = 20;

impl Finding {
    /// Smaller is a better minimized plan: fewer rules, then less total delay.
    fn plan_size(&self) -> Option<(usize, u64)> {
        self.minimized.as_ref().filter(|m| m.confirmed).map(|m| {
            (
                m.rules.len(),
                m.rules
                    .iter()
                    .map(|r| r.delay_us.saturating_mul(u64::from(r.count)))
                    .sum(),
            )
        })
    }

    /// Folds `other` (the same signature, another shard or run) into `self`.
    fn absorb(&mut self, other: Finding) {
        let better = match (other.plan_size(), self.plan_size()) {
            (Some(o), Some(s)) => o < s,
            (Some(_), None) => true,
            (None, None) => self.minimized.is_none() && other.minimized.is_some(),
            (None, Some(_)) => false,
        };
        self.baseline_hits += other.baseline_hits;
        self.unfired_hits += other.unfired_hits;
        self.variants.extend(other.variants);
        self.hits += other.hits;
        self.runs.extend(other.runs);
        self.runs.sort();
        self.runs.dedup();
        self.runs.truncate(RUN_IDS_KEPT);
        self.trials.extend(other.trials);
        self.trials.sort_unstable();
        self.trials.dedup();
        self.trials.truncate(RUN_IDS_KEPT);
        let earlier = match (other.first_trial, self.first_trial) {
            (Some(o), Some(s)) => o < s,
            (Some(_), None) => true,
            _ => false,
        };
        if earlier {
            self.first_trial = other.first_trial;
            self.first_rules = other.first_rules;
            self.evidence = other.evidence;
        }
        if better {
            self.minimized = other.minimized;
            self.scenario_file = other.scenario_file;
        }
    }
}

/// Findings by signature.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FindingSet {
    by_signature: BTreeMap<String, Finding>,
}

impl FindingSet {
    /// Records the anomalies of one run. `trial` is `None` for the baseline and the probe.
    pub fn record(
        &mut self,
        anomalies: &[Anomaly],
        variant: &str,
        run_id: &str,
        trial: Option<(usize, &[String])>,
    ) {
        for a in anomalies {
            let f = Finding {
                signature: a.signature.clone(),
                kind: a.kind,
                origin: if trial.is_some() {
                    Origin::Found
                } else {
                    Origin::Baseline
                },
                evidence: a.evidence.clone(),
                variants: BTreeSet::from([variant.to_string()]),
                first_trial: trial.map(|(i, _)| i),
                first_rules: trial.map(|(_, r)| r.to_vec()).unwrap_or_default(),
                trials: trial.map(|(i, _)| vec![i]).unwrap_or_default(),
                hits: u32::from(trial.is_some()),
                baseline_hits: u32::from(trial.is_none()),
                unfired_hits: 0,
                runs: vec![run_id.to_string()],
                minimized: None,
                consequence_of: None,
                scenario_file: None,
            };
            self.add(f);
        }
    }

    /// Adds or folds in one finding.
    pub fn add(&mut self, f: Finding) {
        match self.by_signature.get_mut(&f.signature) {
            Some(existing) => existing.absorb(f),
            None => {
                self.by_signature.insert(f.signature.clone(), f);
            }
        }
    }

    /// Whether the signature is known already.
    pub fn contains(&self, signature: &str) -> bool {
        self.by_signature.contains_key(signature)
    }

    /// The finding of a signature.
    pub fn get_mut(&mut self, signature: &str) -> Option<&mut Finding> {
        self.by_signature.get_mut(signature)
    }

    /// Every finding, by signature.
    pub fn iter(&self) -> impl Iterator<Item = &Finding> {
        self.by_signature.values()
    }

    /// Findings the search caused (not baseline).
    pub fn found(&self) -> impl Iterator<Item = &Finding> {
        self.iter().filter(|f| f.origin == Origin::Found)
    }

    /// Search runs in which no rule fired (the guest ended, or never reached the points,
    /// before any firing) perturbed nothing: what they showed is not the plan's doing. Moves
    /// their hits to [`Finding::unfired_hits`], re-derives each finding's first trial, and
    /// returns how many such runs there were.
    pub fn reattribute_unperturbed(&mut self, runs: &[TrialRun]) -> u32 {
        let quiet: Vec<&TrialRun> = runs
            .iter()
            .filter(|r| r.error.is_none() && r.firings.iter().all(|n| *n == 0))
            .collect();
        for f in self.by_signature.values_mut() {
            for r in quiet.iter().filter(|r| r.signatures.contains(&f.signature)) {
                f.hits = f.hits.saturating_sub(1);
                f.unfired_hits += 1;
                f.trials.retain(|&i| i != r.index);
                f.runs.retain(|id| id != &r.id);
            }
            let first = f.trials.first().copied();
            if first != f.first_trial {
                f.first_trial = first;
                f.first_rules = first
                    .and_then(|i| runs.iter().find(|r| r.index == i))
                    .map(|r| r.rules.clone())
                    .unwrap_or_default();
            }
        }
        u32::try_from(quiet.len()).unwrap_or(u32::MAX)
    }

    /// Links each found signature to the one it always came with (see
    /// [`Finding::consequence_of`]), from the search runs' signature lists.
    pub fn link_consequences(&mut self, runs: &[TrialRun]) {
        fn rank(k: AnomalyKind) -> u8 {
            match k {
                AnomalyKind::KernelReport => 0,
                AnomalyKind::Escape => 1,
                AnomalyKind::Hang => 2,
                AnomalyKind::Exit => 3,
                AnomalyKind::Fault => 4,
                AnomalyKind::Workload => 5,
            }
        }
        let kinds: BTreeMap<String, (AnomalyKind, u32, Origin)> = self
            .by_signature
            .values()
            .map(|f| (f.signature.clone(), (f.kind, f.hits, f.origin)))
            .collect();
        for f in self.by_signature.values_mut() {
            let with: Vec<&TrialRun> = runs
                .iter()
                .filter(|r| r.signatures.contains(&f.signature))
                .collect();
            let Some(first) = with.first() else {
                f.consequence_of = None;
                continue;
            };
            // The most telling cause first: one the search found (a signature every run shows,
            // the base's own, explains nothing), then the higher rank, then the rarer one (it
            // co-occurs more specifically).
            let mut best: Option<(bool, u8, u32, &String)> = None;
            for other in &first.signatures {
                let Some(&(kind, hits, origin)) = kinds.get(other) else {
                    continue;
                };
                if other == &f.signature || rank(kind) >= rank(f.kind) {
                    continue;
                }
                if !with.iter().all(|r| r.signatures.contains(other)) {
                    continue;
                }
                let key = (origin == Origin::Baseline, rank(kind), hits, other);
                if best.as_ref().is_none_or(|b| key < *b) {
                    best = Some(key);
                }
            }
            f.consequence_of = best.map(|(_, _, _, s)| s.clone());
        }
    }

    /// Sets every finding's origin from the search hits and the `baseline_runs` unperturbed
    /// runs: baseline when it showed in no search run or in every baseline run.
    pub fn classify(&mut self, baseline_runs: u32) {
        for f in self.by_signature.values_mut() {
            f.origin = if f.hits == 0 || (baseline_runs > 0 && f.baseline_hits >= baseline_runs) {
                Origin::Baseline
            } else {
                Origin::Found
            };
        }
    }
}

/// Which trials a report covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// 1-based.
    pub index: u32,
    /// Shards.
    pub count: u32,
}

/// `explore.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExploreReport {
    /// Base scenario name.
    pub scenario: String,
    /// Variants hunted.
    pub variants: BTreeSet<String>,
    /// Kernel releases seen (`uname -r` of the guests), for the record.
    #[serde(default)]
    pub kernels: BTreeSet<String>,
    /// How the plan was laid out.
    pub plan: PlanConfig,
    /// Candidate points.
    pub candidates: usize,
    /// Points the probe reached.
    pub reached: BTreeSet<String>,
    /// Signatures the probe runs showed. Not findings: the probe stalls every reached point
    /// briefly, and its socket round trips per arrival can open a window by themselves; the
    /// search must find such a signature with a plan of one or two rules to report it.
    #[serde(default)]
    pub probe_signatures: BTreeSet<String>,
    /// Trials in the whole plan (after `--runs`, before sharding).
    pub planned: usize,
    /// The shards this report covers (absent: all of the plan in one run; after a merge, the
    /// merged shards).
    #[serde(default)]
    pub shards: Vec<ShardInfo>,
    /// Unperturbed baseline runs (each shard runs its own).
    #[serde(default)]
    pub baseline_runs: u32,
    /// Search runs in which no rule fired.
    #[serde(default)]
    pub unfired_runs: u32,
    /// The search runs without a firing were set apart already (reports of older builds were
    /// not; `merge` does it for them).
    #[serde(default)]
    pub unperturbed_counted: bool,
    /// Search runs performed.
    pub trials: Vec<TrialRun>,
    /// Runs spent on baseline, probe and minimization.
    pub extra_runs: u32,
    /// Findings, by signature.
    pub findings: Vec<Finding>,
    /// Host seconds.
    pub elapsed_s: f64,
    /// The budget stopped the search before the plan's end.
    pub stopped_by_budget: bool,
}

/// Reports cannot be merged.
#[derive(Debug, Error, PartialEq)]
pub enum MergeError {
    /// Nothing to merge.
    #[error("no report to merge")]
    Empty,
    /// Shards of different hunts.
    #[error("{what} differs between the reports ({a} vs {b}): they are not shards of one hunt")]
    Mismatch {
        /// Which field.
        what: &'static str,
        /// One value.
        a: String,
        /// The other.
        b: String,
    },
    /// The same trial appears twice.
    #[error("trial {0} appears in two reports: the same shard merged twice?")]
    Overlap(usize),
}

impl ExploreReport {
    /// Combines shard reports of one hunt: trials concatenated (each at most once), findings
    /// folded by signature (hits summed, the earliest trial kept, the smallest confirmed
    /// minimized plan kept).
    pub fn merge(reports: Vec<ExploreReport>) -> Result<ExploreReport, MergeError> {
        let reports: Vec<ExploreReport> = reports
            .into_iter()
            .map(|mut r| {
                if !r.unperturbed_counted {
                    let mut set = FindingSet::default();
                    for f in std::mem::take(&mut r.findings) {
                        set.add(f);
                    }
                    r.unfired_runs += set.reattribute_unperturbed(&r.trials);
                    r.findings = set.iter().cloned().collect();
                    r.unperturbed_counted = true;
                }
                r
            })
            .collect();
        let mut it = reports.into_iter();
        let mut out = it.next().ok_or(MergeError::Empty)?;
        let mut findings = FindingSet::default();
        for f in std::mem::take(&mut out.findings) {
            findings.add(f);
        }
        let mut seen: BTreeSet<usize> = out.trials.iter().map(|t| t.index).collect();
        for r in it {
            if r.scenario != out.scenario {
                return Err(MergeError::Mismatch {
                    what: "scenario",
                    a: out.scenario.clone(),
                    b: r.scenario,
                });
            }
            if r.plan != out.plan {
                return Err(MergeError::Mismatch {
                    what: "plan (seed, ladder, count, pairs)",
                    a: format!("{:?}", out.plan),
                    b: format!("{:?}", r.plan),
                });
            }
            for t in r.trials {
                if !seen.insert(t.index) {
                    return Err(MergeError::Overlap(t.index));
                }
                out.trials.push(t);
            }
            for f in r.findings {
                findings.add(f);
            }
            out.variants.extend(r.variants);
            out.kernels.extend(r.kernels);
            out.reached.extend(r.reached);
            out.probe_signatures.extend(r.probe_signatures);
            out.candidates = out.candidates.max(r.candidates);
            out.planned = out.planned.max(r.planned);
            out.shards.extend(r.shards);
            out.extra_runs += r.extra_runs;
            out.baseline_runs += r.baseline_runs;
            out.unfired_runs += r.unfired_runs;
            out.elapsed_s = out.elapsed_s.max(r.elapsed_s);
            out.stopped_by_budget |= r.stopped_by_budget;
        }
        out.trials.sort_by_key(|t| t.index);
        out.shards.sort_by_key(|s| s.index);
        findings.classify(out.baseline_runs);
        findings.link_consequences(&out.trials);
        out.findings = findings.iter().cloned().collect();
        Ok(out)
    }

    /// Signatures the search found (baseline ones excluded), sorted.
    pub fn found_signatures(&self) -> Vec<String> {
        self.findings
            .iter()
            .filter(|f| f.origin == Origin::Found)
            .map(|f| f.signature.clone())
            .collect()
    }

    /// The summary table printed at the end of a hunt.
    pub fn render_table(&self) -> String {
        let mut s = format!(
            "explore {}: {} of {} trial(s) run{}, {} extra run(s), {} candidate point(s), {} \
             reached, kernels {}\n",
            self.scenario,
            self.trials.len(),
            self.planned,
            if self.stopped_by_budget {
                " (budget reached)"
            } else {
                ""
            },
            self.extra_runs,
            self.candidates,
            self.reached.len(),
            if self.kernels.is_empty() {
                "unknown".to_string()
            } else {
                self.kernels.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        );
        if !self.probe_signatures.is_empty() {
            s += &format!(
                "probe runs showed (not findings by themselves): {}\n",
                self.probe_signatures
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        if self.findings.is_empty() {
            s += "no finding\n";
        }
        for f in self.findings.iter().filter(|f| f.consequence_of.is_none()) {
            let with: Vec<&str> = self
                .findings
                .iter()
                .filter(|c| c.consequence_of.as_deref() == Some(f.signature.as_str()))
                .map(|c| c.signature.as_str())
                .collect();
            let rate = f
                .minimized
                .as_ref()
                .map(|m| {
                    format!(
                        " | minimized{} to [{}], rate {}/{}",
                        if m.confirmed { "" } else { " (NOT confirmed)" },
                        m.plan_text(),
                        m.hits,
                        m.tries
                    )
                })
                .unwrap_or_default();
            s += &format!(
                "{:<8} {}: {} hit(s){}{}{}\n",
                match f.origin {
                    Origin::Found => "FOUND",
                    Origin::Baseline => "BASELINE",
                },
                f.signature,
                f.hits,
                {
                    let mut also = Vec::new();
                    if f.baseline_hits > 0 {
                        also.push(format!(
                            "in {} of {} unperturbed baseline run(s)",
                            f.baseline_hits, self.baseline_runs
                        ));
                    }
                    if f.unfired_hits > 0 {
                        also.push(format!(
                            "in {} of {} search run(s) where no rule fired",
                            f.unfired_hits, self.unfired_runs
                        ));
                    }
                    if also.is_empty() {
                        String::new()
                    } else {
                        format!(" (also {})", also.join("; "))
                    }
                },
                f.first_trial
                    .map(|t| format!(", first t{t:04} [{}]", f.first_rules.join("; ")))
                    .unwrap_or_default(),
                rate
            );
            for c in with {
                s += &format!("         with: {c}\n");
            }
        }
        s
    }

    /// JUnit: one test case per trial (an error when the run could not be performed) and one
    /// per finding the search caused (a failure: something to look at).
    pub fn render_junit(&self) -> String {
        let mut cases: Vec<Case> = self
            .trials
            .iter()
            .map(|t| Case {
                classname: format!("explore.{}.trials", self.scenario),
                name: format!("t{:04} {}", t.index, t.rules.join("; ")),
                time_s: t.wall_s,
                error: t.error.as_ref().map(|e| Problem {
                    message: e.lines().next().unwrap_or("").to_string(),
                    body: e.clone(),
                }),
                system_out: (!t.signatures.is_empty()).then(|| t.signatures.join("\n")),
                ..Case::default()
            })
            .collect();
        for f in self.findings.iter().filter(|f| f.origin == Origin::Found) {
            cases.push(Case {
                classname: format!("explore.{}.findings", self.scenario),
                name: f.signature.clone(),
                failure: Some(Problem {
                    message: format!("{} hit(s): {}", f.hits, f.signature),
                    body: format!(
                        "evidence: {}\nfirst rules: {}\nruns: {}",
                        f.evidence,
                        f.first_rules.join("; "),
                        f.runs.join(", ")
                    ),
                }),
                ..Case::default()
            });
        }
        let time = self.trials.iter().map(|t| t.wall_s).sum();
        render_report(&Report {
            name: "sluice".into(),
            time_s: time,
            suite: Suite {
                name: format!("sluice-explore-{}", self.scenario),
                time_s: time,
                counts: Counts::All,
                cases,
            },
        })
    }
}

/// A scenario as TOML text (what a finding's scenario file holds after its comment header).
pub fn scenario_toml(s: &Scenario) -> Result<String, toml::ser::Error> {
    toml::to_string(s)
}

/// A file-name-safe short form of a signature.
pub fn slug(signature: &str) -> String {
    let mut s: String = signature
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    s.trim_matches('-').chars().take(60).collect()
}

/// A ready scenario for a minimized finding: the base scenario with the minimized rules, the
/// variants it was seen on, and an expectation that the signature's evidence appears at the
/// measured rate. `None` when the finding's kind has no expectation the harness can state.
pub fn finding_scenario(base: &Scenario, f: &Finding, index: usize) -> Option<Scenario> {
    let m = f.minimized.as_ref()?;
    let mut expect = Expect {
        variants: None,
        escapes_required: Vec::new(),
        escapes_forbidden: Vec::new(),
        console_required: Vec::new(),
        console_forbidden: Vec::new(),
        min_faults: None,
        max_faults: None,
        exit: Some("any".into()),
        min_rate: (m.rate() * 10.0).floor() / 10.0,
    };
    match f.kind {
        AnomalyKind::Escape => {
            // "escape <class> from <site>"
            let class = f.signature.split_whitespace().nth(1)?;
            expect.escapes_required.push(class.to_string());
        }
        AnomalyKind::Fault => expect.min_faults = Some(1),
        AnomalyKind::KernelReport => {
            // The report's first line up to the first normalized part, as a literal regex.
            let head = f.evidence.split(" at ").next().unwrap_or(&f.evidence);
            let head: String = head.chars().take(60).collect();
            expect.console_required.push(regex::escape(head.trim()));
        }
        AnomalyKind::Hang => expect.exit = Some("timeout".into()),
        AnomalyKind::Workload => expect.console_required.push("RESULT FAIL".into()),
        AnomalyKind::Exit => {
            expect.exit = Some(f.signature.strip_prefix("exit ")?.to_string());
        }
    }
    let mut s = base.clone();
    s.name = format!("{}-finding-{index:02}", base.name);
    s.description = format!("explore finding: {}", f.signature);
    s.variants = f.variants.iter().cloned().collect();
    s.seeds = m.tries.max(1);
    s.inject.rules = m.rules.iter().map(TrialRule::to_string).collect();
    s.expect = vec![expect];
    s.sweep = None;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::SweepMode;

    fn anomaly(sig: &str) -> Anomaly {
        Anomaly {
            kind: AnomalyKind::Escape,
            signature: sig.into(),
            evidence: format!("evidence of {sig}"),
        }
    }

    fn report(index: u32, trials: &[usize], set: &FindingSet) -> ExploreReport {
        ExploreReport {
            scenario: "base".into(),
            variants: BTreeSet::from(["6.12".to_string()]),
            kernels: BTreeSet::new(),
            plan: PlanConfig::default(),
            candidates: 10,
            reached: BTreeSet::from([format!("p{index}")]),
            probe_signatures: BTreeSet::new(),
            planned: 8,
            shards: vec![ShardInfo { index, count: 2 }],
            baseline_runs: 1,
            unfired_runs: 0,
            unperturbed_counted: true,
            trials: trials
                .iter()
                .map(|&i| TrialRun {
                    index: i,
                    id: format!("t{i}"),
                    variant: "6.12".into(),
                    rules: vec![format!("p{i}:delay=1ms")],
                    firings: vec![1],
                    signatures: vec![],
                    error: None,
                    wall_s: 1.0,
                })
                .collect(),
            extra_runs: 2,
            findings: set.iter().cloned().collect(),
            elapsed_s: 10.0,
            stopped_by_budget: false,
        }
    }

    fn minimized(rules: usize, delay_ms: u64) -> Minimized {
        Minimized {
            rules: (0..rules)
                .map(|i| TrialRule {
                    point: format!("p{i}"),
                    delay_us: delay_ms * 1000,
                    count: 1,
                    mode: SweepMode::Stall,
                })
                .collect(),
            confirmed: true,
            hits: 3,
            tries: 4,
            runs: 9,
            steps: vec![],
        }
    }

    #[test]
    fn anomalies_group_by_signature_and_baseline_ones_stay_baseline() {
        let mut set = FindingSet::default();
        set.record(&[anomaly("escape x from blk0")], "6.12", "base0", None);
        set.record(
            &[anomaly("escape x from blk0"), anomaly("fault on blk0")],
            "6.12",
            "t3",
            Some((3, &["a".to_string()])),
        );
        set.record(
            &[anomaly("fault on blk0")],
            "6.1",
            "t1",
            Some((1, &["b".into()])),
        );
        set.record(&[anomaly("noise")], "6.12", "base1", None);
        set.classify(2);
        let all: Vec<&Finding> = set.iter().collect();
        assert_eq!(all.len(), 3);
        assert_eq!(
            (all[0].origin, all[0].baseline_hits),
            (Origin::Found, 1),
            "seen by the search and in one of two baselines: the hunt's, with its baseline rate"
        );
        let fault = &all[1];
        assert_eq!(fault.origin, Origin::Found);
        assert_eq!(fault.hits, 2);
        assert_eq!(fault.first_trial, Some(1), "the earliest trial wins");
        assert_eq!(fault.first_rules, ["b"]);
        assert_eq!(fault.trials, [1, 3]);
        assert_eq!(fault.variants.len(), 2);
        assert_eq!(all[2].origin, Origin::Baseline, "never in a search run");
        assert_eq!(set.found().count(), 2);
        set.classify(1);
        assert_eq!(
            set.iter().next().unwrap().origin,
            Origin::Baseline,
            "in every baseline run: the base's own"
        );
    }

    #[test]
    fn signatures_that_always_come_with_a_higher_one_are_its_consequences() {
        let mut set = FindingSet::default();
        let kinds = [
            (
                "kernel Kernel panic - not syncing: x",
                AnomalyKind::KernelReport,
            ),
            ("exit guest-panic", AnomalyKind::Exit),
            ("escape e from blk0", AnomalyKind::Escape),
            ("workload no RESULT line", AnomalyKind::Workload),
        ];
        let a = |i: usize| Anomaly {
            kind: kinds[i].1,
            signature: kinds[i].0.into(),
            evidence: String::new(),
        };
        let run = |i: usize, sigs: &[usize]| TrialRun {
            index: i,
            id: format!("t{i}"),
            variant: "6.12".into(),
            rules: vec![],
            firings: vec![],
            signatures: sigs.iter().map(|&k| kinds[k].0.to_string()).collect(),
            error: None,
            wall_s: 1.0,
        };
        // Run 0: a panic (exit + no RESULT follow); run 1: an escape with no RESULT.
        let runs = [run(0, &[0, 1, 3]), run(1, &[2, 3])];
        set.record(&[a(0), a(1), a(3)], "6.12", "t0", Some((0, &[])));
        set.record(&[a(2), a(3)], "6.12", "t1", Some((1, &[])));
        set.classify(1);
        set.link_consequences(&runs);
        let of = |s: &str| {
            set.iter()
                .find(|f| f.signature == s)
                .unwrap()
                .consequence_of
                .clone()
        };
        assert_eq!(
            of(kinds[1].0).as_deref(),
            Some(kinds[0].0),
            "the exit follows the panic"
        );
        assert_eq!(of(kinds[0].0), None);
        assert_eq!(of(kinds[2].0), None);
        assert_eq!(
            of(kinds[3].0),
            None,
            "no RESULT came with the panic once and with the escape once: neither explains it"
        );
        // A baseline signature present in every run explains nothing: the found one is the cause.
        let mut set = FindingSet::default();
        let base = Anomaly {
            kind: AnomalyKind::Escape,
            signature: "escape wrong-domain from dma0".into(),
            evidence: String::new(),
        };
        set.record(std::slice::from_ref(&base), "6.12", "b0", None);
        set.record(&[base.clone(), a(2), a(3)], "6.12", "t1", Some((1, &[])));
        set.record(std::slice::from_ref(&base), "6.12", "t2", Some((2, &[])));
        set.classify(1);
        let runs = [
            TrialRun {
                signatures: vec![base.signature.clone(), kinds[2].0.into(), kinds[3].0.into()],
                ..run(1, &[])
            },
            TrialRun {
                signatures: vec![base.signature.clone()],
                ..run(2, &[])
            },
        ];
        set.link_consequences(&runs);
        let workload = set.iter().find(|f| f.signature == kinds[3].0).unwrap();
        assert_eq!(workload.consequence_of.as_deref(), Some(kinds[2].0));
    }

    #[test]
    fn a_search_run_in_which_nothing_fired_is_not_the_plans_doing() {
        let mut set = FindingSet::default();
        let panic = Anomaly {
            kind: AnomalyKind::KernelReport,
            signature: "kernel Kernel panic - IO-APIC".into(),
            evidence: String::new(),
        };
        let run = |i: usize, fired: u64| TrialRun {
            index: i,
            id: format!("t{i}"),
            variant: "6.12".into(),
            rules: vec![format!("r{i}")],
            firings: vec![fired],
            signatures: vec![panic.signature.clone()],
            error: None,
            wall_s: 1.0,
        };
        // The panic comes before the stall in t2 (0 firings) and after it in t5.
        let runs = [run(2, 0), run(5, 1)];
        set.record(
            std::slice::from_ref(&panic),
            "6.12",
            "t2",
            Some((2, &["r2".into()])),
        );
        set.record(
            std::slice::from_ref(&panic),
            "6.12",
            "t5",
            Some((5, &["r5".into()])),
        );
        assert_eq!(set.reattribute_unperturbed(&runs), 1);
        let f = set.iter().next().unwrap();
        assert_eq!((f.hits, f.unfired_hits, f.baseline_hits), (1, 1, 0));
        assert_eq!(f.first_trial, Some(5));
        assert_eq!(f.first_rules, ["r5"]);
        set.classify(2);
        assert_eq!(set.found().count(), 1, "a perturbed hit, clean baselines");
        // Shown only by a run where nothing fired: not the plan's doing.
        let mut only_unfired = FindingSet::default();
        only_unfired.record(
            std::slice::from_ref(&panic),
            "6.12",
            "t2",
            Some((2, &["r2".into()])),
        );
        only_unfired.reattribute_unperturbed(&runs[..1]);
        only_unfired.classify(2);
        assert_eq!(only_unfired.found().count(), 0);
    }

    #[test]
    fn merging_shards_dedups_signatures_and_keeps_the_smallest_plan() {
        let mut a = FindingSet::default();
        a.record(&[anomaly("s1")], "6.12", "t2", Some((2, &["r2".into()])));
        a.get_mut("s1").unwrap().minimized = Some(minimized(2, 100));
        let mut b = FindingSet::default();
        b.record(
            &[anomaly("s1"), anomaly("s2")],
            "6.12",
            "t1",
            Some((1, &["r1".into()])),
        );
        b.get_mut("s1").unwrap().minimized = Some(minimized(1, 300));
        let m = ExploreReport::merge(vec![report(1, &[0, 2], &a), report(2, &[1, 3], &b)]).unwrap();
        assert_eq!(m.found_signatures(), ["s1", "s2"]);
        assert_eq!(
            m.trials.iter().map(|t| t.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        let s1 = m.findings.iter().find(|f| f.signature == "s1").unwrap();
        assert_eq!(s1.hits, 2);
        assert_eq!(s1.first_trial, Some(1));
        assert_eq!(
            s1.minimized.as_ref().unwrap().rules.len(),
            1,
            "fewer rules wins"
        );
        assert_eq!(m.shards.len(), 2);
        assert_eq!(m.extra_runs, 4);
        assert_eq!(m.reached.len(), 2);
    }

    #[test]
    fn merging_refuses_other_hunts_and_the_same_shard_twice() {
        let set = FindingSet::default();
        let a = report(1, &[0], &set);
        assert_eq!(
            ExploreReport::merge(vec![a.clone(), a.clone()]),
            Err(MergeError::Overlap(0))
        );
        let mut other = report(2, &[1], &set);
        other.plan.seed = 9;
        assert!(matches!(
            ExploreReport::merge(vec![a.clone(), other]),
            Err(MergeError::Mismatch { what, .. }) if what.starts_with("plan")
        ));
        assert_eq!(ExploreReport::merge(vec![]), Err(MergeError::Empty));
        // A report round-trips through its JSON.
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<ExploreReport>(&json).unwrap(), a);
    }

    #[test]
    fn a_minimized_escape_becomes_a_scenario_that_requires_it() {
        let base: Scenario = toml::from_str(
            "name = \"base\"\nvariants = [\"6.12\"]\n[devices]\niommu = \"virtio\"\n",
        )
        .unwrap();
        let mut set = FindingSet::default();
        set.record(
            &[anomaly("escape bypass-after-takeover from blk0")],
            "6.12",
            "t0",
            Some((0, &["r".into()])),
        );
        let f = set
            .get_mut("escape bypass-after-takeover from blk0")
            .unwrap();
        f.minimized = Some(minimized(1, 50));
        let s = finding_scenario(&base, f, 1).unwrap();
        assert_eq!(s.name, "base-finding-01");
        assert_eq!(s.inject.rules, ["p0:delay=50ms,count=1,mode=stall"]);
        assert_eq!(s.expect[0].escapes_required, ["bypass-after-takeover"]);
        assert_eq!(s.expect[0].min_rate, 0.7);
        assert_eq!(s.seeds, 4);
        let text = toml::to_string(&s).unwrap();
        let back: Scenario = toml::from_str(&text).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            slug("kernel WARNING: at drivers/iommu/iommu.c x"),
            "kernel-warning-at-drivers-iommu-iommu-c-x"
        );
    }

    #[test]
    fn junit_marks_found_signatures_as_failures_and_failed_runs_as_errors() {
        let mut set = FindingSet::default();
        set.record(&[anomaly("s<1>")], "6.12", "t0", Some((0, &["r".into()])));
        set.record(&[anomaly("base")], "6.12", "b", None);
        set.classify(1);
        let mut r = report(1, &[0, 1], &set);
        r.trials[1].error = Some("image build failed".into());
        let x = r.render_junit();
        assert!(x.contains("failures=\"1\""), "{x}");
        assert!(x.contains("errors=\"1\""), "{x}");
        assert!(x.contains("s&lt;1&gt;"));
        assert!(
            !x.contains("name=\"base\""),
            "baseline signatures are not failures"
        );
    }
}
