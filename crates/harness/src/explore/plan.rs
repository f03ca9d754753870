//! The hunt's plan: a probe that learns which candidate points a run reaches, then trials —
//! single points over a delay ladder, then pairs of points one probe run reached together —
//! in a fixed order that depends only on the seed and the probe, so every shard of a hunt
//! computes the same plan and takes its own share of it.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::explore::candidates::{Candidate, GUEST_SYM_PREFIX};
use crate::sweep::SweepMode;

/// Delay of a probe rule: long enough to be a firing, too short to move anything.
pub const PROBE_DELAY_US: u64 = 1;
/// Default delay ladder, in the order it is tried: the middle first, so a hunt cut short by
/// its budget has tried every point once at a delay that opens most windows.
pub const DEFAULT_LADDER_MS: &[u64] = &[100, 500, 20];
/// Default firings per trial rule: a point's first arrivals are often boot-time ones; two
/// lets the second (e.g. the next bus walked) be stalled too.
pub const DEFAULT_COUNT: u32 = 2;
/// Points that take part in pairs, best-ranked first.
pub const DEFAULT_PAIR_POINTS: usize = 12;

/// One rule of a trial.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TrialRule {
    /// Point name.
    pub point: String,
    /// Delay per firing, microseconds.
    pub delay_us: u64,
    /// Firings at most.
    pub count: u32,
    /// Stall or defer.
    pub mode: SweepMode,
}

/// `300ms` / `250us`: the injection syntax for a delay.
pub fn format_delay(us: u64) -> String {
    if us >= 1000 && us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

impl TrialRule {
    /// The rule in the injection plan's one-line form; `extra` (`key=value,...`) is appended.
    pub fn render(&self, extra: Option<&str>) -> String {
        let mut s = format!(
            "{}:delay={},count={},mode={}",
            self.point,
            format_delay(self.delay_us),
            self.count,
            self.mode
        );
        if let Some(e) = extra.filter(|e| !e.trim().is_empty()) {
            s.push(',');
            s.push_str(e.trim());
        }
        s
    }
}

impl fmt::Display for TrialRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(None))
    }
}

/// One run of the hunt's search.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// Position in the whole (unsharded) plan, 0-based: the same trial has the same index in
    /// every shard.
    pub index: usize,
    /// The rules (one for a single, two for a pair).
    pub rules: Vec<TrialRule>,
}

impl Trial {
    /// Short name for directories and progress lines: `t0042`.
    pub fn label(&self) -> String {
        format!("t{:04}", self.index)
    }

    /// The rules in the one-line form.
    pub fn rendered(&self, extra: Option<&str>) -> Vec<String> {
        self.rules.iter().map(|r| r.render(extra)).collect()
    }
}

/// How the plan is laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Seed of the order within a tier (and of the runs).
    pub seed: u64,
    /// Delays tried per point, in this order (milliseconds).
    pub ladder_ms: Vec<u64>,
    /// Firings per rule.
    pub count: u32,
    /// Points taking part in pairs (0: no pairs).
    pub pair_points: usize,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            seed: 1,
            ladder_ms: DEFAULT_LADDER_MS.to_vec(),
            count: DEFAULT_COUNT,
            pair_points: DEFAULT_PAIR_POINTS,
        }
    }
}

/// The probe's rules: every candidate, one short firing each. A rule that fired marks its point
/// reached in that run.
pub fn probe_rules(candidates: &[Candidate]) -> Vec<String> {
    candidates
        .iter()
        .map(|c| {
            TrialRule {
                point: c.point.clone(),
                delay_us: PROBE_DELAY_US,
                count: 1,
                mode: SweepMode::Stall,
            }
            .render(None)
        })
        .collect()
}

/// The points each probe run reached: `firings[run][rule]` against `candidates` (the probe's
/// rules are [`probe_rules`] of them, in order).
pub fn reached_sets(candidates: &[Candidate], firings: &[Vec<u64>]) -> Vec<BTreeSet<String>> {
    firings
        .iter()
        .map(|f| {
            candidates
                .iter()
                .zip(f)
                .filter(|(_, n)| **n > 0)
                .map(|(c, _)| c.point.clone())
                .collect()
        })
        .collect()
}

