//! `sluice harness explore`: a hunt over points Sluice chooses itself (`docs/scenarios.md`,
//! "Explore"). The plan, signatures, grouping and minimization live in
//! `sluice_harness::explore`; this file boots the guests: an unperturbed baseline, the probe
//! that learns which points a run reaches, the search trials (this shard's share), and the
//! minimization runs of each new signature; then it writes `explore.json`, JUnit, a summary
//! and one scenario file per minimized finding.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use regex::Regex;
use sluice_harness::explore::candidates::{self, DevicePoint};
use sluice_harness::explore::findings::{ShardInfo, finding_scenario, scenario_toml, slug};
use sluice_harness::explore::plan::{self, PlanConfig, Trial, TrialRule};
use sluice_harness::explore::progress::{Progress, format_duration};
use sluice_harness::explore::{
    Candidate, ExploreReport, FindingSet, MinimizeConfig, Origin, TrialRun, anomalies, minimize,
};
use sluice_harness::sweep::drive::Clock;
use sluice_harness::sweep::{self, SweepCase, WallClock};
use sluice_harness::{Observation, RunCase, Runner, Scenario, Shard};
use sluice_inject::PointRegistry;

use crate::harness_cmd::{self, GuestRunner, Guests, check_rules, variant_exists};

#[derive(Debug, Args)]
pub struct HarnessExploreArgs {
    /// The base scenario: workload, module order, IOMMU, devices. Its [inject] rules are
    /// dropped (a hunt starts from nothing); rogue DMAs stay (they are workload).
    scenario: PathBuf,
    /// Guest variant. Default: the scenario's first.
    #[arg(long)]
    variant: Option<String>,
    /// Seed of the plan's order and of the runs; the same seed gives the same plan.
    #[arg(long, default_value_t = 1)]
    seed: u32,
    /// Search runs at most: the first N trials of the plan (before sharding).
    #[arg(long)]
    runs: Option<usize>,
    /// Stop launching search runs that would end after this much wall time (e.g. 2h, 45m).
    /// Default: none with --runs, else 1h.
    #[arg(long, value_name = "DURATION")]
    budget: Option<String>,
    /// Run shard i of n (1-based) of the plan, e.g. 2/4; every shard probes on its own.
    #[arg(long)]
    shard: Option<Shard>,
    /// Delay ladder in milliseconds, in the order tried (default 100,500,20).
    #[arg(long, value_delimiter = ',', value_name = "MS")]
    delays: Vec<u64>,
    /// Firings per trial rule (default 2).
    #[arg(long)]
    count: Option<u32>,
    /// Points taking part in pairs, best-ranked first (default 12; 0: no pairs).
    #[arg(long)]
    pair_points: Option<usize>,
    /// Only points whose name matches this regex (e.g. 'probe|attach').
    #[arg(long, value_name = "REGEX")]
    only: Option<String>,
    /// No guest-code points.
    #[arg(long)]
    no_guest_points: bool,
    /// No device points.
    #[arg(long)]
    no_device_points: bool,
    /// Extra keys for every trial rule, e.g. 'after=insmod virtio_iommu'.
    #[arg(long, value_name = "KEY=VALUE,...")]
    rule_options: Option<String>,
    /// Unperturbed baseline runs: a signature in every one is the base's own, one in some is
    /// reported with its baseline rate.
    #[arg(long, default_value_t = 2)]
    baseline_runs: u32,
    /// Probe runs (each arms every candidate once, briefly).
    #[arg(long, default_value_t = 1)]
    probes: u32,
    /// Do not minimize findings.
    #[arg(long)]
    no_minimize: bool,
    /// Runs one minimization may spend before its final rate.
    #[arg(long, default_value_t = 12)]
    minimize_runs: u32,
    /// Wall time for minimization after the search: no new finding's minimization starts
    /// after it (findings with more hits go first), e.g. 15m.
    #[arg(long, value_name = "DURATION", default_value = "20m")]
    minimize_budget: String,
    /// Runs of a minimized plan that measure its rate.
    #[arg(long, default_value_t = 4)]
    rate_runs: u32,
    /// Trials that showed a signature to minimize from, in order, until one is confirmed at
    /// >= 50 % (a flaky first trial is not the end of it).
    #[arg(long, default_value_t = 3)]
    minimize_starts: usize,
    /// Guests run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Artifact directory: one subdirectory per run, explore.json, junit.xml, summary.txt,
    /// findings/*.toml.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the candidates and the plan as if every candidate were reached, then exit.
    #[arg(long)]
    dry_run: bool,
    /// QEMU binary (default: the project's patched build).
    #[arg(long, env = "SLUICE_QEMU")]
    qemu: Option<PathBuf>,
}

