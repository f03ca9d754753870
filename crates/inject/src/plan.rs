//! Plans: the one-line CLI form and TOML, both parsed into the same [`RuleSpec`]s.
//!
//! CLI: `POINT:key=value,key=value[;POINT:...][;seed=N]`, e.g.
//! `virtio-iommu.req.attach:delay=300ms,nth=1,mode=defer`.
//!
//! TOML:
//! ```toml
//! seed = 7
//! [[rule]]
//! point = "virtio-iommu.req.attach"
//! delay = "300ms"
//! mode = "defer"
//! nth = 1
//! ```

use std::fmt;

use sluice_devapi::Bdf;
use thiserror::Error;

use crate::delay::Delay;

/// Every key a rule accepts.
pub const RULE_KEYS: &[(&str, &str)] = &[
    ("delay", "300ms | uniform(1ms..5ms) | exp(5ms) (required)"),
    (
        "mode",
        "stall (default: hold the calling thread) | defer (publish the completion later)",
    ),
    (
        "endpoint",
        "PCI function: 00:03.0, 0000:00:03.0 or a raw requester ID (0x18)",
    ),
    ("sid", "SMMUv3 StreamID"),
    ("fh", "zPCI function handle"),
    ("domain", "domain / context ID"),
    (
        "nth",
        "first firing at the nth matching arrival (1-based); implies count=1",
    ),
    (
        "count",
        "at most this many firings (default: unlimited, or 1 with nth)",
    ),
    (
        "prob",
        "fire with this probability (0..1], drawn from the plan's seed",
    ),
    (
        "after",
        "only once a guest marker containing this text was seen",
    ),
    ("vcpu", "only on this vCPU (guest.sym points only)"),
];

/// Keys of a plan's TOML top level.
pub const PLAN_KEYS: &[&str] = &["seed", "rule"];

/// A plan could not be parsed or validated. Messages name what is valid.
#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    /// A rule is not `POINT:key=value,...`.
    #[error(
        "rule `{0}`: expected POINT:key=value[,key=value...] (e.g. virtio-iommu.req.attach:delay=300ms,nth=1)"
    )]
    Syntax(String),
    /// Unknown key.
    #[error("unknown key `{key}`; valid keys: {valid}")]
    UnknownKey {
        /// The key.
        key: String,
        /// The keys that exist.
        valid: String,
    },
    /// A key was given twice.
    #[error("key `{0}` given twice")]
    Duplicate(String),
    /// A value does not parse.
    #[error("bad value `{value}` for `{key}`: expected {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// A delay does not parse or is out of range.
    #[error(
        "bad delay `{value}`: {why} (forms: 300ms, 250us, 1.5s, uniform(1ms..5ms), exp(5ms); \
         units us, ms, s; 1us to 60s)"
    )]
    BadDelay {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// `delay` is missing.
    #[error("rule `{0}` has no delay= (e.g. delay=300ms)")]
    NoDelay(String),
    /// The point does not exist, or cannot fire in this run.
    #[error("point `{point}` {why}; points of this run, nearest first: {valid}")]
    UnknownPoint {
        /// The point.
        point: String,
        /// What is wrong with it: unknown, or a point of a model this run does not have.
        why: String,
        /// The points of this run, nearest first.
        valid: String,
    },
    /// `mode=defer` on a point whose model cannot publish its completion later.
    #[error(
        "point `{point}` cannot defer (it is not a completion the device publishes); use mode=stall, or defer one of: {valid}"
    )]
    CannotDefer {
        /// The point.
        point: String,
        /// The deferrable points.
        valid: String,
    },
    /// A filter that does not apply to the point.
    #[error("rule `{rule}`: {why}")]
    Filter {
        /// The rule.
        rule: String,
        /// Why.
        why: String,
    },
    /// A guest.sym point without a symbol table, or an unknown symbol.
    #[error("{0}")]
    Symbol(String),
    /// TOML syntax.
    #[error("plan TOML: {0}")]
    Toml(String),
}

/// How a firing delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Block the thread that reached the point (the vCPU, for a BAR access or guest code).
    Stall,
    /// The device publishes the completion later while the caller runs on.
    Defer,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Stall => "stall",
            Mode::Defer => "defer",
        })
    }
}

/// Which DMA master a rule is limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointFilter {
    /// PCI requester ID (virtio-iommu endpoint ID).
    Pci(Bdf),
    /// SMMUv3 StreamID.
    Sid(u32),
    /// zPCI function handle.
    Fh(u32),
}

