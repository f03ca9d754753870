//! DMA through the seam: bypass, translation, exact invalidation, faults and fault events.

use std::sync::Arc;

use sluice_devapi::{Bdf, DmaOutcome, Endpoint, EndpointIommu};
use sluice_virtio_pci::VirtioDevice;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, IommuMemory};

use super::*;
use crate::spec::{
    ATTACH_F_BYPASS, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING,
    MAP_F_READ, MAP_F_WRITE,
};

const RW: u32 = MAP_F_READ | MAP_F_WRITE;
type Mem = IommuMemory<GuestMemoryMmap, EndpointIommu>;

fn dma(d: &VirtioIommu, ep: u32) -> Mem {
    IommuMemory::new(ram(), d.endpoint_iommu(ep).unwrap(), true, ())
}

fn set_bypass(d: &mut VirtioIommu, v: u8) {
    d.write_config(36, &[v]);
}

#[test]
fn endpoint_iommu_only_for_configured_endpoints() {
    let d = device();
    assert!(d.endpoint_iommu(STRANGER).is_none());
    assert_eq!(
        d.endpoint_iommu(EP).unwrap().endpoint(),
        Endpoint::Pci(Bdf(EP as u16))
    );
    assert_eq!(d.endpoint_ids(), vec![EP, EP2]);
}

#[test]
fn boot_bypass_then_cleared_by_the_driver() {
    let rec = Arc::new(RecordingHooks::default());
    let mut d = device_with(cfg(), rec.clone());
    let m = dma(&d, EP);
    m.write_obj(7u32, GuestAddress(0x1000)).unwrap();
    assert_eq!(rec.dmas().last().unwrap().outcome, DmaOutcome::Bypassed);
    set_bypass(&mut d, 0);
    assert!(!d.bypass());
    assert!(m.read_obj::<u32>(GuestAddress(0x1000)).is_err());
    assert_eq!(
        rec.dmas().last().unwrap().outcome,
        DmaOutcome::Faulted {
            reason: u32::from(FAULT_R_DOMAIN)
        }
    );
    assert_eq!(d.pending_faults(), 1);
    // Values other than 0/1 are ignored; 1 restores bypass.
    set_bypass(&mut d, 2);
    assert!(!d.bypass());
    set_bypass(&mut d, 1);
    assert_eq!(m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 7);
    let mut c = [0u8; 1];
    d.read_config(36, &mut c);
    assert_eq!(c[0], 1);
    assert!(
        rec.point_values()
            .iter()
            .any(|(p, v)| p == crate::POINT_CONFIG_WRITE && *v == (36 << 8))
    );
    // Bypass is kept across device reset.
    set_bypass(&mut d, 0);
    d.reset();
    assert!(!d.bypass());
    assert_invalidations_carry_no_generation(&rec);
}

#[test]
fn boot_bypass_off_blocks_unattached_endpoints() {
    let d = device_with(
        ViommuConfig {
            boot_bypass: false,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    assert!(dma(&d, EP).read_obj::<u8>(GuestAddress(0)).is_err());
}

#[test]
fn translated_access_and_exact_unmap_invalidation() {
    let rec = Arc::new(RecordingHooks::default());
    let d = device_with(cfg(), rec.clone());
    ok(&d, attach(3, EP));
    ok(&d, map(3, 0x8000_0000, 0x1000, 0x20_0000, RW));
    ok(&d, map(3, 0x8000_1000, 0x1000, 0x30_0000, RW));
    let m = dma(&d, EP);
    m.write_obj(0x1122_3344u32, GuestAddress(0x8000_0ffe))
        .unwrap();
    // Spans two mappings whose GPAs are not contiguous.
    let phys = ram();
    let _ = phys;
    let back = m.get_backend();
    assert_eq!(
        back.read_obj::<u16>(GuestAddress(0x20_0ffe)).unwrap(),
        0x3344
    );
    assert_eq!(
        back.read_obj::<u16>(GuestAddress(0x30_0000)).unwrap(),
        0x1122
    );
    assert_eq!(
        rec.dmas().last().unwrap().outcome,
        DmaOutcome::Translated {
            gpa: 0x20_0ffe,
            domain: 3
        }
    );
    let ep = d.endpoint_iommu(EP).unwrap();
    let before = ep.stats();
    ok(&d, unmap(3, 0x8000_0000, 0x1000));
    assert!(m.read_obj::<u8>(GuestAddress(0x8000_0000)).is_err());
    // The other mapping is still cached: a hit, no miss.
    m.read_obj::<u8>(GuestAddress(0x8000_1000)).unwrap();
    let after = ep.stats();
    assert_eq!(after.misses, before.misses);
    assert_eq!(after.hits, before.hits + 1);
    assert_eq!(after.faults, before.faults + 1);
    assert_invalidations_carry_no_generation(&rec);
}

#[test]
fn permissions_are_enforced() {
    let d = device();
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0x4000, 0x1000, 0x4000, MAP_F_READ));
    ok(&d, map(1, 0x5000, 0x1000, 0x5000, MAP_F_WRITE));
    let m = dma(&d, EP);
    m.read_obj::<u32>(GuestAddress(0x4000)).unwrap();
    assert!(m.write_obj(1u32, GuestAddress(0x4000)).is_err());
    m.write_obj(1u32, GuestAddress(0x5000)).unwrap();
    assert!(m.read_obj::<u32>(GuestAddress(0x5000)).is_err());
    assert_eq!(d.pending_faults(), 2);
}

