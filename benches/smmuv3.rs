//! criterion benches of the SMMUv3 model's hot paths. Each figure says what it measures:
//!
//! - `iotlb_lookup_hit/N`: `Iotlb::lookup` alone (N entries cached, one tag): the cache probe,
//!   no config, no report, no data;
//! - `iotlb_hit`: `SmmuV3::translate` of 64 bytes answered by the IOTLB (register snapshot,
//!   STE/CD from the config cache, IOTLB probe, segment list, the hooks' report); no data copy;
//! - `walk_4k_4level_resident`: the stage-1 walker alone over resident 4K tables, 4 levels,
//!   reading descriptors the way the model does (`guest::read_u64`);
//! - `translate_miss_4k_cfg_cached`: a whole `translate` that misses the IOTLB (walk + fill +
//!   eviction), STE and CD from the config cache;
//! - `walk_*_miss`, `nested_s1_s2_miss`: `NeverCache`, so STE and CD are fetched and decoded too;
//! - `copy_64_direct`: a 64-byte copy out of guest memory with no translation, for scale: a DMA
//!   through the seam costs its lookup plus this.
//!
//! Run: `cargo bench -p sluice-benches --bench smmuv3 -- --warm-up-time 1 --measurement-time 3`
use criterion::{Throughput, criterion_group, criterion_main};
use sluice_benches::{Bench, bench_config};
use sluice_devapi::{NoHooks, NullInterrupts};
use sluice_smmuv3::guest::read_u64;
use sluice_smmuv3::iotlb::{Iotlb, Tag, TlbEntry};
use sluice_smmuv3::regs::off;
use sluice_smmuv3::walk::{Granule, WalkCfg, perm, walk};
use sluice_smmuv3::{Access, CacheMode, SmmuConfig, SmmuV3};
use std::hint::black_box;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const STRTAB: u64 = 0x10_0000;
const CMDQ: u64 = 0x20_0000;
const EVTQ: u64 = 0x21_0000;
const AF: u64 = 1 << 10;

struct Bed {
    mem: GuestMemoryMmap,
    smmu: SmmuV3,
    next: u64,
}

impl Bed {
    fn new(mode: CacheMode) -> Bed {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let cfg = SmmuConfig {
            cache_mode: mode,
            iotlb_capacity: 16384,
            ..SmmuConfig::default()
        };
        let smmu = SmmuV3::new(cfg, Arc::new(NullInterrupts), Arc::new(NoHooks));
        let b = Bed {
            mem,
            smmu,
            next: 0x40_0000,
        };
        b.w(off::STRTAB_BASE, 8, STRTAB);
        b.w(off::STRTAB_BASE_CFG, 4, 6);
        b.w(off::CMDQ_BASE, 8, CMDQ | 8);
        b.w(off::EVENTQ_BASE, 8, EVTQ | 5);
        b.w(off::CR0, 4, 0xd);
        b
    }
    fn w(&self, o: u64, size: u32, v: u64) {
        self.smmu.mmio_write(&self.mem, o, size, v);
    }
    fn put(&self, a: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(a)).unwrap();
    }
    fn get(&self, a: u64) -> u64 {
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
    fn alloc(&mut self, size: u64) -> u64 {
        let a = (self.next + size - 1) & !(size - 1);
        self.next = a + size;
        a
    }
    /// Maps `va` → `pa` at level 3 in tables rooted at `root`; tables are allocated as
    /// needed (addresses are used as-is: identity between IPA and PA for table pages).
    fn map(&mut self, g: Granule, input_bits: u32, root: u64, va: u64, pa: u64, attrs: u64) {
        let mut level = g.s1_start_level(input_bits);
        let mut table = root;
        let mut first = true;
        while level < 3 {
            let shift = g.level_shift(level);
            let bits = if first {
                input_bits - shift
            } else {
                g.stride()
            };
            first = false;
            let a = table + 8 * ((va >> shift) & ((1 << bits) - 1));
            let d = self.get(a);
            table = if d & 3 == 3 {
                d & 0xffff_ffff_f000 & !((1 << g.bits()) - 1)
            } else {
                let t = self.alloc(1 << g.bits());
                self.put(a, t | 3);
                t
            };
            level += 1;
        }
        let a = table + 8 * ((va >> g.bits()) & ((1 << g.stride()) - 1));
        self.put(a, pa | attrs | 3);
    }
    fn cd(&mut self, asid: u64, t0sz: u64, g: Granule, root: u64) -> u64 {
        let tg = match g {
            Granule::G4K => 0,
            Granule::G64K => 1,
            Granule::G16K => 2,
        };
        let d0 = t0sz
            | (tg << 6)
            | (1 << 30)
            | (1 << 31)
            | (5 << 32)
            | (1 << 41)
            | (1 << 45)
            | (1 << 46)
            | (asid << 48);
        let a = self.alloc(64);
        self.put(a, d0);
        self.put(a + 8, root);
        a
    }
    fn s1_stream(&mut self, sid: u64, g: Granule, input_bits: u32) -> u64 {
        let root = self.alloc(1 << g.bits());
        let cd = self.cd(1, 64 - u64::from(input_bits), g, root);
        self.put(STRTAB + sid * 64, 1 | (5 << 1) | cd);
        root
    }
}

