//! Every request type and every status, plus malformed buffers.

use std::sync::Arc;

use sluice_devapi::{NoHooks, RecordedEvent, StateChange, ViommuRequest, ViommuState};

use super::*;
use crate::spec::{
    ATTACH_F_BYPASS, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE, MSI_WINDOW, PROBE_T_RESV_MEM,
    RESV_MEM_T_MSI, RESV_MEM_T_RESERVED, T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP, features,
};

const RW: u32 = MAP_F_READ | MAP_F_WRITE;
const PAGE: u64 = 0x1000;

// ---- ATTACH ----

#[test]
fn attach_ok_and_states() {
    let rec = Arc::new(RecordingHooks::default());
    let d = device_with(cfg(), rec.clone());
    ok(&d, attach(1, EP));
    assert_eq!(d.attached_domain(EP), Some(1));
    assert_eq!(
        rec.points()
            .last()
            .map(|p| (p.point.clone(), p.domain, p.value)),
        Some((crate::POINT_ATTACH.to_string(), Some(1), 0))
    );
    assert!(rec.state_values().contains(&("attach".to_string(), 1)));
    assert_invalidations_carry_no_generation(&rec);
}

#[test]
fn attach_and_detach_announce_their_start_before_the_change() {
    let rec = Arc::new(RecordingHooks::default());
    let d = device_with(cfg(), rec.clone());
    ok(&d, attach(1, EP));
    ok(
        &d,
        Request::Attach {
            domain: 2,
            endpoint: EP,
            flags: ATTACH_F_BYPASS,
        },
    );
    ok(
        &d,
        Request::Detach {
            domain: 2,
            endpoint: EP,
        },
    );
    // A refused request announces no change, only its completion.
    assert_eq!(
        send(
            &d,
            Request::Detach {
                domain: 2,
                endpoint: EP
            }
        ),
        st(Status::Inval)
    );
    let states = rec.state_values();
    assert_eq!(
        states,
        vec![
            ("attach-begin".to_string(), 1),
            ("attach".to_string(), 1),
            ("attach-done".to_string(), 0),
            ("attach-begin".to_string(), 2 | (1 << 32)),
            ("domain-free".to_string(), 1),
            ("attach".to_string(), 2),
            ("attach-done".to_string(), 0),
            ("detach-begin".to_string(), 2),
            ("domain-free".to_string(), 2),
            ("detach".to_string(), 2),
            ("detach-done".to_string(), 0),
            ("detach-done".to_string(), u64::from(Status::Inval.code())),
        ]
    );
    // The completion comes after the request's point (a stall there keeps it in progress).
    let done = StateChange::Viommu(ViommuState::RequestDone {
        request: ViommuRequest::Detach,
        domain: 2,
        status: 0,
    });
    let events = rec.events();
    let point = events
        .iter()
        .position(|e| matches!(e, RecordedEvent::Point(p) if p.point == crate::POINT_DETACH));
    let state = events
        .iter()
        .position(|e| matches!(e, RecordedEvent::State(s) if s.change == done));
    assert!(
        point.is_some() && state > point,
        "DETACH's completion follows its point"
    );
    assert_invalidations_carry_no_generation(&rec);
}

#[test]
fn attach_unknown_flag_is_inval() {
    let d = device();
    let r = Request::Attach {
        domain: 1,
        endpoint: EP,
        flags: 2,
    };
    assert_eq!(send(&d, r), st(Status::Inval));
    assert_eq!(d.attached_domain(EP), None);
}

#[test]
fn attach_nonzero_reserved_is_inval() {
    let d = device();
    let mut b = encode(&attach(1, EP));
    b[19] = 1;
    assert_eq!(d.handle_request(&b, 4, None).status(), st(Status::Inval));
    assert_eq!(d.attached_domain(EP), None);
}

#[test]
fn attach_bypass_needs_bypass_config() {
    let d = device();
    d.set_acked_features(all_features() & !(1 << features::BYPASS_CONFIG));
    let r = Request::Attach {
        domain: 1,
        endpoint: EP,
        flags: ATTACH_F_BYPASS,
    };
    assert_eq!(send(&d, r), st(Status::Inval));
    d.set_acked_features(all_features());
    ok(&d, r);
}

#[test]
fn attach_unknown_endpoint_is_noent() {
    assert_eq!(send(&device(), attach(1, STRANGER)), st(Status::NoEnt));
}

