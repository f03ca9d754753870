//! `sluice harness run`: scenarios × variants × seeds, with JUnit and JSON out; and what
//! `harness sweep` shares with it: guests prepared once, plans checked before any run, the
//! runner that boots one case.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use sluice_harness::plan::{self, Shard};
use sluice_harness::verdict::{self, Observation};
use sluice_harness::{IommuKind, RunCase, Runner, Scenario, artifact, junit};
use sluice_host::machine::Arch;
use sluice_host::{DiskSpec, DmaEngineSpec};
use sluice_inject::{Plan, PointRegistry, SymbolMap};

use crate::image::{self, BuildOutput, GuestImage};
use crate::rogue::RogueRule;
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
    /// Second attempts for a run that broke an invariant while its guest kernel reported its
    /// own timer not firing (host starvation under TCG; `docs/scenarios.md`). 0: none.
    #[arg(long, default_value_t = 1)]
    artifact_retries: u32,
}

pub(crate) fn variant_exists(v: &str) -> bool {
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

/// Guest images and QEMU, found or built once before the first run, so that runs print only
/// their progress line and do not each re-run the build scripts.
pub(crate) struct Guests {
    /// Per variant: the image, or why it could not be built (its runs then fail with that).
    images: BTreeMap<String, Result<GuestImage, String>>,
    /// QEMU per guest architecture (the patched build under TCG, or the one given); absent:
    /// `run::execute` picks (stock QEMU under hardware KVM).
    qemu: std::collections::HashMap<Arch, PathBuf>,
}

impl Guests {
    /// Builds or finds each variant (quietly when cached, with the build's progress when not)
    /// and, under TCG, the patched QEMU. A variant that fails to build is reported and its runs
    /// fail; QEMU failing to build stops everything, since no run could start.
    pub(crate) fn prepare(variants: &[String], qemu: Option<PathBuf>) -> Result<Guests> {
        let mut images = BTreeMap::new();
        for v in variants {
            if images.contains_key(v) {
                continue;
            }
            let started = Instant::now();
            let built = image::variant_arch(v)
                .and_then(|arch| image::build_guest_with(v, arch, BuildOutput::QuietIfCached));
            match &built {
                Ok(img) => eprintln!(
                    "harness: guest {v} ready ({:.1} s; {})",
                    started.elapsed().as_secs_f64(),
                    img.kernel.parent().unwrap_or(Path::new("?")).display()
                ),
                Err(e) => eprintln!("harness: guest {v} could not be built, its runs fail: {e:#}"),
            }
            images.insert(v.clone(), built.map_err(|e| format!("{e:#}")));
        }
        // One QEMU per architecture the variants need (x86_64 when none could be read).
        let mut arches: Vec<Arch> = variants
            .iter()
            .filter_map(|v| image::variant_arch(v).ok())
            .collect();
        arches.sort_by_key(|a| a.name());
        arches.dedup();
        if arches.is_empty() {
            arches.push(Arch::X86_64);
        }
        let mut by_arch = std::collections::HashMap::new();
        for arch in arches {
            let q = match &qemu {
                Some(q) => q.clone(),
                None if sluice_qemu::Accel::detect() == sluice_qemu::Accel::Tcg => {
                    let q = image::build_qemu_with(arch, BuildOutput::QuietIfCached)
                        .with_context(|| format!("the patched QEMU ({arch}) could not be built"))?;
                    eprintln!("harness: QEMU {}", q.display());
                    q
                }
                None => continue,
            };
            by_arch.insert(arch, q);
        }
        Ok(Guests {
            images,
            qemu: by_arch,
        })
    }

    /// Whether `variant`'s image was built.
    pub(crate) fn has_image(&self, variant: &str) -> bool {
        self.system_map(variant).is_some()
    }

    /// The System.map of `variant`, if its image was built.
    fn system_map(&self, variant: &str) -> Option<&Path> {
        match self.images.get(variant) {
            Some(Ok(img)) => Some(&img.system_map),
            _ => None,
        }
    }

    /// The injection points of runs of `scenario` on `variant`: its devices' points, and guest
    /// symbols from the variant's System.map.
    pub(crate) fn registry(&self, scenario: &Scenario, variant: &str) -> Result<PointRegistry> {
        let mut reg = scenario_registry(scenario);
        if let Some(map) = self.system_map(variant) {
            reg.set_symbols(
                SymbolMap::load(map).with_context(|| format!("cannot read {}", map.display()))?,
            );
        }
        Ok(reg)
    }
}

/// The points of `s`'s devices (no guest symbols).
pub(crate) fn scenario_registry(s: &Scenario) -> PointRegistry {
    run::config_points(
        s.devices.disks.len(),
        iommu_of(s),
        s.devices.dma_engine.is_some(),
    )
}

/// The DMA engine of `s`, if it has one.
pub(crate) fn dma_engine_of(s: &Scenario) -> Result<Option<DmaEngineSpec>> {
    match s.devices.dma_engine.as_deref() {
        None => Ok(None),
        Some("iommu") => Ok(Some(DmaEngineSpec { iommu: true })),
        Some("direct") => Ok(Some(DmaEngineSpec { iommu: false })),
        Some(other) => bail!(
            "scenario {}: [devices] dma_engine = {other:?}: expected \"iommu\" or \"direct\"",
            s.name
        ),
    }
}

/// The rogue DMAs of `s`.
pub(crate) fn rogue_of(s: &Scenario) -> Result<Vec<RogueRule>> {
    if !s.inject.rogue.is_empty() && s.devices.dma_engine.is_none() {
        bail!(
            "scenario {}: [inject] rogue needs [devices] dma_engine",
            s.name
        );
    }
    s.inject
        .rogue
        .iter()
        .map(|r| RogueRule::parse(r).with_context(|| format!("scenario {}", s.name)))
        .collect()
}

pub(crate) fn iommu_of(s: &Scenario) -> IommuArg {
    match s.devices.iommu {
        IommuKind::None => IommuArg::None,
        IommuKind::Virtio => IommuArg::Virtio,
        IommuKind::Smmuv3 => IommuArg::Smmuv3,
        IommuKind::Zpci => IommuArg::Zpci,
    }
}

/// Checks `rules` against `reg` as a run would, and returns the plan's warnings. Runs of a
/// variant whose image is missing skip `guest.sym` resolution here; they fail on their own.
pub(crate) fn check_rules(
    reg: &PointRegistry,
    rules: &[String],
    symbols_known: bool,
) -> Result<Vec<String>> {
    let mut plan = Plan::default();
    for r in rules {
        plan.add_cli(r).with_context(|| format!("rule {r:?}"))?;
    }
    if !symbols_known {
        plan.rules.retain(|r| {
            !r.point
                .starts_with(sluice_inject::registry::GUEST_SYM_PREFIX)
        });
    }
    Ok(reg.validate(&plan)?.warnings)
}

/// Checks every scenario's injection plan on each of its variants before anything runs, and
/// prints each distinct warning once. Without `guests` (before any image is built) the
/// `guest.sym` rules wait for the System.map and nothing is printed: a bad point or key then
/// fails in milliseconds instead of after the builds.
fn check_scenario_plans(scenarios: &[Arc<Scenario>], guests: Option<&Guests>) -> Result<()> {
    let mut warnings = std::collections::BTreeSet::new();
    for s in scenarios {
        for v in &s.variants {
            let (reg, symbols_known) = match guests {
                Some(g) => (g.registry(s, v)?, g.system_map(v).is_some()),
                None => (scenario_registry(s), false),
            };
            dma_engine_of(s)?;
            rogue_of(s)?;
            let found = check_rules(&reg, &s.inject.rules, symbols_known)
                .with_context(|| format!("scenario {} on {v}: [inject]", s.name))?;
            warnings.extend(found);
        }
    }
    if guests.is_some() {
        for w in warnings {
            eprintln!("harness: warning: {w}");
        }
    }
    Ok(())
}

/// Boots one case with the prepared guests.
pub(crate) struct GuestRunner<'a> {
    pub(crate) guests: &'a Guests,
}

