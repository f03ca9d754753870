//! Random ATTACH/MAP/UNMAP/DETACH sequences against a reference model kept as a map of pages:
//! both must agree on every status and every translation.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use sluice_devapi::EndpointIommu;
use vm_memory::Permissions;
use vm_memory::iommu::Iommu;

use super::*;
use crate::spec::{ATTACH_F_BYPASS, MAP_F_READ, MAP_F_WRITE};

const PAGE: u64 = 0x1000;
const PAGES: u64 = 24;
const DOMAINS: u32 = 5; // valid IDs 0..=3, 4 is out of range
const MAX_DOMAINS: usize = 3;
const MAX_MAPS: usize = 6;
const EPS: [u32; 3] = [EP, EP2, STRANGER];

#[derive(Debug, Clone)]
enum Op {
    Attach {
        d: u32,
        ep: usize,
        bypass: bool,
    },
    Detach {
        d: u32,
        ep: usize,
    },
    Map {
        d: u32,
        page: u64,
        n: u64,
        phys: u64,
        flags: u32,
        misalign: bool,
    },
    Unmap {
        d: u32,
        page: u64,
        n: u64,
    },
    Translate {
        ep: usize,
        page: u64,
        n: u64,
        write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..DOMAINS;
    let ep = 0..EPS.len();
    prop_oneof![
        2 => (d.clone(), ep.clone(), prop::bool::weighted(0.15))
            .prop_map(|(d, ep, bypass)| Op::Attach { d, ep, bypass }),
        1 => (d.clone(), ep.clone()).prop_map(|(d, ep)| Op::Detach { d, ep }),
        4 => (d.clone(), 0..PAGES, 1..4u64, 0..64u64, prop::sample::select(vec![1u32, 2, 3, 3, 0, 8]),
              prop::bool::weighted(0.05))
            .prop_map(|(d, page, n, phys, flags, misalign)| Op::Map { d, page, n, phys, flags, misalign }),
        2 => (d.clone(), 0..PAGES, 1..6u64).prop_map(|(d, page, n)| Op::Unmap { d, page, n }),
        5 => (ep, 0..PAGES, 1..3u64, any::<bool>())
            .prop_map(|(ep, page, n, write)| Op::Translate { ep, page, n, write }),
    ]
}

/// Reference: domain → (bypass, members, page → (phys page, flags, mapping start, mapping end)).
#[derive(Default)]
struct RefDomain {
    bypass: bool,
    members: BTreeSet<u32>,
    pages: BTreeMap<u64, (u64, u32, u64, u64)>,
}

#[derive(Default)]
struct Reference {
    domains: BTreeMap<u32, RefDomain>,
    ep: BTreeMap<u32, u32>,
}

impl Reference {
    fn maps(&self, d: u32) -> usize {
        self.domains[&d]
            .pages
            .values()
            .map(|v| v.2)
            .collect::<BTreeSet<_>>()
            .len()
    }