#[test]
fn attach_domain_out_of_range_is_range() {
    let d = device_with(
        ViommuConfig {
            domain_range: (1, 100),
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    assert_eq!(send(&d, attach(0, EP)), st(Status::Range));
    assert_eq!(send(&d, attach(101, EP)), st(Status::Range));
    ok(&d, attach(100, EP));
}

#[test]
fn attach_bypass_mismatch_is_inval() {
    let d = device();
    ok(&d, attach(1, EP));
    let r = Request::Attach {
        domain: 1,
        endpoint: EP2,
        flags: ATTACH_F_BYPASS,
    };
    assert_eq!(send(&d, r), st(Status::Inval));
    ok(
        &d,
        Request::Attach {
            domain: 2,
            endpoint: EP2,
            flags: ATTACH_F_BYPASS,
        },
    );
    assert_eq!(send(&d, attach(2, EP)), st(Status::Inval));
}

#[test]
fn attach_beyond_max_domains_is_nomem() {
    let d = device_with(
        ViommuConfig {
            max_domains: 1,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    ok(&d, attach(1, EP));
    assert_eq!(send(&d, attach(2, EP2)), st(Status::NoMem));
    // Moving the only endpoint frees its domain, so this fits.
    ok(&d, attach(2, EP));
    ok(&d, attach(2, EP2));
}

#[test]
fn attach_moves_endpoint_and_frees_empty_domain() {
    let d = device();
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0x10_0000, PAGE, 0x1000, RW));
    ok(&d, attach(2, EP));
    assert_eq!(d.attached_domain(EP), Some(2));
    // Domain 1 ceased to exist with its mappings.
    assert_eq!(
        send(&d, map(1, 0x10_0000, PAGE, 0x1000, RW)),
        st(Status::NoEnt)
    );
    // Shared domains survive a member leaving.
    ok(&d, attach(2, EP2));
    ok(&d, map(2, 0, PAGE, 0, RW));
    ok(&d, attach(3, EP));
    assert_eq!(send(&d, map(2, 0, PAGE, 0, RW)), st(Status::Inval));
}

#[test]
fn reattach_to_the_same_domain_is_a_no_op_that_keeps_the_mappings() {
    let rec = Arc::new(RecordingHooks::default());
    let d = device_with(cfg(), rec.clone());
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0, PAGE, 0, RW));
    let states_before = rec.state_values().len();
    // The endpoint is the domain's only member: the re-ATTACH must not free it.
    ok(&d, attach(1, EP));
    assert_eq!(d.attached_domain(EP), Some(1));
    assert_eq!(
        send(&d, map(1, 0, PAGE, 0, RW)),
        st(Status::Inval),
        "the old mapping is still there (overlap)"
    );
    ok(&d, unmap(1, 0, PAGE));
    assert!(
        rec.state_values()[states_before..]
            .iter()
            .all(|(w, _)| w != "domain-free"),
        "no domain was freed"
    );
    // Shared domain: same answer, nothing changes for the other member.
    ok(&d, map(1, 0, PAGE, 0, RW));
    ok(&d, attach(1, EP2));
    ok(&d, attach(1, EP2));
    assert_eq!(send(&d, map(1, 0, PAGE, 0, RW)), st(Status::Inval));
    // A re-ATTACH with the other bypass flag is still refused.
    assert_eq!(
        send(
            &d,
            Request::Attach {
                domain: 1,
                endpoint: EP,
                flags: ATTACH_F_BYPASS,
            }
        ),
        st(Status::Inval)
    );
    assert_eq!(d.attached_domain(EP), Some(1));
    assert_invalidations_carry_no_generation(&rec);
}

// ---- DETACH ----

#[test]
fn detach_ok_frees_domain() {
    let rec = Arc::new(RecordingHooks::default());
    let d = device_with(cfg(), rec.clone());
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0, PAGE, 0, RW));
    ok(
        &d,
        Request::Detach {
            domain: 1,
            endpoint: EP,
        },
    );
    assert_eq!(d.attached_domain(EP), None);
    assert_eq!(send(&d, map(1, 0, PAGE, 0, RW)), st(Status::NoEnt));
    assert!(
        rec.state_values()
            .iter()
            .any(|(w, v)| w == "domain-free" && *v == 1)
    );
    assert_invalidations_carry_no_generation(&rec);
}

