//! `sluice harness merge`: combines the output directories of shards into one report. Explore
//! shards (`explore.json`) merge into one hunt with signatures deduplicated and each finding's
//! smallest minimized scenario kept; `harness run` shards (`results.json`) merge into one
//! suite, judged again over all runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use sluice_harness::explore::ExploreReport;
use sluice_harness::explore::findings::slug;
use sluice_harness::junit;
use sluice_harness::verdict::{self, CaseResult};

use crate::explore_cmd;

#[derive(Debug, Args)]
pub struct HarnessMergeArgs {
    /// Output directories of the shards (each with explore.json, or each with results.json).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Where the merged report goes.
    #[arg(long)]
    out: PathBuf,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a report", path.display()))
}

pub fn merge(args: HarnessMergeArgs) -> Result<ExitCode> {
    let explore = args.dirs.iter().all(|d| d.join("explore.json").is_file());
    let run = args.dirs.iter().all(|d| d.join("results.json").is_file());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    match (explore, run) {
        (true, _) => merge_explore(&args),
        (false, true) => merge_runs(&args),
        _ => bail!(
            "every directory must hold explore.json (explore shards) or every one results.json \
             (harness run shards): {}",
            args.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn merge_explore(args: &HarnessMergeArgs) -> Result<ExitCode> {
    let mut reports = Vec::new();
    for d in &args.dirs {
        let mut r: ExploreReport = read_json(&d.join("explore.json"))?;
        // Scenario files are relative to their shard: make them findable after the merge.
        for f in &mut r.findings {
            if let Some(rel) = &f.scenario_file {
                f.scenario_file = Some(d.join(rel).display().to_string());
            }
        }
        reports.push(r);
    }
    let mut merged = ExploreReport::merge(reports)?;
    let dir = args.out.join("findings");
    let mut n = 0;
    for f in &mut merged.findings {
        let Some(src) = f.scenario_file.take() else {
            continue;
        };
        n += 1;
        std::fs::create_dir_all(&dir)?;
        let name = format!("{n:02}-{}.toml", slug(&f.signature));
        std::fs::copy(&src, dir.join(&name)).with_context(|| format!("cannot copy {src}"))?;
        f.scenario_file = Some(format!("findings/{name}"));
    }
    explore_cmd::write_report(&merged, &args.out)?;
    Ok(explore_cmd::exit_code(&merged))
}

fn merge_runs(args: &HarnessMergeArgs) -> Result<ExitCode> {
    #[derive(serde::Deserialize)]
    struct Doc {
        runs: Vec<CaseResult>,
    }
    let mut runs: Vec<CaseResult> = Vec::new();
    for d in &args.dirs {
        let doc: Doc = read_json(&d.join("results.json"))?;
        for r in doc.runs {
            if runs.iter().any(|x| x.id == r.id) {
                bail!(
                    "run {} appears in two shards: the same shard merged twice?",
                    r.id
                );
            }
            runs.push(r);
        }
    }
    runs.sort_by(|a, b| a.id.cmp(&b.id));
    let summary = verdict::summarize(&runs);
    for g in &summary.groups {
        println!(
            "{:<44} {:>5}  {}: {}",
            g.group,
            g.runs,
            if g.pass { "PASS" } else { "FAIL" },
            g.label
        );
    }
    std::fs::write(args.out.join("junit.xml"), junit::render(&summary, &runs))?;
    let doc = serde_json::json!({ "summary": summary, "runs": runs });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    println!(
        "HARNESS (merged {} shard(s)): {} ({} group(s), {} run(s)); {}",
        args.dirs.len(),
        if summary.pass { "PASS" } else { "FAIL" },
        summary.groups.len(),
        runs.len(),
        args.out.display()
    );
    Ok(if summary.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