impl GuestRunner<'_> {
    fn spec(&self, case: &RunCase, dir: &Path) -> Result<RunSpec> {
        let img = match self.guests.images.get(&case.variant) {
            Some(Ok(img)) => img,
            Some(Err(e)) => bail!("guest image {} could not be built: {e}", case.variant),
            None => bail!("guest image {} was not prepared", case.variant),
        };
        let arch = image::variant_arch(&case.variant)?;
        let mut spec = scenario_spec(
            &case.scenario,
            arch,
            GuestSource::Files {
                kernel: img.kernel.clone(),
                initrd: img.initrd.clone(),
            },
            case.seed,
            dir,
        )?;
        spec.qemu = self.guests.qemu.get(&arch).cloned();
        spec.system_map = Some(img.system_map.clone());
        Ok(spec)
    }
}

/// One run of scenario `s` with `guest` and `seed` in `dir` (its disks are created there): what
/// the harness boots for a case, and `sluice demo` for its one run. QEMU and the System.map are
/// found as `sluice run` finds them unless the caller sets them; output is quiet.
pub(crate) fn scenario_spec(
    s: &Scenario,
    arch: Arch,
    guest: GuestSource,
    seed: u32,
    dir: &Path,
) -> Result<RunSpec> {
    std::fs::create_dir_all(dir)?;
    let mut disks = Vec::new();
    for (i, d) in s.devices.disks.iter().enumerate() {
        let path = dir.join(format!("disk{i}.img"));
        std::fs::File::create(&path).and_then(|f| f.set_len(d.size_mib << 20))?;
        disks.push(DiskSpec {
            path,
            read_only: false,
            iommu: d.iommu && s.devices.iommu.is_some(),
        });
    }
    let mut cmdline = s.guest.cmdline.clone();
    if let Some(load) = &s.guest.load {
        cmdline = format!("{cmdline} sluice.load={load}");
    }
    Ok(RunSpec {
        arch,
        guest,
        qemu: None,
        cpus: s.cpus,
        mem_mib: 512,
        disks,
        iommu: iommu_of(s),
        boot_bypass: s.devices.boot_bypass,
        model_bug: s
            .devices
            .model_bug
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| anyhow::anyhow!("scenario {}: {e}", s.name))?,
        cmdline,
        workload: s.guest.workload.clone(),
        seed: u64::from(seed),
        timeout: Duration::from_secs(s.timeout),
        run_dir: dir.to_path_buf(),
        serial_log: None,
        report: None,
        backend: run::Backend::Qemu,
        inject: s.inject.rules.clone(),
        inject_file: None,
        // Each seed draws its own delays and probabilities: the harness's seeds are the
        // injection seeds too.
        inject_seed: Some(u64::from(seed)),
        system_map: None,
        cpuid_mask: vec![],
        dma_engine: dma_engine_of(s)?,
        rogue: rogue_of(s)?,
        quiet: true,
    })
}

