//! Host-armed rogue DMAs of the DMA engine: `--rogue iova=..,len=..,after=MARKER[,delay=..]`.
//!
//! A scenario asks "could this device reach that IOVA now?" by making the engine DMA on its own
//! when a guest marker line arrives (plus a delay). `iova=kernel` aims at the IOVA the guest's
//! `sluice_dma` driver keeps mapped in the kernel's domain, as `/init` announces it with the
//! marker line `dma kernel-iova <bdf> <iova>`.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use sluice_dma_engine::{DmaEngine, MAX_LEN, RogueDma};

/// Where a rogue DMA is aimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RogueTarget {
    /// A fixed IOVA.
    Iova(u64),
    /// The kernel driver's long-lived mapping, from the guest's `dma kernel-iova` marker.
    KernelMapping,
}

/// One `--rogue` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RogueRule {
    /// Target.
    pub target: RogueTarget,
    /// Bytes (1..=1 MiB).
    pub len: u32,
    /// `Some(byte)`: write it; `None`: read.
    pub write: Option<u8>,
    /// Fires once, at the first marker line that starts with this text.
    pub after: String,
    /// Waits this long after the marker.
    pub delay: Duration,
    /// The rule as written, for reports.
    pub text: String,
}

/// What one rule did, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct RogueReport {
    /// The rule as written.
    pub rule: String,
    /// IOVA actually used (None when `iova=kernel` had no marker to resolve it).
    pub iova: Option<u64>,
    /// Engine status name (`Ok`, `WriteFault`, ...) or why it did not run.
    pub status: String,
    /// Bytes moved.
    pub moved: u64,
    /// First refused IOVA.
    pub fault: Option<u64>,
}

/// A `--rogue` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad --rogue rule `{rule}`: {why}")]
pub struct RogueParseError {
    rule: String,
    why: String,
}

fn parse_u64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

impl RogueRule {
    /// Parses `iova=X|kernel,len=N,after=TEXT[,write=BYTE][,delay=D]` (D like `10ms`, `1s`).
    pub fn parse(text: &str) -> Result<Self, RogueParseError> {
        let err = |why: &str| RogueParseError {
            rule: text.to_string(),
            why: why.to_string(),
        };
        let (mut target, mut len, mut write, mut after, mut delay) =
            (None, 4096u32, None, None, Duration::ZERO);
        for kv in text.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err("expected key=value"))?;
            match k.trim() {
                "iova" if v == "kernel" => target = Some(RogueTarget::KernelMapping),
                "iova" => {
                    target = Some(RogueTarget::Iova(
                        parse_u64(v).ok_or_else(|| err("iova is not a number"))?,
                    ))
                }
                "len" => {
                    len = parse_u64(v)
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| (1..=MAX_LEN).contains(n))
                        .ok_or_else(|| err("len must be 1..=1048576"))?
                }
                "write" => {
                    write = Some(
                        parse_u64(v)
                            .and_then(|b| u8::try_from(b).ok())
                            .ok_or_else(|| err("write takes a byte value"))?,
                    )
                }
                "after" => after = Some(v.to_string()),
                "delay" => delay = humantime_like(v).ok_or_else(|| err("delay like 10ms or 1s"))?,
                other => return Err(err(&format!("unknown key `{other}`"))),
            }
        }
        Ok(RogueRule {
            target: target.ok_or_else(|| err("iova= is required"))?,
            len,
            write,
            after: after
                .filter(|a| !a.is_empty())
                .ok_or_else(|| err("after=MARKER is required"))?,
            delay,
            text: text.to_string(),
        })
    }
}

/// `10ms`, `2s`, `500us`, or a bare number of milliseconds.
fn humantime_like(v: &str) -> Option<Duration> {
    let (num, unit) = v
        .find(|c: char| !c.is_ascii_digit())
        .map_or((v, "ms"), |i| v.split_at(i));
    let n: u64 = num.parse().ok()?;
    match unit {
        "us" => Some(Duration::from_micros(n)),
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        _ => None,
    }
}

/// The armed rules of one run, fed with the guest's marker lines.
#[derive(Default)]
pub struct RogueArm {
    rules: Vec<RogueRule>,
    fired: Mutex<Vec<bool>>,
    kernel_iova: Mutex<Option<u64>>,
    engine: OnceLock<Arc<DmaEngine>>,
    reports: Arc<Mutex<Vec<RogueReport>>>,
    quiet: bool,
}

