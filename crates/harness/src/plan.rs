//! Scenarios × variants × seeds → run cases, and splitting them into shards.

use std::str::FromStr;
use std::sync::Arc;

use crate::scenario::Scenario;

/// One guest run.
#[derive(Debug, Clone)]
pub struct RunCase {
    /// Its scenario.
    pub scenario: Arc<Scenario>,
    /// Guest variant.
    pub variant: String,
    /// Seed (1-based).
    pub seed: u32,
    /// The sweep cell this run belongs to (`c03-<point>@<delay>-<mode>`); `None` for
    /// `harness run`. A cell's scenario carries the cell's injection rules.
    pub cell: Option<String>,
}

impl RunCase {
    /// Stable identifier, usable as a directory name.
    pub fn id(&self) -> String {
        match &self.cell {
            Some(cell) => format!(
                "{}--{cell}--{}--s{}",
                self.scenario.name, self.variant, self.seed
            ),
            None => format!("{}--{}--s{}", self.scenario.name, self.variant, self.seed),
        }
    }

    /// `scenario/variant` (`scenario/cell/variant` in a sweep), the group whose reproduction
    /// rate is judged.
    pub fn group(&self) -> String {
        match &self.cell {
            Some(cell) => format!("{}/{cell}/{}", self.scenario.name, self.variant),
            None => format!("{}/{}", self.scenario.name, self.variant),
        }
    }
}

/// Every case of `scenarios`, in a stable order. `seeds` overrides each scenario's count.
pub fn expand(scenarios: &[Arc<Scenario>], seeds: Option<u32>) -> Vec<RunCase> {
    let mut cases = Vec::new();
    for s in scenarios {
        for v in &s.variants {
            for seed in 1..=seeds.unwrap_or(s.seeds) {
                cases.push(RunCase {
                    scenario: s.clone(),
                    variant: v.clone(),
                    seed,
                    cell: None,
                });
            }
        }
    }
    cases.sort_by_key(|c| (c.scenario.name.clone(), c.variant.clone(), c.seed));
    cases
}

/// `i/n`: this machine runs shard `i` (1-based) of `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1..=count.
    pub index: u32,
    /// Number of shards.
    pub count: u32,
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("shard {s:?}: expected i/n, e.g. 2/4"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("shard {s:?}: {i:?} is not a number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("shard {s:?}: {n:?} is not a number"))?;
        if count == 0 || index == 0 || index > count {
            return Err(format!("shard {s:?}: need 1 <= i <= n"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The cases of this shard: round-robin over the stable order, so shards are balanced and
    /// every case belongs to exactly one shard on every machine.
    pub fn select(&self, cases: Vec<RunCase>) -> Vec<RunCase> {
        cases
            .into_iter()
            .enumerate()
            .filter(|(k, _)| (*k as u32) % self.count == self.index - 1)
            .map(|(_, c)| c)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn scenario(name: &str, variants: &[&str], seeds: u32) -> Arc<Scenario> {
        let text = format!(
            "name = \"{name}\"\nvariants = [{}]\nseeds = {seeds}\n",
            variants
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        Arc::new(Scenario::parse(Path::new("t"), &text, &|_| true).unwrap())
    }

    #[test]
    fn expansion_is_the_full_product_in_stable_order() {
        let s = [
            scenario("b", &["6.12", "6.1"], 2),
            scenario("a", &["6.12"], 3),
        ];
        let ids: Vec<String> = expand(&s, None).iter().map(RunCase::id).collect();
        assert_eq!(
            ids,
            [
                "a--6.12--s1",
                "a--6.12--s2",
                "a--6.12--s3",
                "b--6.1--s1",
                "b--6.1--s2",
                "b--6.12--s1",
                "b--6.12--s2"
            ]
        );
        assert_eq!(expand(&s, Some(1)).len(), 3);
    }

    #[test]
    fn every_case_in_exactly_one_shard() {
        let s = [
            scenario("b", &["6.12", "6.1"], 7),
            scenario("a", &["6.12"], 5),
        ];
        let all: Vec<String> = expand(&s, None).iter().map(RunCase::id).collect();
        for n in 1..=6 {
            let mut seen: Vec<String> = Vec::new();
            for i in 1..=n {
                let part = Shard { index: i, count: n }.select(expand(&s, None));
                assert!(part.len().abs_diff(all.len() / n as usize) <= 1, "balanced");
                seen.extend(part.iter().map(RunCase::id));
            }
            seen.sort();
            let mut want = all.clone();
            want.sort();
            assert_eq!(seen, want, "n={n}");
        }
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert!("0/4".parse::<Shard>().is_err());
        assert!("5/4".parse::<Shard>().is_err());
        assert!("x/4".parse::<Shard>().is_err());
        assert!("2".parse::<Shard>().is_err());
    }
}
