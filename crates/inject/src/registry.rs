//! Which points exist in a run, which of them can defer, and the guest's symbol table for
//! `guest.sym.<symbol>[+offset]` points; validation of a [`Plan`] against them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::delay::{MAX_DELAY, WATCHDOG_BUDGET};
use crate::plan::{EndpointFilter, Mode, Plan, PlanError, RuleSpec};
use sluice_devapi::PointDecl;

/// Prefix of guest-code points.
pub const GUEST_SYM_PREFIX: &str = "guest.sym.";

/// One known point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointInfo {
    /// Stable name.
    pub name: String,
    /// The model can publish this completion later (`mode=defer`).
    pub defer: bool,
    /// Reached inside the guest's doorbell write (see [`PointDecl::doorbell`]).
    pub doorbell: bool,
    /// Reached about once per I/O; the timeline samples it (see [`PointDecl::hot`]).
    pub hot: bool,
    /// Which model announces it (`virtio-iommu`, `virtio-pci`, `blk0`, ...).
    pub owner: String,
}

/// `nm`-style symbol table (`System.map`: `address type name`).
#[derive(Debug, Clone, Default)]
pub struct SymbolMap {
    by_name: BTreeMap<String, u64>,
}

impl SymbolMap {
    /// Parses System.map text. Text symbols (`t`/`T`/`w`/`W`) only: guest.sym points are code.
    pub fn parse(text: &str) -> SymbolMap {
        let mut by_name = BTreeMap::new();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            if let Ok(a) = u64::from_str_radix(addr, 16) {
                by_name.entry(name.to_string()).or_insert(a);
            }
        }
        SymbolMap { by_name }
    }

    /// The same symbols `bias` bytes higher: where a kernel that runs away from its link
    /// address (s390 maps its image at `CONFIG_KERNEL_IMAGE_BASE`) has them.
    pub fn offset_by(mut self, bias: u64) -> SymbolMap {
        for a in self.by_name.values_mut() {
            *a = a.wrapping_add(bias);
        }
        self
    }

    /// Reads and parses a System.map file.
    pub fn load(path: &Path) -> std::io::Result<SymbolMap> {
        Ok(SymbolMap::parse(&std::fs::read_to_string(path)?))
    }

    /// Address of a text symbol.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// Every text symbol's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Number of text symbols.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// No symbols.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Symbols that start like `name` (for "did you mean").
    fn near(&self, name: &str) -> Vec<&str> {
        let stem: String = name.chars().take(6).collect();
        self.by_name
            .keys()
            .filter(|k| k.starts_with(&stem))
            .take(8)
            .map(String::as_str)
            .collect()
    }
}

/// One model's named points, as its crate declares them. The device host assembles the
/// catalogue of every model (`sluice_host::points`); this crate knows no model.
#[derive(Debug, Clone)]
pub struct ModelPoints {
    /// The owner name its points carry (`virtio-iommu`, `smmuv3`, ...).
    pub owner: &'static str,
    /// Its points, with their properties.
    pub points: Vec<PointDecl>,
}

/// Every point of a run.
#[derive(Debug, Clone, Default)]
pub struct PointRegistry {
    points: BTreeMap<String, PointInfo>,
    /// Points of models this run does not have (name → owner): known names that cannot fire.
    absent: BTreeMap<String, &'static str>,
    symbols: Option<SymbolMap>,
}

impl PointRegistry {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every point of every model in `catalogue` (what `sluice points` lists).
    pub fn all_models(catalogue: &[ModelPoints]) -> Self {
        let owners: Vec<&str> = catalogue.iter().map(|m| m.owner).collect();
        Self::with_models(catalogue, &owners)
    }

    /// The points of the models of `catalogue` whose owner is in `present`: those a run with
    /// these models can fire. The points of the other models stay known, so a rule on one of
    /// them is refused as "not in this run" rather than "unknown".
    pub fn with_models(catalogue: &[ModelPoints], present: &[&str]) -> Self {
        let mut r = Self::new();
        for m in catalogue {
            if present.contains(&m.owner) {
                r.add_model(m.owner, &m.points);
            } else {
                r.absent
                    .extend(m.points.iter().map(|p| (p.name.clone(), m.owner)));
            }
        }
        r
    }

    /// Adds one model's points.
    pub fn add_model(&mut self, owner: &str, points: &[PointDecl]) {
        for p in points {
            self.add(p, owner);
        }
    }

