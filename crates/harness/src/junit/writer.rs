//! The JUnit XML both reports write (`sluice harness run` and `sluice sweep`): one
//! `<testsuites>` holding one `<testsuite>`, whose `tests`/`failures`/`errors`/`skipped` counts
//! are taken from its test cases, so the header always agrees with the body.

/// A `<testsuites>` document with a single suite.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    /// `<testsuites name>`.
    pub name: String,
    /// `<testsuites time>`, in seconds.
    pub time_s: f64,
    /// The one `<testsuite>`.
    pub suite: Suite,
}

/// One `<testsuite>`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Suite {
    /// `<testsuite name>`.
    pub name: String,
    /// `<testsuite time>`, in seconds.
    pub time_s: f64,
    /// Which counts the suite reports: the harness run's report never had `errors` and
    /// `skipped` (it has neither), and CI readers rely on its attributes as they are.
    pub counts: Counts,
    /// Its test cases, in order.
    pub cases: Vec<Case>,
}

/// The count attributes a report carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counts {
    /// `tests` and `failures`.
    Failures,
    /// `tests`, `failures` and `errors`; the suite also `skipped`.
    All,
}

/// One `<testcase>`.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Case {
    /// `classname`.
    pub classname: String,
    /// `name`.
    pub name: String,
    /// `time`, in seconds.
    pub time_s: f64,
    /// `<failure>`: the case broke what it checks.
    pub failure: Option<Problem>,
    /// `<error>`: the case could not be performed.
    pub error: Option<Problem>,
    /// `<skipped message>`.
    pub skipped: Option<String>,
    /// `<system-out>`.
    pub system_out: Option<String>,
}

/// A `<failure>` or `<error>`: a one-line message and the full text.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Problem {
    /// The `message` attribute.
    pub message: String,
    /// The element's text.
    pub body: String,
}

/// Escapes text and attribute values; control characters other than newline and tab, which
/// XML 1.0 cannot carry at all, become spaces.
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

/// Renders `report` as a JUnit XML document.
pub(crate) fn render(report: &Report) -> String {
    let suite = &report.suite;
    let count = |has: fn(&Case) -> bool| suite.cases.iter().filter(|c| has(c)).count();
    let tests = suite.cases.len();
    let failures = count(|c| c.failure.is_some());
    let errors = count(|c| c.error.is_some());
    let skipped = count(|c| c.skipped.is_some());
    let (suites_counts, suite_counts) = match suite.counts {
        Counts::Failures => (
            format!("tests=\"{tests}\" failures=\"{failures}\""),
            format!("tests=\"{tests}\" failures=\"{failures}\""),
        ),
        Counts::All => (
            format!("tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\""),
            format!(
                "tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\""
            ),
        ),
    };
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x += &format!(
        "<testsuites name=\"{}\" {suites_counts} time=\"{:.3}\">\n",
        esc(&report.name),
        report.time_s
    );
    x += &format!(
        "<testsuite name=\"{}\" {suite_counts} time=\"{:.3}\">\n",
        esc(&suite.name),
        suite.time_s
    );
    for case in &suite.cases {
        x += &render_case(case);
    }
    x += "</testsuite>\n</testsuites>\n";
    x
}

