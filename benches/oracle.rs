//! criterion bench of the escape oracle's cost on the translate path:
//!
//! - `oracle_translate_hit`: a virtio-iommu cache hit through the per-endpoint seam with
//!   `NoHooks`, with the oracle, with the oracle behind a `Fanout` next to the run's DMA counters
//!   (what `sluice run` installs), and with the oracle holding 1 000 unmapped ranges of the
//!   endpoint's domain (the mapping-level `stale-config` check on every translated access);
//! - `oracle_smmu_hit`: an SMMUv3 IOTLB hit with `NoHooks`, with the oracle (no re-derivation),
//!   with 1 000 completed TLBI ranges of the stream's ASID kept, and with the `unsynced-config`
//!   re-derivation of one cached translation in N (N = 1 is paranoid mode).
//!
//! Times are the bench thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: on the
//! shared development machine wall time also counts the time other processes hold the cores
//! while the bench thread waits, which made cases measured a minute apart incomparable.
//!
//! Run: `cargo bench -p sluice-benches --bench oracle -- --warm-up-time 2 --measurement-time 5`
use criterion::{BenchmarkId, Throughput, criterion_group, criterion_main};
use sluice_benches::{Bench, bench_config};
use sluice_devapi::{Bdf, EndpointIommu, Fanout, Hooks, NoHooks, NullInterrupts, StateEvent};
use sluice_oracle::{IommuTopo, Oracle, OracleConfig, Topology};
use sluice_smmuv3::regs::off;
use sluice_smmuv3::{Access, SmmuConfig, SmmuV3};
use sluice_virtio_iommu::device::OFFERED_FEATURES;
use sluice_virtio_iommu::request::{Request, encode};
use sluice_virtio_iommu::{ViommuConfig, VirtioIommu};
use std::hint::black_box;
use std::sync::Arc;
use vm_memory::iommu::Iommu;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

const EP: u32 = 0x18;
const IOVA: u64 = 0x1_0000_0000;

/// A device with one 64 KiB mapping in domain 1, EP attached, the IOMMU taken over.
fn bed(hooks: Arc<dyn Hooks>) -> (VirtioIommu, EndpointIommu) {
    let cfg = ViommuConfig {
        endpoints: vec![EP],
        check_phys_ram: false,
        ..ViommuConfig::default()
    };
    hooks.state(&StateEvent {
        source: "virtio-pci",
        endpoint: Some(sluice_devapi::Endpoint::Pci(Bdf::new(0, 2, 0))),
        change: sluice_devapi::DeviceState::DriverOk { usable: true }.into(),
    });
    let d = VirtioIommu::new("bench", cfg, hooks);
    d.set_acked_features(OFFERED_FEATURES);
    let reqs = [
        Request::Attach {
            domain: 1,
            endpoint: EP,
            flags: 0,
        },
        Request::Map {
            domain: 1,
            virt_start: IOVA,
            virt_end: IOVA + 0xffff,
            phys_start: 0x20_0000,
            flags: 3,
        },
    ];
    for r in reqs {
        assert_eq!(d.handle_request(&encode(&r), 4, None).status(), Some(0));
    }
    let ep = d.endpoint_iommu(EP).unwrap();
    (d, ep)
}

/// 1 000 one-page MAP + UNMAP pairs in domain 1, every other page above the bench's mapping,
/// so the oracle keeps 1 000 separate unmapped ranges for the domain.
fn unmap_thousand(d: &VirtioIommu) {
    for i in 0..1000u64 {
        let iova = IOVA + 0x10_0000 + i * 0x2000;
        let reqs = [
            Request::Map {
                domain: 1,
                virt_start: iova,
                virt_end: iova + 0xfff,
                phys_start: 0x20_0000,
                flags: 3,
            },
            Request::Unmap {
                domain: 1,
                virt_start: iova,
                virt_end: iova + 0xfff,
            },
        ];
        for r in reqs {
            assert_eq!(d.handle_request(&encode(&r), 4, None).status(), Some(0));
        }
    }
}

fn oracle() -> Arc<Oracle> {
    Oracle::new(
        Topology::virtio(Bdf::new(0, 2, 0), vec![Bdf(EP as u16)]),
        OracleConfig::default(),
    )
}

