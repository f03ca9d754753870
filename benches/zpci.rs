//! criterion benches of the zPCI model's hot paths: translate hit (shadow IOTLB), walk miss
//! (always-walk mode), and RPCIT of 1, 512 and 65 536 pages.
//!
//! Run: `cargo bench -p sluice-benches --bench zpci -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, criterion_group, criterion_main};
use sluice_benches::{Bench, bench_config};
use sluice_devapi::NoHooks;
use sluice_zpci::clp::SetPciFnOp;
use sluice_zpci::guest::GuestTables;
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

    let w = setup(TlbMode::AlwaysWalk);
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
