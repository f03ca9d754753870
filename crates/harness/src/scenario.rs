//! Scenario files (`scenarios/*.toml`); the format is documented in `docs/scenarios.md`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sweep::spec::{SweepSpec, check_spec_values};

/// Escape classes the oracle reports, plus `*` (any class) for `escapes_forbidden`.
pub const ESCAPE_CLASSES: &[&str] = &[
    "bypass-after-takeover",
    "stale-config",
    "unsynced-config",
    "wrong-domain",
    "after-release",
];

/// A scenario file is wrong.
#[derive(Debug, Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, unknown key or wrong type (the message names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What toml said.
        message: String,
    },
    /// Semantically invalid.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn default_seeds() -> u32 {
    1
}
fn default_timeout() -> u64 {
    180
}
fn default_cpus() -> u32 {
    2
}
fn default_workload() -> String {
    "disk".into()
}
fn default_true() -> bool {
    true
}
fn default_disk_mib() -> u64 {
    64
}
fn default_rate() -> f64 {
    1.0
}

/// What the guest does.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// Extra kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Module load plan in `/init`'s `sluice.load=` syntax (`a,b` in order, `a+b` concurrently).
    #[serde(default)]
    pub load: Option<String>,
    /// `/init` workload.
    #[serde(default = "default_workload")]
    pub workload: String,
}

/// One disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Size of the scratch image.
    #[serde(default = "default_disk_mib")]
    pub size_mib: u64,
    /// Behind the IOMMU.
    #[serde(default = "default_true")]
    pub iommu: bool,
}

/// The IOMMU in front of the run's devices, as a scenario names it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IommuKind {
    /// No IOMMU: devices reach guest-physical memory directly.
    #[default]
    None,
    /// Sluice's virtio-iommu (x86: described by a VIOT).
    Virtio,
    /// Sluice's Arm SMMUv3 (arm64 guests).
    Smmuv3,
    /// Sluice's s390 zPCI translation (s390x guests).
    Zpci,
}

impl IommuKind {
    /// True when there is an IOMMU.
    pub fn is_some(self) -> bool {
        self != IommuKind::None
    }
}

/// The platform.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// `none`, `virtio`, `smmuv3` or `zpci`.
    #[serde(default)]
    pub iommu: IommuKind,
    /// virtio-iommu boot bypass.
    #[serde(default = "default_true")]
    pub boot_bypass: bool,
    /// Disks (default: one 64 MiB disk behind the IOMMU).
    #[serde(default = "default_disks")]
    pub disks: Vec<DiskSpec>,
    /// Sluice's DMA engine after the disks and the marker: `iommu` (behind the run's IOMMU) or
    /// `direct`; absent means none.
    #[serde(default)]
    pub dma_engine: Option<String>,
    /// A deliberate bug in the IOMMU model, for the escape oracle's positive controls
    /// (`skip-rpcit-invalidation`: zPCI); absent means none.
    #[serde(default)]
    pub model_bug: Option<String>,
}

fn default_disks() -> Vec<DiskSpec> {
    vec![DiskSpec {
        size_mib: default_disk_mib(),
        iommu: true,
    }]
}

impl Default for DeviceSpec {
    fn default() -> Self {
        DeviceSpec {
            iommu: IommuKind::None,
            boot_bypass: true,
            disks: default_disks(),
            dma_engine: None,
            model_bug: None,
        }
    }
}

/// Race injection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InjectSpec {
    /// Rules in the one-line form (`point:key=value,...`), one per entry.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Rogue DMAs of the DMA engine, as `sluice run --rogue` takes them.
    #[serde(default)]
    pub rogue: Vec<String>,
}

/// What must hold, for some or all variants.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Variants this block applies to (default: all of the scenario's).
    #[serde(default)]
    pub variants: Option<Vec<String>>,
    /// Escape classes that must occur (a run without them did not reproduce).
    #[serde(default)]
    pub escapes_required: Vec<String>,
    /// Escape classes that must never occur (`*`: none at all).
    #[serde(default)]
    pub escapes_forbidden: Vec<String>,
    /// Regexes that must match some console line (reproduction condition).
    #[serde(default)]
    pub console_required: Vec<String>,
    /// Regexes that must match no console line (every run).
    #[serde(default)]
    pub console_forbidden: Vec<String>,
    /// Translation faults at least this many (reproduction condition).
    #[serde(default)]
    pub min_faults: Option<u64>,
    /// Translation faults at most this many (every run).
    #[serde(default)]
    pub max_faults: Option<u64>,
    /// How the guest must end (every run): `powered-off`, `timeout`, `guest-panic`, or `any`.
    /// A block that names none leaves it to the variant's other blocks; when no block of the
    /// variant names one, the guest must power off (see [`Scenario::exits_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    /// Fraction of seeds whose run must meet the reproduction conditions.
    #[serde(default = "default_rate")]
    pub min_rate: f64,
}

