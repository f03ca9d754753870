//! A virtqueue whose rings live at IOVAs mapped through the IOMMU: unmapping the ring's page
//! under a live queue makes the device's very next ring access fault. Nothing caches ring
//! addresses (the queue keeps IOVAs; every access is translated inside the memory object).

use sluice_devapi::EndpointIommu;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, IommuMemory};

use super::*;
use crate::spec::{MAP_F_READ, MAP_F_WRITE};

const RW: u32 = MAP_F_READ | MAP_F_WRITE;
/// Where the rings are in guest-physical memory.
const RING_GPA: u64 = 0x10_0000;
/// Where the device sees them.
const RING_IOVA: u64 = 0x4000_0000;
const BUF_GPA: u64 = 0x20_0000;
const BUF_IOVA: u64 = 0x5000_0000;
const QSIZE: u16 = 16;

fn iova_of(gpa: GuestAddress) -> u64 {
    gpa.0 - RING_GPA + RING_IOVA
}

#[test]
fn unmapping_a_live_ring_faults_the_next_access() {
    let d = device();
    ok(&d, attach(1, EP));
    ok(&d, map(1, RING_IOVA, 0x1000, RING_GPA, RW));
    ok(&d, map(1, BUF_IOVA, 0x1000, BUF_GPA, RW));

    // The driver side writes the rings in guest-physical memory; descriptors carry IOVAs.
    let phys = ram();
    let vq = MockSplitQueue::create(&phys, GuestAddress(RING_GPA), QSIZE);
    assert!(vq.end().0 <= RING_GPA + 0x1000);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(BUF_IOVA, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(BUF_IOVA + 0x100, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(BUF_IOVA + 0x200, 16, 0, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    phys.write_obj(0xabcd_u16, GuestAddress(BUF_GPA)).unwrap();

    // The device side: a queue programmed with IOVAs, accessed through the endpoint's memory.
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    let set = |lo_hi: u64| (Some(lo_hi as u32), Some((lo_hi >> 32) as u32));
    let (l, h) = set(iova_of(vq.desc_table_addr()));
    q.set_desc_table_address(l, h);
    let (l, h) = set(iova_of(vq.avail_addr()));
    q.set_avail_ring_address(l, h);
    let (l, h) = set(iova_of(vq.used_addr()));
    q.set_used_ring_address(l, h);
    q.set_ready(true);
    let mem: IommuMemory<GuestMemoryMmap, EndpointIommu> =
        IommuMemory::new(phys.clone(), d.endpoint_iommu(EP).unwrap(), true, ());
    assert!(q.is_valid(&mem));

    let chain = q.pop_descriptor_chain(&mem).expect("first chain");
    let head = chain.head_index();
    let desc = chain.clone().next().unwrap();
    assert_eq!(mem.read_obj::<u16>(desc.addr()).unwrap(), 0xabcd);
    q.add_used(&mem, head, 0).unwrap();

    // The driver unmaps the ring page while the queue is live.
    ok(&d, unmap(1, RING_IOVA, 0x1000));
    assert!(
        q.pop_descriptor_chain(&mem).is_none(),
        "avail ring read must fault"
    );
    assert!(
        q.add_used(&mem, 1, 0).is_err(),
        "used ring write must fault"
    );
    assert!(q.iter(&mem).is_err());
    let faults = d.endpoint_iommu(EP).unwrap().stats().faults;
    assert!(faults >= 3, "{faults}");

    // Re-mapping elsewhere in GPA would redirect it; mapping it back restores the queue,
    // proving nothing was cached at enable time.
    ok(&d, map(1, RING_IOVA, 0x1000, RING_GPA, RW));
    let chain = q
        .pop_descriptor_chain(&mem)
        .expect("second chain after re-map");
    assert_eq!(chain.head_index(), 1);
}

#[test]
fn unmapping_a_buffer_faults_the_data_access() {
    let d = device();
    ok(&d, attach(1, EP));
    ok(&d, map(1, BUF_IOVA, 0x2000, BUF_GPA, RW));
    let phys = ram();
    let mem: IommuMemory<GuestMemoryMmap, EndpointIommu> =
        IommuMemory::new(phys, d.endpoint_iommu(EP).unwrap(), true, ());
    let mut buf = [0u8; 0x1800];
    mem.read_slice(&mut buf, GuestAddress(BUF_IOVA + 0x400))
        .unwrap();
    ok(&d, unmap(1, BUF_IOVA, 0x2000));
    assert!(
        mem.read_slice(&mut buf, GuestAddress(BUF_IOVA + 0x400))
            .is_err()
    );
}