#[test]
fn detach_attach_and_bypass_domains_invalidate() {
    let mut d = device();
    set_bypass(&mut d, 0);
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0, 0x1000, 0x9000, RW));
    let m = dma(&d, EP);
    m.write_obj(5u8, GuestAddress(0)).unwrap();
    ok(
        &d,
        Request::Detach {
            domain: 1,
            endpoint: EP,
        },
    );
    assert!(m.read_obj::<u8>(GuestAddress(0)).is_err());
    // A bypass domain lets everything through untranslated.
    ok(
        &d,
        Request::Attach {
            domain: 2,
            endpoint: EP,
            flags: ATTACH_F_BYPASS,
        },
    );
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 5);
    // Moving to a translated domain drops the identity entries.
    ok(&d, attach(4, EP));
    assert!(m.read_obj::<u8>(GuestAddress(0x9000)).is_err());
    ok(&d, map(4, 0x9000, 0x1000, 0, RW));
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0);
    // Reset detaches everything.
    d.reset();
    assert!(m.read_obj::<u8>(GuestAddress(0x9000)).is_err());
    assert_eq!(d.attached_domain(EP), None);
}

#[test]
fn endpoints_in_one_domain_share_mappings_but_not_caches() {
    let d = device();
    ok(&d, attach(1, EP));
    ok(&d, attach(1, EP2));
    ok(&d, map(1, 0x1000, 0x1000, 0x1000, RW));
    let (a, b) = (dma(&d, EP), dma(&d, EP2));
    a.read_obj::<u8>(GuestAddress(0x1000)).unwrap();
    b.read_obj::<u8>(GuestAddress(0x1000)).unwrap();
    ok(&d, unmap(1, 0x1000, 0x1000));
    assert!(a.read_obj::<u8>(GuestAddress(0x1000)).is_err());
    assert!(b.read_obj::<u8>(GuestAddress(0x1000)).is_err());
}

fn event_queue(m: &GuestMemoryMmap, bufs: &[(u64, u32)]) -> Queue {
    let vq = MockSplitQueue::create(m, GuestAddress(0x8_0000), 16);
    let descs: Vec<RawDescriptor> = bufs
        .iter()
        .map(|&(a, l)| RawDescriptor::from(SplitDescriptor::new(a, l, 2, 0)))
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    vq.create_queue().unwrap()
}

#[test]
fn faults_are_written_to_the_event_queue() {
    let mut d = device();
    set_bypass(&mut d, 0);
    let phys = ram();
    let mut q = event_queue(&phys, &[(0x9_0000, 8), (0x9_1000, 24)]);
    // Nothing pending: no buffer consumed.
    assert!(!d.process_event_queue(&mut q, &phys).unwrap());
    let m = IommuMemory::new(phys.clone(), d.endpoint_iommu(EP2).unwrap(), true, ());
    assert!(m.write_obj(1u64, GuestAddress(0x1234_5000)).is_err());
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0, 0x1000, 0, MAP_F_READ));
    let m1 = IommuMemory::new(phys.clone(), d.endpoint_iommu(EP).unwrap(), true, ());
    assert!(m1.read_obj::<u64>(GuestAddress(0x2000)).is_err());
    assert_eq!(d.pending_faults(), 2);
    assert!(d.process_event_queue(&mut q, &phys).unwrap());
    // The 8-byte buffer was too small (returned empty); the 24-byte one got the first fault.
    assert_eq!(d.pending_faults(), 1);
    let rec: [u8; 24] = phys.read_obj(GuestAddress(0x9_1000)).unwrap();
    assert_eq!(rec[0], FAULT_R_DOMAIN);
    assert_eq!(
        u32::from_le_bytes(rec[4..8].try_into().unwrap()),
        FAULT_F_WRITE | FAULT_F_ADDRESS
    );
    assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), EP2);
    assert_eq!(
        u64::from_le_bytes(rec[16..24].try_into().unwrap()),
        0x1234_5000
    );
    let used_len: u32 = phys
        .read_obj(GuestAddress(q.used_ring() + 4 + 8 + 4))
        .unwrap();
    assert_eq!(used_len, 24);
    let c: std::collections::BTreeMap<_, _> = d.counters().into_iter().collect();
    assert_eq!(c["events_written"], 1);
    assert_eq!(c["event_buffers_bad"], 1);
    assert_eq!(c["faults_raised"], 2);
    let _ = (FAULT_R_MAPPING, FAULT_F_READ);
}

#[test]
fn fault_queue_overflow_drops_and_counts() {
    let mut d = device_with(
        ViommuConfig {
            fault_queue_len: 2,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    set_bypass(&mut d, 0);
    let m = dma(&d, EP);
    for i in 0..5u64 {
        assert!(m.read_obj::<u8>(GuestAddress(i << 12)).is_err());
    }
    let c: std::collections::BTreeMap<_, _> = d.counters().into_iter().collect();
    assert_eq!(c["events_dropped"], 3);
    assert_eq!(c["translations_fault"], 5);
    assert_eq!(d.pending_faults(), 2);
}
