//! `sluice harness run`: scenarios × variants × seeds, with JUnit and JSON out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use sluice_harness::plan::{self, Shard};
use sluice_harness::verdict::{self, Observation};
use sluice_harness::{RunCase, Runner, Scenario, junit};
use sluice_host::DiskSpec;

use crate::image;
use crate::run::{self, GuestSource, IommuArg, RunSpec};

#[derive(Debug, Args)]
pub struct HarnessRunArgs {
    /// Scenario files or directories of them (`*.toml`).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Seeds per scenario/variant (overrides the files).
    #[arg(long)]
    seeds: Option<u32>,
    /// Only cases whose id (`scenario--variant--sN`) matches this regex.
    #[arg(long)]
    filter: Option<String>,
    /// Run shard i of n (1-based), e.g. 2/4.
    #[arg(long)]
    shard: Option<Shard>,
    /// Guests run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// JUnit XML output (default OUT/junit.xml).
    #[arg(long)]
    junit: Option<PathBuf>,
    /// JSON output (default OUT/results.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Artifact directory (one subdirectory per run).
    #[arg(long)]
    out: Option<PathBuf>,
    /// QEMU binary (default: the project's patched build).
    #[arg(long, env = "SLUICE_QEMU")]
    qemu: Option<PathBuf>,
}

fn variant_exists(v: &str) -> bool {
    image::repo_root()
        .join("guest-images/variants")
        .join(v)
        .join("variant.conf")
        .is_file()
}

/// Every scenario file named by `paths` (directories: their `*.toml`, sorted).
pub fn load_scenarios(paths: &[PathBuf]) -> Result<Vec<Arc<Scenario>>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        bail!("no scenario files in {paths:?}");
    }
    let mut out: Vec<Arc<Scenario>> = Vec::new();
    for f in files {
        let s = Scenario::load(&f, &variant_exists)?;
        if out.iter().any(|o| o.name == s.name) {
            bail!("{}: scenario name {:?} is used twice", f.display(), s.name);
        }
        out.push(Arc::new(s));
    }
    Ok(out)
}

struct GuestRunner {
    qemu: Option<PathBuf>,
}

impl GuestRunner {
    fn spec(&self, case: &RunCase, dir: &Path) -> Result<RunSpec> {
        let s = &case.scenario;
        std::fs::create_dir_all(dir)?;
        let mut disks = Vec::new();
        for (i, d) in s.devices.disks.iter().enumerate() {
            let path = dir.join(format!("disk{i}.img"));
            std::fs::File::create(&path).and_then(|f| f.set_len(d.size_mib << 20))?;
            disks.push(DiskSpec {
                path,
                read_only: false,
                iommu: d.iommu && s.devices.iommu != "none",
            });
        }
        let mut cmdline = s.guest.cmdline.clone();
        if let Some(load) = &s.guest.load {
            cmdline = format!("{cmdline} sluice.load={load}");
        }
        Ok(RunSpec {
            guest: GuestSource::Variant(case.variant.clone()),
            qemu: self.qemu.clone(),
            cpus: s.cpus,
            mem_mib: 512,
            disks,
            iommu: if s.devices.iommu == "virtio" {
                IommuArg::Virtio
            } else {
                IommuArg::None
            },
            boot_bypass: s.devices.boot_bypass,
            cmdline,
            workload: s.guest.workload.clone(),
            seed: u64::from(case.seed),
            timeout: Duration::from_secs(s.timeout),
            run_dir: dir.to_path_buf(),
            serial_log: None,
            report: None,
            backend: run::Backend::Qemu,
            inject: s.inject.rules.clone(),
            inject_file: None,
            // Each seed draws its own delays and probabilities: the harness's seeds are the
            // injection seeds too.
            inject_seed: Some(u64::from(case.seed)),
            system_map: None,
            cpuid_mask: vec![],
        })
    }
}

