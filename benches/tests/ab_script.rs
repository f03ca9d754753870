//! `benches/ab.sh`'s argument handling: help, and the errors it must give before building anything.
use std::process::{Command, Output};

fn ab(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/ab.sh"))
        .args(args)
        .output()
        .expect("run bash benches/ab.sh")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_exits_zero_with_the_usage_line() {
    let o = ab(&["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("usage: benches/ab.sh [--rounds N]"), "{out}");
}

#[test]
fn a_missing_revision_is_an_error() {
    let o = ab(&["no-such-revision-of-sluice", "HEAD", "oracle"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("'no-such-revision-of-sluice' is not a revision"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_targets_options_and_arity_are_errors() {
    for (args, msg) in [
        (
            &["HEAD", "HEAD", "no-such-bench"][..],
            "no bench target 'no-such-bench'",
        ),
        (
            &["--rounds", "0", "HEAD", "HEAD", "oracle"][..],
            "--rounds must be",
        ),
        (
            &["--measure", "x", "HEAD", "HEAD", "oracle"][..],
            "--measure must be",
        ),
        (
            &["--bogus", "HEAD", "HEAD", "oracle"][..],
            "unknown option --bogus",
        ),
        (
            &["HEAD", "HEAD"][..],
            "expected <rev-A> <rev-B> <bench-target>",
        ),
    ] {
        let o = ab(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
}
