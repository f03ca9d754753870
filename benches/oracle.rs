//! criterion bench of the escape oracle's cost on the translate path: a virtio-iommu cache hit
//! through the per-endpoint seam with `NoHooks`, with the oracle, and with the oracle behind a
//! `Fanout` next to the run's DMA counters (what `sluice run` installs).
//!
//! Run: `cargo bench -p sluice-benches --bench oracle -- --warm-up-time 1 --measurement-time 2`
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_devapi::{Bdf, EndpointIommu, Fanout, Hooks, NoHooks, StateEvent};
use sluice_oracle::{Oracle, OracleConfig, Topology};
use sluice_virtio_iommu::device::OFFERED_FEATURES;
use sluice_virtio_iommu::request::{Request, encode};
use sluice_virtio_iommu::{ViommuConfig, VirtioIommu};
use std::hint::black_box;
use std::sync::Arc;
use vm_memory::iommu::Iommu;
use vm_memory::{GuestAddress, Permissions};

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
        what: "driver-ok",
        endpoint: Some(sluice_devapi::Endpoint::Pci(Bdf::new(0, 2, 0))),
        value: 1,
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

fn oracle() -> Arc<Oracle> {
    Oracle::new(
        Topology::virtio(Bdf::new(0, 2, 0), vec![Bdf(EP as u16)]),
        OracleConfig::default(),
    )
}

fn translate_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("oracle_translate_hit");
    g.throughput(Throughput::Elements(1));
    let o1 = oracle();
    let o2 = oracle();
    let fan: Arc<dyn Hooks> = Arc::new(Fanout(vec![o2.clone(), Arc::new(sluice_devapi::NoHooks)]));
    let cases: [(&str, Arc<dyn Hooks>); 3] = [
        ("nohooks", Arc::new(NoHooks)),
        ("oracle", o1.clone()),
        ("fanout-oracle", fan),
    ];
    for (name, hooks) in cases {
        let (_d, ep) = bed(hooks);
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
    for o in [o1, o2] {
        assert_eq!(o.escape_count(), 0);
        let _ = o.finish(&std::env::temp_dir().join("sluice-bench-oracle"));
    }
}

criterion_group!(benches, translate_hit);
criterion_main!(benches);