impl Runner for GuestRunner {
    fn run(&self, case: &RunCase, dir: &Path) -> Observation {
        let start = Instant::now();
        match self.spec(case, dir).and_then(|spec| run::execute(&spec)) {
            Ok(rec) => Observation {
                exit: rec.outcome.exit.name().to_string(),
                escapes: rec.escapes,
                faults: rec.faults,
                console: rec.outcome.console,
                error: None,
                wall_s: rec.outcome.wall.as_secs_f64(),
            },
            Err(e) => Observation {
                exit: "not-run".into(),
                error: Some(format!("{e:#}")),
                wall_s: start.elapsed().as_secs_f64(),
                ..Default::default()
            },
        }
    }
}

pub fn run(args: HarnessRunArgs) -> Result<ExitCode> {
    let scenarios = load_scenarios(&args.paths)?;
    let mut cases = plan::expand(&scenarios, args.seeds);
    if let Some(f) = &args.filter {
        let re = regex::Regex::new(f).with_context(|| format!("bad --filter {f:?}"))?;
        cases.retain(|c| re.is_match(&c.id()));
    }
    if let Some(shard) = args.shard {
        cases = shard.select(cases);
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        image::repo_root()
            .join("target/sluice-harness")
            .join(format!("run-{stamp}"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    eprintln!(
        "harness: {} scenario(s), {} run(s), artifacts in {}",
        scenarios.len(),
        cases.len(),
        out.display()
    );
    let runner = GuestRunner {
        qemu: args.qemu.clone(),
    };
    let total = cases.len();
    let started = Instant::now();
    let report = |i: usize, r: &verdict::CaseResult| {
        let state = match (r.violations.is_empty(), r.reproduced) {
            (false, _) => format!("VIOLATION {}", r.violations.join("; ")),
            (true, true) => "reproduced".to_string(),
            (true, false) => format!("not reproduced ({})", r.missing.join("; ")),
        };
        eprintln!(
            "[{:>3}/{total}] {:6.1}s {} {}",
            i + 1,
            started.elapsed().as_secs_f64(),
            r.id,
            state
        );
    };
    let results = run_parallel(&runner, &cases, &out, args.jobs.max(1), report);
    let summary = verdict::summarize(&results);
    println!(
        "{:<50} {:>6} {:>10} {:>8} {:>8}  verdict",
        "scenario/variant", "runs", "reproduced", "rate", "needed"
    );
    for g in &summary.groups {
        println!(
            "{:<50} {:>6} {:>10} {:>8.2} {:>8.2}  {}{}",
            g.group,
            g.runs,
            g.reproduced,
            g.rate,
            g.min_rate,
            if g.pass { "PASS" } else { "FAIL" },
            if g.violating > 0 {
                format!(" ({} run(s) violated invariants)", g.violating)
            } else {
                String::new()
            }
        );
    }
    let junit_path = args.junit.clone().unwrap_or_else(|| out.join("junit.xml"));
    std::fs::write(&junit_path, junit::render(&summary, &results))
        .with_context(|| format!("cannot write {}", junit_path.display()))?;
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| out.join("results.json"));
    let doc = serde_json::json!({ "summary": summary, "runs": results });
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!(
        "HARNESS: {} ({} group(s)); JUnit {}; JSON {}",
        if summary.pass { "PASS" } else { "FAIL" },
        summary.groups.len(),
        junit_path.display(),
        json_path.display()
    );
    Ok(if summary.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs cases on `jobs` threads; results come back in case order.
fn run_parallel(
    runner: &GuestRunner,
    cases: &[RunCase],
    out: &Path,
    jobs: usize,
    report: impl Fn(usize, &verdict::CaseResult) + Sync,
) -> Vec<verdict::CaseResult> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<verdict::CaseResult>>> = Mutex::new(vec![None; cases.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(cases.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(case) = cases.get(i) else { break };
                    let obs = runner.run(case, &out.join(case.id()));
                    let r = verdict::judge(case, obs);
                    report(i, &r);
                    if let Some(slot) = results.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i)
                    {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}