    fn leave(&mut self, ep: u32) {
        if let Some(old) = self.ep.remove(&ep) {
            let dom = self.domains.get_mut(&old).unwrap();
            dom.members.remove(&ep);
            if dom.members.is_empty() {
                self.domains.remove(&old);
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Option<Status> {
        use Status::*;
        Some(match *op {
            Op::Attach { d, ep, bypass } => {
                let ep = EPS[ep];
                if ep == STRANGER {
                    return Some(NoEnt);
                }
                if d >= DOMAINS - 1 {
                    return Some(Range);
                }
                if self.domains.get(&d).is_some_and(|x| x.bypass != bypass) {
                    return Some(Inval);
                }
                let old = self.ep.get(&ep).copied();
                // Re-ATTACH to the current domain: nothing changes (mappings kept).
                if old == Some(d) {
                    return Some(Ok);
                }
                let old_dies = old.is_some_and(|o| self.domains[&o].members.len() == 1);
                let exists_after = self.domains.contains_key(&d);
                if !exists_after && self.domains.len() - usize::from(old_dies) >= MAX_DOMAINS {
                    return Some(NoMem);
                }
                self.leave(ep);
                let dom = self.domains.entry(d).or_insert_with(|| RefDomain {
                    bypass,
                    ..RefDomain::default()
                });
                dom.members.insert(ep);
                self.ep.insert(ep, d);
                Ok
            }
            Op::Detach { d, ep } => {
                let ep = EPS[ep];
                if ep == STRANGER {
                    return Some(NoEnt);
                }
                if d >= DOMAINS - 1 {
                    return Some(Range);
                }
                if self.ep.get(&ep) != Some(&d) {
                    return Some(Inval);
                }
                self.leave(ep);
                Ok
            }
            Op::Map {
                d,
                page,
                n,
                phys,
                flags,
                misalign,
            } => {
                if flags & !7 != 0 {
                    return Some(Inval);
                }
                if d >= DOMAINS - 1 {
                    return Some(Range);
                }
                let Some(dom) = self.domains.get(&d) else {
                    return Some(NoEnt);
                };
                if dom.bypass {
                    return Some(Inval);
                }
                if misalign {
                    return Some(Range);
                }
                if (page..page + n).any(|p| dom.pages.contains_key(&p)) {
                    return Some(Inval);
                }
                if self.maps(d) >= MAX_MAPS {
                    return Some(NoMem);
                }
                let dom = self.domains.get_mut(&d).unwrap();
                for i in 0..n {
                    dom.pages
                        .insert(page + i, (phys + i, flags, page, page + n - 1));
                }
                Ok
            }
            Op::Unmap { d, page, n } => {
                if d >= DOMAINS - 1 {
                    return Some(Range);
                }
                let Some(dom) = self.domains.get_mut(&d) else {
                    return Some(NoEnt);
                };
                if dom.bypass {
                    return Some(Inval);
                }
                let (lo, hi) = (page, page + n - 1);
                let hit: Vec<u64> = dom.pages.range(lo..=hi).map(|(&p, _)| p).collect();
                if hit.iter().any(|p| {
                    let (_, _, s, e) = dom.pages[p];
                    s < lo || e > hi
                }) {
                    return Some(Range);
                }
                for p in hit {
                    dom.pages.remove(&p);
                }
                Ok
            }
            Op::Translate { .. } => return None,
        })
    }

    /// Expected GPA of the first byte, or None for a fault (bypass is off).
    fn translate(&self, ep: u32, page: u64, n: u64, write: bool) -> Option<u64> {
        let dom = self.domains.get(self.ep.get(&ep)?)?;
        if dom.bypass {
            return Some(page * PAGE);
        }
        let need = if write { MAP_F_WRITE } else { MAP_F_READ };
        let mut first = None;
        for p in page..page + n {
            let &(phys, flags, _, _) = dom.pages.get(&p)?;
            if flags & need == 0 {
                return None;
            }
            first.get_or_insert(phys * PAGE);
        }
        first
    }
}

fn to_request(op: &Op) -> Option<Request> {
    Some(match *op {
        Op::Attach { d, ep, bypass } => Request::Attach {
            domain: d,
            endpoint: EPS[ep],
            flags: if bypass { ATTACH_F_BYPASS } else { 0 },
        },
        Op::Detach { d, ep } => Request::Detach {
            domain: d,
            endpoint: EPS[ep],
        },
        Op::Map {
            d,
            page,
            n,
            phys,
            flags,
            misalign,
        } => Request::Map {
            domain: d,
            virt_start: page * PAGE + if misalign { 0x800 } else { 0 },
            virt_end: (page + n) * PAGE - 1,
            phys_start: phys * PAGE,
            flags,
        },
        Op::Unmap { d, page, n } => Request::Unmap {
            domain: d,
            virt_start: page * PAGE,
            virt_end: (page + n) * PAGE - 1,
        },
        Op::Translate { .. } => return None,
    })
}

fn run_case(ops: &[Op]) -> Result<(), TestCaseError> {
    let d = device_with(
        ViommuConfig {
            boot_bypass: false,
            domain_range: (0, DOMAINS - 2),
            max_domains: MAX_DOMAINS,
            max_mappings_per_domain: MAX_MAPS,
            check_phys_ram: false,
            ..cfg()
        },
        std::sync::Arc::new(NoHooks),
    );
    let seams: BTreeMap<u32, EndpointIommu> = [EP, EP2]
        .iter()
        .map(|&e| (e, d.endpoint_iommu(e).unwrap()))
        .collect();
    let mut r = Reference::default();
    for (i, op) in ops.iter().enumerate() {
        if let Op::Translate { ep, page, n, write } = *op {
            let id = EPS[ep];
            let Some(seam) = seams.get(&id) else { continue };
            let access = if write {
                Permissions::Write
            } else {
                Permissions::Read
            };
            let got = seam
                .translate(GuestAddress(page * PAGE), (n * PAGE) as usize, access)
                .ok()
                .and_then(|mut it| it.next())
                .map(|m| m.base.0);
            let want = r.translate(id, page, n, write);
            prop_assert_eq!(got, want, "op {} {:?}", i, op);
            continue;
        }
        let want = r.apply(op).unwrap();
        let got = send(&d, to_request(op).unwrap());
        prop_assert_eq!(got, Some(want.code()), "op {} {:?}", i, op);
    }
    Ok(())
}

#[test]
fn random_sequences_match_the_page_model() {
    let config = Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7u8; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    runner
        .run(&prop::collection::vec(op(), 1..80), |ops| run_case(&ops))
        .unwrap();
}
