//! criterion benches of the zPCI model's hot paths. Each figure says what it measures:
//!
//! - `iotlb_lookup_hit`: the shadow IOTLB's probe alone (`iotlb::Iotlb::lookup`, 65 536 pages);
//! - `translate_hit_4k`: `Zpci::translate_into` of 256 bytes answered by the shadow IOTLB (the
//!   function's read lock, state checks, probe, piece, the hooks' report); no data copy;
//! - `walk_3level`: the region-third → segment → page walker alone (`walk::walk_one`) over
//!   resident tables;
//! - `walk_miss_4k`: `translate_into` in always-walk mode (the whole path around that walk);
//! - `rpcit_N_pages`: RPCIT refreshing N pages whose shadow entries were dropped first.
//!
//! Run: `cargo bench -p sluice-benches --bench zpci -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, criterion_group, criterion_main};
use sluice_benches::{Bench, bench_config};
use sluice_devapi::NoHooks;
use sluice_zpci::clp::SetPciFnOp;
use sluice_zpci::guest::GuestTables;
use sluice_zpci::iotlb::Iotlb;
use sluice_zpci::walk::{Frame, Iota, Mapping, Step, walk_one};
use sluice_zpci::{Fib, FunctionConfig, MpcifcOp, Piece, TlbMode, Zpci, ZpciOptions};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const PBA: u64 = 0x1_0000_0000;
const PAGES: u64 = 65_536;

struct Setup {
    z: Zpci,
    m: GuestMemoryMmap<()>,
    fh: u32,
}

fn setup(mode: TlbMode) -> Setup {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("memory");
    let opts = ZpciOptions {
        tlb_mode: mode,
        ..ZpciOptions::default()
    };
    let z = Zpci::new(
        vec![FunctionConfig {
            fid: 1,
            ..FunctionConfig::default()
        }],
        opts,
        Arc::new(NoHooks),
    )
    .expect("model");
    z.configure(1).expect("configure");
    let fh = z
        .clp_set_pci_fn(z.fh_of(1).expect("fh"), SetPciFnOp::Enable { ndas: 1 })
        .expect("enable");
    let mut t = GuestTables::new(&m, 0x100_0000, 0x200_0000).expect("tables");
    // 65 536 pages = 256 MiB of IOVA over 256 page tables; frames cycle over 16 MiB (frame 0 is an invalid PTE target).
    for i in 0..PAGES {
        t.map(&m, PBA + i * 0x1000, (1 + i % 4095) * 0x1000, true)
            .expect("map");
    }
    let fib = Fib {
        pba: PBA,
        pal: PBA + (1 << 32) - 1,
        iota: t.iota(),
        ..Fib::default()
    };
    z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::RegIoat, &fib)
        .expect("reg ioat");
    Setup { z, m, fh }
}

fn benches(c: &mut Bench) {
    let s = setup(TlbMode::Shadow);
    assert!(s.z.rpcit(&s.m, s.fh, PBA, PAGES * 0x1000).is_ok());
    let mut out: Vec<Piece> = Vec::with_capacity(4);
    let mut i = 0u64;
    c.bench_function("zpci/translate_hit_4k", |b| {
        b.iter(|| {
            i = (i + 7) % PAGES;
            out.clear();
            black_box(s.z.translate_into(&s.m, s.fh, PBA + i * 0x1000 + 0x10, 256, true, &mut out))
        })
    });

    // The shadow IOTLB probe alone.
    let mut tlb = Iotlb::default();
    for p in 0..PAGES {
        let m = Mapping {
            iova: PBA + p * 0x1000,
            gpa: (1 + p % 4095) * 0x1000,
            frame: Frame::Page,
            writable: true,
        };
        tlb.install(&m, 1);
    }
    c.bench_function("zpci/iotlb_lookup_hit", |b| {
        b.iter(|| {
            i = (i + 7) % PAGES;
            black_box(tlb.lookup(black_box(PBA + i * 0x1000 + 0x10)))
        })
    });

    let w = setup(TlbMode::AlwaysWalk);
    // The walker alone over the same tables.
    let iota = Iota::parse(w.z.ioat_of(1).expect("ioat").0).expect("iota");
    assert!(matches!(
        walk_one(&w.m, &iota, PBA + 0x10, false),
        Ok(Step::Mapped(_))
    ));
    c.bench_function("zpci/walk_3level", |b| {
        b.iter(|| {
            i = (i + 7) % PAGES;
            black_box(walk_one(
                &w.m,
                &iota,
                black_box(PBA + i * 0x1000 + 0x10),
                false,
            ))
            .is_ok()
        })
    });
    c.bench_function("zpci/walk_miss_4k", |b| {
        b.iter(|| {
            i = (i + 7) % PAGES;
            out.clear();
            black_box(w.z.translate_into(&w.m, w.fh, PBA + i * 0x1000 + 0x10, 256, true, &mut out))
        })
    });

    for pages in [1u64, 512, 65_536] {
        // Each iteration refreshes a range whose shadow entries were dropped first (cold
        // RPCIT: walk + install), measured with the drop outside the timing.
        let r = setup(TlbMode::Shadow);
        let empty = Fib::default();
        let fib = Fib {
            pba: PBA,
            pal: PBA + (1 << 32) - 1,
            iota: r.z.ioat_of(1).expect("ioat").0,
            ..empty
        };
        c.bench_function(&format!("zpci/rpcit_{pages}_pages"), |b| {
            b.iter_batched(
                || {
                    r.z.mpcifc_with_fib(&r.m, r.fh, 0, MpcifcOp::ReregIoat, &fib)
                        .expect("rereg");
                },
                |()| black_box(r.z.rpcit(&r.m, r.fh, PBA, pages * 0x1000)),
                BatchSize::PerIteration,
            )
        });
    }
}

criterion_group! {
    name = zpci;
    config = bench_config();
    targets = benches
}
criterion_main!(zpci);
