//! `walk_one` (three direct entry reads) against the range walker it replaced on the DMA path,
//! over hostile tables: random entries of every shape, table origins outside guest RAM, across a
//! region end and in the hole between regions, IOVAs beyond the region-third reach. Both must
//! give the same step or the same error, and neither may panic.

use proptest::prelude::*;
use sluice_zpci::walk::{Iota, PAGE_SIZE, Step, walk_one, walk_one_by_range, walk_range};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Three regions: [0, 64 KiB) and [64 KiB, 128 KiB) adjacent (a table may straddle them and
/// is then copied, not sliced), a hole, and [192 KiB, 256 KiB).
const REGIONS: [(u64, u64); 3] = [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x3_0000, 0x1_0000)];

/// xorshift64*: a whole memory image from one seed, so proptest shrinks the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// An entry of a random shape: zero, garbage, valid-looking region/segment/page entries
/// pointing anywhere in (or just past) guest RAM, invalid bits, 1 MiB frames.
fn entry(r: &mut Rng) -> u64 {
    let addr = r.next() % 0x4_2000;
    match r.next() % 9 {
        0 => 0,
        1 => r.next(),
        2 => (addr & !0x3fff) | 0x7,
        3 => (addr & !0x7ff) | (r.next() & 0x200),
        4 => (addr & !0xfff) | (r.next() & 0x600),
        5 => (addr & !0xf_ffff) | 0x400 | (r.next() & 0x220),
        6 => 0x20,
        7 => addr | (r.next() & 0x3ff),
        _ => (addr & !0x3fff) | 0x4 | (r.next() & 0xff),
    }
}

fn memory(seed: u64) -> GuestMemoryMmap<()> {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|(a, l)| (GuestAddress(*a), *l as usize))
        .collect();
    let m = GuestMemoryMmap::from_ranges(&ranges).expect("memory");
    let mut r = Rng(seed | 1);
    for (base, len) in REGIONS {
        for off in (0..len).step_by(8) {
            m.write_obj(entry(&mut r).to_be_bytes(), GuestAddress(base + off))
                .expect("fill");
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 160,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x3a1c_0001),
        ..ProptestConfig::default()
    })]

    #[test]
    fn walk_one_equals_the_range_walk(
        seed in any::<u64>(),
        origin in prop_oneof![0..0x4_4000u64, any::<u64>()],
        protected in any::<bool>(),
        one_meg in any::<bool>(),
        rtx in prop_oneof![0..4u64, 0..0x800u64],
        sx in prop_oneof![0..4u64, 0..0x800u64],
        px in 0..0x100u64,
        off in 0..0x1000u64,
        beyond in prop::bool::weighted(0.05),
    ) {
        let m = memory(seed);
        let iota = Iota {
            origin: origin & !0x7,
            protected,
            raw: 0,
        };
        let iova = (rtx << 31 | sx << 20 | px << 12 | off) | if beyond { 1 << 42 } else { 0 };
        let fast = walk_one(&m, &iota, iova, one_meg);
        let slow = walk_one_by_range(&m, &iota, iova, one_meg);
        prop_assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x3a1c_0002),
        ..ProptestConfig::default()
    })]

    /// A range walk (page tables read as runs: sliced, or copied across a region end) reports,
    /// for every page before any error, what `walk_one` reports for that page.
    #[test]
    fn range_walk_agrees_with_walk_one_page_by_page(
        seed in any::<u64>(),
        origin in 0..0x4_4000u64,
        one_meg in any::<bool>(),
        sx in 0..8u64,
        first in 0..0x100u64,
        pages in 1..600u64,
    ) {
        let m = memory(seed);
        let iota = Iota { origin: origin & !0x3fff, protected: false, raw: 0 };
        let start = sx << 20 | first << 12;
        let end = start + pages * PAGE_SIZE;
        let mut steps = Vec::new();
        let res = walk_range(&m, &iota, start, end, one_meg, &mut |s| steps.push(s));
        let stop = match res {
            Ok(()) => end,
            Err((at, _)) => at,
        };
        let mut page = start;
        for s in steps {
            let (s_start, s_end) = match s {
                Step::Invalid { start, len } => (start, start + len),
                Step::Mapped(mp) => (mp.iova.max(page), mp.iova + mp.frame.size()),
            };
            prop_assert_eq!(s_start, page);
            while page < s_end.min(stop) {
                let one = walk_one(&m, &iota, page, one_meg);
                match (&s, one) {
                    (Step::Invalid { .. }, Ok(Step::Invalid { .. })) => {}
                    (Step::Mapped(a), Ok(Step::Mapped(b))) => prop_assert_eq!(*a, b),
                    (a, b) => prop_assert!(false, "page {:#x}: range {:?}, one {:?}", page, a, b),
                }
                page += PAGE_SIZE;
            }
            page = page.max(s_end.min(end));
        }
        prop_assert_eq!(page.min(stop), stop);
    }
}
