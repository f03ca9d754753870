//! The hunt's progress line: runs done of planned, findings so far, elapsed time and an ETA
//! from the mean run time. On a terminal it is rewritten in place; otherwise a plain line is
//! printed every [`PLAIN_EVERY_RUNS`] runs or [`PLAIN_EVERY`], whichever comes first.

use std::time::Duration;

/// A plain progress line at least this often (in runs)...
pub const PLAIN_EVERY_RUNS: usize = 10;
/// ...or this often (in time).
pub const PLAIN_EVERY: Duration = Duration::from_secs(60);

/// `1h02m`, `3m05s`, `42s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Progress of a hunt.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Runs planned (this shard's search runs).
    pub total: usize,
    /// Runs done.
    pub done: usize,
    /// Signatures found so far (baseline excluded).
    pub findings: usize,
    /// Runs that could not be performed.
    pub errors: usize,
    last_plain: Option<(usize, Duration)>,
}

impl Progress {
    /// Starts with `total` runs planned.
    pub fn new(total: usize) -> Self {
        Progress {
            total,
            ..Default::default()
        }
    }

    /// The line for `elapsed`.
    pub fn line(&self, elapsed: Duration) -> String {
        let eta = if self.done == 0 || self.done >= self.total {
            "-".to_string()
        } else {
            let per_run = elapsed / self.done as u32;
            format_duration(per_run * (self.total - self.done) as u32)
        };
        format!(
            "explore: {}/{} runs, {} finding(s), {} error(s), elapsed {}, ETA {}",
            self.done,
            self.total,
            self.findings,
            self.errors,
            format_duration(elapsed),
            eta
        )
    }

    /// Whether a non-terminal should print a line now: the first run, every
    /// [`PLAIN_EVERY_RUNS`] runs or [`PLAIN_EVERY`], and the last run.
    pub fn plain_due(&mut self, elapsed: Duration) -> bool {
        let due = match self.last_plain {
            None => true,
            Some((runs, at)) => {
                self.done >= runs + PLAIN_EVERY_RUNS
                    || elapsed >= at + PLAIN_EVERY
                    || self.done == self.total
            }
        };
        if due {
            self.last_plain = Some((self.done, elapsed));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_counts_and_an_eta_from_the_mean_run() {
        let mut p = Progress::new(10);
        assert!(p.line(Duration::ZERO).ends_with("ETA -"));
        p.done = 4;
        p.findings = 1;
        let l = p.line(Duration::from_secs(40));
        assert_eq!(
            l,
            "explore: 4/10 runs, 1 finding(s), 0 error(s), elapsed 40s, ETA 1m00s"
        );
        assert_eq!(format_duration(Duration::from_secs(3725)), "1h02m");
    }

    #[test]
    fn plain_lines_are_periodic() {
        let mut p = Progress::new(100);
        p.done = 1;
        assert!(p.plain_due(Duration::from_secs(5)));
        p.done = 5;
        assert!(!p.plain_due(Duration::from_secs(20)));
        p.done = 11;
        assert!(p.plain_due(Duration::from_secs(25)));
        p.done = 12;
        assert!(p.plain_due(Duration::from_secs(90)), "a minute passed");
        p.done = 100;
        assert!(p.plain_due(Duration::from_secs(91)), "the last run");
    }
}
