//! What to sweep: the optional `[sweep]` table of a scenario file, the same keys given on the
//! command line, and their resolution into one checked [`SweepConfig`].

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Delays used when neither the command line nor the file gives any: a baseline without the
/// sweep rule, then three orders of magnitude.
pub const DEFAULT_DELAYS: &[&str] = &["0ms", "10ms", "100ms", "500ms"];
/// Seeds per cell and variant when none are given. Not the scenario's `seeds`: that one is
/// sized for judging a reproduction rate, a sweep multiplies it by every cell.
pub const DEFAULT_SEEDS: u32 = 3;
/// Wall-time budget when none is given.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(20 * 60);
/// Firings per run of the sweep rule when neither `count` nor `nth` is given: one firing is
/// the smallest perturbation, and a reproduction is then attributable to it.
pub const DEFAULT_COUNT: u32 = 1;
/// Rule keys the grid writes itself; `rule_options` may not set them.
pub const GRID_KEYS: &[&str] = &["delay", "mode", "count", "nth"];

/// How a cell's rule delays (`docs/injection.md`, "The two modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepMode {
    /// Hold the thread that reached the point.
    Stall,
    /// Publish the device's completion later (deferrable points only).
    Defer,
}

impl fmt::Display for SweepMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SweepMode::Stall => "stall",
            SweepMode::Defer => "defer",
        })
    }
}

impl std::str::FromStr for SweepMode {
    type Err = SweepError;
    fn from_str(s: &str) -> Result<Self, SweepError> {
        match s.trim() {
            "stall" => Ok(SweepMode::Stall),
            "defer" => Ok(SweepMode::Defer),
            other => Err(SweepError::BadValue {
                key: "modes",
                why: format!("unknown mode {other:?} (expected stall or defer)"),
            }),
        }
    }
}

/// A sweep cannot be set up. Messages name the key and what would be accepted.
#[derive(Debug, Error, PartialEq)]
pub enum SweepError {
    /// Neither the command line nor the file names a point.
    #[error(
        "no injection points to sweep: give --point P (repeatable) or [sweep] points = [...]; \
         `sluice points` lists them, guest code is guest.sym.<kernel symbol>"
    )]
    NoPoints,
    /// A value is out of range or malformed.
    #[error("sweep {key}: {why}")]
    BadValue {
        /// The key (`delays`, `budget`, ...).
        key: &'static str,
        /// What is wrong and what is accepted.
        why: String,
    },
    /// The injection layer does not know the point.
    #[error("sweep point `{point}`: {why}")]
    UnknownPoint {
        /// The point.
        point: String,
        /// The injection layer's answer (lists the valid points).
        why: String,
    },
    /// None of the requested modes applies to a point.
    #[error(
        "sweep point `{point}` supports none of the requested modes ({requested}); it can only \
         stall: add stall to the modes or drop the point"
    )]
    NoApplicableMode {
        /// The point.
        point: String,
        /// The modes asked for.
        requested: String,
    },
}

/// The `[sweep]` table of a scenario file. Every key is optional; the command line overrides
/// the file key by key (`SweepConfig::resolve`). Documented in `docs/scenarios.md`, "Sweeps".
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// Injection points: device points (`sluice points`) or `guest.sym.<symbol>[+offset]`.
    #[serde(default)]
    pub points: Option<Vec<String>>,
    /// Delays in the injection syntax (`100ms`, `uniform(1ms..5ms)`); `0ms` (or `0`, `none`)
    /// is the baseline cell: the scenario without the sweep rule.
    #[serde(default)]
    pub delays: Option<Vec<String>>,
    /// Modes to try where the point allows them.
    #[serde(default)]
    pub modes: Option<Vec<SweepMode>>,
    /// Seeds per cell and variant.
    #[serde(default)]
    pub seeds: Option<u32>,
    /// Wall-time budget, e.g. `20m`, `90s`, `1h30m`.
    #[serde(default)]
    pub budget: Option<String>,
    /// Firings of the sweep rule per run (`count=`).
    #[serde(default)]
    pub count: Option<u32>,
    /// Arrivals to fire at, one cell each (`nth=`; then `count` does not apply).
    #[serde(default)]
    pub nth: Option<Vec<u32>>,
    /// Drop every scenario rule instead of only those on the swept point.
    #[serde(default)]
    pub replace: Option<bool>,
    /// Extra rule keys for every sweep rule, e.g. `after=insmod virtio_iommu`.
    #[serde(default)]
    pub rule_options: Option<String>,
}