fn translate_hit(c: &mut Bench) {
    let mut g = c.benchmark_group("oracle_translate_hit");
    g.throughput(Throughput::Elements(1));
    let o1 = oracle();
    let o2 = oracle();
    let o3 = oracle();
    let fan: Arc<dyn Hooks> = Arc::new(Fanout(vec![o2.clone(), Arc::new(sluice_devapi::NoHooks)]));
    let cases: [(&str, Arc<dyn Hooks>, bool); 5] = [
        ("nohooks", Arc::new(NoHooks), false),
        ("oracle", o1.clone(), false),
        ("fanout-oracle", fan, false),
        // The same MAP/UNMAP history without the oracle: what the seam itself costs after it.
        ("nohooks-1000-unmapped", Arc::new(NoHooks), true),
        ("oracle-1000-unmapped", o3.clone(), true),
    ];
    for (name, hooks, unmapped) in cases {
        let (d, ep) = bed(hooks);
        if unmapped {
            unmap_thousand(&d);
        }
        ep.translate(GuestAddress(IOVA), 8, Permissions::Read)
            .unwrap();
        let mut i = 0u64;
        g.bench_with_input(BenchmarkId::new(name, 512), &512usize, |b, &len| {
            b.iter(|| {
                i = (i + 512) & 0xffff;
                let it = ep
                    .translate(black_box(GuestAddress(IOVA + i)), len, Permissions::Write)
                    .unwrap();
                black_box(it.count())
            })
        });
    }
    g.finish();
    for o in [o1, o2, o3] {
        assert_eq!(o.escape_count(), 0);
        let _ = o.finish(&std::env::temp_dir().join("sluice-bench-oracle"));
    }
}

const SID: u32 = 1;
const STRTAB: u64 = 0x10_0000;
const CMDQ: u64 = 0x20_0000;
const CMDQ_LOG2: u64 = 10;
const EVTQ: u64 = 0x21_0000;
const CD: u64 = 0x30_0000;
const L1: u64 = 0x40_0000;
const L2: u64 = 0x40_1000;
const L3: u64 = 0x40_2000;
const VA: u64 = 0x1000_0000;

/// An SMMU with one stage-1 stream (39-bit VA, 4 KiB granule, ASID 1) and the page at `VA`
/// mapped and cached.
struct Smmu {
    mem: GuestMemoryMmap,
    smmu: SmmuV3,
}

impl Smmu {
    fn new(hooks: Arc<dyn Hooks>) -> Smmu {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let smmu = SmmuV3::new(SmmuConfig::default(), Arc::new(NullInterrupts), hooks);
        let b = Smmu { mem, smmu };
        b.w(off::STRTAB_BASE, 8, STRTAB);
        b.w(off::STRTAB_BASE_CFG, 4, 6);
        b.w(off::CMDQ_BASE, 8, CMDQ | CMDQ_LOG2);
        b.w(off::EVENTQ_BASE, 8, EVTQ | 5);
        b.w(off::CR0, 4, 0xd);
        let cd0 = 25 | (1 << 30) | (1 << 31) | (5 << 32) | (1 << 41) | (1 << 45) | (1 << 46);
        b.put(CD, cd0 | (1 << 48));
        b.put(CD + 8, L1);
        b.put(STRTAB + u64::from(SID) * 64, 1 | (5 << 1) | CD);
        b.put(L1, L2 | 3);
        b.put(L2 + 8 * ((VA >> 21) & 511), L3 | 3);
        b.put(L3, 0x50_0000 | (1 << 10) | 3);
        b.put(L3 + 8, 0x51_0000 | (1 << 10) | 3);
        b.cmd(0x03 | (u64::from(SID) << 32), 1);
        b.cmd(0x46, 0);
        b
    }
    fn w(&self, o: u64, size: u32, v: u64) {
        self.smmu.mmio_write(&self.mem, o, size, v);
    }
    fn put(&self, a: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(a)).unwrap();
    }
    fn cmd(&self, d0: u64, d1: u64) {
        let prod = self.smmu.mmio_read(off::CMDQ_PROD, 4);
        let idx = prod & ((1 << CMDQ_LOG2) - 1);
        self.put(CMDQ + idx * 16, d0);
        self.put(CMDQ + idx * 16 + 8, d1);
        self.w(off::CMDQ_PROD, 4, (prod + 1) & ((2 << CMDQ_LOG2) - 1));
    }
    /// TLBI_NH_VA of 1 000 single pages of ASID 1 away from `VA`, then CMD_SYNC.
    fn tlbi_thousand(&self) {
        for i in 0..1000u64 {
            self.cmd(0x12 | (1 << 48), 0x2000_0000 + i * 0x2000);
        }
        self.cmd(0x46, 0);
    }
    fn hit(&self) -> u64 {
        self.hit_at(VA + 0x40)
    }
    fn hit_at(&self, va: u64) -> u64 {
        let t = self
            .smmu
            .translate(&self.mem, SID, None, black_box(va), 64, Access::READ)
            .unwrap();
        t.segments[0].pa
    }
}

