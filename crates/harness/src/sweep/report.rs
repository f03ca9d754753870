//! A sweep's table (stdout and `summary.txt`) and JUnit XML.

use crate::junit::{Case, Counts, Problem, Report, Suite, render_report};
use crate::sweep::judge::{SweepEnd, SweepReport};
use crate::sweep::spec::format_budget;

/// The header line: grid size, wall time, how the sweep ended.
pub fn headline(rep: &SweepReport) -> String {
    let cells = rep.grid.cells.len();
    let run = rep.planned - rep.not_run;
    let end = match rep.end {
        SweepEnd::Complete => "complete".to_string(),
        SweepEnd::RunErrors => {
            format!("complete, but {} run(s) could not be performed", rep.errors)
        }
        SweepEnd::Budget => {
            let next = rep
                .stopped
                .as_ref()
                .and_then(|s| {
                    s.estimate_s
                        .map(|e| format!(", next run estimated {e:.1} s at {:.1} s", s.at_s))
                })
                .unwrap_or_default();
            format!(
                "STOPPED by the budget after {run} of {} runs{next}",
                rep.planned
            )
        }
    };
    format!(
        "sweep {}: {cells} cell(s) x {} variant(s) x {} seed(s) = {} runs; {:.1} s of {}: {end}",
        rep.scenario,
        rep.variants.len(),
        rep.config.seeds,
        rep.planned,
        rep.wall_s,
        format_budget(rep.config.budget),
    )
}