/// A checked sweep: every key resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepConfig {
    /// Points, in the order given.
    pub points: Vec<String>,
    /// Delays, in the order given (baseline spellings kept as written).
    pub delays: Vec<String>,
    /// Modes, in the order given.
    pub modes: Vec<SweepMode>,
    /// Seeds per cell and variant (runs use seeds 1..=seeds).
    pub seeds: u32,
    /// Wall-time budget.
    #[serde(serialize_with = "as_secs")]
    pub budget: Duration,
    /// Firings per run (`count=`), used when `nth` is empty.
    pub count: u32,
    /// Arrivals, one cell each (`nth=`).
    pub nth: Vec<u32>,
    /// Drop every scenario rule.
    pub replace: bool,
    /// Extra rule keys (`key=value,...`), possibly empty.
    pub rule_options: String,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl SweepConfig {
    /// Merges the command line (`cli`) over the file's table (`file`) key by key, fills in
    /// defaults, and checks the result.
    pub fn resolve(file: Option<&SweepSpec>, cli: &SweepSpec) -> Result<SweepConfig, SweepError> {
        let empty = SweepSpec::default();
        let file = file.unwrap_or(&empty);
        fn pick<T: Clone>(cli: &Option<T>, file: &Option<T>) -> Option<T> {
            cli.clone().or_else(|| file.clone())
        }
        let budget = match pick(&cli.budget, &file.budget) {
            Some(text) => parse_budget(&text)?,
            None => DEFAULT_BUDGET,
        };
        let config = SweepConfig {
            points: pick(&cli.points, &file.points).unwrap_or_default(),
            delays: pick(&cli.delays, &file.delays)
                .unwrap_or_else(|| DEFAULT_DELAYS.iter().map(|d| d.to_string()).collect()),
            modes: pick(&cli.modes, &file.modes)
                .unwrap_or_else(|| vec![SweepMode::Stall, SweepMode::Defer]),
            seeds: pick(&cli.seeds, &file.seeds).unwrap_or(DEFAULT_SEEDS),
            budget,
            count: pick(&cli.count, &file.count).unwrap_or(DEFAULT_COUNT),
            nth: pick(&cli.nth, &file.nth).unwrap_or_default(),
            replace: pick(&cli.replace, &file.replace).unwrap_or(false),
            rule_options: pick(&cli.rule_options, &file.rule_options).unwrap_or_default(),
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), SweepError> {
        if self.points.is_empty() {
            return Err(SweepError::NoPoints);
        }
        check_spec_values(&SweepSpec {
            points: Some(self.points.clone()),
            delays: Some(self.delays.clone()),
            modes: Some(self.modes.clone()),
            seeds: Some(self.seeds),
            budget: None,
            count: Some(self.count),
            nth: Some(self.nth.clone()),
            replace: Some(self.replace),
            rule_options: Some(self.rule_options.clone()),
        })
    }
}

/// Checks the keys a `[sweep]` table (or the command line) gives; absent keys are fine.
pub fn check_spec_values(spec: &SweepSpec) -> Result<(), SweepError> {
    let bad = |key: &'static str, why: String| SweepError::BadValue { key, why };
    if let Some(points) = &spec.points {
        for p in points {
            // The point becomes the head of a one-line rule `POINT:key=value,...`.
            if p.is_empty() || p.contains([':', ';', ',', '=']) || p.contains(char::is_whitespace) {
                return Err(bad(
                    "points",
                    format!("{p:?} is not a point name (no spaces, ':', ';', ',' or '=')"),
                ));
            }
        }
        no_duplicates("points", points)?;
    }
    if let Some(delays) = &spec.delays {
        if delays.is_empty() {
            return Err(bad("delays", "is empty".into()));
        }
        for d in delays {
            if d.trim().is_empty() || d.contains([';', ',', ':', '=']) {
                return Err(bad(
                    "delays",
                    format!(
                        "{d:?} is not a delay (forms: 0ms for the baseline, 300ms, \
                         uniform(1ms..5ms), exp(5ms))"
                    ),
                ));
            }
        }
        no_duplicates("delays", delays)?;
        if delays.iter().filter(|d| is_baseline_delay(d)).count() > 1 {
            return Err(bad(
                "delays",
                "more than one baseline delay (0, 0ms, none)".into(),
            ));
        }
    }
    if let Some(modes) = &spec.modes {
        if modes.is_empty() {
            return Err(bad("modes", "is empty (stall, defer)".into()));
        }
        no_duplicates("modes", modes)?;
    }
    if let Some(seeds) = spec.seeds
        && !(1..=1000).contains(&seeds)
    {
        return Err(bad("seeds", format!("{seeds} is outside 1..=1000")));
    }
    if let Some(budget) = &spec.budget {
        parse_budget(budget)?;
    }
    if let Some(count) = spec.count
        && !(1..=1000).contains(&count)
    {
        return Err(bad("count", format!("{count} is outside 1..=1000")));
    }
    if let Some(nth) = &spec.nth {
        if let Some(n) = nth.iter().find(|n| !(1..=100_000).contains(*n)) {
            return Err(bad("nth", format!("{n} is outside 1..=100000")));
        }
        no_duplicates("nth", nth)?;
    }
    if let Some(opts) = &spec.rule_options {
        check_rule_options(opts)?;
    }
    Ok(())
}

fn no_duplicates<T: PartialEq + fmt::Debug>(key: &'static str, v: &[T]) -> Result<(), SweepError> {
    for (i, x) in v.iter().enumerate() {
        if v[..i].contains(x) {
            return Err(SweepError::BadValue {
                key,
                why: format!("{x:?} is given twice"),
            });
        }
    }
    Ok(())
}

/// `key=value[,key=value...]` without the keys the grid sets. The injection layer checks the
/// keys themselves when the plan is validated.
fn check_rule_options(opts: &str) -> Result<(), SweepError> {
    let bad = |why: String| SweepError::BadValue {
        key: "rule_options",
        why,
    };
    if opts.contains(';') {
        return Err(bad(format!("{opts:?}: one rule's options only (no ';')")));
    }
    for kv in opts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((key, _)) = kv.split_once('=') else {
            return Err(bad(format!("{kv:?} is not key=value")));
        };
        if GRID_KEYS.contains(&key.trim()) {
            return Err(bad(format!(
                "{key} is set by the sweep grid (delays, modes, count, nth); leave it out"
            )));
        }
    }
    Ok(())
}