fn benches(c: &mut Bench) {
    let mut g = c.benchmark_group("smmuv3");

    // IOTLB hit: 4K page, 48-bit VA.
    let mut b = Bed::new(CacheMode::LikeHardware);
    let root = b.s1_stream(1, Granule::G4K, 48);
    b.map(Granule::G4K, 48, root, 0x1234_5000, 0x80_0000, AF);
    b.smmu
        .translate(&b.mem, 1, None, 0x1234_5000, 64, Access::READ)
        .unwrap();
    g.bench_function("iotlb_hit", |bn| {
        bn.iter(|| {
            b.smmu
                .translate(&b.mem, 1, None, black_box(0x1234_5040), 64, Access::READ)
                .unwrap()
        })
    });

    // The IOTLB probe alone.
    for n in [1u64, 10_000] {
        let tlb = Iotlb::new(16384);
        let tag = Tag { vmid: 0, asid: 1 };
        for p in 0..n {
            let e = TlbEntry {
                iova: p << 12,
                size_log2: 12,
                oa: 0x100_0000 + (p << 12),
                s1perm: perm::ALL,
                s2perm: perm::ALL,
                ipa: 0x100_0000 + (p << 12),
                granule: Granule::G4K,
                level: 3,
            };
            assert!(tlb.insert(tag, e, tlb.epoch()));
        }
        let mut i = 0u64;
        g.bench_function(format!("iotlb_lookup_hit/{n}"), |bn| {
            bn.iter(|| {
                i = (i + 7) % n;
                black_box(tlb.lookup(tag, black_box((i << 12) | 0x40)))
            })
        });
    }

    // The walker alone, tables resident: 4 descriptor reads, 4K granule, 48-bit VA.
    let mut b = Bed::new(CacheMode::LikeHardware);
    let root = b.s1_stream(1, Granule::G4K, 48);
    b.map(Granule::G4K, 48, root, 0x1234_5000, 0x80_0000, AF);
    let cfg = WalkCfg {
        granule: Granule::G4K,
        start_level: 0,
        input_bits: 48,
        oa_bits: 48,
        ttb: root,
        had: false,
    };
    assert_eq!(
        walk(&cfg, 0x1234_5040, &mut |a, _| read_u64(&b.mem, a)).map(|l| l.oa),
        Ok(0x80_0000)
    );
    g.bench_function("walk_4k_4level_resident", |bn| {
        bn.iter(|| {
            walk(&cfg, black_box(0x1234_5040), &mut |a, _| {
                read_u64(&b.mem, a)
            })
            .map(|l| l.oa)
            .unwrap()
        })
    });

    // A whole translation that misses the IOTLB (one entry of capacity, two pages alternating:
    // every access walks, fills and evicts) while STE and CD come from the config cache.
    let mut b = Bed::new(CacheMode::LikeHardware);
    let root = b.s1_stream(1, Granule::G4K, 48);
    b.map(Granule::G4K, 48, root, 0x1234_5000, 0x80_0000, AF);
    b.map(Granule::G4K, 48, root, 0x1234_6000, 0x90_0000, AF);
    let b = Bed {
        smmu: {
            let cfg = SmmuConfig {
                cache_mode: CacheMode::LikeHardware,
                iotlb_capacity: 1,
                ..SmmuConfig::default()
            };
            SmmuV3::new(cfg, Arc::new(NullInterrupts), Arc::new(NoHooks))
        },
        ..b
    };
    b.w(off::STRTAB_BASE, 8, STRTAB);
    b.w(off::STRTAB_BASE_CFG, 4, 6);
    b.w(off::CMDQ_BASE, 8, CMDQ | 8);
    b.w(off::EVENTQ_BASE, 8, EVTQ | 5);
    b.w(off::CR0, 4, 0xd);
    let mut flip = 0u64;
    g.bench_function("translate_miss_4k_cfg_cached", |bn| {
        bn.iter(|| {
            flip ^= 0x1000;
            b.smmu
                .translate(
                    &b.mem,
                    1,
                    None,
                    black_box(0x1234_5040 + flip),
                    64,
                    Access::READ,
                )
                .unwrap()
        })
    });
    assert!(b.smmu.iotlb_len() <= 1);

    // For scale: the data copy a 64-byte DMA adds to its translation.
    let mut buf = [0u8; 64];
    g.bench_function("copy_64_direct", |bn| {
        bn.iter(|| {
            b.mem
                .read_slice(&mut buf, GuestAddress(black_box(0x80_0040)))
                .unwrap();
            black_box(buf[0])
        })
    });

    // Full walks: NeverCache re-reads STE and CD too (two extra 64-byte reads).
    let mut b = Bed::new(CacheMode::NeverCache);
    let root = b.s1_stream(1, Granule::G4K, 48);
    b.map(Granule::G4K, 48, root, 0x1234_5000, 0x80_0000, AF);
    g.bench_function("walk_4k_4level_miss", |bn| {
        bn.iter(|| {
            b.smmu
                .translate(&b.mem, 1, None, black_box(0x1234_5040), 64, Access::READ)
                .unwrap()
        })
    });
    let mut b = Bed::new(CacheMode::NeverCache);
    let root = b.s1_stream(1, Granule::G64K, 48);
    b.map(Granule::G64K, 48, root, 0x1234_0000, 0x80_0000, AF);
    g.bench_function("walk_64k_3level_miss", |bn| {
        bn.iter(|| {
            b.smmu
                .translate(&b.mem, 1, None, black_box(0x1234_0040), 64, Access::READ)
                .unwrap()
        })
    });

    // Nested miss: S1 4K 39-bit (3 levels) with every table and the CD behind a 4K 39-bit
    // stage 2 (3 levels): 3 S1 reads + CD, each translated through stage 2, plus the output.
    let mut b = Bed::new(CacheMode::NeverCache);
    let s2root = b.alloc(0x1000);
    // Stage-2 identity for the first 32 MiB of IPA space (tables live there) as 4K pages,
    // and the data IPA.
    for p in (0x40_0000u64..0x50_0000).step_by(0x1000) {
        b.map(Granule::G4K, 39, s2root, p, p, AF | (3 << 6));
    }
    let s1root = b.alloc(0x1000);
    let cdaddr = b.cd(1, 25, Granule::G4K, s1root);
    b.map(Granule::G4K, 39, s1root, 0x1000, 0x900_0000, AF);
    b.map(
        Granule::G4K,
        39,
        s2root,
        0x900_0000,
        0xa00_0000,
        AF | (3 << 6),
    );
    let d2 = 1 | (25 << 32) | (1 << 38) | (5 << 48) | (1 << 51) | (1 << 58);
    b.put(STRTAB + 2 * 64, 1 | (7 << 1) | cdaddr);
    b.put(STRTAB + 2 * 64 + 16, d2);
    b.put(STRTAB + 2 * 64 + 24, s2root);
    assert_eq!(
        b.smmu
            .translate(&b.mem, 2, None, 0x1040, 64, Access::READ)
            .unwrap()
            .segments[0]
            .pa,
        0xa00_0040
    );
    g.bench_function("nested_s1_s2_miss", |bn| {
        bn.iter(|| {
            b.smmu
                .translate(&b.mem, 2, None, black_box(0x1040), 64, Access::READ)
                .unwrap()
        })
    });

    // Commands: 63 TLBI_NH_VA + CMD_SYNC per doorbell.
    let b = Bed::new(CacheMode::LikeHardware);
    let mut prod = 0u64;
    g.throughput(Throughput::Elements(64));
    g.bench_function("cmdq_64_commands_per_doorbell", |bn| {
        bn.iter(|| {
            for i in 0..64u64 {
                let idx = (prod + i) & 0xff;
                let d0 = if i == 63 { 0x46 } else { 0x12 | (1 << 48) };
                b.put(CMDQ + idx * 16, d0);
                b.put(CMDQ + idx * 16 + 8, i << 12);
            }
            prod = (prod + 64) & 0x1ff;
            b.w(off::CMDQ_PROD, 4, prod);
        })
    });
    g.throughput(Throughput::Elements(1));

    // TLBI range with 10 000 cached entries: invalidate 16 pages (RIL NUM=15) + SYNC, then
    // refill them so the IOTLB stays at 10 000.
    let mut b = Bed::new(CacheMode::LikeHardware);
    let root = b.s1_stream(1, Granule::G4K, 48);
    for p in 0..10_000u64 {
        b.map(Granule::G4K, 48, root, p << 12, 0x100_0000 + (p << 12), AF);
        b.smmu
            .translate(&b.mem, 1, None, p << 12, 8, Access::READ)
            .unwrap();
    }
    assert_eq!(b.smmu.iotlb_len(), 10_000);
    let mut prod = 0u64;
    let mut at = 0u64;
    g.bench_function("tlbi_range16_with_10000_entries", |bn| {
        bn.iter(|| {
            let va = ((at % 600) * 16) << 12;
            at += 1;
            let idx = prod & 0xff;
            b.put(CMDQ + idx * 16, 0x12 | (15 << 12) | (1 << 48));
            b.put(CMDQ + idx * 16 + 8, va | (1 << 10));
            b.put(CMDQ + ((prod + 1) & 0xff) * 16, 0x46);
            b.put(CMDQ + ((prod + 1) & 0xff) * 16 + 8, 0);
            prod = (prod + 2) & 0x1ff;
            b.w(off::CMDQ_PROD, 4, prod);
            for p in 0..16u64 {
                b.smmu
                    .translate(&b.mem, 1, None, va + (p << 12), 8, Access::READ)
                    .unwrap();
            }
        })
    });
    g.bench_function("refill_16_pages_only_baseline", |bn| {
        bn.iter(|| {
            for p in 0..16u64 {
                b.smmu
                    .translate(&b.mem, 1, None, black_box(p << 12), 8, Access::READ)
                    .unwrap();
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = smmuv3;
    config = bench_config();
    targets = benches
}
criterion_main!(smmuv3);