/// One rule as written (points not yet checked against a run).
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSpec {
    /// The rule as the user wrote it (CLI form), for firings and messages.
    pub text: String,
    /// Point name (`guest.sym.<symbol>[+off]` allowed).
    pub point: String,
    /// Delay of each firing.
    pub delay: Delay,
    /// Stall or defer.
    pub mode: Mode,
    /// Endpoint filter.
    pub endpoint: Option<EndpointFilter>,
    /// Domain filter.
    pub domain: Option<u32>,
    /// First firing at this matching arrival (1-based).
    pub nth: Option<u64>,
    /// Firing limit.
    pub count: Option<u64>,
    /// Firing probability.
    pub prob: Option<f64>,
    /// Guest marker that arms the rule.
    pub after: Option<String>,
    /// vCPU filter (guest.sym only).
    pub vcpu: Option<u32>,
}

impl RuleSpec {
    /// The firing limit in effect (`count`, or 1 when only `nth` is given).
    pub fn limit(&self) -> Option<u64> {
        self.count.or(self.nth.map(|_| 1))
    }
}

/// A seed and rules.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Seed of every rule's PRNG (default 0).
    pub seed: u64,
    /// Rules, in plan order.
    pub rules: Vec<RuleSpec>,
}

fn valid_keys() -> String {
    RULE_KEYS
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ")
}

