//! Shrinking a plan that showed a finding to the smallest one that still shows it in at least
//! half of its runs (delta debugging over the rules, then over each rule's firings and delay),
//! and measuring the rate of what remains. The runs are the caller's: a closure that runs the
//! plan once and says whether the finding's signature appeared, so the logic is tested without
//! a guest.

use serde::{Deserialize, Serialize};

use crate::explore::plan::TrialRule;

/// How hard to try.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinimizeConfig {
    /// Runs per check: a candidate plan "still reproduces" when at least half of them show
    /// the signature (a check stops as soon as the answer is known). Three, so that one lucky
    /// run of a race the host's load opens now and then does not pass a reduction.
    pub tries: u32,
    /// Runs of the final plan, all performed, for its rate.
    pub final_tries: u32,
    /// Delays are not halved below this (microseconds).
    pub min_delay_us: u64,
    /// Halvings per rule at most.
    pub max_halvings: u32,
    /// Runs one minimization may spend before the final rate (reduction stops there).
    pub max_runs: u32,
}

impl Default for MinimizeConfig {
    fn default() -> Self {
        MinimizeConfig {
            tries: 3,
            final_tries: 4,
            min_delay_us: 1000,
            max_halvings: 4,
            max_runs: 16,
        }
    }
}

/// What minimization produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Minimized {
    /// The smallest plan found (the original when nothing could be dropped or shrunk, or when
    /// the original did not reproduce at half its runs).
    pub rules: Vec<TrialRule>,
    /// The original reproduced in at least half of its check runs.
    pub confirmed: bool,
    /// Runs of the final plan that showed the signature.
    pub hits: u32,
    /// Runs of the final plan.
    pub tries: u32,
    /// Every run minimization performed (checks and final).
    pub runs: u32,
    /// What each accepted step did, in order.
    pub steps: Vec<String>,
}

