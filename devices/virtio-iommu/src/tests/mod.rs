//! Unit tests of the device: requests and statuses, translation through the seam, a live ring
//! unmapped under a device, the worker, a property test against a reference model, and the
//! fuzz body on pseudo-random inputs.

use std::sync::Arc;

use sluice_devapi::{Hooks, NoHooks, RecordedEvent, RecordingHooks};
use sluice_virtio_pci::VIRTIO_F_VERSION_1;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::config::ViommuConfig;
use crate::device::{OFFERED_FEATURES, Reply, VirtioIommu};
use crate::request::{Request, encode, writable_len};
use crate::spec::Status;

mod defer;
mod fuzz;
mod model_prop;
mod provenance;
mod requests;
mod ring;
mod translation;
mod worker;

/// An endpoint behind the IOMMU.
pub(crate) const EP: u32 = 0x10;
/// Another one.
pub(crate) const EP2: u32 = 0x18;
/// Not behind the IOMMU.
pub(crate) const STRANGER: u32 = 0x99;
/// Guest RAM size in tests.
pub(crate) const RAM: usize = 16 << 20;
/// A configured reserved region.
pub(crate) const RESV: (u64, u64) = (0x1_0000_0000, 0x1_0000_ffff);

pub(crate) fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
}

pub(crate) fn cfg() -> ViommuConfig {
    ViommuConfig {
        endpoints: vec![EP, EP2],
        reserved: vec![RESV],
        ..ViommuConfig::default()
    }
}

pub(crate) fn all_features() -> u64 {
    OFFERED_FEATURES | (1 << VIRTIO_F_VERSION_1)
}

pub(crate) fn device_with(cfg: ViommuConfig, hooks: Arc<dyn Hooks>) -> VirtioIommu {
    let d = VirtioIommu::new("viommu0", cfg, hooks);
    d.set_acked_features(all_features());
    d
}

pub(crate) fn device() -> VirtioIommu {
    device_with(cfg(), Arc::new(NoHooks))
}

/// Sends a well-formed request; returns the status byte (None: returned unwritten).
pub(crate) fn send(d: &VirtioIommu, req: Request) -> Option<u8> {
    let mem = ram();
    let w = writable_len(req.kind(), d.config().probe_size);
    d.handle_request(&encode(&req), w, Some(&mem)).status()
}

pub(crate) fn ok(d: &VirtioIommu, req: Request) {
    assert_eq!(send(d, req), Some(Status::Ok.code()), "{req:?}");
}

pub(crate) fn st(s: Status) -> Option<u8> {
    Some(s.code())
}

pub(crate) fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach {
        domain,
        endpoint,
        flags: 0,
    }
}

pub(crate) fn map(domain: u32, iova: u64, len: u64, phys: u64, flags: u32) -> Request {
    Request::Map {
        domain,
        virt_start: iova,
        virt_end: iova + len - 1,
        phys_start: phys,
        flags,
    }
}

pub(crate) fn unmap(domain: u32, iova: u64, len: u64) -> Request {
    Request::Unmap {
        domain,
        virt_start: iova,
        virt_end: iova + len - 1,
    }
}

/// The points, mappings and invalidations `rec` saw, one line each in arrival order.
pub(crate) fn arrival_order(rec: &RecordingHooks) -> Vec<String> {
    rec.events()
        .into_iter()
        .filter_map(|e| match e {
            RecordedEvent::Point(p) => Some(p.point),
            RecordedEvent::Mapped(m) => Some(format!(
                "mapped {} {} {:#x}-{:#x}",
                m.source, m.context, m.first, m.last
            )),
            RecordedEvent::Invalidated(i) => Some(format!(
                "{} {} {:?} {:#x}-{:#x}",
                i.kind, i.source, i.contexts, i.first, i.last
            )),
            _ => None,
        })
        .collect()
}

/// virtio-iommu invalidations take effect with their request: they carry no cache generation
/// and no completion number.
pub(crate) fn assert_invalidations_carry_no_generation(rec: &RecordingHooks) {
    for i in rec.invalidations() {
        assert_eq!((i.generation, i.completion), (None, 0), "{i:?}");
    }
}

#[test]
fn reply_helpers() {
    assert_eq!(Reply::Unwritten.status(), None);
    assert_eq!(Reply::Write(vec![0, 0, 0, 0, 5, 0, 0, 0]).status(), Some(5));
}