impl RogueArm {
    /// Arms `rules` (none fire until [`RogueArm::set_engine`]); `quiet` keeps stderr for the
    /// harness's own progress lines.
    pub fn new(rules: Vec<RogueRule>, quiet: bool) -> Self {
        let fired = Mutex::new(vec![false; rules.len()]);
        RogueArm {
            rules,
            fired,
            quiet,
            ..Default::default()
        }
    }

    /// True when there is nothing to arm.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The engine the rules act on, once the devices exist.
    pub fn set_engine(&self, engine: Arc<DmaEngine>) {
        let _ = self.engine.set(engine);
    }

    /// What fired so far.
    pub fn reports(&self) -> Vec<RogueReport> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// A guest marker line: resolves `iova=kernel` and fires the rules it matches.
    pub fn marker(&self, line: &str) {
        if let Some(rest) = line.strip_prefix("dma kernel-iova ") {
            let iova = rest.split_whitespace().nth(1).and_then(parse_u64);
            if let Ok(mut k) = self.kernel_iova.lock() {
                *k = iova;
            }
        }
        let Some(engine) = self.engine.get() else {
            return;
        };
        for (i, rule) in self.rules.iter().enumerate() {
            if !line.starts_with(&rule.after) {
                continue;
            }
            let first = match self.fired.lock() {
                Ok(mut f) => f.get_mut(i).is_some_and(|f| !std::mem::replace(f, true)),
                Err(_) => false,
            };
            if !first {
                continue;
            }
            let iova = match rule.target {
                RogueTarget::Iova(v) => Some(v),
                RogueTarget::KernelMapping => self.kernel_iova.lock().ok().and_then(|k| *k),
            };
            let (engine, rule, reports) = (engine.clone(), rule.clone(), self.reports.clone());
            let quiet = self.quiet;
            // Off the marker path: the marker device's BAR write must not wait for the delay.
            std::thread::spawn(move || {
                std::thread::sleep(rule.delay);
                let report = match iova {
                    None => RogueReport {
                        rule: rule.text.clone(),
                        iova: None,
                        status: "no kernel-iova marker yet".into(),
                        moved: 0,
                        fault: None,
                    },
                    Some(iova) => {
                        let out = engine.rogue(RogueDma {
                            iova,
                            len: rule.len,
                            write: rule.write,
                        });
                        RogueReport {
                            rule: rule.text.clone(),
                            iova: Some(iova),
                            status: format!("{:?}", out.status),
                            moved: out.moved,
                            fault: out.fault,
                        }
                    }
                };
                if !quiet {
                    eprintln!(
                        "sluice: rogue DMA `{}` at {}: {} ({} bytes moved)",
                        report.rule,
                        report.iova.map_or("-".into(), |v| format!("{v:#x}")),
                        report.status,
                        report.moved
                    );
                }
                if let Ok(mut r) = reports.lock() {
                    r.push(report);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_bad_ones_say_why() {
        let r = RogueRule::parse("iova=0x1000,len=64,write=0x5a,after=own set-container,delay=5ms")
            .unwrap();
        assert_eq!(r.target, RogueTarget::Iova(0x1000));
        assert_eq!((r.len, r.write), (64, Some(0x5a)));
        assert_eq!(r.after, "own set-container");
        assert_eq!(r.delay, Duration::from_millis(5));
        let k = RogueRule::parse("iova=kernel,after=own map").unwrap();
        assert_eq!(
            (k.target, k.len, k.write),
            (RogueTarget::KernelMapping, 4096, None)
        );
        for (bad, why) in [
            ("len=4,after=x", "iova= is required"),
            ("iova=1", "after=MARKER is required"),
            ("iova=zz,after=x", "iova is not a number"),
            ("iova=1,len=0,after=x", "len must be"),
            ("iova=1,len=2000000,after=x", "len must be"),
            ("iova=1,write=256,after=x", "byte value"),
            ("iova=1,after=x,delay=3h", "delay like"),
            ("iova=1,after=x,color=red", "unknown key `color`"),
            ("iova", "expected key=value"),
        ] {
            let e = RogueRule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn kernel_iova_comes_from_the_marker_line() {
        let arm = RogueArm::new(vec![], true);
        arm.marker("dma kernel-iova 0000:00:05.0 0xfffff000");
        assert_eq!(*arm.kernel_iova.lock().unwrap(), Some(0xffff_f000));
        arm.marker("dma kernel-iova 0000:00:05.0 none");
        assert_eq!(*arm.kernel_iova.lock().unwrap(), None);
    }
}
