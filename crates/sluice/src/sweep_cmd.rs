//! `sluice harness sweep`: one scenario over a grid of injection points × delays × modes ×
//! seeds, within a wall-time budget (`docs/scenarios.md`, "Sweeps"). The grid, its order,
//! the budget and the judging live in `sluice_harness::sweep`; this file gathers the
//! arguments, asks `sluice-inject` which points exist, prepares the guests and prints.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use sluice_harness::Scenario;
use sluice_harness::sweep::grid::cell_rules;
use sluice_harness::sweep::judge::judge_run;
use sluice_harness::sweep::{
    self, Grid, SweepCase, SweepConfig, SweepMode, SweepReport, SweepSpec, WallClock, report,
};
use sluice_inject::PlanError;
use sluice_inject::registry::GUEST_SYM_PREFIX;

use crate::harness_cmd::{
    self, GuestRunner, Guests, check_rules, scenario_registry, variant_exists,
};

#[derive(Debug, Args)]
pub struct HarnessSweepArgs {
    /// The scenario file.
    scenario: PathBuf,
    /// Injection point to sweep (repeatable): a device point of `sluice points`, or
    /// guest.sym.<kernel symbol>[+offset]. Default: the file's [sweep] points.
    #[arg(long = "point", value_name = "P")]
    points: Vec<String>,
    /// Delays, comma-separated, in the injection syntax; 0ms is the baseline cell (the
    /// scenario without a sweep rule). Default: [sweep] delays, else 0ms,10ms,100ms,500ms.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    delays: Vec<String>,
    /// Modes to try where the point allows (stall everywhere, defer on deferrable points).
    /// Default: [sweep] modes, else stall,defer.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    modes: Vec<SweepMode>,
    /// Seeds per cell and variant (seed k is also the injection seed). Default: [sweep] seeds,
    /// else 3.
    #[arg(long)]
    seeds: Option<u32>,
    /// Stop launching runs that would end after this much wall time, e.g. 20m, 90s, 1h30m.
    /// Default: [sweep] budget, else 20m. Image builds before the first run do not count.
    #[arg(long, value_name = "DURATION")]
    budget: Option<String>,
    /// Firings of the sweep rule per run (count=). Default: [sweep] count, else 1.
    #[arg(long)]
    count: Option<u32>,
    /// Sweep arrivals too: one cell per value, firing only at that arrival (nth=).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    nth: Vec<u32>,
    /// Drop every rule of the scenario's [inject] (default: only rules on the swept point are
    /// dropped, the others stay in every run).
    #[arg(long)]
    replace: bool,
    /// Extra keys for every sweep rule, e.g. 'after=insmod virtio_iommu,endpoint=00:03.0'.
    #[arg(long, value_name = "KEY=VALUE,...")]
    rule_options: Option<String>,
    /// Guest variant (repeatable). Default: the scenario's variants.
    #[arg(long = "variant", value_name = "V")]
    variants: Vec<String>,
    /// Guests run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Artifact directory: one subdirectory per run, summary.txt, sweep.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// JSON output (default OUT/sweep.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// JUnit XML output (one test case per cell and variant; none unless asked).
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Print the grid and the launch order with every run's rules, then exit; nothing boots.
    #[arg(long)]
    dry_run: bool,
    /// QEMU binary (default: the project's patched build).
    #[arg(long, env = "SLUICE_QEMU")]
    qemu: Option<PathBuf>,
}

impl HarnessSweepArgs {
    /// The command line's grid keys; absent ones fall back to the file's `[sweep]`.
    fn overrides(&self) -> SweepSpec {
        let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        SweepSpec {
            points: non_empty(&self.points),
            delays: non_empty(&self.delays),
            modes: (!self.modes.is_empty()).then(|| self.modes.clone()),
            seeds: self.seeds,
            budget: self.budget.clone(),
            count: self.count,
            nth: (!self.nth.is_empty()).then(|| self.nth.clone()),
            replace: self.replace.then_some(true),
            rule_options: self.rule_options.clone(),
        }
    }
}

/// The variants to run: `--variant`s (any known variant) or the scenario's.
fn pick_variants(scenario: &Scenario, asked: &[String]) -> Result<Vec<String>> {
    if asked.is_empty() {
        return Ok(scenario.variants.clone());
    }
    let mut seen = BTreeSet::new();
    for v in asked {
        if !variant_exists(v) {
            bail!("--variant {v:?}: unknown guest variant (see guest-images/variants/)");
        }
        if !seen.insert(v) {
            bail!("--variant {v:?} is given twice");
        }
        if !scenario.variants.contains(v) {
            eprintln!(
                "sweep: note: {v} is not one of {}'s variants; only its expectation blocks \
                 without `variants` apply to it",
                scenario.name
            );
        }
    }
    Ok(asked.to_vec())
}