    /// Adds one point as `owner` declared it.
    pub fn add(&mut self, decl: &PointDecl, owner: &str) {
        self.points.insert(
            decl.name.clone(),
            PointInfo {
                name: decl.name.clone(),
                defer: decl.defer,
                doorbell: decl.doorbell,
                hot: decl.hot,
                owner: owner.to_string(),
            },
        );
    }

    /// Adds the points of one device instance `instance`.
    pub fn add_instance(&mut self, instance: &str, points: &[PointDecl]) {
        self.add_model(instance, points);
    }

    /// The names of the points reached about once per I/O (the oracle samples them).
    pub fn hot_points(&self) -> std::collections::HashSet<String> {
        self.points
            .values()
            .filter(|p| p.hot)
            .map(|p| p.name.clone())
            .collect()
    }

    /// The guest's symbol table, enabling `guest.sym.*` points.
    pub fn set_symbols(&mut self, symbols: SymbolMap) {
        self.symbols = Some(symbols);
    }

    /// The guest's symbol table, if set.
    pub fn symbols(&self) -> Option<&SymbolMap> {
        self.symbols.as_ref()
    }

    /// Every point, sorted by name. `guest.sym.<symbol>[+offset]` is listed by `patterns()`.
    pub fn points(&self) -> impl Iterator<Item = &PointInfo> {
        self.points.values()
    }

    /// Name patterns of points not listed one by one.
    pub fn patterns(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.symbols.is_none() {
            v.push("virtio.<dev>.{notify,status,complete} (per device; not yet resolved)".into());
        }
        v.push(format!(
            "{GUEST_SYM_PREFIX}<kernel symbol>[+offset] (TCG plugin or kvm breakpoints; {})",
            match &self.symbols {
                Some(s) => format!("{} text symbols from System.map", s.len()),
                None => "needs the guest's System.map".into(),
            }
        ));
        v
    }

    /// Looks a point up.
    pub fn get(&self, name: &str) -> Option<&PointInfo> {
        self.points.get(name)
    }

    /// The points of this run, nearest to `name` first (edit distance, then name).
    pub fn nearest(&self, name: &str) -> Vec<&str> {
        let mut v: Vec<(usize, &str)> = self
            .points
            .keys()
            .map(|k| (edit_distance(name, k), k.as_str()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    }

    /// The error for a rule on `point`, which is not a point of this run: unknown, or a point
    /// of a model the run does not have. Lists the run's points, nearest first.
    pub fn unknown_point(&self, point: &str) -> PlanError {
        let why = match self.absent.get(point) {
            Some(owner) => format!(
                "cannot fire in this run: it belongs to the {owner} model, which this run does \
                 not have"
            ),
            None => "does not exist".to_string(),
        };
        let mut valid = self.nearest(point).join(", ");
        if !valid.is_empty() {
            valid.push_str(", ");
        }
        valid.push_str(&format!("{GUEST_SYM_PREFIX}<symbol>[+offset]"));
        PlanError::UnknownPoint {
            point: point.to_string(),
            why,
            valid,
        }
    }

    fn defer_list(&self) -> String {
        self.points
            .values()
            .filter(|p| p.defer)
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Resolves `guest.sym.<symbol>[+offset]` to a guest virtual address.
    pub fn resolve_sym(&self, point: &str) -> Result<u64, PlanError> {
        let body = point.strip_prefix(GUEST_SYM_PREFIX).unwrap_or(point);
        let (sym, off) = match body.split_once('+') {
            Some((s, o)) => {
                let o = o.trim();
                let off = match o.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => o.parse(),
                }
                .map_err(|_| {
                    PlanError::Symbol(format!("`{point}`: offset `{o}` is not a number"))
                })?;
                (s, off)
            }
            None => (body, 0),
        };
        let syms = self.symbols.as_ref().ok_or_else(|| {
            PlanError::Symbol(format!(
                "`{point}`: guest.sym points need the guest's System.map (guest \
                 booted with nokaslr)"
            ))
        })?;
        let addr = syms.get(sym).ok_or_else(|| {
            PlanError::Symbol(format!(
                "`{point}`: no text symbol `{sym}` in System.map; similar: {}",
                syms.near(sym).join(", ")
            ))
        })?;
        Ok(addr.wrapping_add(off))
    }

    /// Checks a plan against this run: points exist, defer only where the model supports it,
    /// filters that apply, guest symbols resolve. Returns the rules with warnings.
    pub fn validate(&self, plan: &Plan) -> Result<ValidPlan, PlanError> {
        let mut rules = Vec::new();
        for (i, spec) in plan.rules.iter().enumerate() {
            rules.push(self.validate_rule(i, spec)?);
        }
        let warnings = watchdog_warnings(&rules);
        Ok(ValidPlan {
            seed: plan.seed,
            rules,
            warnings,
        })
    }

    fn validate_rule(&self, index: usize, spec: &RuleSpec) -> Result<Rule, PlanError> {
        let filter_err = |why: &str| PlanError::Filter {
            rule: spec.text.clone(),
            why: why.into(),
        };
        let guest_addr = if spec.point.starts_with(GUEST_SYM_PREFIX) {
            if spec.mode == Mode::Defer {
                return Err(PlanError::CannotDefer {
                    point: spec.point.clone(),
                    valid: self.defer_list(),
                });
            }
            if spec.endpoint.is_some() || spec.domain.is_some() {
                return Err(filter_err(
                    "endpoint/sid/fh/domain filters do not apply to guest code points",
                ));
            }
            Some(self.resolve_sym(&spec.point)?)
        } else {
            let info = self
                .points
                .get(&spec.point)
                .ok_or_else(|| self.unknown_point(&spec.point))?;
            if spec.mode == Mode::Defer && !info.defer {
                return Err(PlanError::CannotDefer {
                    point: spec.point.clone(),
                    valid: self.defer_list(),
                });
            }
            if spec.vcpu.is_some() {
                return Err(filter_err(
                    "vcpu= applies to guest.sym points only (a device point does not know the vCPU)",
                ));
            }
            if matches!(spec.endpoint, Some(EndpointFilter::Sid(_))) && info.owner != "smmuv3" {
                return Err(filter_err("sid= applies to smmuv3 points only"));
            }
            if matches!(spec.endpoint, Some(EndpointFilter::Fh(_))) && info.owner != "zpci" {
                return Err(filter_err("fh= applies to zpci points only"));
            }
            None
        };
        Ok(Rule {
            index,
            spec: spec.clone(),
            guest_addr,
        })
    }
}

/// Levenshtein distance over characters: how many one-character edits turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // One row of the DP table at a time: row[j] is the distance from a's prefix to b[..j].
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row.first().copied().unwrap_or(i);
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let (Some(&up), Some(&left)) = (row.get(j + 1), row.get(j)) else {
                break;
            };
            let next = (diagonal + usize::from(ca != *cb))
                .min(up + 1)
                .min(left + 1);
            diagonal = up;
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = next;
            }
        }
    }
    row.last().copied().unwrap_or(0)
}

