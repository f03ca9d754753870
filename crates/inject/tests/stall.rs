//! A real stall: one thread is held at a ruled point while another passes an un-ruled point
//! at once; a composed `Fanout` sees both.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use sluice_devapi::{Fanout, Hooks, NoHooks, PointCtx};
use sluice_inject::{Firing, Injector, Plan, PointRegistry, VirtioKind};

#[test]
fn stalled_point_holds_only_its_thread() {
    let mut reg = PointRegistry::sluice_models();
    reg.add_virtio_device("blk0", VirtioKind::Block);
    let plan = reg
        .validate(&Plan::parse_cli("virtio-iommu.req.attach:delay=200ms,nth=1").unwrap())
        .unwrap();
    let inj = Arc::new(Injector::new(plan));
    let firings = Arc::new(Mutex::new(Vec::<Firing>::new()));
    let f = firings.clone();
    inj.set_sink(Arc::new(move |x: &Firing| {
        f.lock().unwrap().push(x.clone())
    }));
    let hooks: Arc<dyn Hooks> = Arc::new(Fanout(vec![inj.clone(), Arc::new(NoHooks)]));
    let start = Arc::new(Barrier::new(2));
    let (h1, s1) = (hooks.clone(), start.clone());
    let stalled = std::thread::spawn(move || {
        s1.wait();
        let t = Instant::now();
        h1.point(&PointCtx::new("virtio-iommu.req.attach", 0));
        t.elapsed()
    });
    start.wait();
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    for _ in 0..1000 {
        hooks.point(&PointCtx::new("virtio.blk0.notify", 0));
        hooks.point(&PointCtx::new("virtio-iommu.req.map", 0));
    }
    let free = t.elapsed();
    let held = stalled.join().unwrap();
    assert!(
        free < Duration::from_millis(50),
        "un-ruled points passed in {free:?}"
    );
    assert!(held >= Duration::from_millis(200), "{held:?}");
    assert!(held < Duration::from_secs(2), "{held:?}");
    let f = firings.lock().unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].rule, f[0].occurrence), (0, 1));
    assert_eq!(
        &*f[0].rule_text,
        "virtio-iommu.req.attach:delay=200ms,nth=1"
    );
    // nth=1 fired once: the second ATTACH passes.
    let t = Instant::now();
    hooks.point(&PointCtx::new("virtio-iommu.req.attach", 0));
    assert!(t.elapsed() < Duration::from_millis(50));
}
