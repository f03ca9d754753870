//! A real stall: one thread is held at a ruled point while another passes an un-ruled point
//! at once; a composed `Fanout` sees both.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_devapi::{Fanout, Hooks, NoHooks, PointCtx};
use sluice_inject::{Firing, Injector, Plan};

#[test]
fn stalled_point_holds_only_its_thread() {
    let reg = sluice_host::points::with_run_devices(sluice_host::points::all_models(), 1, false);
    let plan = reg
        .validate(&Plan::parse_cli("virtio-iommu.req.attach:delay=2s,nth=1").unwrap())
        .unwrap();
    let inj = Arc::new(Injector::new(plan));
    let firings = Arc::new(Mutex::new(Vec::<Firing>::new()));
    let f = firings.clone();
    inj.set_sink(Arc::new(move |x: &Firing| {
        f.lock().unwrap().push(x.clone())
    }));
    let hooks: Arc<dyn Hooks> = Arc::new(Fanout(vec![inj.clone(), Arc::new(NoHooks)]));
    let h1 = hooks.clone();
    let stalled = std::thread::spawn(move || {
        let t = Instant::now();
        h1.point(&PointCtx::new("virtio-iommu.req.attach", 0));
        t.elapsed()
    });
    // Order, not short wall times (the host may be loaded): the firing is published before the
    // stall begins, so once it is seen the other thread is held; un-ruled points must get through
    // while it still is. The 2 s stall is ~10^5 times the cost of the loop below.
    let deadline = Instant::now() + Duration::from_secs(30);
    while firings.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the rule never fired");
        std::thread::sleep(Duration::from_millis(1));
    }
    for _ in 0..1000 {
        hooks.point(&PointCtx::new("virtio.blk0.notify", 0));
        hooks.point(&PointCtx::new("virtio-iommu.req.map", 0));
    }
    assert!(
        !stalled.is_finished(),
        "un-ruled points waited for the stalled thread"
    );
    let held = stalled.join().unwrap();
    // A sleep never returns early, so this lower bound cannot flake.
    assert!(held >= Duration::from_secs(2), "{held:?}");
    {
        let f = firings.lock().unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].rule, f[0].occurrence), (0, 1));
        assert_eq!(&*f[0].rule_text, "virtio-iommu.req.attach:delay=2s,nth=1");
    }
    // nth=1 fired once: the second ATTACH passes without a firing.
    hooks.point(&PointCtx::new("virtio-iommu.req.attach", 0));
    assert_eq!(firings.lock().unwrap().len(), 1);
}