fn bad(key: &str, value: &str, expected: &str) -> PlanError {
    PlanError::BadValue {
        key: key.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

/// `0x..` hex or decimal.
fn parse_u64(key: &str, v: &str) -> Result<u64, PlanError> {
    let v = v.trim();
    let r = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    r.map_err(|_| bad(key, v, "an integer (decimal or 0x hex)"))
}

fn parse_u32(key: &str, v: &str) -> Result<u32, PlanError> {
    u32::try_from(parse_u64(key, v)?).map_err(|_| bad(key, v, "a 32-bit integer"))
}

/// `00:03.0`, `0000:00:03.0`, or a raw requester ID.
pub fn parse_bdf(v: &str) -> Result<Bdf, PlanError> {
    let expected = "a PCI function bb:dd.f, dddd:bb:dd.f, or a raw requester ID";
    let v = v.trim();
    if !v.contains(':') {
        return u16::try_from(parse_u64("endpoint", v)?)
            .map(Bdf)
            .map_err(|_| bad("endpoint", v, expected));
    }
    v.parse().map_err(|_| bad("endpoint", v, expected))
}

/// Builds a rule from its point and `key=value` pairs.
fn build_rule(text: &str, point: &str, pairs: &[(String, String)]) -> Result<RuleSpec, PlanError> {
    let point = point.trim();
    if point.is_empty() {
        return Err(PlanError::Syntax(text.into()));
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut r = RuleSpec {
        text: text.trim().to_string(),
        point: point.to_string(),
        delay: Delay::Fixed(std::time::Duration::ZERO),
        mode: Mode::Stall,
        endpoint: None,
        domain: None,
        nth: None,
        count: None,
        prob: None,
        after: None,
        vcpu: None,
    };
    let mut have_delay = false;
    for (k, v) in pairs {
        let (k, v) = (k.trim(), v.trim());
        if seen.contains(&k) {
            return Err(PlanError::Duplicate(k.into()));
        }
        seen.push(k);
        let set_ep = |r: &mut RuleSpec, e| {
            if r.endpoint.is_some() {
                return Err(PlanError::Duplicate("endpoint/sid/fh".into()));
            }
            r.endpoint = Some(e);
            Ok(())
        };
        match k {
            "delay" => {
                r.delay = Delay::parse(v)?;
                have_delay = true;
            }
            "mode" => {
                r.mode = match v {
                    "stall" => Mode::Stall,
                    "defer" => Mode::Defer,
                    _ => return Err(bad(k, v, "stall or defer")),
                }
            }
            "endpoint" => set_ep(&mut r, EndpointFilter::Pci(parse_bdf(v)?))?,
            "sid" => set_ep(&mut r, EndpointFilter::Sid(parse_u32(k, v)?))?,
            "fh" => set_ep(&mut r, EndpointFilter::Fh(parse_u32(k, v)?))?,
            "domain" => r.domain = Some(parse_u32(k, v)?),
            "nth" => {
                let n = parse_u64(k, v)?;
                if n == 0 {
                    return Err(bad(k, v, "an occurrence number >= 1"));
                }
                r.nth = Some(n);
            }
            "count" => {
                let n = parse_u64(k, v)?;
                if n == 0 {
                    return Err(bad(k, v, "a firing count >= 1"));
                }
                r.count = Some(n);
            }
            "prob" => {
                let p: f64 = v
                    .parse()
                    .ok()
                    .filter(|p: &f64| *p > 0.0 && *p <= 1.0)
                    .ok_or_else(|| bad(k, v, "a probability in (0, 1]"))?;
                r.prob = Some(p);
            }
            "after" => {
                if v.is_empty() {
                    return Err(bad(k, v, "the text of a guest marker"));
                }
                r.after = Some(v.to_string());
            }
            "vcpu" => r.vcpu = Some(parse_u32(k, v)?),
            _ => {
                return Err(PlanError::UnknownKey {
                    key: k.into(),
                    valid: valid_keys(),
                });
            }
        }
    }
    if !have_delay {
        return Err(PlanError::NoDelay(text.trim().into()));
    }
    Ok(r)
}

/// Parses one CLI rule `POINT:key=value,...`.
pub fn parse_rule(text: &str) -> Result<RuleSpec, PlanError> {
    let (point, rest) = text
        .split_once(':')
        .ok_or_else(|| PlanError::Syntax(text.into()))?;
    let mut pairs = Vec::new();
    for kv in rest.split(',').filter(|s| !s.trim().is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| PlanError::Syntax(text.into()))?;
        pairs.push((k.to_string(), v.to_string()));
    }
    build_rule(text, point, &pairs)
}

impl Plan {
    /// Parses the CLI form: rules separated by `;`, optionally a `seed=N` segment.
    pub fn parse_cli(s: &str) -> Result<Plan, PlanError> {
        let mut plan = Plan::default();
        plan.add_cli(s)?;
        Ok(plan)
    }

    /// Adds the rules of one more `--inject` argument (and its `seed=`, if any).
    pub fn add_cli(&mut self, s: &str) -> Result<(), PlanError> {
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(seed) = part.strip_prefix("seed=") {
                self.seed = parse_u64("seed", seed)?;
                continue;
            }
            self.rules.push(parse_rule(part)?);
        }
        Ok(())
    }

    /// Parses a TOML plan (`seed`, `[[rule]]` tables with `point` and the rule keys).
    pub fn parse_toml(s: &str) -> Result<Plan, PlanError> {
        let table: toml::Table = s.parse().map_err(|e: toml::de::Error| {
            PlanError::Toml(e.to_string().trim().replace('\n', " "))
        })?;
        Plan::from_toml(&table)
    }

    /// Builds a plan from an already-parsed TOML table (e.g. a scenario file's `[inject]`).
    pub fn from_toml(table: &toml::Table) -> Result<Plan, PlanError> {
        let mut plan = Plan::default();
        for (k, v) in table {
            match k.as_str() {
                "seed" => {
                    plan.seed = v
                        .as_integer()
                        .and_then(|i| u64::try_from(i).ok())
                        .ok_or_else(|| bad("seed", &v.to_string(), "a non-negative integer"))?
                }
                "rule" => {
                    let rules = v.as_array().ok_or_else(|| {
                        bad("rule", &v.to_string(), "an array of tables ([[rule]])")
                    })?;
                    for r in rules {
                        let t = r
                            .as_table()
                            .ok_or_else(|| bad("rule", &r.to_string(), "a table"))?;
                        plan.rules.push(rule_from_toml(t)?);
                    }
                }
                _ => {
                    return Err(PlanError::UnknownKey {
                        key: k.clone(),
                        valid: PLAN_KEYS.join(", "),
                    });
                }
            }
        }
        Ok(plan)
    }
}

fn rule_from_toml(t: &toml::Table) -> Result<RuleSpec, PlanError> {
    let mut point = None;
    let mut pairs = Vec::new();
    for (k, v) in t {
        let s = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => return Err(bad(k, &other.to_string(), "a string or a number")),
        };
        if k == "point" {
            point = Some(s);
        } else {
            pairs.push((k.clone(), s));
        }
    }
    let point = point.ok_or_else(|| PlanError::Syntax("[[rule]] without point".into()))?;
    let text = format!(
        "{point}:{}",
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    build_rule(&text, &point, &pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cli_form_parses_every_key() {
        let p = Plan::parse_cli(
            "virtio-iommu.req.attach:delay=300ms,nth=1,mode=defer,endpoint=00:03.0,domain=2 ; \
             seed=42; smmuv3.cmd.CMD_SYNC:delay=uniform(1ms..2ms),count=3,prob=0.5,sid=0x10,\
             after=insmod virtio_iommu",
        )
        .unwrap();
        assert_eq!(p.seed, 42);
        assert_eq!(p.rules.len(), 2);
        let a = &p.rules[0];
        assert_eq!(a.point, "virtio-iommu.req.attach");
        assert_eq!(a.delay, Delay::Fixed(Duration::from_millis(300)));
        assert_eq!(a.mode, Mode::Defer);
        assert_eq!(a.endpoint, Some(EndpointFilter::Pci(Bdf::new(0, 3, 0))));
        assert_eq!((a.domain, a.nth, a.limit()), (Some(2), Some(1), Some(1)));
        let b = &p.rules[1];
        assert_eq!(b.mode, Mode::Stall);
        assert_eq!(b.endpoint, Some(EndpointFilter::Sid(0x10)));
        assert_eq!((b.count, b.prob), (Some(3), Some(0.5)));
        assert_eq!(b.after.as_deref(), Some("insmod virtio_iommu"));
        assert_eq!(b.limit(), Some(3));
        let g = parse_rule("guest.sym.bus_iommu_probe+0x4:delay=500ms,vcpu=1,fh=0x2000").unwrap();
        assert_eq!(g.point, "guest.sym.bus_iommu_probe+0x4");
        assert_eq!(g.vcpu, Some(1));
        assert_eq!(g.endpoint, Some(EndpointFilter::Fh(0x2000)));
        assert_eq!(g.limit(), None);
        let mut more = Plan::default();
        more.add_cli("virtio.blk0.notify:delay=1ms").unwrap();
        more.add_cli("virtio.blk0.notify:delay=2ms").unwrap();
        assert_eq!(more.rules.len(), 2);
    }

    #[test]
    fn toml_form_matches_cli_form() {
        let t = Plan::parse_toml(
            r#"
seed = 9
[[rule]]
point = "virtio-iommu.req.attach"
delay = "300ms"
mode = "defer"
nth = 1
endpoint = "0000:00:03.0"
[[rule]]
point = "zpci.rpcit"
delay = "exp(1ms)"
prob = 0.25
fh = 0x1234
"#,
        )
        .unwrap();
        let c = Plan::parse_cli(
            "seed=9;virtio-iommu.req.attach:delay=300ms,mode=defer,nth=1,endpoint=00:03.0;\
             zpci.rpcit:delay=exp(1ms),prob=0.25,fh=0x1234",
        )
        .unwrap();
        assert_eq!(t.seed, c.seed);
        for (a, b) in t.rules.iter().zip(&c.rules) {
            assert_eq!(
                (a.point.as_str(), a.delay, a.mode, a.endpoint, a.nth, a.prob),
                (b.point.as_str(), b.delay, b.mode, b.endpoint, b.nth, b.prob)
            );
        }
    }

    #[test]
    fn bad_input_names_what_is_valid() {
        let e = Plan::parse_cli("virtio-iommu.req.attach:delay=1ms,nht=1").unwrap_err();
        assert!(
            e.to_string().contains("unknown key `nht`") && e.to_string().contains("nth"),
            "{e}"
        );
        let e = Plan::parse_cli("virtio-iommu.req.attach:delay=1").unwrap_err();
        assert!(e.to_string().contains("no unit"), "{e}");
        let e = Plan::parse_cli("virtio-iommu.req.attach:mode=defer").unwrap_err();
        assert!(matches!(e, PlanError::NoDelay(_)), "{e}");
        let e = Plan::parse_cli("virtio-iommu.req.attach:delay=1ms,mode=later").unwrap_err();
        assert!(e.to_string().contains("stall or defer"), "{e}");
        assert!(Plan::parse_cli("virtio-iommu.req.attach").is_err());
        assert!(Plan::parse_cli("x:delay=1ms,delay=2ms").is_err());
        assert!(Plan::parse_cli("x:delay=1ms,nth=0").is_err());
        assert!(Plan::parse_cli("x:delay=1ms,prob=1.5").is_err());
        assert!(Plan::parse_cli("x:delay=1ms,endpoint=00:40.0").is_err());
        assert!(Plan::parse_cli("x:delay=1ms,endpoint=1:2,sid=3").is_err());
        assert!(Plan::parse_cli("x:delay=1ms,count").is_err());
        assert!(Plan::parse_cli("seed=x").is_err());
        let e = Plan::parse_toml("sed = 1").unwrap_err();
        assert!(e.to_string().contains("seed, rule"), "{e}");
        assert!(Plan::parse_toml("[[rule]]\ndelay='1ms'").is_err());
        assert!(Plan::parse_toml("[[rule]]\npoint='x'\ndelay=[1]").is_err());
        assert!(matches!(
            Plan::parse_toml("seed = "),
            Err(PlanError::Toml(_))
        ));
    }

    #[test]
    fn bdf_forms() {
        assert_eq!(parse_bdf("00:03.0").unwrap(), Bdf::new(0, 3, 0));
        assert_eq!(parse_bdf("0000:01:1f.7").unwrap(), Bdf::new(1, 31, 7));
        assert_eq!(parse_bdf("0x18").unwrap(), Bdf(0x18));
        assert_eq!(parse_bdf("24").unwrap(), Bdf(24));
        assert!(parse_bdf("00:03").is_err());
        assert!(parse_bdf("0x10000").is_err());
    }
}