impl Minimized {
    /// The plan in one line: rules in the injection syntax, `; `-separated.
    pub fn plan_text(&self) -> String {
        self.rules
            .iter()
            .map(TrialRule::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// hits / tries.
    pub fn rate(&self) -> f64 {
        if self.tries == 0 {
            0.0
        } else {
            f64::from(self.hits) / f64::from(self.tries)
        }
    }
}

/// Runs `rules` once as run number `k` of its check (the caller picks seeds from `k`) and
/// says whether the signature appeared.
pub type RunOnce<'a> = dyn FnMut(&[TrialRule], u32) -> bool + 'a;

struct Budgeted<'a, 'b> {
    run: &'a mut RunOnce<'b>,
    spent: u32,
}

impl Budgeted<'_, '_> {
    /// At least half of `tries` runs show the signature; stops once that is decided.
    fn holds(&mut self, rules: &[TrialRule], tries: u32) -> bool {
        let tries = tries.max(1);
        let mut hits = 0;
        for k in 0..tries {
            if (self.run)(rules, k) {
                hits += 1;
            }
            self.spent += 1;
            let remaining = tries - k - 1;
            if hits * 2 >= tries {
                return true;
            }
            if (hits + remaining) * 2 < tries {
                return false;
            }
        }
        hits * 2 >= tries
    }
}

/// Runs `rules` `tries` times; the runs that showed the signature.
fn rate_of(b: &mut Budgeted<'_, '_>, rules: &[TrialRule], tries: u32) -> u32 {
    let mut hits = 0;
    for k in 0..tries {
        if (b.run)(rules, k) {
            hits += 1;
        }
        b.spent += 1;
    }
    hits
}

/// Shrinks `original`: is injection needed at all; which rules can go; can each rule fire
/// once instead of several times; how far can each delay be halved. Then runs the result
/// `final_tries` times for its rate.
pub fn minimize(original: &[TrialRule], cfg: &MinimizeConfig, run: &mut RunOnce<'_>) -> Minimized {
    let mut b = Budgeted { run, spent: 0 };
    let mut steps = Vec::new();
    let mut cur = original.to_vec();
    let confirmed = b.holds(&cur, cfg.tries);
    if confirmed {
        let within = |b: &Budgeted| b.spent < cfg.max_runs;
        // No injection at all: then the finding is not a race the plan opened.
        if within(&b) && !cur.is_empty() && b.holds(&[], cfg.tries) {
            steps.push("reproduces without injection".to_string());
            cur.clear();
        }
        // Drop rules one at a time, restarting after each success (ddmin with n = 1).
        let mut i = 0;
        while cur.len() > 1 && i < cur.len() && within(&b) {
            let mut without = cur.clone();
            let gone = without.remove(i);
            if b.holds(&without, cfg.tries) {
                steps.push(format!("dropped {}", gone.point));
                cur = without;
                i = 0;
            } else {
                i += 1;
            }
        }
        for i in 0..cur.len() {
            if cur[i].count > 1 && within(&b) {
                let mut once = cur.clone();
                once[i].count = 1;
                if b.holds(&once, cfg.tries) {
                    steps.push(format!("{}: count {} -> 1", cur[i].point, cur[i].count));
                    cur = once;
                }
            }
            for _ in 0..cfg.max_halvings {
                let half = cur[i].delay_us / 2;
                if half < cfg.min_delay_us || !within(&b) {
                    break;
                }
                let mut shorter = cur.clone();
                shorter[i].delay_us = half;
                if !b.holds(&shorter, cfg.tries) {
                    break;
                }
                steps.push(format!(
                    "{}: delay {} -> {}",
                    cur[i].point,
                    crate::explore::plan::format_delay(cur[i].delay_us),
                    crate::explore::plan::format_delay(half)
                ));
                cur = shorter;
            }
        }
    }
    let mut hits = rate_of(&mut b, &cur, cfg.final_tries);
    // Reductions were judged on few runs: if the result measures below half, measure the
    // original too and keep whichever reproduces better (the smaller on a tie).
    if confirmed && cur != original && hits * 2 < cfg.final_tries {
        let original_hits = rate_of(&mut b, original, cfg.final_tries);
        if original_hits > hits {
            steps.push(format!(
                "reduced plan measured {hits}/{0}, original {original_hits}/{0}: original kept",
                cfg.final_tries
            ));
            cur = original.to_vec();
            hits = original_hits;
        }
    }
    Minimized {
        rules: cur,
        confirmed,
        hits,
        tries: cfg.final_tries,
        runs: b.spent,
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::SweepMode;

    fn rule(point: &str, ms: u64, count: u32) -> TrialRule {
        TrialRule {
            point: point.into(),
            delay_us: ms * 1000,
            count,
            mode: SweepMode::Stall,
        }
    }

    /// A deterministic "kernel": the finding appears iff a stall of at least 60 ms sits on
    /// `guest.sym.a` (whatever its count), wherever `b` is.
    fn needs_a_60ms(rules: &[TrialRule], _k: u32) -> bool {
        rules
            .iter()
            .any(|r| r.point == "guest.sym.a" && r.delay_us >= 60_000)
    }

    #[test]
    fn drops_the_bystander_rule_shrinks_count_and_halves_to_the_threshold() {
        let original = [rule("guest.sym.b", 100, 2), rule("guest.sym.a", 500, 2)];
        let mut calls = 0;
        let mut run = |r: &[TrialRule], k: u32| {
            calls += 1;
            needs_a_60ms(r, k)
        };
        let m = minimize(
            &original,
            &MinimizeConfig {
                max_runs: 100,
                ..Default::default()
            },
            &mut run,
        );
        // 500 -> 250 -> 125 -> 62.5 holds; 31.25 does not.
        assert_eq!(
            m.rules,
            [rule("guest.sym.a", 0, 1)].map(|mut r| {
                r.delay_us = 62_500;
                r
            })
        );
        assert!(m.confirmed);
        assert_eq!((m.hits, m.tries), (4, 4));
        assert_eq!(m.rate(), 1.0);
        assert_eq!(m.runs, calls);
        assert!(
            m.steps.iter().any(|s| s == "dropped guest.sym.b"),
            "{:?}",
            m.steps
        );
        assert!(m.steps.iter().any(|s| s.contains("count 2 -> 1")));
    }

    #[test]
    fn a_finding_that_needs_no_injection_minimizes_to_nothing() {
        let m = minimize(
            &[rule("guest.sym.a", 100, 1)],
            &MinimizeConfig::default(),
            &mut |_, _| true,
        );
        assert!(m.rules.is_empty());
        assert_eq!(m.steps, ["reproduces without injection"]);
    }

    #[test]
    fn an_unconfirmed_finding_keeps_its_plan_and_gets_a_measured_rate() {
        // Shows up on every fourth run only.
        let mut n = 0;
        let mut run = |_: &[TrialRule], _k: u32| {
            n += 1;
            n % 4 == 0
        };
        let original = [rule("guest.sym.a", 100, 2)];
        let m = minimize(&original, &MinimizeConfig::default(), &mut run);
        assert!(!m.confirmed);
        assert_eq!(m.rules, original);
        assert_eq!(m.tries, 4);
        assert!(m.rate() < 0.5);
    }

    #[test]
    fn a_reduction_that_measures_worse_than_the_original_is_undone() {
        // Flaky "kernel": the empty plan passes its reduction check by luck (2 of its first 3
        // runs), then never again; the original always reproduces.
        let mut empty_runs = 0;
        let mut run = |r: &[TrialRule], _k: u32| {
            if r.is_empty() {
                empty_runs += 1;
                empty_runs <= 2
            } else {
                true
            }
        };
        let original = [rule("guest.sym.a", 100, 1)];
        let m = minimize(&original, &MinimizeConfig::default(), &mut run);
        assert_eq!(m.rules, original);
        assert_eq!((m.hits, m.tries), (4, 4));
        assert!(
            m.steps.last().unwrap().contains("original kept"),
            "{:?}",
            m.steps
        );
    }

    #[test]
    fn checks_stop_early_and_the_budget_bounds_reduction() {
        let mut calls = 0;
        let cfg = MinimizeConfig {
            tries: 4,
            max_runs: 3,
            ..Default::default()
        };
        let mut run = |r: &[TrialRule], k: u32| {
            calls += 1;
            needs_a_60ms(r, k)
        };
        let m = minimize(&[rule("guest.sym.a", 500, 1)], &cfg, &mut run);
        // Confirmation: 2 hits of 4 decide it (2 runs); no-injection check: 0 of the first 3
        // can no longer reach half (3 runs, budget spent); then the final 4.
        assert_eq!(m.runs, 2 + 3 + 4);
        assert_eq!(m.rules[0].delay_us, 500_000, "no budget left to halve");
        assert_eq!(calls, m.runs);
    }
}