/// A rule checked against a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Position in the plan (firings name it).
    pub index: usize,
    /// The rule as written.
    pub spec: RuleSpec,
    /// For `guest.sym` points, the guest virtual address watched.
    pub guest_addr: Option<u64>,
}

/// A validated plan.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValidPlan {
    /// Seed.
    pub seed: u64,
    /// Rules.
    pub rules: Vec<Rule>,
    /// Things the user should know (watchdog budget).
    pub warnings: Vec<String>,
}

fn watchdog_warnings(rules: &[Rule]) -> Vec<String> {
    let mut w = Vec::new();
    let mut total = Duration::ZERO;
    let mut unbounded = Vec::new();
    for r in rules {
        let max = r.spec.delay.max();
        if max >= WATCHDOG_BUDGET {
            w.push(format!(
                "rule `{}`: one firing can last {max:?}, at or above the guest's ~20 s \
                 soft-lockup/RCU-stall watchdogs",
                r.spec.text
            ));
        }
        match r.spec.limit() {
            Some(n) => total += max.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX)),
            None => unbounded.push(r.spec.text.as_str()),
        }
    }
    let total = total.min(MAX_DELAY * 1000);
    if total >= WATCHDOG_BUDGET {
        w.push(format!(
            "the plan's firings can add up to {total:?} (>= ~20 s: guest soft-lockup/RCU-stall \
             watchdogs may fire if they hit one vCPU or one lock)"
        ));
    }
    if !unbounded.is_empty() {
        w.push(format!(
            "rules without count=/nth= fire on every arrival, so their total delay is unbounded \
             (add count= to stay under ~20 s): {}",
            unbounded.join("; ")
        ));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_move_with_the_kernel() {
        let m =
            SymbolMap::parse("0000000000100000 T _text\n00000000003015a8 t iommu_release_device\n")
                .offset_by(0x3ff_e000_0000);
        assert_eq!(m.get("iommu_release_device"), Some(0x3ff_e030_15a8));
        assert_eq!(m.get("_text"), Some(0x3ff_e010_0000));
    }

    fn reg() -> PointRegistry {
        let mut r = fixture::with_blk0();
        fixture::add_virtio(&mut r, "viommu0", false);
        r.set_symbols(SymbolMap::parse(
            "ffffffff81000000 T _text\nffffffff81234560 T bus_iommu_probe\n\
             ffffffff81234000 t iommu_subsys_init\nffffffff82000000 D some_data\n",
        ));
        r
    }

    #[test]
    fn registry_knows_models_and_instances() {
        let r = reg();
        for p in [
            "virtio-iommu.req.attach",
            "virtio-iommu.config.write",
            "pci.cfg.write.command",
            "smmuv3.cmd.CMD_SYNC",
            "smmuv3.mmio.write.CR0",
            "zpci.rpcit",
            "virtio.blk0.notify",
            "virtio.blk0.status",
            "virtio.blk0.complete",
            "virtio.viommu0.notify",
        ] {
            assert!(r.get(p).is_some(), "{p}");
        }
        assert!(r.get("virtio.viommu0.complete").is_none());
        assert!(r.get("virtio-iommu.req.attach").unwrap().defer);
        assert!(r.get("virtio.blk0.complete").unwrap().defer);
        assert!(!r.get("virtio.blk0.notify").unwrap().defer);
        assert_eq!(
            r.resolve_sym("guest.sym.bus_iommu_probe+0x10").unwrap(),
            0xffff_ffff_8123_4570
        );
        assert_eq!(
            r.resolve_sym("guest.sym.iommu_subsys_init").unwrap(),
            0xffff_ffff_8123_4000
        );
    }

    #[test]
    fn validation_errors_name_valid_choices() {
        let r = reg();
        let v = |s: &str| r.validate(&Plan::parse_cli(s).unwrap());
        let e = v("virtio-iommu.req.atach:delay=1ms").unwrap_err();
        assert!(
            e.to_string().contains("virtio-iommu.req.attach")
                && e.to_string().contains("does not exist"),
            "{e}"
        );
        let e = v("virtio.blk0.notify:delay=1ms,mode=defer").unwrap_err();
        assert!(
            e.to_string().contains("cannot defer")
                && e.to_string().contains("virtio.blk0.complete"),
            "{e}"
        );
        assert!(v("guest.sym.bus_iommu_probe:delay=1ms,mode=defer").is_err());
        let e = v("guest.sym.data_thing:delay=1ms").unwrap_err();
        assert!(e.to_string().contains("no text symbol"), "{e}");
        assert!(v("guest.sym.some_data:delay=1ms").is_err());
        assert!(v("guest.sym.bus_iommu_probe:delay=1ms,endpoint=00:03.0").is_err());
        assert!(v("virtio-iommu.req.attach:delay=1ms,vcpu=1").is_err());
        assert!(v("virtio-iommu.req.attach:delay=1ms,sid=1").is_err());
        assert!(v("smmuv3.cmd.CFGI_STE:delay=1ms,fh=1").is_err());
        assert!(v("zpci.rpcit:delay=1ms,fh=1").is_ok());
        let no_syms = PointRegistry::all_models(&fixture::catalogue());
        let e = no_syms
            .validate(&Plan::parse_cli("guest.sym.bus_iommu_probe:delay=1ms").unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("System.map"), "{e}");
        let ok = v("virtio-iommu.req.attach:delay=300ms,nth=1,mode=defer;\
                    guest.sym.bus_iommu_probe:delay=500ms,vcpu=0,count=1")
        .unwrap();
        assert_eq!(ok.rules[1].guest_addr, Some(0xffff_ffff_8123_4560));
        assert!(ok.warnings.is_empty(), "{:?}", ok.warnings);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("attach", "atach"), 1);
        assert_eq!(edit_distance("µs", "us"), 1);
    }

    /// An x86 virtio-iommu run has no SMMUv3 or zPCI: rules on their points are refused with
    /// the run's own points, nearest first; `all_models()` (what `sluice points` lists)
    /// still has every point.
    #[test]
    fn points_of_models_not_in_the_run_are_refused() {
        let mut r =
            PointRegistry::with_models(&fixture::catalogue(), &["virtio-iommu", "virtio-pci"]);
        fixture::add_virtio(&mut r, "blk0", true);
        fixture::add_virtio(&mut r, "viommu0", false);
        let v = |s: &str| r.validate(&Plan::parse_cli(s).unwrap());
        assert!(v("virtio-iommu.req.attach:delay=1ms").is_ok());
        assert!(v("virtio.blk0.complete:delay=1ms,mode=defer").is_ok());
        for p in ["smmuv3.cmd.CFGI_STE", "zpci.rpcit"] {
            let e = v(&format!("{p}:delay=1ms")).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "point `{p}` cannot fire in this run: it belongs to the"
                )),
                "{e}"
            );
            let listed = e.split("nearest first: ").nth(1).unwrap_or_default();
            assert!(listed.starts_with("virtio"), "{e}");
            assert!(
                !listed.contains("smmuv3.") && !listed.contains("zpci."),
                "{e}"
            );
        }
        let e = v("virtio-iommu.req.atach:delay=1ms")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "point `virtio-iommu.req.atach` does not exist; points of this run, nearest \
                 first: \
                 virtio-iommu.req.attach, virtio-iommu.req.detach, "
            ),
            "{e}"
        );
        assert!(e.ends_with(", guest.sym.<symbol>[+offset]"), "{e}");
        let e = v("virtio.blk0.notfy:delay=1ms").unwrap_err().to_string();
        assert!(e.contains("nearest first: virtio.blk0.notify, "), "{e}");
        let all = PointRegistry::all_models(&fixture::catalogue());
        assert!(all.get("smmuv3.cmd.CFGI_STE").is_some() && all.get("zpci.rpcit").is_some());
    }

    #[test]
    fn watchdog_budget_warnings() {
        let r = reg();
        let v = |s: &str| r.validate(&Plan::parse_cli(s).unwrap()).unwrap().warnings;
        assert!(v("virtio-iommu.req.attach:delay=25s,count=1")[0].contains("20 s"));
        assert_eq!(
            v("virtio-iommu.req.map:delay=1s,count=30").len(),
            1,
            "30 x 1 s adds up"
        );
        assert!(v("virtio-iommu.req.map:delay=1ms")[0].contains("unbounded"));
        assert!(v("virtio-iommu.req.map:delay=1ms,count=5").is_empty());
    }
}