/// A scenario.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name (lowercase, digits, dashes).
    pub name: String,
    /// One sentence.
    #[serde(default)]
    pub description: String,
    /// Guest variants (guest-images/variants/<name>).
    pub variants: Vec<String>,
    /// Seeds per variant (runs 1..=seeds).
    #[serde(default = "default_seeds")]
    pub seeds: u32,
    /// Seconds before a run is killed.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest behaviour.
    #[serde(default)]
    pub guest: GuestSpec,
    /// Devices and IOMMU.
    #[serde(default)]
    pub devices: DeviceSpec,
    /// Injection plan.
    #[serde(default)]
    pub inject: InjectSpec,
    /// Expectations.
    #[serde(default)]
    pub expect: Vec<Expect>,
    /// Default grid of `harness sweep` (ignored by `harness run`).
    #[serde(default)]
    pub sweep: Option<SweepSpec>,
}

impl Scenario {
    /// Parses and validates `text`. `variant_exists` tells whether a guest variant is known.
    pub fn parse(
        path: &Path,
        text: &str,
        variant_exists: &dyn Fn(&str) -> bool,
    ) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        s.validate(variant_exists)
            .map_err(|message| ScenarioError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(s)
    }

    /// Reads and parses a file.
    pub fn load(
        path: &Path,
        variant_exists: &dyn Fn(&str) -> bool,
    ) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Scenario::parse(path, &text, variant_exists)
    }

    /// The expectation blocks that apply to `variant`.
    pub fn expectations_for<'a>(
        &'a self,
        variant: &'a str,
    ) -> impl Iterator<Item = &'a Expect> + 'a {
        self.expect.iter().filter(move |e| {
            e.variants
                .as_ref()
                .is_none_or(|v| v.iter().any(|x| x == variant))
        })
    }

    /// The ways a run of `variant` may end, each of which must hold: the exits its blocks name
    /// (`any` holds always), or `powered-off` when none names one. A block that only forbids
    /// console lines must not force "powered-off" on a variant whose own block says `any`.
    pub fn exits_for<'a>(&'a self, variant: &'a str) -> Vec<&'a str> {
        let named: Vec<&str> = self
            .expectations_for(variant)
            .filter_map(|e| e.exit.as_deref())
            .collect();
        if named.is_empty() {
            vec!["powered-off"]
        } else {
            named
        }
    }

    fn validate(&self, variant_exists: &dyn Fn(&str) -> bool) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "name {:?} must be lowercase letters, digits and dashes",
                self.name
            ));
        }
        if self.variants.is_empty() {
            return Err("variants is empty".into());
        }
        for v in &self.variants {
            if !variant_exists(v) {
                return Err(format!(
                    "unknown guest variant {v:?} (see guest-images/variants/)"
                ));
            }
        }
        if !(1..=1000).contains(&self.seeds) {
            return Err(format!("seeds = {} is outside 1..=1000", self.seeds));
        }
        if !(1..=3600).contains(&self.timeout) {
            return Err(format!(
                "timeout = {} is outside 1..=3600 seconds",
                self.timeout
            ));
        }
        if !(1..=8).contains(&self.cpus) {
            return Err(format!("cpus = {} is outside 1..=8", self.cpus));
        }
        if self.devices.disks.is_empty() || self.devices.disks.len() > 8 {
            return Err("devices.disks must list 1 to 8 disks".into());
        }
        if self.devices.disks.iter().any(|d| d.size_mib < 8) {
            return Err("a disk must be at least 8 MiB (the pattern lives at 1..5 MiB)".into());
        }
        for (i, e) in self.expect.iter().enumerate() {
            validate_expect(i, e, &self.variants)?;
        }
        for v in &self.variants {
            let mut exits = self.exits_for(v);
            exits.retain(|x| *x != "any");
            exits.sort_unstable();
            exits.dedup();
            if exits.len() > 1 {
                return Err(format!(
                    "impossible expectation: variant {v:?} must end both {}",
                    exits.join(" and ")
                ));
            }
        }
        if let Some(sweep) = &self.sweep {
            check_spec_values(sweep).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn validate_expect(i: usize, e: &Expect, variants: &[String]) -> Result<(), String> {
    let at = format!("expect[{i}]");
    if let Some(vs) = &e.variants {
        for v in vs {
            if !variants.contains(v) {
                return Err(format!(
                    "{at}: variant {v:?} is not one of the scenario's variants {variants:?}"
                ));
            }
        }
    }
    for c in e.escapes_required.iter() {
        if !ESCAPE_CLASSES.contains(&c.as_str()) {
            return Err(format!(
                "{at}: unknown escape class {c:?} (known: {})",
                ESCAPE_CLASSES.join(", ")
            ));
        }
    }
    for c in e.escapes_forbidden.iter() {
        if c != "*" && !ESCAPE_CLASSES.contains(&c.as_str()) {
            return Err(format!(
                "{at}: unknown escape class {c:?} (known: *, {})",
                ESCAPE_CLASSES.join(", ")
            ));
        }
    }
    let all_forbidden = e.escapes_forbidden.iter().any(|c| c == "*");
    for c in &e.escapes_required {
        if all_forbidden || e.escapes_forbidden.contains(c) {
            return Err(format!(
                "{at}: impossible expectation: {c} is both required and forbidden"
            ));
        }
    }
    if let (Some(min), Some(max)) = (e.min_faults, e.max_faults)
        && min > max
    {
        return Err(format!(
            "{at}: impossible expectation: min_faults {min} > max_faults {max}"
        ));
    }
    if !(0.0..=1.0).contains(&e.min_rate) {
        return Err(format!("{at}: min_rate {} is outside 0..=1", e.min_rate));
    }
    if let Some(exit) = &e.exit
        && !["powered-off", "timeout", "guest-panic", "any"].contains(&exit.as_str())
    {
        return Err(format!(
            "{at}: exit {exit:?}: expected powered-off, timeout, guest-panic or any"
        ));
    }
    for r in e.console_required.iter().chain(&e.console_forbidden) {
        regex::Regex::new(r).map_err(|err| format!("{at}: bad console regex {r:?}: {err}"))?;
    }
    if let Some(r) = e
        .console_required
        .iter()
        .find(|r| e.console_forbidden.contains(r))
    {
        return Err(format!(
            "{at}: impossible expectation: console pattern {r:?} both required and forbidden"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(v: &str) -> bool {
        ["6.12", "6.1", "6.12-regwin"].contains(&v)
    }

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(Path::new("t.toml"), text, &known)
    }

    /// Every scenario file in the repository parses and validates against the variants that
    /// exist in `guest-images/variants/`, so a typo fails here, not after a kernel build.
    #[test]
    fn every_committed_scenario_is_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let variants = root.join("guest-images/variants");
        let exists = |v: &str| variants.join(v).join("variant.conf").is_file();
        let mut dirs = vec![root.join("scenarios")];
        let mut seen = 0;
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|e| e == "toml") {
                    Scenario::load(&p, &exists).unwrap_or_else(|e| panic!("{e}"));
                    seen += 1;
                }
            }
        }
        assert!(seen >= 8, "only {seen} scenario files found");
    }

    #[test]
    fn full_scenario_parses_with_defaults() {
        let s = parse(
            r#"
name = "registration-window"
variants = ["6.12", "6.1"]
seeds = 10
[guest]
load = "virtio_iommu+virtio_blk"
[devices]
iommu = "virtio"
[inject]
rules = ["guest.sym.bus_iommu_probe:delay=300ms,mode=stall"]
[[expect]]
escapes_required = ["bypass-after-takeover"]
console_forbidden = ["WARNING:", "BUG:"]
min_rate = 0.3
[[expect]]
variants = ["6.1"]
exit = "any"
"#,
        )
        .unwrap();
        assert_eq!(s.seeds, 10);
        assert_eq!(s.timeout, 180);
        assert_eq!(
            s.devices.disks,
            vec![DiskSpec {
                size_mib: 64,
                iommu: true
            }]
        );
        assert_eq!(s.guest.workload, "disk");
        assert_eq!(s.expectations_for("6.12").count(), 1);
        assert_eq!(s.expectations_for("6.1").count(), 2);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert!(
            err("name = \"x\"\nvariants = [\"6.12\"]\nbogus = 1\n").contains("bogus"),
            "unknown key"
        );
        assert!(
            err("name = \"x\"\nvariants = [\"7.0\"]\n").contains("unknown guest variant \"7.0\"")
        );
        assert!(err("name = \"x\"\n").contains("variants"), "missing key");
        assert!(err("name = \"X y\"\nvariants = [\"6.12\"]\n").contains("lowercase"));
        let impossible = "name = \"x\"\nvariants = [\"6.12\"]\n[[expect]]\nescapes_required = [\"wrong-domain\"]\nescapes_forbidden = [\"*\"]\n";
        assert!(err(impossible).contains("impossible expectation"));
        let rate = "name = \"x\"\nvariants = [\"6.12\"]\n[[expect]]\nmin_rate = 1.5\n";
        assert!(err(rate).contains("min_rate"));
        let class =
            "name = \"x\"\nvariants = [\"6.12\"]\n[[expect]]\nescapes_required = [\"leak\"]\n";
        assert!(err(class).contains("unknown escape class \"leak\""));
        let var = "name = \"x\"\nvariants = [\"6.12\"]\n[[expect]]\nvariants = [\"6.1\"]\n";
        assert!(err(var).contains("not one of the scenario's variants"));
        let re = "name = \"x\"\nvariants = [\"6.12\"]\n[[expect]]\nconsole_forbidden = [\"(\"]\n";
        assert!(err(re).contains("bad console regex"));
        let faults =
            "name = \"x\"\nvariants = [\"6.12\"]\n[[expect]]\nmin_faults = 3\nmax_faults = 1\n";
        assert!(err(faults).contains("min_faults"));
        let exits = "name = \"x\"\nvariants = [\"6.12\"]\n[[expect]]\nexit = \"timeout\"\n[[expect]]\nexit = \"powered-off\"\n[[expect]]\nexit = \"any\"\n";
        assert!(
            err(exits).contains("must end both powered-off and timeout"),
            "{}",
            err(exits)
        );
        let iommu = "name = \"x\"\nvariants = [\"6.12\"]\n[devices]\niommu = \"smmu\"\n";
        let e = err(iommu);
        // toml names the key and the values it accepts
        assert!(
            e.contains("iommu") && e.contains("none") && e.contains("virtio"),
            "{e}"
        );
    }

    #[test]
    fn sweep_table_is_strict() {
        let head = "name = \"x\"\nvariants = [\"6.12\"]\n[sweep]\n";
        let s = parse(&format!(
            "{head}points = [\"virtio-iommu.req.attach\"]\ndelays = [\"0ms\", \"300ms\"]\n\
             modes = [\"defer\"]\nseeds = 2\nbudget = \"5m\"\n"
        ))
        .unwrap();
        let sweep = s.sweep.unwrap();
        assert_eq!(sweep.seeds, Some(2));
        assert_eq!(sweep.budget.as_deref(), Some("5m"));
        assert!(
            parse("name = \"x\"\nvariants = [\"6.12\"]\n")
                .unwrap()
                .sweep
                .is_none()
        );
        let err = |t: &str| parse(&format!("{head}{t}")).unwrap_err().to_string();
        let e = err("point = [\"virtio-iommu.req.attach\"]\n");
        assert!(
            e.contains("unknown field `point`") && e.contains("line 4"),
            "{e}"
        );
        let e = err("modes = [\"sleep\"]\n");
        assert!(e.contains("unknown variant `sleep`"), "{e}");
        let e = err("budget = \"twenty minutes\"\n");
        assert!(e.starts_with("t.toml: sweep budget:"), "{e}");
        let e = err("seeds = 0\n");
        assert!(e.contains("sweep seeds: 0 is outside"), "{e}");
        let e = err("rule_options = \"mode=defer\"\n");
        assert!(e.contains("set by the sweep grid"), "{e}");
    }
}