/// `0`, `0ms`, `0s`, `0us`, `none`: the cell without the sweep rule.
pub fn is_baseline_delay(d: &str) -> bool {
    let d = d.trim();
    if d == "none" {
        return true;
    }
    let number = ["us", "µs", "ms", "s"]
        .iter()
        .find_map(|u| d.strip_suffix(u))
        .unwrap_or(d);
    number.parse::<f64>().is_ok_and(|v| v == 0.0)
}

/// Parses a budget: `20m`, `90s`, `1h30m`, `2m30s` (units h, m, s; at least 1 s, at most 7 d).
pub fn parse_budget(text: &str) -> Result<Duration, SweepError> {
    let bad = |why: &str| SweepError::BadValue {
        key: "budget",
        why: format!("{text:?}: {why} (e.g. 20m, 90s, 1h30m)"),
    };
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut seen_unit = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let scale = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad(&format!("unexpected {c:?}"))),
        };
        let n: u64 = digits.parse().map_err(|_| bad("a unit without a number"))?;
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too large"))?;
        digits.clear();
        seen_unit = true;
    }
    if !digits.is_empty() || !seen_unit {
        return Err(bad("every number needs a unit"));
    }
    if !(1..=7 * 24 * 3600).contains(&total) {
        return Err(bad("must be between 1s and 7 days"));
    }
    Ok(Duration::from_secs(total))
}