fn smmu_oracle(recheck_every: u64) -> Arc<Oracle> {
    Oracle::new(
        Topology {
            iommus: vec![IommuTopo::Smmu {
                source: "smmuv3".into(),
                sids: vec![SID],
            }],
        },
        OracleConfig {
            recheck_every,
            paranoid: recheck_every == 1,
            ..OracleConfig::default()
        },
    )
}

fn smmu_hit(c: &mut Bench) {
    let mut g = c.benchmark_group("oracle_smmu_hit");
    g.throughput(Throughput::Elements(1));
    let mut oracles = Vec::new();
    let mut cases: Vec<(String, Arc<dyn Hooks>, bool)> =
        vec![("nohooks".into(), Arc::new(NoHooks), false)];
    let two_pages_oracle = smmu_oracle(u64::MAX);
    oracles.push(two_pages_oracle.clone());
    for (name, every, tlbis) in [
        ("oracle".to_string(), u64::MAX, false),
        ("oracle-1000-tlbi".to_string(), u64::MAX, true),
        ("oracle-recheck-every-1".to_string(), 1, false),
        ("oracle-recheck-every-16".to_string(), 16, false),
        ("oracle-recheck-every-64".to_string(), 64, false),
        ("oracle-recheck-every-128".to_string(), 128, false),
        ("oracle-recheck-every-256".to_string(), 256, false),
    ] {
        let o = smmu_oracle(every);
        oracles.push(o.clone());
        cases.push((name, o, tlbis));
    }
    for (name, hooks, tlbis) in cases {
        let b = Smmu::new(hooks);
        assert_eq!(b.hit(), 0x50_0040, "walk and fill");
        if tlbis {
            b.tlbi_thousand();
        }
        g.bench_function(BenchmarkId::new(name, 64), |bench| {
            bench.iter(|| black_box(b.hit()))
        });
    }
    // Two pages in turn: the oracle's per-endpoint memo of the last clean translation never
    // matches, so every DMA looks its three entries up among the 1 000 kept ranges.
    let two: [(&str, Arc<dyn Hooks>); 2] = [
        ("nohooks-two-pages", Arc::new(NoHooks)),
        ("oracle-1000-tlbi-two-pages", two_pages_oracle),
    ];
    for (name, hooks) in two {
        let b = Smmu::new(hooks);
        assert_eq!(b.hit_at(VA + 0x1040), 0x51_0040, "walk and fill");
        assert_eq!(b.hit(), 0x50_0040, "walk and fill");
        b.tlbi_thousand();
        let mut i = 0u64;
        g.bench_function(BenchmarkId::new(name, 64), |bench| {
            bench.iter(|| {
                i ^= 0x1000;
                black_box(b.hit_at(VA + 0x40 + i))
            })
        });
    }
    g.finish();
    for o in oracles {
        assert_eq!(o.escape_count(), 0);
        let _ = o.finish(&std::env::temp_dir().join("sluice-bench-oracle"));
    }
}

criterion_group! {
    name = benches;
    config = bench_config();
    targets = translate_hit, smmu_hit
}
criterion_main!(benches);
