//! JUnit XML: one test case per scenario/variant group, named `scenario/variant`.

use crate::verdict::{CaseResult, SuiteSummary};

pub(crate) fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&apos;".to_string(),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => " ".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// Renders the suite.
pub fn render(summary: &SuiteSummary, results: &[CaseResult]) -> String {
    let failures = summary.groups.iter().filter(|g| !g.pass).count();
    let time: f64 = results.iter().map(|r| r.observation.wall_s).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x += &format!(
        "<testsuites name=\"sluice\" tests=\"{}\" failures=\"{failures}\" time=\"{time:.3}\">\n<testsuite name=\"sluice-harness\" tests=\"{}\" failures=\"{failures}\" time=\"{time:.3}\">\n",
        summary.groups.len(),
        summary.groups.len()
    );
    for g in &summary.groups {
        let runs: Vec<&CaseResult> = results.iter().filter(|r| r.group == g.group).collect();
        let t: f64 = runs.iter().map(|r| r.observation.wall_s).sum();
        let (scenario, variant) = g.group.split_once('/').unwrap_or((&g.group, ""));
        x += &format!(
            "  <testcase classname=\"{}\" name=\"{}\" time=\"{t:.3}\">\n",
            esc(scenario),
            esc(variant)
        );
        if !g.pass {
            let mut msg = g.label.clone();
            for r in runs.iter().filter(|r| !r.violations.is_empty()) {
                msg += &format!("\n{}: {}", r.id, r.violations.join("; "));
            }
            x += &format!(
                "    <failure message=\"{}\">{}</failure>\n",
                esc(msg.lines().next().unwrap_or("")),
                esc(&msg)
            );
        }
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
        x += &format!(
            "    <system-out>{}</system-out>\n  </testcase>\n",
            esc(&out)
        );
    }
    x += "</testsuite>\n</testsuites>\n";
    x
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
