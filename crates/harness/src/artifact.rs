//! Host artifacts: guest failures that the guest kernel itself attributes to its timer not
//! firing, which under TCG on a busy host means the host starved the vCPU thread, not that the
//! kernel under test misbehaved.
//!
//! A run that breaks an invariant and shows one of these is run once more (same case, same
//! seed); both attempts stay on record (`CaseResult::retried_after`, the JSON, JUnit and the
//! progress line), and the retry's verdict counts. Only the kernel's own diagnoses count:
//! a stall report that names a blocked task or a held lock is a finding, never an artifact.

use std::path::Path;

use crate::verdict::{self, CaseResult, matches_any};
use crate::{RunCase, Runner};

/// One console signature of a host artifact.
struct Signature {
    /// Regex over one console line.
    pattern: &'static str,
    /// What it means, for the record.
    meaning: &'static str,
}

/// The signatures, each seen on this project's TCG guests under host load
/// (docs/findings.md, findings 2 and 3).
const SIGNATURES: &[Signature] = &[
    Signature {
        // RCU's check that its grace-period kthread's timer fired; printed with
        // "Possible timer handling issue on cpu=N".
        pattern: r"rcu_\w+ kthread timer wakeup didn't happen",
        meaning: "RCU: the grace-period kthread's timer did not fire (the kernel's own \
                  diagnosis: a timer handling issue, not a stalled task)",
    },
    Signature {
        // check_timer() at boot: the 8254's ticks never reached the CPU.
        pattern: r"IO-APIC \+ timer doesn't work",
        meaning: "boot timer check: no timer ticks reached the CPU",
    },
];

/// The host artifact this console shows, if any.
pub fn host_artifact(console: &[String]) -> Option<&'static str> {
    SIGNATURES
        .iter()
        .find(|s| matches_any(console, s.pattern))
        .map(|s| s.meaning)
}