impl Runner for GuestRunner<'_> {
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
                firings: rec.firings,
                escape_sites: rec.escape_sites,
                fault_sites: rec.fault_sites,
                problems: if rec.verdict.pass {
                    Vec::new()
                } else {
                    rec.verdict.reasons
                },
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

/// `OUT`, or `target/sluice-harness/<prefix>-<unix time>`.
pub(crate) fn out_dir(out: Option<&Path>, prefix: &str) -> Result<PathBuf> {
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        image::repo_root()
            .join("target/sluice-harness")
            .join(format!("{prefix}-{stamp}"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(out)
}

pub fn run(args: HarnessRunArgs) -> Result<ExitCode> {
    let scenarios = load_scenarios(&args.paths)?;
    let mut cases = plan::expand(&scenarios, args.seeds);
    if let Some(f) = &args.filter {
        let re = regex::Regex::new(f).with_context(|| format!("bad --filter {f:?}"))?;
        cases.retain(|c| re.is_match(&c.id()));
        // A filter that selects nothing would "pass" without testing anything.
        if cases.is_empty() {
            bail!("--filter {f:?} matches no case (ids look like `scenario--variant--s1`)");
        }
    }
    if let Some(shard) = args.shard {
        cases = shard.select(cases);
    }
    let out = out_dir(args.out.as_deref(), "run")?;
    eprintln!(
        "harness: {} scenario(s), {} run(s), artifacts in {}",
        scenarios.len(),
        cases.len(),
        out.display()
    );
    let mut variants: Vec<String> = cases.iter().map(|c| c.variant.clone()).collect();
    variants.sort();
    variants.dedup();
    check_scenario_plans(&scenarios, None)?;
    let guests = Guests::prepare(&variants, args.qemu.clone())?;
    check_scenario_plans(&scenarios, Some(&guests))?;
    let runner = GuestRunner { guests: &guests };
    let total = cases.len();
    let started = Instant::now();
    let report = |i: usize, r: &verdict::CaseResult| {
        eprintln!(
            "[{:>3}/{total}] {:6.1}s {} {}",
            i + 1,
            started.elapsed().as_secs_f64(),
            r.id,
            r.label()
        );
    };
    let results = run_parallel(
        &runner,
        &cases,
        &out,
        args.jobs.max(1),
        args.artifact_retries,
        report,
    );
    let summary = verdict::summarize(&results);
    println!(
        "{:<44} {:>5} {:>10}  verdict",
        "scenario/variant", "runs", "reproduced"
    );
    for g in &summary.groups {
        // A group with nothing to reproduce has no reproduction count to show.
        let reproduced = if g.expects_reproduction {
            format!("{}/{}", g.reproduced, g.runs)
        } else {
            "-".into()
        };
        println!(
            "{:<44} {:>5} {:>10}  {}: {}",
            g.group,
            g.runs,
            reproduced,
            if g.pass { "PASS" } else { "FAIL" },
            g.label
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
    runner: &GuestRunner<'_>,
    cases: &[RunCase],
    out: &Path,
    jobs: usize,
    retries: u32,
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
                    let r = artifact::run_judged(runner, case, out, retries);
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
