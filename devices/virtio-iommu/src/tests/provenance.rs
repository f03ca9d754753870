//! What the device tells the escape oracle about mappings: a MAP is announced before it is
//! visible and only when it will succeed, an UNMAP once its caches are invalidated and before
//! its status; the fault-injection switch skips only the cache invalidation.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, IommuMemory};

use super::*;
use crate::model::FaultInjection;

#[test]
fn map_and_unmap_are_announced_in_order_and_failures_are_not() {
    let rec = Arc::new(RecordingHooks::default());
    let d = device_with(cfg(), rec.clone());
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0x10_0000, 0x2000, 0x20_0000, 3));
    // Overlaps the mapping: refused (INVAL), so never announced.
    assert_eq!(
        send(&d, map(1, 0x10_1000, 0x1000, 0x30_0000, 3)),
        st(Status::Inval)
    );
    ok(&d, unmap(1, 0x10_0000, 0x2000));
    let order = arrival_order(&rec);
    let ctx = "ContextSel { value: 1, mask: 18446744073709551615 }";
    assert_eq!(
        order,
        vec![
            "virtio-iommu.req.attach".to_string(),
            "mapped viommu0 1 0x100000-0x101fff".to_string(),
            "virtio-iommu.req.map".to_string(),
            "virtio-iommu.req.map".to_string(),
            format!("UNMAP viommu0 {ctx} 0x100000-0x101fff"),
            "virtio-iommu.req.unmap".to_string(),
        ]
    );
    assert_invalidations_carry_no_generation(&rec);
}

#[test]
fn skipping_the_unmap_invalidation_leaves_only_the_cache_behind() {
    for broken in [false, true] {
        let d = device();
        d.set_fault_injection(FaultInjection {
            skip_unmap_invalidation: broken,
        });
        ok(&d, attach(1, EP));
        ok(&d, map(1, 0x10_0000, 0x1000, 0x20_0000, 3));
        let mem = IommuMemory::new(ram(), d.endpoint_iommu(EP).unwrap(), true, ());
        let mut b = [0u8; 8];
        assert!(mem.read_slice(&mut b, GuestAddress(0x10_0000)).is_ok());
        ok(&d, unmap(1, 0x10_0000, 0x1000));
        // The mapping is gone from the model either way; only the cached copy differs.
        assert_eq!(
            send(&d, unmap(1, 0x10_0000, 0x1000)),
            st(Status::Ok),
            "unmapping a hole is fine"
        );
        let hit = mem.read_slice(&mut b, GuestAddress(0x10_0000)).is_ok();
        assert_eq!(hit, broken, "broken={broken}");
        assert!(
            mem.read_slice(&mut b, GuestAddress(0x10_1000)).is_err(),
            "never mapped"
        );
    }
}