#[test]
fn detach_errors() {
    let d = device_with(
        ViommuConfig {
            domain_range: (0, 10),
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    let det = |domain, endpoint| Request::Detach { domain, endpoint };
    assert_eq!(send(&d, det(1, STRANGER)), st(Status::NoEnt));
    assert_eq!(send(&d, det(11, EP)), st(Status::Range));
    assert_eq!(send(&d, det(1, EP)), st(Status::Inval));
    ok(&d, attach(1, EP));
    assert_eq!(send(&d, det(2, EP)), st(Status::Inval));
    assert_eq!(send(&d, det(1, EP2)), st(Status::Inval));
    // Reserved bytes of DETACH are ignored.
    let mut b = encode(&det(1, EP));
    b[12] = 0xff;
    assert_eq!(d.handle_request(&b, 4, None).status(), st(Status::Ok));
}

// ---- MAP ----

#[test]
fn map_statuses() {
    let d = device_with(
        ViommuConfig {
            domain_range: (0, 10),
            input_range: (0, 0xffff_ffff_ffff),
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0x10_0000, 4 * PAGE, 0x20_0000, RW));
    let cases = [
        (map(1, 0x20_0000, PAGE, 0, 0x8), Status::Inval),
        (map(11, 0, PAGE, 0, RW), Status::Range),
        (map(2, 0, PAGE, 0, RW), Status::NoEnt),
        (
            Request::Map {
                domain: 1,
                virt_start: 0x2000,
                virt_end: 0xfff,
                phys_start: 0,
                flags: RW,
            },
            Status::Inval,
        ),
        (map(1, 0x1_0000_0000_0000, PAGE, 0, RW), Status::Range),
        (map(1, 0x800, PAGE, 0, RW), Status::Range),
        (map(1, 0x30_0000, PAGE, 0x800, RW), Status::Range),
        (map(1, 0x30_0000, 0x800, 0, RW), Status::Range),
        (map(1, 0x30_0000, PAGE, u64::MAX - 0xfff, RW), Status::Fault),
        (
            map(1, 0x31_0000, 2 * PAGE, u64::MAX - 0xfff, RW),
            Status::Range,
        ),
        (map(1, MSI_WINDOW.0, PAGE, 0, RW), Status::Inval),
        (map(1, MSI_WINDOW.0 - PAGE, 2 * PAGE, 0, RW), Status::Inval),
        (map(1, RESV.1 & !0xfff, PAGE, 0, RW), Status::Inval),
        (map(1, 0x10_3000, 2 * PAGE, 0, RW), Status::Inval),
        (map(1, 0xf_f000, 2 * PAGE, 0, RW), Status::Inval),
        (map(1, 0x20_0000, PAGE, RAM as u64, RW), Status::Fault),
        (
            map(1, 0x20_0000, PAGE, RAM as u64, RW | MAP_F_MMIO),
            Status::Ok,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(send(&d, req), st(want), "{req:?}");
    }
}

#[test]
fn map_phys_check_can_be_disabled() {
    let d = device_with(
        ViommuConfig {
            check_phys_ram: false,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0, PAGE, 1 << 40, MAP_F_READ));
}

#[test]
fn map_unmap_need_map_unmap_feature() {
    let d = device();
    ok(&d, attach(1, EP));
    d.set_acked_features(all_features() & !(1 << features::MAP_UNMAP));
    assert_eq!(send(&d, map(1, 0, PAGE, 0, RW)), st(Status::Unsupp));
    assert_eq!(send(&d, unmap(1, 0, PAGE)), st(Status::Unsupp));
}

#[test]
fn map_mmio_flag_needs_mmio_feature() {
    let d = device();
    ok(&d, attach(1, EP));
    d.set_acked_features(all_features() & !(1 << features::MMIO));
    assert_eq!(
        send(&d, map(1, 0, PAGE, 0, RW | MAP_F_MMIO)),
        st(Status::Inval)
    );
}

#[test]
fn map_on_bypass_domain_is_inval() {
    let d = device();
    ok(
        &d,
        Request::Attach {
            domain: 1,
            endpoint: EP,
            flags: ATTACH_F_BYPASS,
        },
    );
    assert_eq!(send(&d, map(1, 0, PAGE, 0, RW)), st(Status::Inval));
    assert_eq!(send(&d, unmap(1, 0, PAGE)), st(Status::Inval));
}

#[test]
fn map_table_bounds_are_nomem() {
    let d = device_with(
        ViommuConfig {
            max_mappings_per_domain: 2,
            max_mappings_total: 3,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    ok(&d, attach(1, EP));
    ok(&d, attach(2, EP2));
    ok(&d, map(1, 0, PAGE, 0, RW));
    ok(&d, map(1, PAGE, PAGE, 0, RW));
    assert_eq!(send(&d, map(1, 2 * PAGE, PAGE, 0, RW)), st(Status::NoMem));
    ok(&d, map(2, 0, PAGE, 0, RW));
    assert_eq!(send(&d, map(2, PAGE, PAGE, 0, RW)), st(Status::NoMem));
    ok(&d, unmap(1, 0, PAGE));
    ok(&d, map(2, PAGE, PAGE, 0, RW));
}

#[test]
fn map_granule_follows_page_size_mask() {
    let d = device_with(
        ViommuConfig {
            page_size_mask: !0xffff,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    ok(&d, attach(1, EP));
    assert_eq!(send(&d, map(1, 0, PAGE, 0, RW)), st(Status::Range));
    ok(&d, map(1, 0, 0x10000, 0, RW));
    let mut c = [0u8; 8];
    sluice_virtio_pci::VirtioDevice::read_config(&d, 0, &mut c);
    assert_eq!(u64::from_le_bytes(c), !0xffff);
}

#[test]
fn map_whole_top_of_space() {
    let d = device_with(
        ViommuConfig {
            check_phys_ram: false,
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    ok(&d, attach(1, EP));
    let r = Request::Map {
        domain: 1,
        virt_start: u64::MAX - 0xfff,
        virt_end: u64::MAX,
        phys_start: 0,
        flags: RW,
    };
    ok(&d, r);
    ok(
        &d,
        Request::Unmap {
            domain: 1,
            virt_start: 0xffff_0000_0000_0000,
            virt_end: u64::MAX,
        },
    );
}

// ---- UNMAP ----

#[test]
fn unmap_statuses() {
    let d = device_with(
        ViommuConfig {
            domain_range: (0, 10),
            input_range: (0, 0xffff_ffff),
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    ok(&d, attach(1, EP));
    ok(&d, map(1, 0x10_0000, 4 * PAGE, 0, RW));
    ok(&d, map(1, 0x20_0000, PAGE, 0, RW));
    assert_eq!(send(&d, unmap(11, 0, PAGE)), st(Status::Range));
    assert_eq!(send(&d, unmap(2, 0, PAGE)), st(Status::NoEnt));
    assert_eq!(send(&d, unmap(1, 0x1_0000_0000, PAGE)), st(Status::Range));
    assert_eq!(
        send(
            &d,
            Request::Unmap {
                domain: 1,
                virt_start: 5,
                virt_end: 4
            }
        ),
        st(Status::Inval)
    );
    // Split: refused and nothing removed.
    assert_eq!(send(&d, unmap(1, 0x10_0000, PAGE)), st(Status::Range));
    assert_eq!(send(&d, unmap(1, 0x10_3000, 0x20_0000)), st(Status::Range));
    assert_eq!(
        send(&d, map(1, 0x10_0000, PAGE, 0, RW)),
        st(Status::Inval),
        "still mapped"
    );
    // Holes are fine; everything inside goes.
    ok(&d, unmap(1, 0, 0x100_0000));
    ok(&d, map(1, 0x10_0000, PAGE, 0, RW));
    ok(&d, unmap(1, 0x50_0000, PAGE));
    // Reserved bytes nonzero: refused, nothing removed.
    let mut b = encode(&unmap(1, 0x10_0000, PAGE));
    b[24] = 1;
    assert_eq!(d.handle_request(&b, 4, None).status(), st(Status::Inval));
    assert_eq!(send(&d, map(1, 0x10_0000, PAGE, 0, RW)), st(Status::Inval));
}

// ---- PROBE ----

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[test]
fn probe_reports_msi_and_reserved_regions() {
    let d = device();
    let r = Request::Probe { endpoint: EP };
    let Reply::Write(b) = d.handle_request(&encode(&r), 512 + 4, None) else {
        panic!("unwritten");
    };
    assert_eq!(b.len(), 516);
    assert_eq!(&b[512..], &[0, 0, 0, 0]);
    assert_eq!(le16(&b, 0), PROBE_T_RESV_MEM);
    assert_eq!(le16(&b, 2), 20);
    assert_eq!(b[4], RESV_MEM_T_MSI);
    assert_eq!((le64(&b, 8), le64(&b, 16)), MSI_WINDOW);
    assert_eq!(le16(&b, 24), PROBE_T_RESV_MEM);
    assert_eq!(b[28], RESV_MEM_T_RESERVED);
    assert_eq!((le64(&b, 32), le64(&b, 40)), RESV);
    assert!(b[48..512].iter().all(|&x| x == 0));
}

#[test]
fn probe_errors_and_probe_size() {
    let d = device_with(
        ViommuConfig {
            probe_size: 24,
            reserved: vec![],
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    let mut c = [0u8; 4];
    sluice_virtio_pci::VirtioDevice::read_config(&d, 32, &mut c);
    assert_eq!(u32::from_le_bytes(c), 24);
    let r = encode(&Request::Probe { endpoint: EP });
    let reply = d.handle_request(&r, 28, None);
    assert_eq!(reply.status(), st(Status::Ok));
    let Reply::Write(b) = reply else { panic!() };
    assert_eq!(b.len(), 28);
    // The buffer must be exactly probe_size + tail.
    let Reply::Write(b) = d.handle_request(&r, 512 + 4, None) else {
        panic!()
    };
    assert_eq!(b[512], Status::Inval.code());
    assert!(b[..512].iter().all(|&x| x == 0), "no property written");
    assert_eq!(
        send(&d, Request::Probe { endpoint: STRANGER }),
        st(Status::NoEnt)
    );
    // probe_size is raised when the configured regions need more.
    let d = device_with(
        ViommuConfig {
            probe_size: 0,
            reserved: vec![(0, 0xfff), (0x2000, 0x2fff)],
            ..cfg()
        },
        Arc::new(NoHooks),
    );
    assert_eq!(d.config().probe_size, 72);
    // Reserved bytes of PROBE are ignored.
    let mut r = encode(&Request::Probe { endpoint: EP });
    r[40] = 9;
    assert_eq!(d.handle_request(&r, 76, None).status(), st(Status::Ok));
}

// ---- framing ----

#[test]
fn malformed_buffers() {
    let d = device();
    let attach_bytes = encode(&attach(1, EP));
    // Unknown types: returned unwritten.
    for t in [0u8, 6, 0x7f, 0xff] {
        let mut b = attach_bytes.clone();
        b[0] = t;
        assert_eq!(d.handle_request(&b, 4, None), Reply::Unwritten, "type {t}");
    }
    // No head, no tail, absurd writable part: unwritten.
    assert_eq!(
        d.handle_request(&attach_bytes[..3], 4, None),
        Reply::Unwritten
    );
    assert_eq!(d.handle_request(&attach_bytes, 3, None), Reply::Unwritten);
    assert_eq!(
        d.handle_request(&attach_bytes, 1 << 20, None),
        Reply::Unwritten
    );
    // Short or oversized parts of a known type: INVAL, nothing applied.
    for (t, len) in [
        (T_ATTACH, 20),
        (T_DETACH, 20),
        (T_MAP, 36),
        (T_UNMAP, 28),
        (T_PROBE, 72),
    ] {
        let mut b = vec![0u8; len + 1];
        b[0] = t;
        let w = writable_len(t, d.config().probe_size);
        assert_eq!(
            d.handle_request(&b[..len - 1], w, None).status(),
            st(Status::Inval)
        );
        assert_eq!(d.handle_request(&b, w, None).status(), st(Status::Inval));
        assert_eq!(
            d.handle_request(&b[..len], w + 4, None).status(),
            st(Status::Inval)
        );
    }
    assert_eq!(d.attached_domain(EP), None);
    // Head reserved bytes are ignored.
    let mut b = attach_bytes.clone();
    b[1..4].copy_from_slice(&[1, 2, 3]);
    assert_eq!(d.handle_request(&b, 4, None).status(), st(Status::Ok));
    // An oversized writable part gets the status in its last 4 bytes, zeros before.
    let Reply::Write(b) = d.handle_request(&encode(&attach(1, EP)), 12, None) else {
        panic!()
    };
    assert_eq!(
        b,
        vec![0, 0, 0, 0, 0, 0, 0, 0, Status::Inval.code(), 0, 0, 0]
    );
}

#[test]
fn deverr_when_the_model_is_poisoned() {
    let d = Arc::new(device());
    let d2 = d.clone();
    let _ = std::thread::spawn(move || {
        let _g = d2.engine.model.lock().unwrap();
        panic!("poison");
    })
    .join();
    assert_eq!(send(&d, attach(1, EP)), st(Status::DevErr));
}

#[test]
fn counters_count_requests_and_statuses() {
    let d = device();
    ok(&d, attach(1, EP));
    send(&d, attach(1, STRANGER));
    d.handle_request(&[9, 0, 0, 0], 4, None);
    let c: std::collections::BTreeMap<_, _> = sluice_virtio_pci::VirtioDevice::counters(&d)
        .into_iter()
        .collect();
    assert_eq!(c["requests_attach"], 2);
    assert_eq!(c["status_ok"], 1);
    assert_eq!(c["status_noent"], 1);
    assert_eq!(c["requests_unparsed"], 1);
    assert_eq!(c["domains"], 1);
}