/// Runs `case` into `out/<id>` and judges it. A run that broke an invariant with a host
/// artifact on its console is run again, up to `retries` times; the earlier attempt's directory
/// is kept as `<id>.host-artifact-N` and named in the result's `retried_after`.
pub fn run_judged(runner: &impl Runner, case: &RunCase, out: &Path, retries: u32) -> CaseResult {
    let dir = out.join(case.id());
    let mut r = verdict::judge(case, runner.run(case, &dir));
    for attempt in 1..=retries {
        if r.violations.is_empty() || r.observation.error.is_some() {
            break;
        }
        let Some(seen) = host_artifact(&r.observation.console) else {
            break;
        };
        let kept = out.join(format!("{}.host-artifact-{attempt}", case.id()));
        // A directory left by an earlier harness run with the same --out.
        let _ = std::fs::remove_dir_all(&kept);
        let kept_note = match std::fs::rename(&dir, &kept) {
            Ok(()) => format!("artifacts in {}", kept.display()),
            Err(e) => format!("its artifacts could not be kept: {e}"),
        };
        eprintln!(
            "harness: {} attempt {attempt}: {seen}; {}; running it again",
            case.id(),
            r.label()
        );
        let first = format!("{seen}; {}; {kept_note}", r.label());
        r = verdict::judge(case, runner.run(case, &dir));
        r.retried_after = Some(first);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;
    use crate::verdict::Observation;
    use std::cell::RefCell;
    use std::sync::Arc;

    /// Plays back consoles, one per run, and writes a file into each run's directory.
    struct Consoles(RefCell<Vec<&'static str>>);

    impl Runner for Consoles {
        fn run(&self, _case: &RunCase, dir: &Path) -> Observation {
            let console = self.0.borrow_mut().remove(0);
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("console.log"), console).unwrap();
            let hung = console.contains("didn't happen") || console.contains("lockup");
            Observation {
                exit: if hung { "timeout" } else { "powered-off" }.into(),
                console: lines(console),
                ..Observation::default()
            }
        }
    }

    fn clean_boot() -> RunCase {
        let text =
            "name = \"clean\"\nvariants = [\"6.12\"]\n[[expect]]\nescapes_forbidden = [\"*\"]\n";
        RunCase {
            scenario: Arc::new(Scenario::parse(Path::new("t"), text, &|_| true).unwrap()),
            variant: "6.12".into(),
            seed: 1,
            cell: None,
        }
    }

    /// A fresh directory per test, under the system's temp dir.
    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-artifact-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const STARVED: &str = "rcu: rcu_sched kthread timer wakeup didn't happen for 5251 jiffies!";

    #[test]
    fn a_run_broken_by_a_host_artifact_runs_again_and_both_stay_on_record() {
        let out = scratch("again");
        let runner = Consoles(RefCell::new(vec![STARVED, "Run /init"]));
        let r = run_judged(&runner, &clean_boot(), &out, 1);
        assert!(r.violations.is_empty(), "{r:?}");
        let first = r.retried_after.as_deref().unwrap();
        assert!(
            first.contains("timer did not fire") && first.contains("exit timeout"),
            "{first}"
        );
        let kept = out.join("clean--6.12--s1.host-artifact-1/console.log");
        assert_eq!(std::fs::read_to_string(kept).unwrap(), STARVED);
        let second = out.join("clean--6.12--s1/console.log");
        assert_eq!(std::fs::read_to_string(second).unwrap(), "Run /init");
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn retries_are_bounded_and_only_for_host_artifacts() {
        let out = scratch("bounded");
        let runner = Consoles(RefCell::new(vec![STARVED, STARVED, STARVED]));
        let r = run_judged(&runner, &clean_boot(), &out, 2);
        assert!(
            !r.violations.is_empty(),
            "a third starved attempt still fails"
        );
        assert_eq!(runner.0.borrow().len(), 0);

        let runner = Consoles(RefCell::new(vec![
            "watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
            "Run /init",
        ]));
        let r = run_judged(&runner, &clean_boot(), &out, 1);
        assert!(!r.violations.is_empty() && r.retried_after.is_none());
        assert_eq!(
            runner.0.borrow().len(),
            1,
            "a lockup is a finding, not run again"
        );

        let runner = Consoles(RefCell::new(vec![STARVED]));
        let r = run_judged(&runner, &clean_boot(), &out, 0);
        assert!(
            !r.violations.is_empty(),
            "--artifact-retries 0 keeps the first verdict"
        );
        let _ = std::fs::remove_dir_all(&out);
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_kernels_own_timer_diagnoses_are_host_artifacts() {
        // As printed by the 6.12 guest in CI (clean-boot--6.12--s1).
        let rcu = lines(
            "[   23.101] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:\n\
             [   23.102] rcu: \t1-...!: (0 ticks this GP) idle=1234/0/0x0 softirq=5/5 fqs=0 (false positive?)\n\
             [   23.103] rcu: rcu_sched kthread timer wakeup didn't happen for 5251 jiffies! g-1135 f0x0 RCU_GP_WAIT_FQS(5) ->state=0x402\n\
             [   23.104] rcu: \tPossible timer handling issue on cpu=1 timer-softirq=2",
        );
        assert!(host_artifact(&rcu).unwrap().contains("timer did not fire"));
        let apic = lines(
            "Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with apic=debug",
        );
        assert!(host_artifact(&apic).unwrap().contains("no timer ticks"));
    }

    #[test]
    fn stalls_that_name_a_task_or_a_lock_are_not() {
        let task_stall = lines(
            "rcu: INFO: rcu_sched self-detected stall on CPU\n\
             rcu: \t0-....: (21002 ticks this GP) idle=...\n\
             task:insmod state:R running task\n\
             INFO: task kworker/0:1:12 blocked for more than 20 seconds.",
        );
        assert_eq!(host_artifact(&task_stall), None);
        let lockup = lines("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [insmod:80]");
        assert_eq!(host_artifact(&lockup), None);
        assert_eq!(host_artifact(&[]), None);
    }
}