impl HarnessExploreArgs {
    fn plan_config(&self) -> PlanConfig {
        let d = PlanConfig::default();
        PlanConfig {
            seed: u64::from(self.seed),
            ladder_ms: if self.delays.is_empty() {
                d.ladder_ms
            } else {
                self.delays.clone()
            },
            count: self.count.unwrap_or(d.count),
            pair_points: self.pair_points.unwrap_or(d.pair_points),
        }
    }
}

/// The candidates of `scenario` on this variant, each checked alone against the run's points
/// (a point the registry refuses is left out and counted).
fn choose_candidates(
    args: &HarnessExploreArgs,
    reg: &PointRegistry,
) -> Result<(Vec<Candidate>, usize)> {
    let only = args
        .only
        .as_deref()
        .map(Regex::new)
        .transpose()
        .context("--only")?;
    let mut out = Vec::new();
    if !args.no_guest_points {
        let Some(symbols) = reg.symbols() else {
            bail!("the guest's System.map is missing: guest-code points cannot be chosen");
        };
        out.extend(candidates::guest_candidates(symbols.names(), only.as_ref()));
    }
    if !args.no_device_points {
        let points: Vec<DevicePoint> = reg
            .points()
            .map(|p| DevicePoint {
                name: p.name.clone(),
                defer: p.defer,
                hot: p.hot,
            })
            .collect();
        out.extend(candidates::device_candidates(&points, only.as_ref()));
    }
    let before = out.len();
    out.retain(|c| {
        let probe = plan::probe_rules(std::slice::from_ref(c));
        check_rules(reg, &probe, true).is_ok()
    });
    Ok((out.clone(), before - out.len()))
}

/// The kernel release a run's console announced (`SLUICE: kernel=...`).
fn kernel_of(obs: &Observation) -> Option<String> {
    obs.console.iter().find_map(|l| {
        l.split("SLUICE: kernel=")
            .nth(1)
            .map(|k| k.trim().to_string())
    })
}

struct Hunt<'a> {
    base: &'a Scenario,
    variant: String,
    runner: GuestRunner<'a>,
    out: PathBuf,
    extra: Option<String>,
}

impl Hunt<'_> {
    /// A run case of the base with `rules`, in its own directory named by `label`.
    fn case(&self, label: &str, rules: Vec<String>, seed: u32) -> RunCase {
        let mut s = self.base.clone();
        s.inject.rules = rules;
        RunCase {
            scenario: Arc::new(s),
            variant: self.variant.clone(),
            seed,
            cell: Some(label.to_string()),
        }
    }

    fn run(&self, label: &str, rules: Vec<String>, seed: u32) -> (RunCase, Observation) {
        let case = self.case(label, rules, seed);
        let obs = self.runner.run(&case, &self.out.join(case.id()));
        (case, obs)
    }
}