/// splitmix64: a tiny deterministic generator for the order within a tier.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a name, so a point's rank does not depend on which other points exist.
fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Candidates reached by at least one probe run, ranked: tier first, then a seeded order
/// within the tier (a point's place depends only on the seed and its name). Guest-code points
/// rank before device points of the same tier: the hunt is first of all about kernel paths.
pub fn rank(candidates: &[Candidate], reached: &[BTreeSet<String>], seed: u64) -> Vec<Candidate> {
    let any: BTreeSet<&String> = reached.iter().flatten().collect();
    let mut out: Vec<Candidate> = candidates
        .iter()
        .filter(|c| any.contains(&c.point))
        .cloned()
        .collect();
    out.sort_by_key(|c| {
        (
            c.tier,
            !c.point.starts_with(GUEST_SYM_PREFIX),
            mix(seed ^ name_hash(&c.point)),
            c.point.clone(),
        )
    });
    out
}

/// The whole plan: for each delay of the ladder, each ranked point (stall; defer too where the
/// point can), then pairs of the first `pair_points` ranked points that one probe run reached
/// together, at the ladder's first delay, in a seeded order.
pub fn build(ranked: &[Candidate], reached: &[BTreeSet<String>], cfg: &PlanConfig) -> Vec<Trial> {
    let mut rules: Vec<Vec<TrialRule>> = Vec::new();
    for &ms in &cfg.ladder_ms {
        for c in ranked {
            let modes: &[SweepMode] = if c.defer {
                &[SweepMode::Stall, SweepMode::Defer]
            } else {
                &[SweepMode::Stall]
            };
            for &mode in modes {
                rules.push(vec![TrialRule {
                    point: c.point.clone(),
                    delay_us: ms.saturating_mul(1000),
                    count: cfg.count,
                    mode,
                }]);
            }
        }
    }
    if let Some(&ms) = cfg.ladder_ms.first() {
        let top: Vec<&Candidate> = ranked.iter().take(cfg.pair_points).collect();
        let mut pairs = Vec::new();
        for (i, a) in top.iter().enumerate() {
            for b in &top[i + 1..] {
                let together = reached
                    .iter()
                    .any(|r| r.contains(&a.point) && r.contains(&b.point));
                if together {
                    pairs.push((a.point.clone(), b.point.clone()));
                }
            }
        }
        pairs.sort_by_key(|(a, b)| {
            (
                mix(cfg.seed ^ name_hash(a) ^ name_hash(b).rotate_left(17)),
                a.clone(),
                b.clone(),
            )
        });
        for (a, b) in pairs {
            let rule = |point: String| TrialRule {
                point,
                delay_us: ms.saturating_mul(1000),
                count: cfg.count,
                mode: SweepMode::Stall,
            };
            rules.push(vec![rule(a), rule(b)]);
        }
    }
    rules
        .into_iter()
        .enumerate()
        .map(|(index, rules)| Trial { index, rules })
        .collect()
}

