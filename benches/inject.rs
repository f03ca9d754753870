//! criterion benches of race injection's fast path: what a model pays at a named point that
//! has no rule. Compared: `NoHooks` (the floor), an injector with no rules, an injector with
//! rules on *other* points (the mask bucket of the point is empty: one relaxed load), the same
//! through a `Fanout` with a second member, and a ruled point whose rule is spent (`nth=1`
//! after its firing: the slow path, for scale).
//!
//! Run: `cargo bench -p sluice-benches --bench inject -- --warm-up-time 1 --measurement-time 2`
use criterion::{criterion_group, criterion_main};
use sluice_benches::{Bench, bench_config};
use sluice_devapi::{Fanout, Hooks, NoHooks, PointCtx};
use sluice_host::points::{self, VirtioKind};
use sluice_inject::{Injector, Plan};
use std::hint::black_box;
use std::sync::Arc;

fn injector(plan: &str) -> Arc<Injector> {
    let mut r = points::all_models();
    points::add_virtio_device(&mut r, "blk0", VirtioKind::Block);
    points::add_virtio_device(&mut r, "viommu0", VirtioKind::Iommu);
    Arc::new(Injector::new(
        r.validate(&Plan::parse_cli(plan).expect("plan"))
            .expect("valid"),
    ))
}

fn bench(c: &mut Bench) {
    let notify = PointCtx::new("virtio.blk0.notify", 0);
    let mut g = c.benchmark_group("point_without_rule");
    let none: Arc<dyn Hooks> = Arc::new(NoHooks);
    g.bench_function("NoHooks", |b| b.iter(|| none.point(black_box(&notify))));
    let empty: Arc<dyn Hooks> = Arc::new(Injector::empty());
    g.bench_function("injector_no_rules", |b| {
        b.iter(|| empty.point(black_box(&notify)))
    });
    let other = injector(
        "virtio-iommu.req.attach:delay=300ms,nth=1,mode=defer;\
         smmuv3.cmd.CMD_SYNC:delay=1ms,count=1;zpci.rpcit:delay=1ms,count=1",
    );
    let other_dyn: Arc<dyn Hooks> = other.clone();
    assert_eq!(other.defer(&notify), None);
    g.bench_function("injector_rules_elsewhere", |b| {
        b.iter(|| other_dyn.point(black_box(&notify)))
    });
    g.bench_function("injector_rules_elsewhere_defer", |b| {
        b.iter(|| other_dyn.defer(black_box(&notify)))
    });
    let fan: Arc<dyn Hooks> = Arc::new(Fanout(vec![other.clone(), Arc::new(NoHooks)]));
    g.bench_function("fanout_injector_nohooks", |b| {
        b.iter(|| fan.point(black_box(&notify)))
    });
    let spent = injector("virtio.blk0.notify:delay=1us,nth=1");
    spent.point(&notify);
    let spent_dyn: Arc<dyn Hooks> = spent;
    g.bench_function("ruled_point_rule_spent", |b| {
        b.iter(|| spent_dyn.point(black_box(&notify)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = bench_config();
    targets = bench
}
criterion_main!(benches);