/// Renders a duration the way budgets are written (`20m`, `1h30m`, `45s`).
pub fn format_budget(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if sec > 0 || out.is_empty() {
        out += &format!("{sec}s");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_from_toml(text: &str) -> Result<SweepSpec, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn budgets() {
        assert_eq!(parse_budget("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_budget("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_budget("2m30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_budget(" 45s "), Ok(Duration::from_secs(45)));
        for bad in [
            "",
            "20",
            "m",
            "20x",
            "0s",
            "8d",
            "1h-5m",
            "99999999999999999999h",
        ] {
            let e = parse_budget(bad).unwrap_err().to_string();
            assert!(e.starts_with("sweep budget:"), "{bad}: {e}");
        }
        assert_eq!(format_budget(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_budget(Duration::from_secs(600)), "10m");
        assert_eq!(format_budget(Duration::from_secs(61)), "1m1s");
    }

    #[test]
    fn baseline_spellings() {
        for d in ["0", "0ms", "0s", "0us", "0.0ms", "none"] {
            assert!(is_baseline_delay(d), "{d}");
        }
        for d in ["1ms", "0.5ms", "uniform(0ms..5ms)", "exp(5ms)", "10"] {
            assert!(!is_baseline_delay(d), "{d}");
        }
    }

    #[test]
    fn table_parses_every_key() {
        let s = spec_from_toml(
            r#"
points = ["guest.sym.bus_iommu_probe", "virtio-iommu.req.attach"]
delays = ["0ms", "100ms"]
modes = ["defer", "stall"]
seeds = 2
budget = "10m"
count = 2
nth = [1, 3]
replace = true
rule_options = "after=insmod virtio_iommu"
"#,
        )
        .unwrap();
        assert_eq!(s.modes, Some(vec![SweepMode::Defer, SweepMode::Stall]));
        check_spec_values(&s).unwrap();
        let c = SweepConfig::resolve(Some(&s), &SweepSpec::default()).unwrap();
        assert_eq!(c.budget, Duration::from_secs(600));
        assert_eq!((c.seeds, c.count, c.replace), (2, 2, true));
        assert_eq!(c.nth, [1, 3]);
    }

    #[test]
    fn table_rejects_unknown_keys_and_modes() {
        let e = spec_from_toml("points = [\"x\"]\ndelay = [\"1ms\"]\n").unwrap_err();
        assert!(e.contains("unknown field `delay`"), "{e}");
        let e = spec_from_toml("modes = [\"pause\"]\n").unwrap_err();
        assert!(e.contains("pause") && e.contains("stall"), "{e}");
    }

    #[test]
    fn command_line_overrides_the_file_key_by_key() {
        let file = SweepSpec {
            points: Some(vec!["a.b".into()]),
            seeds: Some(5),
            budget: Some("1h".into()),
            ..Default::default()
        };
        let cli = SweepSpec {
            seeds: Some(1),
            delays: Some(vec!["1ms".into()]),
            ..Default::default()
        };
        let c = SweepConfig::resolve(Some(&file), &cli).unwrap();
        assert_eq!(c.points, ["a.b"], "from the file");
        assert_eq!(c.seeds, 1, "the command line wins");
        assert_eq!(c.delays, ["1ms"]);
        assert_eq!(c.budget, Duration::from_secs(3600));
        assert_eq!(c.modes, [SweepMode::Stall, SweepMode::Defer], "default");
        assert_eq!(c.count, DEFAULT_COUNT);
        let none = SweepConfig::resolve(None, &SweepSpec::default()).unwrap_err();
        assert_eq!(none, SweepError::NoPoints);
    }

    #[test]
    fn bad_values_name_the_key() {
        let check = |spec: SweepSpec| check_spec_values(&spec).unwrap_err().to_string();
        let with_points = |p: &[&str]| SweepSpec {
            points: Some(p.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        assert!(check(with_points(&["a:delay=1ms"])).starts_with("sweep points:"));
        assert!(check(with_points(&["a", "a"])).contains("given twice"));
        let delays = |d: &[&str]| SweepSpec {
            delays: Some(d.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        assert!(check(delays(&[])).contains("empty"));
        assert!(check(delays(&["1ms,count=3"])).starts_with("sweep delays:"));
        assert!(check(delays(&["0", "0ms"])).contains("more than one baseline"));
        let e = check(SweepSpec {
            seeds: Some(0),
            ..Default::default()
        });
        assert!(e.starts_with("sweep seeds:"), "{e}");
        let e = check(SweepSpec {
            nth: Some(vec![0]),
            ..Default::default()
        });
        assert!(e.starts_with("sweep nth:"), "{e}");
        let opts = |o: &str| SweepSpec {
            rule_options: Some(o.into()),
            ..Default::default()
        };
        assert!(check(opts("count=3")).contains("set by the sweep grid"));
        assert!(check(opts("after")).contains("not key=value"));
        assert!(check(opts("after=x;seed=3")).contains("no ';'"));
        check_spec_values(&opts("after=SLUICE: insmod virtio_iommu,endpoint=00:03.0")).unwrap();
    }
}
