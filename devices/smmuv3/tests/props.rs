//! Property tests: random page tables in every granule against an independent reference
//! walker; random map/unmap/TLBI/SYNC sequences never leave a stale translation visible once
//! the covering invalidation has completed; the fuzz body on random inputs.

mod common;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use sluice_smmuv3::walk::Granule;
use sluice_smmuv3::{Access, EventType, Fault};

/// Seed of every property test in this file. Fixed, so a failure in CI reproduces anywhere;
/// `SLUICE_PROPTEST_SEED` (decimal or `0x` hex) picks another to explore. Each test prints the
/// seed it runs with (shown with the failure, or with `--nocapture`).
const DEFAULT_SEED: u64 = 0x5117_5eed;
const SEED_VAR: &str = "SLUICE_PROPTEST_SEED";

fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(v) => parse_seed(&v).unwrap_or_else(|| panic!("{SEED_VAR}={v:?} is not a number")),
        Err(_) => DEFAULT_SEED,
    }
}

fn config(cases: u32) -> ProptestConfig {
    let seed = seed();
    eprintln!("smmuv3 property tests: seed {seed:#x} (set {SEED_VAR} to change it)");
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // The seed reproduces a failure; no regression files are written into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn the_seed_is_fixed_unless_overridden() {
    if std::env::var_os(SEED_VAR).is_none() {
        assert_eq!(config(1).rng_seed, RngSeed::Fixed(DEFAULT_SEED));
    }
    assert_eq!(parse_seed("0x2a"), Some(42));
    assert_eq!(parse_seed(" 42 "), Some(42));
    assert_eq!(parse_seed("banana"), None);
}

/// Independent reference walker: straight from the VMSAv8-64 rules, sharing no code with the
/// model.
fn ref_walk(rig: &Rig, g: Granule, input_bits: u32, root: u64, va: u64) -> Option<u64> {
    let gb = g.bits();
    let stride = gb - 3;
    if va >> input_bits != 0 {
        return None;
    }
    let levels = (input_bits - gb).div_ceil(stride);
    let mut level = 4 - levels;
    let mut table = root;
    let mut first = true;
    let oa_mask = (1u64 << 48) - 1;
    loop {
        let shift = gb + (3 - level) * stride;
        let nbits = if first { input_bits - shift } else { stride };
        first = false;
        let idx = (va >> shift) & ((1 << nbits) - 1);
        let d = rig.read_u64(table + idx * 8);
        if d & 1 == 0 {
            return None;
        }
        let block_ok = match g {
            Granule::G4K => level == 1 || level == 2,
            _ => level == 2,
        };
        if level == 3 {
            return (d & 2 != 0).then(|| (d & oa_mask & !((1 << gb) - 1)) | (va & ((1 << gb) - 1)));
        }
        if d & 2 != 0 {
            table = d & oa_mask & !((1 << gb) - 1);
            level += 1;
            continue;
        }
        return block_ok.then(|| (d & oa_mask & !((1 << shift) - 1)) | (va & ((1 << shift) - 1)));
    }
}