/// The trials shard `index` of `count` (1-based) runs: every `count`-th, from its own offset.
/// The shards of one plan are disjoint and together are the plan.
pub fn shard(trials: Vec<Trial>, index: u32, count: u32) -> Vec<Trial> {
    let count = count.max(1) as usize;
    let offset = (index.max(1) as usize - 1) % count;
    trials
        .into_iter()
        .filter(|t| t.index % count == offset)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explore::candidates::Tier;

    fn cand(point: &str, tier: Tier, defer: bool) -> Candidate {
        Candidate {
            point: point.into(),
            defer,
            tier,
        }
    }

    fn fixture() -> (Vec<Candidate>, Vec<BTreeSet<String>>) {
        let c = vec![
            cand("guest.sym.iommu_dma_map_page", Tier::DataPath, false),
            cand("guest.sym.bus_iommu_probe", Tier::Lifecycle, false),
            cand("guest.sym.never_reached", Tier::Lifecycle, false),
            cand("virtio-iommu.req.attach", Tier::Lifecycle, true),
            cand("guest.sym.iommu_group_get", Tier::Other, false),
        ];
        let firings = vec![vec![3, 1, 0, 1, 0], vec![0, 1, 0, 0, 2]];
        let reached = reached_sets(&c, &firings);
        (c, reached)
    }

    #[test]
    fn probe_rules_fire_once_briefly_and_reached_sets_follow_firings() {
        let (c, reached) = fixture();
        let rules = probe_rules(&c);
        assert_eq!(
            rules[1],
            "guest.sym.bus_iommu_probe:delay=1us,count=1,mode=stall"
        );
        assert!(reached[0].contains("guest.sym.iommu_dma_map_page"));
        assert!(!reached[0].contains("guest.sym.iommu_group_get"));
        assert!(reached[1].contains("guest.sym.iommu_group_get"));
        assert!(
            reached
                .iter()
                .all(|r| !r.contains("guest.sym.never_reached"))
        );
    }

    #[test]
    fn ranking_keeps_reached_points_only_tier_first_guest_code_first() {
        let (c, reached) = fixture();
        let r = rank(&c, &reached, 7);
        let names: Vec<&str> = r.iter().map(|c| c.point.as_str()).collect();
        assert_eq!(
            names,
            [
                "guest.sym.bus_iommu_probe",
                "virtio-iommu.req.attach",
                "guest.sym.iommu_group_get",
                "guest.sym.iommu_dma_map_page"
            ]
        );
    }

    #[test]
    fn plan_is_ladder_major_with_defer_where_allowed_then_pairs_reached_together() {
        let (c, reached) = fixture();
        let ranked = rank(&c, &reached, 1);
        let cfg = PlanConfig {
            seed: 1,
            ladder_ms: vec![100, 10],
            count: 2,
            pair_points: 4,
        };
        let plan = build(&ranked, &reached, &cfg);
        // 4 points + 1 defer per delay, two delays: 10 singles.
        let singles = plan.iter().filter(|t| t.rules.len() == 1).count();
        assert_eq!(singles, 10);
        assert_eq!(
            plan[0].rendered(None),
            ["guest.sym.bus_iommu_probe:delay=100ms,count=2,mode=stall"]
        );
        assert_eq!(plan[2].rules[0].mode, SweepMode::Defer);
        assert_eq!(plan[5].rules[0].delay_us, 10_000);
        // Pairs only of points some probe run reached together: iommu_group_get was reached
        // only in run 2, where neither attach nor map_page was.
        let pairs: Vec<(String, String)> = plan
            .iter()
            .filter(|t| t.rules.len() == 2)
            .map(|t| (t.rules[0].point.clone(), t.rules[1].point.clone()))
            .collect();
        assert_eq!(pairs.len(), 4, "{pairs:?}");
        assert!(pairs.iter().all(|(a, b)| a != b));
        assert!(
            !pairs
                .iter()
                .any(|(a, b)| a.contains("group_get") && b.contains("attach")
                    || a.contains("attach") && b.contains("group_get"))
        );
        assert!(plan.iter().enumerate().all(|(i, t)| t.index == i));
    }

    #[test]
    fn same_seed_same_plan_other_seed_other_order() {
        let (c, reached) = fixture();
        let cfg = PlanConfig::default();
        let a = build(&rank(&c, &reached, 1), &reached, &cfg);
        let b = build(&rank(&c, &reached, 1), &reached, &cfg);
        assert_eq!(a, b);
        let many: Vec<Candidate> = (0..40)
            .map(|i| cand(&format!("guest.sym.f{i}"), Tier::Other, false))
            .collect();
        let all: Vec<BTreeSet<String>> = vec![many.iter().map(|c| c.point.clone()).collect()];
        let x = rank(&many, &all, 1);
        let y = rank(&many, &all, 2);
        assert_ne!(x, y, "the seed orders points within a tier");
    }

    #[test]
    fn shards_are_disjoint_and_cover_the_plan() {
        let (c, reached) = fixture();
        let plan = build(&rank(&c, &reached, 3), &reached, &PlanConfig::default());
        let mut seen: Vec<usize> = (1..=4)
            .flat_map(|i| shard(plan.clone(), i, 4))
            .map(|t| t.index)
            .collect();
        seen.sort();
        assert_eq!(seen, (0..plan.len()).collect::<Vec<_>>());
        assert_eq!(shard(plan.clone(), 1, 1), plan);
    }

    #[test]
    fn delays_render_in_the_injection_syntax() {
        assert_eq!(format_delay(300_000), "300ms");
        assert_eq!(format_delay(1), "1us");
        assert_eq!(format_delay(1500), "1500us");
        let r = TrialRule {
            point: "p".into(),
            delay_us: 5000,
            count: 1,
            mode: SweepMode::Defer,
        };
        assert_eq!(
            r.render(Some("after=insmod virtio_iommu")),
            "p:delay=5ms,count=1,mode=defer,after=insmod virtio_iommu"
        );
    }
}