fn render_case(case: &Case) -> String {
    let mut x = format!(
        "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">\n",
        esc(&case.classname),
        esc(&case.name),
        case.time_s
    );
    for (element, problem) in [("failure", &case.failure), ("error", &case.error)] {
        if let Some(p) = problem {
            x += &format!(
                "    <{element} message=\"{}\">{}</{element}>\n",
                esc(&p.message),
                esc(&p.body)
            );
        }
    }
    if let Some(message) = &case.skipped {
        x += &format!("    <skipped message=\"{}\"/>\n", esc(message));
    }
    if let Some(out) = &case.system_out {
        x += &format!("    <system-out>{}</system-out>\n", esc(out));
    }
    x += "  </testcase>\n";
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str) -> Case {
        Case {
            classname: "c".into(),
            name: name.into(),
            time_s: 1.0,
            ..Case::default()
        }
    }

    fn report(counts: Counts, cases: Vec<Case>) -> String {
        render(&Report {
            name: "sluice".into(),
            time_s: 2.5,
            suite: Suite {
                name: "s<1>".into(),
                time_s: 2.25,
                counts,
                cases,
            },
        })
    }

    #[test]
    fn counts_come_from_the_cases_and_every_value_is_escaped() {
        let failing = Case {
            failure: Some(Problem {
                message: "a \"b\"".into(),
                body: "x < y & z".into(),
            }),
            system_out: Some("l1\nl2\u{1}".into()),
            ..case("f")
        };
        let erring = Case {
            error: Some(Problem {
                message: "e".into(),
                body: "why".into(),
            }),
            ..case("e")
        };
        let skipped = Case {
            skipped: Some("not run".into()),
            ..case("s")
        };
        let x = report(Counts::All, vec![failing, erring, skipped, case("ok")]);
        assert_eq!(
            x,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <testsuites name=\"sluice\" tests=\"4\" failures=\"1\" errors=\"1\" time=\"2.500\">\n\
             <testsuite name=\"s&lt;1&gt;\" tests=\"4\" failures=\"1\" errors=\"1\" skipped=\"1\" time=\"2.250\">\n\
             \x20 <testcase classname=\"c\" name=\"f\" time=\"1.000\">\n\
             \x20   <failure message=\"a &quot;b&quot;\">x &lt; y &amp; z</failure>\n\
             \x20   <system-out>l1\nl2 </system-out>\n\
             \x20 </testcase>\n\
             \x20 <testcase classname=\"c\" name=\"e\" time=\"1.000\">\n\
             \x20   <error message=\"e\">why</error>\n\
             \x20 </testcase>\n\
             \x20 <testcase classname=\"c\" name=\"s\" time=\"1.000\">\n\
             \x20   <skipped message=\"not run\"/>\n\
             \x20 </testcase>\n\
             \x20 <testcase classname=\"c\" name=\"ok\" time=\"1.000\">\n\
             \x20 </testcase>\n\
             </testsuite>\n</testsuites>\n"
        );
    }

    #[test]
    fn failures_only_reports_carry_no_error_or_skip_counts() {
        let x = report(Counts::Failures, vec![case("ok")]);
        assert!(x.contains(
            "<testsuites name=\"sluice\" tests=\"1\" failures=\"0\" time=\"2.500\">\n\
             <testsuite name=\"s&lt;1&gt;\" tests=\"1\" failures=\"0\" time=\"2.250\">\n"
        ));
    }

    fn child<'a, 'input>(
        case: roxmltree::Node<'a, 'input>,
        tag: &str,
    ) -> roxmltree::Node<'a, 'input> {
        case.children()
            .find(|n| n.has_tag_name(tag))
            .unwrap_or_else(|| panic!("no <{tag}>"))
    }

    #[test]
    fn what_an_xml_reader_sees_is_what_was_written() {
        // Attribute values are one line (a reader turns a newline in one into a space).
        let nasty = "<a href=\"x\">&amp; 'q'</a>";
        let text = "<a href=\"x\">&amp; 'q'\nline two</a>";
        let x = report(
            Counts::All,
            vec![
                Case {
                    failure: Some(Problem {
                        message: nasty.into(),
                        body: text.into(),
                    }),
                    system_out: Some(text.into()),
                    ..case(nasty)
                },
                Case {
                    skipped: Some(nasty.into()),
                    ..case("s")
                },
            ],
        );
        let doc = roxmltree::Document::parse(&x).expect("well-formed XML");
        let suite = doc
            .descendants()
            .find(|n| n.has_tag_name("testsuite"))
            .expect("a testsuite");
        assert_eq!(suite.attribute("name"), Some("s<1>"));
        let cases: Vec<_> = suite.children().filter(|n| n.is_element()).collect();
        assert_eq!(suite.attribute("tests"), Some("2"));
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].attribute("name"), Some(nasty));
        let failure = child(cases[0], "failure");
        assert_eq!(failure.attribute("message"), Some(nasty));
        assert_eq!(failure.text(), Some(text));
        assert_eq!(child(cases[0], "system-out").text(), Some(text));
        assert_eq!(child(cases[1], "skipped").attribute("message"), Some(nasty));
    }
}