fn granule(i: u8) -> Granule {
    Granule::ALL[usize::from(i % 3)]
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn random_tables_match_reference_walker(
        gi in 0u8..3,
        small in any::<bool>(),
        maps in prop::collection::vec((any::<u64>(), any::<u64>(), 0u32..4, any::<bool>()), 1..24),
        probes in prop::collection::vec(any::<u64>(), 1..16),
    ) {
        let g = granule(gi);
        let input_bits = if small { 39 } else { 48 };
        let rig = Rig::new();
        rig.enable(6);
        let pt = Pt::s1(&rig, g, input_bits);
        let cdaddr = rig.alloc(64, 64);
        rig.write_words(cdaddr, &cd(1, 64 - u64::from(input_bits), g, pt.root));
        rig.set_ste(1, ste_s1(cdaddr, 0, 0, 0));
        let mut vas = Vec::new();
        for (va, pa, lvl, valid) in maps {
            let level = pt.start_level + lvl % (4 - pt.start_level);
            let shift = g.level_shift(level);
            // Keep VAs in a small window so tables are shared and overwritten.
            let va = (va % (1 << input_bits.min(42))) & !((1 << g.bits()) - 1);
            let pa = (pa % (1 << 40)) & !((1u64 << shift) - 1);
            let attrs = if valid { AF } else { 0 };
            let a = pt.map(va, pa, level, attrs);
            if !valid {
                rig.write_u64(a, 0);
            }
            vas.push(va + (probes[0] & ((1 << g.bits()) - 1)));
        }
        vas.extend(probes.iter().map(|p| p % (1 << input_bits)));
        for va in vas {
            let want = ref_walk(&rig, g, input_bits, pt.root, va);
            let got = rig.smmu.translate(&rig.mem, 1, None, va, 1, Access::READ);
            match (want, got) {
                (Some(pa), Ok(t)) => prop_assert_eq!(t.segments[0].pa, pa),
                (None, Err(Fault::Event { event, .. })) => prop_assert_eq!(event.kind, EventType::FTranslation),
                (w, g) => prop_assert!(false, "va {:#x}: reference {:?}, model {:?}", va, w, g),
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Map(u64, u64),
    Unmap(u64),
    Tlbi(u64),
    TlbiRange(u64, u64),
    TlbiAsid,
    Sync,
    Translate(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..32, 0u64..1024).prop_map(|(p, f)| Op::Map(p, f)),
        (0u64..32).prop_map(Op::Unmap),
        (0u64..32).prop_map(Op::Tlbi),
        (0u64..32, 0u64..8).prop_map(|(p, n)| Op::TlbiRange(p, n)),
        Just(Op::TlbiAsid),
        Just(Op::Sync),
        (0u64..32).prop_map(Op::Translate),
    ]
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn no_stale_translation_after_covering_tlbi_and_sync(ops in prop::collection::vec(op(), 1..80)) {
        let rig = Rig::new();
        rig.enable(6);
        let pt = Pt::s1(&rig, Granule::G4K, 48);
        let cdaddr = rig.alloc(64, 64);
        rig.write_words(cdaddr, &cd(2, 16, Granule::G4K, pt.root));
        rig.set_ste(1, ste_s1(cdaddr, 0, 0, 0));
        let base = 0x40_0000u64;
        // Make sure the level-3 table exists so an unmap is a PTE write.
        pt.map(base, 0, 3, 0);
        rig.write_u64(pt.desc_addr(base, 3), 0);
        let mut truth: [Option<u64>; 32] = [None; 32];
        let mut dirty = [false; 32];
        let mut pending_sync = [false; 32];
        for op in ops {
            match op {
                Op::Map(p, f) => {
                    pt.map(base + p * 0x1000, 0x100_0000 + f * 0x1000, 3, AF);
                    truth[p as usize] = Some(0x100_0000 + f * 0x1000);
                    dirty[p as usize] = true;
                }
                Op::Unmap(p) => {
                    rig.write_u64(pt.desc_addr(base + p * 0x1000, 3), 0);
                    truth[p as usize] = None;
                    dirty[p as usize] = true;
                }
                Op::Tlbi(p) => {
                    let [d0, d1] = tlbi_va(2, base + p * 0x1000);
                    rig.cmd(d0, d1);
                    if dirty[p as usize] { pending_sync[p as usize] = true; }
                }
                Op::TlbiRange(p, n) => {
                    // (NUM+1) << SCALE pages with SCALE=0.
                    let [d0, d1] = tlbi_va_range(2, base + p * 0x1000, Granule::G4K, n, 0);
                    rig.cmd(d0, d1);
                    for q in p..(p + n + 1).min(32) {
                        if dirty[q as usize] { pending_sync[q as usize] = true; }
                    }
                }
                Op::TlbiAsid => {
                    rig.cmd(0x11 | (2 << 48), 0);
                    for q in 0..32 { if dirty[q] { pending_sync[q] = true; } }
                }
                Op::Sync => {
                    rig.sync();
                    for q in 0..32 {
                        if pending_sync[q] { dirty[q] = false; pending_sync[q] = false; }
                    }
                }
                Op::Translate(p) => {
                    let r = rig.smmu.translate(&rig.mem, 1, None, base + p * 0x1000 + 8, 4, Access::READ);
                    let got = r.ok().map(|t| t.segments[0].pa - 8);
                    if !dirty[p as usize] {
                        prop_assert_eq!(got, truth[p as usize], "page {} stale after TLBI+SYNC", p);
                    }
                }
            }
        }
    }
}

/// The fuzz target's body on a few thousand deterministic pseudo-random inputs.
#[test]
fn fuzz_body_on_random_inputs() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for i in 0..3000 {
        let mem_len = (next() % 0x2000) as usize;
        let ops_len = (next() % 400) as usize;
        let mut data = vec![0u8; mem_len + ops_len];
        // Mostly-zero memory with sprinkled words makes valid-looking structures likelier.
        for _ in 0..(mem_len / 16) {
            let at = (next() as usize) % mem_len.max(1);
            if let Some(b) = data.get_mut(at) {
                *b = next() as u8;
            }
        }
        for b in data.iter_mut().skip(mem_len) {
            *b = next() as u8;
        }
        if i % 2 == 0 {
            // Full 32 KiB image so the ops start exactly after it.
            let mut full = vec![0u8; sluice_smmuv3::fuzzing::MEM_SIZE];
            full[..mem_len].copy_from_slice(&data[..mem_len]);
            full.extend_from_slice(&data[mem_len..]);
            data = full;
        }
        sluice_smmuv3::fuzzing::run(&data);
    }
}