/// Which points the scenario's devices have and whether they can defer; `guest.sym.*` points
/// can only stall (their symbols are checked per variant once the images are there).
fn grid_for(scenario: &Scenario, config: &SweepConfig) -> Result<Grid> {
    let reg = scenario_registry(scenario);
    let can_defer = |point: &str| -> Result<bool, String> {
        if point.starts_with(GUEST_SYM_PREFIX) {
            return Ok(false);
        }
        reg.get(point).map(|p| p.defer).ok_or_else(|| {
            // The registry says why (unknown, or a model the scenario's run does not have)
            // and lists the run's points nearest first; the sweep error names the point.
            match reg.unknown_point(point) {
                PlanError::UnknownPoint { why, valid, .. } => {
                    format!("{why}; points of this scenario's devices, nearest first: {valid}")
                }
                other => other.to_string(),
            }
        })
    };
    Ok(sweep::expand_grid(config, &can_defer)?)
}

/// Checks every cell's rules on every variant (points, modes, guest symbols) before any run;
/// prints each distinct warning once. Without `guests` (before the images are built) only
/// what needs no System.map is checked, and nothing is printed.
fn check_cells(
    scenario: &Scenario,
    grid: &Grid,
    config: &SweepConfig,
    variants: &[String],
    guests: Option<&Guests>,
) -> Result<()> {
    let mut warnings = BTreeSet::new();
    for v in variants {
        let (reg, symbols_known) = match guests {
            Some(g) => (g.registry(scenario, v)?, g.has_image(v)),
            None => (scenario_registry(scenario), false),
        };
        for cell in &grid.cells {
            let rules = cell_rules(&scenario.inject.rules, cell, config.replace);
            let found = check_rules(&reg, &rules, symbols_known)
                .with_context(|| format!("cell {} on {v}", cell.label))?;
            warnings.extend(found);
        }
    }
    if guests.is_some() {
        for w in warnings {
            eprintln!("sweep: warning: {w}");
        }
    }
    Ok(())
}

/// Prints the cells and the launch order. A closed pipe (`| head`) ends the listing quietly.
fn print_dry_run(grid: &Grid, order: &[SweepCase]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "cells:")?;
    for cell in &grid.cells {
        writeln!(
            out,
            "  {:<50} {}",
            cell.label,
            cell.rule.as_deref().unwrap_or("(no sweep rule)")
        )?;
    }
    for note in &grid.not_applicable {
        writeln!(out, "not in the grid: {note}")?;
    }
    writeln!(out, "launch order ({} runs):", order.len())?;
    for (i, run) in order.iter().enumerate() {
        writeln!(
            out,
            "  {:>4} {}  inject: {}",
            i + 1,
            run.case.id(),
            run.case.scenario.inject.rules.join("; ")
        )?;
    }
    Ok(())
}

pub fn sweep(args: HarnessSweepArgs) -> Result<ExitCode> {
    let scenario = Scenario::load(&args.scenario, &variant_exists)?;
    let config = SweepConfig::resolve(scenario.sweep.as_ref(), &args.overrides())
        .with_context(|| format!("{}", args.scenario.display()))?;
    let variants = pick_variants(&scenario, &args.variants)?;
    let grid = grid_for(&scenario, &config)?;
    let order = sweep::order_runs(&scenario, &grid, &config, &variants);
    if args.dry_run {
        match print_dry_run(&grid, &order) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => return Ok(ExitCode::SUCCESS),
        }
    }
    check_cells(&scenario, &grid, &config, &variants, None)?;
    let guests = Guests::prepare(&variants, args.qemu.clone())?;
    check_cells(&scenario, &grid, &config, &variants, Some(&guests))?;
    let out = harness_cmd::out_dir(args.out.as_deref(), "sweep")?;
    eprintln!(
        "sweep: {}: {} cell(s) x {} variant(s) x {} seed(s) = {} runs, budget {}, artifacts in {}",
        scenario.name,
        grid.cells.len(),
        variants.len(),
        config.seeds,
        order.len(),
        sweep::spec::format_budget(config.budget),
        out.display()
    );
    let clock = WallClock::start();
    let runner = GuestRunner { guests: &guests };
    let total = order.len();
    let progress = |i: usize, run: &SweepCase, obs: &sluice_harness::Observation| {
        let (result, findings) = judge_run(&run.case, obs.clone());
        let what = if let Some(e) = &obs.error {
            format!("ERROR: {e}")
        } else if findings.hit {
            format!("HIT {}", findings.signals.join(", "))
        } else {
            "no signal".into()
        };
        let unexpected = if obs.error.is_none() && !result.violations.is_empty() {
            format!(
                " (UNEXPECTED for {}: {})",
                run.case.variant,
                result.violations.join("; ")
            )
        } else {
            String::new()
        };
        let cell = grid
            .cells
            .get(run.cell)
            .map(|c| c.describe())
            .unwrap_or_default();
        eprintln!(
            "[{:>4}/{total}] {:7.1}s {cell} | {} s{}: {what}{unexpected}",
            i + 1,
            obs.wall_s,
            run.case.variant,
            run.case.seed,
        );
    };
    let driven = sweep::drive(
        &order,
        &runner,
        &clock,
        config.budget,
        args.jobs.max(1),
        &out,
        &progress,
    );
    let rep = SweepReport::build(&scenario.name, &variants, &config, &grid, &order, driven);
    write_outputs(&rep, &args, &out)
}