pub fn explore(args: HarnessExploreArgs) -> Result<ExitCode> {
    let mut base = Scenario::load(&args.scenario, &variant_exists)?;
    if !base.inject.rules.is_empty() {
        eprintln!(
            "explore: the base's {} [inject] rule(s) are dropped: a hunt starts from nothing",
            base.inject.rules.len()
        );
        base.inject.rules.clear();
    }
    let variant = match &args.variant {
        Some(v) if variant_exists(v) => v.clone(),
        Some(v) => bail!("--variant {v:?}: unknown guest variant (see guest-images/variants/)"),
        None => base
            .variants
            .first()
            .cloned()
            .context("the scenario names no variant")?,
    };
    let budget = match (&args.budget, args.runs) {
        (Some(b), _) => sweep::spec::parse_budget(b)?,
        (None, Some(_)) => Duration::MAX,
        (None, None) => Duration::from_secs(3600),
    };
    let cfg = args.plan_config();
    let guests = Guests::prepare(std::slice::from_ref(&variant), args.qemu.clone())?;
    let reg = guests.registry(&base, &variant)?;
    let (cands, refused) = choose_candidates(&args, &reg)?;
    if cands.is_empty() {
        bail!("no candidate point (check --only and the variant's System.map)");
    }
    eprintln!(
        "explore: {} on {variant}: {} candidate point(s) ({} guest code, {} device){}",
        base.name,
        cands.len(),
        cands
            .iter()
            .filter(|c| c.point.starts_with(candidates::GUEST_SYM_PREFIX))
            .count(),
        cands
            .iter()
            .filter(|c| !c.point.starts_with(candidates::GUEST_SYM_PREFIX))
            .count(),
        if refused > 0 {
            format!(", {refused} refused by the run's registry")
        } else {
            String::new()
        }
    );
    if args.dry_run {
        let all: Vec<BTreeSet<String>> = vec![cands.iter().map(|c| c.point.clone()).collect()];
        let trials = plan_trials(&cands, &all, &cfg, args.runs);
        println!("candidates:");
        for c in &cands {
            println!(
                "  {:<60} {:?}{}",
                c.point,
                c.tier,
                if c.defer { " defer" } else { "" }
            );
        }
        println!(
            "plan if every candidate were reached ({} trials):",
            trials.len()
        );
        for t in trials.iter().take(200) {
            println!(
                "  {} {}",
                t.label(),
                t.rendered(args.rule_options.as_deref()).join("; ")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let out = harness_cmd::out_dir(args.out.as_deref(), "explore")?;
    let hunt = Hunt {
        base: &base,
        variant: variant.clone(),
        runner: GuestRunner { guests: &guests },
        out: out.clone(),
        extra: args.rule_options.clone(),
    };
    let clock = WallClock::start();
    let mut findings = FindingSet::default();
    let mut kernels = BTreeSet::new();
    let mut extra_runs = 0u32;

    // The unperturbed baselines: what shows in every one of them is the base's own.
    for b in 0..args.baseline_runs.max(1) {
        let (_, obs) = hunt.run(&format!("baseline{b}"), Vec::new(), args.seed + b);
        extra_runs += 1;
        if let Some(e) = &obs.error {
            bail!("baseline run {b} could not be performed: {e}");
        }
        kernels.extend(kernel_of(&obs));
        let base_anoms = anomalies(&obs);
        findings.record(&base_anoms, &variant, &format!("baseline{b}"), None);
        eprintln!(
            "explore: baseline {b} {:.1}s: {}",
            obs.wall_s,
            describe(
                &base_anoms
                    .iter()
                    .map(|a| a.signature.clone())
                    .collect::<Vec<_>>()
            )
        );
    }

    // The probe: which candidates a run reaches.
    let probe_rules = plan::probe_rules(&cands);
    let mut firings = Vec::new();
    let mut probe_signatures = BTreeSet::new();
    for p in 0..args.probes.max(1) {
        let (_, obs) = hunt.run(&format!("probe{p}"), probe_rules.clone(), args.seed + p);
        extra_runs += 1;
        if let Some(e) = &obs.error {
            bail!("probe run {p} could not be performed: {e}");
        }
        if obs.firings.len() != probe_rules.len() {
            bail!(
                "probe run {p}: {} firing counts for {} rules",
                obs.firings.len(),
                probe_rules.len()
            );
        }
        let anoms = anomalies(&obs);
        probe_signatures.extend(anoms.iter().map(|a| a.signature.clone()));
        eprintln!(
            "explore: probe {p} {:.1}s: {} of {} points reached; {}",
            obs.wall_s,
            obs.firings.iter().filter(|n| **n > 0).count(),
            cands.len(),
            describe(
                &anoms
                    .iter()
                    .map(|a| a.signature.clone())
                    .collect::<Vec<_>>()
            )
        );
        firings.push(obs.firings);
    }
    let reached_sets = plan::reached_sets(&cands, &firings);
    let reached: BTreeSet<String> = reached_sets.iter().flatten().cloned().collect();
    let all_trials = plan_trials(&cands, &reached_sets, &cfg, args.runs);
    let planned = all_trials.len();
    let (shard_index, shard_count) = args.shard.map_or((1, 1), |s| (s.index, s.count));
    let trials = plan::shard(all_trials, shard_index, shard_count);
    eprintln!(
        "explore: {} trial(s) planned{}; this run: {}; artifacts in {}",
        planned,
        args.runs
            .map(|n| format!(" (--runs {n})"))
            .unwrap_or_default(),
        trials.len(),
        out.display()
    );

    // The search.
    let runs: Vec<SweepCase> = trials
        .iter()
        .map(|t| SweepCase {
            cell: t.index,
            case: hunt.case(&t.label(), t.rendered(hunt.extra.as_deref()), args.seed),
        })
        .collect();
    let by_index: std::collections::BTreeMap<usize, &Trial> =
        trials.iter().map(|t| (t.index, t)).collect();
    let tty = std::io::stderr().is_terminal();
    let state = Mutex::new((findings, Progress::new(runs.len()), Vec::<TrialRun>::new()));
    let on_done = |_: usize, run: &SweepCase, obs: &Observation| {
        let anoms = anomalies(obs);
        let rules = run.case.scenario.inject.rules.clone();
        let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
        let (findings, progress, done) = &mut *guard;
        let mut new = Vec::new();
        for a in &anoms {
            if !findings.contains(&a.signature) {
                new.push(a.signature.clone());
            }
        }
        findings.record(
            &anoms,
            &run.case.variant,
            &run.case.id(),
            Some((run.cell, &rules)),
        );
        progress.done += 1;
        progress.errors += usize::from(obs.error.is_some());
        progress.findings = findings.found().count();
        done.push(TrialRun {
            index: run.cell,
            id: run.case.id(),
            variant: run.case.variant.clone(),
            rules: rules.clone(),
            firings: obs.firings.clone(),
            signatures: anoms.iter().map(|a| a.signature.clone()).collect(),
            error: obs.error.clone(),
            wall_s: obs.wall_s,
        });
        let elapsed = clock.elapsed();
        let mut err = std::io::stderr().lock();
        for sig in &new {
            let line = format!(
                "explore: NEW {sig} (t{:04}: {})",
                run.cell,
                by_index
                    .get(&run.cell)
                    .map(|t| t.rendered(None).join("; "))
                    .unwrap_or_default()
            );
            let _ = writeln!(err, "{}{line}", if tty { "\r\x1b[K" } else { "" });
        }
        if let Some(e) = &obs.error {
            let _ = writeln!(
                err,
                "{}explore: ERROR t{:04}: {e}",
                if tty { "\r\x1b[K" } else { "" },
                run.cell
            );
        }
        if tty {
            let _ = write!(err, "\r\x1b[K{}", progress.line(elapsed));
            let _ = err.flush();
        } else if progress.plain_due(elapsed) {
            let _ = writeln!(err, "{}", progress.line(elapsed));
        }
    };
    let driven = sweep::drive(
        &runs,
        &hunt.runner,
        &clock,
        budget,
        args.jobs.max(1),
        &out,
        &on_done,
    );
    if tty {
        eprintln!();
    }
    let (mut findings, _, mut trial_runs) = state.into_inner().unwrap_or_else(|p| p.into_inner());
    // Search runs in which nothing fired were unperturbed runs (the guest died or finished
    // before the plan's point): what they showed is not the plan's doing.
    let baseline_runs = args.baseline_runs.max(1);
    let unfired_runs = findings.reattribute_unperturbed(&trial_runs);
    findings.classify(baseline_runs);
    findings.link_consequences(&trial_runs);
    trial_runs.sort_by_key(|t| t.index);

    // Minimization of each signature the search found.
    if !args.no_minimize {
        let mcfg = MinimizeConfig {
            max_runs: args.minimize_runs,
            final_tries: args.rate_runs.max(1),
            ..MinimizeConfig::default()
        };
        let minimize_budget =
            sweep::spec::parse_budget(&args.minimize_budget).context("--minimize-budget")?;
        let minimize_start = clock.elapsed();
        let mut order: Vec<&sluice_harness::explore::Finding> = findings
            .found()
            .filter(|f| f.consequence_of.is_none())
            .collect();
        order.sort_by_key(|f| std::cmp::Reverse(f.hits));
        let todo: Vec<(String, Vec<Vec<TrialRule>>)> = order
            .into_iter()
            .map(|f| {
                let starts = f
                    .trials
                    .iter()
                    .filter_map(|i| by_index.get(i).map(|t| t.rules.clone()))
                    .take(args.minimize_starts.max(1))
                    .collect();
                (f.signature.clone(), starts)
            })
            .collect();
        for (n, (sig, starts)) in todo.into_iter().enumerate() {
            if clock.elapsed().saturating_sub(minimize_start) >= minimize_budget {
                eprintln!("explore: minimization budget used up: {sig} not minimized");
                continue;
            }
            let mut attempt = 0u32;
            let mut best = None;
            for rules in starts {
                eprintln!(
                    "explore: minimizing {sig} from [{}]",
                    rules
                        .iter()
                        .map(TrialRule::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                let mut run_once = |r: &[TrialRule], k: u32| {
                    attempt += 1;
                    let rendered = r.iter().map(|x| x.render(hunt.extra.as_deref())).collect();
                    let label = format!("m{n:02}-{attempt:03}");
                    let (_, obs) = hunt.run(&label, rendered, args.seed + 1 + k);
                    anomalies(&obs).iter().any(|a| a.signature == sig)
                };
                let m = minimize(&rules, &mcfg, &mut run_once);
                extra_runs += m.runs;
                eprintln!(
                    "explore:   -> [{}] {}/{}{}",
                    m.plan_text(),
                    m.hits,
                    m.tries,
                    if m.confirmed {
                        ""
                    } else {
                        " (did not reproduce at >= 50 %)"
                    }
                );
                let done = m.confirmed;
                // Keep the confirmed one, else the best-rated attempt.
                if best
                    .as_ref()
                    .is_none_or(|b: &sluice_harness::explore::Minimized| {
                        m.confirmed || (!b.confirmed && m.rate() > b.rate())
                    })
                {
                    best = Some(m);
                }
                if done {
                    break;
                }
            }
            if let (Some(f), Some(m)) = (findings.get_mut(&sig), best) {
                f.minimized = Some(m);
            }
        }
    }

    // Outputs.
    let dir = out.join("findings");
    let mut written = 0;
    let found: Vec<String> = findings
        .found()
        .filter(|f| f.consequence_of.is_none())
        .map(|f| f.signature.clone())
        .collect();
    for (i, sig) in found.iter().enumerate() {
        let Some(f) = findings.get_mut(sig) else {
            continue;
        };
        if let Some(s) = finding_scenario(&base, f, i + 1) {
            std::fs::create_dir_all(&dir)?;
            let name = format!("{:02}-{}.toml", i + 1, slug(sig));
            let text = format!(
                "# Minimized by `sluice harness explore` from {} (seed {}).\n# Signature: {}\n\
                 # Evidence: {}\n{}",
                args.scenario.display(),
                args.seed,
                sig,
                f.evidence,
                scenario_toml(&s)?
            );
            std::fs::write(dir.join(&name), text)?;
            f.scenario_file = Some(format!("findings/{name}"));
            written += 1;
        }
    }
    let report = ExploreReport {
        scenario: base.name.clone(),
        variants: BTreeSet::from([variant]),
        kernels,
        plan: cfg,
        candidates: cands.len(),
        reached,
        probe_signatures,
        planned,
        shards: args
            .shard
            .map(|s| {
                vec![ShardInfo {
                    index: s.index,
                    count: s.count,
                }]
            })
            .unwrap_or_default(),
        baseline_runs,
        unfired_runs,
        unperturbed_counted: true,
        trials: trial_runs,
        extra_runs,
        findings: findings.iter().cloned().collect(),
        elapsed_s: clock.elapsed().as_secs_f64(),
        stopped_by_budget: driven.stopped.is_some(),
    };
    write_report(&report, &out)?;
    eprintln!(
        "explore: {} finding scenario(s) in {}; took {}",
        written,
        dir.display(),
        format_duration(clock.elapsed())
    );
    Ok(exit_code(&report))
}

/// The plan's trials, cut to `runs`.
fn plan_trials(
    cands: &[Candidate],
    reached: &[BTreeSet<String>],
    cfg: &PlanConfig,
    runs: Option<usize>,
) -> Vec<Trial> {
    let ranked = plan::rank(cands, reached, cfg.seed);
    let mut trials = plan::build(&ranked, reached, cfg);
    if let Some(n) = runs {
        trials.truncate(n);
    }
    trials
}

fn describe(sigs: &[String]) -> String {
    if sigs.is_empty() {
        "no anomaly".into()
    } else {
        format!("anomalies: {}", sigs.join("; "))
    }
}

/// Writes explore.json, junit.xml and summary.txt, and prints the table.
pub(crate) fn write_report(report: &ExploreReport, out: &Path) -> Result<()> {
    let table = report.render_table();
    print!("{table}");
    std::fs::write(out.join("summary.txt"), &table)?;
    std::fs::write(out.join("junit.xml"), report.render_junit())?;
    let json = out.join("explore.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    println!(
        "EXPLORE: {} signature(s) found, {} baseline; {} of {} trial(s) run; JSON {}",
        report.found_signatures().len(),
        report
            .findings
            .iter()
            .filter(|f| f.origin == Origin::Baseline)
            .count(),
        report.trials.len(),
        report.planned,
        json.display()
    );
    Ok(())
}

/// 0: the hunt ran (findings are its output, not a failure); 1: some runs could not be
/// performed; 3: the budget stopped it.
pub(crate) fn exit_code(report: &ExploreReport) -> ExitCode {
    if report.trials.iter().any(|t| t.error.is_some()) {
        ExitCode::from(1)
    } else if report.stopped_by_budget {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}
