//! JUnit XML of a harness run: one test case per scenario/variant group, named
//! `scenario/variant`. The `writer` submodule writes the document (the sweep report uses it too).

use crate::verdict::{CaseResult, SuiteSummary};

mod writer;

pub(crate) use writer::{Case, Counts, Problem, Report, Suite, render as render_report};

/// Renders the suite.
pub fn render(summary: &SuiteSummary, results: &[CaseResult]) -> String {
    let time: f64 = results.iter().map(|r| r.observation.wall_s).sum();
    let cases = summary
        .groups
        .iter()
        .map(|g| {
            let runs: Vec<&CaseResult> = results.iter().filter(|r| r.group == g.group).collect();
            let (scenario, variant) = g.group.split_once('/').unwrap_or((&g.group, ""));
            let failure = (!g.pass).then(|| {
                let mut msg = g.label.clone();
                for r in runs.iter().filter(|r| !r.violations.is_empty()) {
                    msg += &format!("\n{}: {}", r.id, r.violations.join("; "));
                }
                Problem {
                    message: msg.lines().next().unwrap_or("").to_string(),
                    body: msg,
                }
            });
            let mut out = format!("{}\n", g.label);
            for r in &runs {
                out += &format!(
                    "{} {}: exit={} escapes={:?} faults={}{}\n",
                    r.id,
                    r.label(),
                    r.observation.exit,
                    r.observation.escapes,
                    r.observation.faults,
                    if r.missing.is_empty() {
                        String::new()
                    } else {
                        format!(" missing=[{}]", r.missing.join("; "))
                    }
                );
            }
            Case {
                classname: scenario.to_string(),
                name: variant.to_string(),
                time_s: runs.iter().map(|r| r.observation.wall_s).sum(),
                failure,
                system_out: Some(out),
                ..Case::default()
            }
        })
        .collect();
    render_report(&Report {
        name: "sluice".into(),
        time_s: time,
        suite: Suite {
            name: "sluice-harness".into(),
            time_s: time,
            counts: Counts::Failures,
            cases,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{Observation, summarize};

    #[test]
    fn escapes_xml_and_marks_failures() {
        let r = CaseResult {
            id: "a--6.12--s1".into(),
            group: "a/6.12".into(),
            seed: 1,
            expects_reproduction: false,
            reproduced: false,
            violations: vec!["forbidden console pattern \"<BUG>&\" seen".into()],
            missing: vec![],
            observation: Observation {
                exit: "powered-off".into(),
                wall_s: 2.5,
                ..Default::default()
            },
            min_rate: 1.0,
            retried_after: None,
        };
        let s = summarize(std::slice::from_ref(&r));
        let x = render(&s, &[r]);
        assert!(x.contains("<testcase classname=\"a\" name=\"6.12\""));
        assert!(x.contains("failures=\"1\""));
        assert!(x.contains("message=\"UNEXPECTED: 1 run(s) broke an invariant\""));
        assert!(x.contains("&lt;BUG&gt;&amp;"));
        assert!(!x.contains("<BUG>"));
    }
}