fn write_outputs(
    rep: &SweepReport,
    args: &HarnessSweepArgs,
    out: &std::path::Path,
) -> Result<ExitCode> {
    let table = report::render_table(rep);
    print!("{table}");
    let summary = out.join("summary.txt");
    std::fs::write(&summary, &table)
        .with_context(|| format!("cannot write {}", summary.display()))?;
    let json = args.json.clone().unwrap_or_else(|| out.join("sweep.json"));
    std::fs::write(&json, serde_json::to_string_pretty(rep)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let mut written = format!("summary {}; JSON {}", summary.display(), json.display());
    if let Some(j) = &args.junit {
        std::fs::write(j, report::render_junit(rep))
            .with_context(|| format!("cannot write {}", j.display()))?;
        written += &format!("; JUnit {}", j.display());
    }
    let end = match rep.end {
        sweep::SweepEnd::Complete => "COMPLETE".to_string(),
        sweep::SweepEnd::RunErrors => format!("COMPLETE with {} failed run(s)", rep.errors),
        sweep::SweepEnd::Budget => format!(
            "STOPPED by the budget: {} of {} runs not run",
            rep.not_run, rep.planned
        ),
    };
    if rep.failures.is_empty() {
        println!("SWEEP: {end}; {written}");
    } else {
        println!(
            "SWEEP: {end}; JUDGEMENT FAILED ({} finding(s) contradict the scenario, listed \
             above); {written}",
            rep.failures.len()
        );
    }
    Ok(ExitCode::from(rep.exit_code()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: HarnessSweepArgs,
    }

    fn parse(line: &str) -> Result<HarnessSweepArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("sweep").chain(line.split_whitespace())).map(|c| c.args)
    }

    #[test]
    fn command_line_becomes_overrides() {
        let a = parse(
            "s.toml --point guest.sym.bus_iommu_probe --point virtio-iommu.req.attach \
             --delays 0ms,100ms --modes defer --seeds 2 --budget 10m --nth 1,2 --replace",
        )
        .unwrap();
        let o = a.overrides();
        assert_eq!(
            o.points.as_deref(),
            Some(
                &[
                    "guest.sym.bus_iommu_probe".to_string(),
                    "virtio-iommu.req.attach".into()
                ][..]
            )
        );
        assert_eq!(o.delays, Some(vec!["0ms".into(), "100ms".into()]));
        assert_eq!(o.modes, Some(vec![SweepMode::Defer]));
        assert_eq!((o.seeds, o.budget.as_deref()), (Some(2), Some("10m")));
        assert_eq!(
            (o.nth, o.replace, o.count),
            (Some(vec![1, 2]), Some(true), None)
        );
        let bare = parse("s.toml").unwrap().overrides();
        assert_eq!(
            bare,
            SweepSpec::default(),
            "nothing given: the file decides"
        );
        let e = parse("s.toml --modes stall,pause")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("unknown mode \"pause\"")));
    }

    /// The example sweeps in `scenarios/sweeps/` parse, name real variants, and expand into a
    /// grid whose every cell's rules validate against the scenario's devices (guest symbols
    /// are left to the run, which has the System.map).
    #[test]
    fn example_sweep_files_resolve() {
        let dir = crate::image::repo_root().join("scenarios/sweeps");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no examples in {}", dir.display());
        for f in files {
            let s = Scenario::load(&f, &variant_exists).unwrap();
            let config = SweepConfig::resolve(s.sweep.as_ref(), &SweepSpec::default()).unwrap();
            let grid = grid_for(&s, &config).unwrap();
            assert!(grid.cells.len() > 1, "{}", f.display());
            let reg = scenario_registry(&s);
            for cell in &grid.cells {
                let rules = cell_rules(&s.inject.rules, cell, config.replace);
                check_rules(&reg, &rules, false)
                    .unwrap_or_else(|e| panic!("{} {}: {e:#}", f.display(), cell.label));
            }
        }
    }
}
