//! criterion benches of the virtio-iommu hot paths, each with 1, 1 000 and 100 000 live
//! mappings in the domain. Each figure says what it measures:
//!
//! - `viommu_lookup/store/N`: the model's mapping lookup alone (`MapStore::lookup`, the interval
//!   map the seam consults on a miss); no lock, no report, no data;
//! - `viommu_lookup/random_read_5MiB`: for scale, one 8-byte read at a scattered index of a
//!   5 MiB buffer (about the page index's footprint at N = 100 000): what a lookup whose table
//!   no longer fits the caches pays for the one cache line it must touch;
//! - `viommu_translate/hit/N`: `EndpointIommu::translate` of 512 bytes answered by the seam's
//!   per-endpoint cache (`sluice-devapi`), iterated; no data copy;
//! - `viommu_translate/miss/N`: the same after invalidating the page: the model resolves it;
//! - `read_u64_iommu_memory_hit` / `read_u64_direct`: an 8-byte read through `IommuMemory`
//!   (lookup + copy) against the copy alone;
//! - `viommu_map_unmap_pair/N`: a MAP and an UNMAP request.
//!
//! Run: `cargo bench -p sluice-benches --bench viommu -- --warm-up-time 1 --measurement-time 3`
use criterion::{BenchmarkId, Throughput, criterion_group, criterion_main};
use sluice_benches::{Bench, bench_config};
use sluice_devapi::{EndpointIommu, NoHooks};
use sluice_virtio_iommu::device::OFFERED_FEATURES;
use sluice_virtio_iommu::request::{Request, encode};
use sluice_virtio_iommu::spec::{MAP_F_READ, MAP_F_WRITE};
use sluice_virtio_iommu::store::{MapStore, Mapping};
use sluice_virtio_iommu::{ViommuConfig, VirtioIommu};
use std::hint::black_box;
use std::sync::Arc;
use vm_memory::iommu::Iommu;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory, Permissions};

const EP: u32 = 0x10;
const PAGE: u64 = 0x1000;
/// Mapped IOVAs start here; page i maps to a scattered GPA so the cache cannot merge them.
const BASE: u64 = 0x1_0000_0000;
const RAM_PAGES: u64 = 4096;

fn map_req(iova: u64, phys: u64) -> Vec<u8> {
    encode(&Request::Map {
        domain: 1,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
        phys_start: phys,
        flags: MAP_F_READ | MAP_F_WRITE,
    })
}

fn unmap_req(iova: u64) -> Vec<u8> {
    encode(&Request::Unmap {
        domain: 1,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
    })
}

/// A device with `n` single-page mappings in domain 1, EP attached.
fn bed(n: u64) -> (VirtioIommu, EndpointIommu) {
    let cfg = ViommuConfig {
        endpoints: vec![EP],
        check_phys_ram: false,
        ..ViommuConfig::default()
    };
    let d = VirtioIommu::new("bench", cfg, Arc::new(NoHooks));
    d.set_acked_features(OFFERED_FEATURES);
    let attach = encode(&Request::Attach {
        domain: 1,
        endpoint: EP,
        flags: 0,
    });
    assert_eq!(d.handle_request(&attach, 4, None).status(), Some(0));
    for i in 0..n {
        let phys = ((i * 7919) % RAM_PAGES) * PAGE;
        let r = d.handle_request(&map_req(BASE + 2 * i * PAGE, phys), 4, None);
        assert_eq!(r.status(), Some(0));
    }
    let ep = d.endpoint_iommu(EP).unwrap();
    (d, ep)
}

fn lookup(c: &mut Bench) {
    let mut g = c.benchmark_group("viommu_lookup");
    for n in [1u64, 1_000, 100_000] {
        let mut s = MapStore::new();
        for i in 0..n {
            let start = BASE + 2 * i * PAGE;
            let m = Mapping {
                end: start + PAGE - 1,
                phys: ((i * 7919) % RAM_PAGES) * PAGE,
                flags: MAP_F_READ | MAP_F_WRITE,
            };
            s.insert(start, m).unwrap();
        }
        let mut i = 0u64;
        g.bench_with_input(BenchmarkId::new("store", n), &n, |b, &n| {
            b.iter(|| {
                i = (i + 7) % n;
                black_box(s.lookup(black_box(BASE + 2 * i * PAGE + 64)))
            })
        });
    }
    // 100 000 entries of 40 bytes in a table of 131 072 buckets: about 5 MiB.
    let words = vec![1u64; (5 << 20) / 8];
    let mut i = 0usize;
    g.bench_function("random_read_5MiB", |b| {
        b.iter(|| {
            // Same stride pattern as the lookups (7 entries on), scattered by a multiplier.
            i = (i + 7) % 100_000;
            let at = (i.wrapping_mul(0x9E37_79B9) >> 3) % words.len();
            black_box(words.get(at).copied())
        })
    });
    g.finish();
}

fn translate(c: &mut Bench) {
    let mut g = c.benchmark_group("viommu_translate");
    g.throughput(Throughput::Elements(1));
    for n in [1u64, 1_000, 100_000] {
        let (_d, ep) = bed(n);
        // Warm the cache with every mapping.
        for i in 0..n {
            ep.translate(GuestAddress(BASE + 2 * i * PAGE), 8, Permissions::Read)
                .unwrap();
        }
        let mut i = 0u64;
        g.bench_with_input(BenchmarkId::new("hit", n), &n, |b, &n| {
            b.iter(|| {
                i = (i + 1) % n;
                let it = ep
                    .translate(
                        GuestAddress(BASE + 2 * i * PAGE + 64),
                        512,
                        Permissions::Read,
                    )
                    .unwrap();
                black_box(it.count())
            })
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, &n| {
            b.iter(|| {
                i = (i + 1) % n;
                let iova = BASE + 2 * i * PAGE;
                ep.invalidate(iova, PAGE);
                let it = ep
                    .translate(GuestAddress(iova + 64), 512, Permissions::Read)
                    .unwrap();
                black_box(it.count())
            })
        });
    }
    // For scale: an 8-byte read through IommuMemory (hit) against a direct read.
    let (_d, ep) = bed(1);
    let phys =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (RAM_PAGES * PAGE) as usize)])
            .unwrap();
    let mem = IommuMemory::new(phys.clone(), ep, true, ());
    mem.read_obj::<u64>(GuestAddress(BASE)).unwrap();
    g.bench_function("read_u64_iommu_memory_hit", |b| {
        b.iter(|| black_box(mem.read_obj::<u64>(GuestAddress(BASE + 8)).unwrap()))
    });
    g.bench_function("read_u64_direct", |b| {
        b.iter(|| black_box(phys.read_obj::<u64>(GuestAddress(8)).unwrap()))
    });
    g.finish();
}

fn map_unmap(c: &mut Bench) {
    let mut g = c.benchmark_group("viommu_map_unmap_pair");
    g.throughput(Throughput::Elements(1));
    for n in [1u64, 1_000, 100_000] {
        let (d, ep) = bed(n);
        // Keep a translation cached so UNMAP's exact invalidation has real work to do.
        ep.translate(GuestAddress(BASE), 8, Permissions::Read)
            .unwrap();
        // A hole between existing mappings, in the middle of the domain.
        let iova = BASE + (2 * (n / 2) + 1) * PAGE;
        let (m, u) = (map_req(iova, 0x2000), unmap_req(iova));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let a = d.handle_request(&m, 4, None);
                let b2 = d.handle_request(&u, 4, None);
                black_box((a, b2))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = bench_config();
    targets = lookup, translate, map_unmap
}
criterion_main!(benches);