/// The table: one row per cell, one column per variant (`hits/runs` and the signals seen),
/// then a line per variant, the combinations left out, and a legend.
pub fn render_table(rep: &SweepReport) -> String {
    let with_nth = !rep.config.nth.is_empty();
    let mut header = vec![
        "cell".to_string(),
        "point".into(),
        "delay".into(),
        "mode".into(),
    ];
    if with_nth {
        header.push("nth".into());
    }
    header.extend(rep.variants.iter().cloned());
    let mut rows = vec![header];
    for cell in &rep.grid.cells {
        let mut row = vec![
            cell.label.split('-').next().unwrap_or_default().to_string(),
            cell.point
                .clone()
                .unwrap_or_else(|| "baseline (no sweep rule)".into()),
            cell.delay.clone().unwrap_or_else(|| "-".into()),
            cell.mode
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
        ];
        if with_nth {
            row.push(
                cell.nth
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        for v in &rep.variants {
            row.push(
                rep.outcome(cell.index, v)
                    .map(|o| o.text())
                    .unwrap_or_default(),
            );
        }
        rows.push(row);
    }
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut t = format!("{}\n", headline(rep));
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        t += line.join("  ").trim_end();
        t += "\n";
    }
    for v in &rep.variants {
        t += &variant_line(rep, v);
        t += "\n";
    }
    for note in &rep.grid.not_applicable {
        t += &format!("not in the grid: {note}\n");
    }
    for f in &rep.failures {
        t += &format!("JUDGEMENT FAILED: {f}\n");
    }
    t += "hits/runs per cell and variant; a hit is a run with an escape, a console pattern the \
          scenario forbids, or the scenario's reproduction conditions met (`reproduced`); \
          `!`: some run broke an invariant the scenario sets for that variant\n";
    t
}

/// `6.12: 2 of 5 cells hit (c02 2/2, c03 1/2); baseline 0/2`.
fn variant_line(rep: &SweepReport, variant: &str) -> String {
    let mut hit = Vec::new();
    let mut with_rule = 0;
    let mut baseline = None;
    for cell in &rep.grid.cells {
        let Some(o) = rep.outcome(cell.index, variant) else {
            continue;
        };
        let short = cell.label.split('-').next().unwrap_or_default();
        if cell.point.is_none() {
            baseline = Some(format!("{}/{}", o.hits, o.ran));
            continue;
        }
        with_rule += 1;
        if o.hits > 0 {
            hit.push(format!("{short} {}/{}", o.hits, o.ran));
        }
    }
    let mut line = format!("{variant}: {} of {with_rule} cell(s) hit", hit.len());
    if !hit.is_empty() {
        line += &format!(" ({})", hit.join(", "));
    }
    if let Some(b) = baseline {
        line += &format!("; baseline {b}");
    }
    line
}

/// JUnit: one test case per cell and variant. It fails when a run broke an invariant the
/// scenario sets for that variant (a sweep explores: a cell that does not reproduce is not a
/// failure), errs when a run could not be performed, and is skipped when the budget left it
/// out entirely.
pub fn render_junit(rep: &SweepReport) -> String {
    let mut cases = Vec::new();
    for o in &rep.outcomes {
        let Some(cell) = rep.grid.cells.get(o.cell) else {
            continue;
        };
        let runs: Vec<_> = rep
            .runs
            .iter()
            .filter(|r| r.cell == o.cell && r.variant == o.variant)
            .collect();
        let mut out = format!("{}: {}\n", cell.describe(), o.text());
        let mut broken = Vec::new();
        let mut failed = Vec::new();
        for r in &runs {
            match &r.result {
                None => out += &format!("{}: not run (budget)\n", r.id),
                Some(res) => {
                    out += &format!("{}: {}\n", r.id, res.label());
                    if let Some(e) = &res.observation.error {
                        failed.push(format!("{}: {e}", r.id));
                    } else if !res.violations.is_empty() {
                        broken.push(format!("{}: {}", r.id, res.violations.join("; ")));
                    }
                }
            }
        }
        cases.push(Case {
            classname: format!("sweep.{}", rep.scenario),
            name: format!("{}/{}", cell.label, o.variant),
            time_s: runs
                .iter()
                .filter_map(|r| r.result.as_ref())
                .map(|r| r.observation.wall_s)
                .sum(),
            failure: (!broken.is_empty()).then(|| Problem {
                message: format!("{} run(s) broke an invariant of the scenario", broken.len()),
                body: broken.join("\n"),
            }),
            error: (!failed.is_empty()).then(|| Problem {
                message: format!("{} run(s) could not be performed", failed.len()),
                body: failed.join("\n"),
            }),
            skipped: (o.ran + o.errors == 0).then(|| "not run (budget)".to_string()),
            system_out: Some(out),
        });
    }
    render_report(&Report {
        name: "sluice".into(),
        time_s: rep.wall_s,
        suite: Suite {
            name: format!("sluice-sweep.{}", rep.scenario),
            time_s: rep.wall_s,
            counts: Counts::All,
            cases,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;
    use crate::sweep::drive::Driven;
    use crate::sweep::grid::{expand_grid, order_runs};
    use crate::sweep::spec::{SweepConfig, SweepMode, SweepSpec};
    use crate::verdict::Observation;
    use std::path::Path;
    use std::time::Duration;

    fn report(observations: Vec<Option<Observation>>) -> SweepReport {
        let scenario = Scenario::parse(
            Path::new("t"),
            "name = \"race\"\nvariants = [\"fixed\"]\n[[expect]]\nescapes_forbidden = [\"*\"]\n",
            &|_| true,
        )
        .unwrap();
        let config = SweepConfig::resolve(
            None,
            &SweepSpec {
                points: Some(vec!["virtio-iommu.req.attach".into()]),
                delays: Some(vec!["0".into(), "100ms".into()]),
                modes: Some(vec![SweepMode::Defer]),
                seeds: Some(1),
                budget: Some("10m".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let grid = expand_grid(&config, &|_| Ok(true)).unwrap();
        let variants = vec!["fixed".to_string()];
        let order = order_runs(&scenario, &grid, &config, &variants);
        let driven = Driven {
            observations,
            stopped: None,
            elapsed: Duration::from_secs(8),
        };
        SweepReport::build("race", &variants, &config, &grid, &order, driven)
    }

    fn ran(escapes: &[(&str, u64)]) -> Option<Observation> {
        Some(Observation {
            exit: "powered-off".into(),
            escapes: escapes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            wall_s: 4.0,
            ..Default::default()
        })
    }

    #[test]
    fn table_rows_and_variant_lines() {
        let rep = report(vec![ran(&[]), ran(&[("<wrong>-domain", 1)])]);
        let t = render_table(&rep);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "sweep race: 2 cell(s) x 1 variant(s) x 1 seed(s) = 2 runs; 8.0 s of 10m: complete"
        );
        assert_eq!(
            lines[1],
            "cell  point                     delay  mode   fixed"
        );
        assert_eq!(
            lines[2],
            "c01   baseline (no sweep rule)  -      -      0/1"
        );
        assert_eq!(
            lines[3],
            "c02   virtio-iommu.req.attach   100ms  defer  1/1 ! <wrong>-domain"
        );
        assert_eq!(
            lines[4],
            "fixed: 1 of 1 cell(s) hit (c02 1/1); baseline 0/1"
        );
    }

    #[test]
    fn junit_fails_broken_invariants_and_skips_what_did_not_run() {
        let rep = report(vec![ran(&[("<wrong>-domain", 1)]), None]);
        let x = render_junit(&rep);
        assert!(
            x.contains("tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"1\""),
            "{x}"
        );
        assert!(x.contains("name=\"c01-baseline/fixed\""));
        assert!(x.contains("<failure message=\"1 run(s) broke an invariant of the scenario\">"));
        assert!(x.contains("forbidden escape *: 1"));
        assert!(x.contains("<skipped message=\"not run (budget)\"/>"));
        assert!(x.contains("&lt;wrong&gt;-domain") && !x.contains("<wrong>"));
        assert_eq!(rep.end, SweepEnd::Budget);
        assert!(render_table(&rep).starts_with(
            "sweep race: 2 cell(s) x 1 variant(s) x 1 seed(s) = 2 runs; 8.0 s of 10m: \
             STOPPED by the budget after 1 of 2 runs\n"
        ));
    }
}