/// A catalogue for this crate's own tests, shaped like the device host's (the real one is
/// `sluice_host::points::catalogue()`; its tests check the real names).
#[cfg(test)]
pub(crate) mod fixture {
    use super::{ModelPoints, PointDecl, PointRegistry};

    const VIOMMU: &[&str] = &[
        "virtio-iommu.req.attach",
        "virtio-iommu.req.detach",
        "virtio-iommu.req.map",
        "virtio-iommu.req.unmap",
        "virtio-iommu.req.probe",
    ];

    fn plain(names: &[&str]) -> Vec<PointDecl> {
        names.iter().map(|&n| PointDecl::new(n)).collect()
    }

    pub(crate) fn catalogue() -> Vec<ModelPoints> {
        let mut viommu: Vec<PointDecl> = VIOMMU
            .iter()
            .map(|&n| PointDecl::new(n).deferrable().on_doorbell())
            .collect();
        viommu.push(PointDecl::new("virtio-iommu.config.write"));
        vec![
            ModelPoints {
                owner: "virtio-iommu",
                points: viommu,
            },
            ModelPoints {
                owner: "virtio-pci",
                points: plain(&["pci.cfg.write.command"]),
            },
            ModelPoints {
                owner: "smmuv3",
                points: plain(&[
                    "smmuv3.cmd.CFGI_STE",
                    "smmuv3.cmd.CMD_SYNC",
                    "smmuv3.mmio.write.CR0",
                ]),
            },
            ModelPoints {
                owner: "zpci",
                points: plain(&["zpci.rpcit", "zpci.mpcifc.reg_ioat"]),
            },
        ]
    }

    /// A virtio device instance's points, as the transport and virtio-blk name them.
    pub(crate) fn add_virtio(r: &mut PointRegistry, name: &str, block: bool) {
        let mut p = vec![
            PointDecl::new(format!("virtio.{name}.notify"))
                .on_doorbell()
                .hot(),
            PointDecl::new(format!("virtio.{name}.status")),
        ];
        if block {
            p.push(
                PointDecl::new(format!("virtio.{name}.complete"))
                    .deferrable()
                    .hot(),
            );
        }
        r.add_instance(name, &p);
    }

    /// Every model and one disk, `blk0`.
    pub(crate) fn with_blk0() -> PointRegistry {
        let mut r = PointRegistry::all_models(&catalogue());
        add_virtio(&mut r, "blk0", true);
        r
    }
}
