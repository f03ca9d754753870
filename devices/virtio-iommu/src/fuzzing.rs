//! The body of the fuzz target (`fuzz/fuzz_targets/viommu_requests.rs`), kept in the crate so
//! the `#[test]` that runs it on pseudo-random inputs and the fuzzer exercise the same code.
//!
//! The input is a sequence of operations: raw request bytes (any length, any writable size),
//! structured requests built from a few bytes (so most reach `apply`), DMA through the
//! endpoints' seams, configuration writes, event-queue draining and resets. Besides "no panic,
//! no hang" it checks one invariant: an unattached endpoint with bypass off never translates.

use std::sync::Arc;

use sluice_devapi::{EndpointIommu, NoHooks};
use sluice_virtio_pci::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

use crate::config::ViommuConfig;
use crate::device::{OFFERED_FEATURES, VirtioIommu};
use crate::request::{Request, encode, writable_len};

const MAX_OPS: usize = 256;
const MEM_SIZE: usize = 0x10_0000;
const ENDPOINTS: [u32; 3] = [1, 2, 8];

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

fn u64_of(b: [u8; 8]) -> u64 {
    u64::from_le_bytes(b)
}

/// A small address: mostly page-aligned, in the low megabytes, sometimes anything.
fn addr(sel: u8, raw: u64) -> u64 {
    match sel % 4 {
        0 => raw,
        1 => raw & 0xf_ffff,
        _ => raw & 0xf_f000,
    }
}

fn structured(data: &mut &[u8]) -> Option<Request> {
    let [kind, dom, ep, flags, sel] = take::<5>(data)?;
    let a = u64_of(take::<8>(data)?);
    let len = u64::from(u16::from_le_bytes(take::<2>(data)?)) << (sel % 13);
    let domain = u32::from(dom % 8);
    let endpoint = ENDPOINTS
        .get(usize::from(ep % 4))
        .copied()
        .unwrap_or(u32::from(ep));
    let start = addr(sel, a);
    let end = start.wrapping_add(len).wrapping_sub(1);
    Some(match kind % 5 {
        0 => Request::Attach {
            domain,
            endpoint,
            flags: u32::from(flags % 3),
        },
        1 => Request::Detach { domain, endpoint },
        2 => Request::Map {
            domain,
            virt_start: start,
            virt_end: end,
            phys_start: addr(sel >> 2, a.rotate_left(17)),
            flags: u32::from(flags % 9),
        },
        3 => Request::Unmap {
            domain,
            virt_start: start,
            virt_end: end,
        },
        _ => Request::Probe { endpoint },
    })
}

/// Runs one input. Never panics, never hangs (for a correct device).
pub fn run(data: &[u8]) {
    let mut ops = data;
    let Some([f]) = take::<1>(&mut ops) else {
        return;
    };
    let cfg = ViommuConfig {
        endpoints: ENDPOINTS.to_vec(),
        reserved: vec![(0x8_0000, 0x8_ffff)],
        boot_bypass: f & 1 != 0,
        max_domains: 4,
        max_mappings_per_domain: 32,
        max_mappings_total: 48,
        fault_queue_len: 8,
        probe_size: if f & 2 != 0 { 512 } else { 48 },
        ..ViommuConfig::default()
    };
    let mut dev = VirtioIommu::new("fuzz", cfg, Arc::new(NoHooks));
    // Mostly everything negotiated; sometimes a random subset.
    let acked = if f & 4 != 0 {
        OFFERED_FEATURES & u64::from(f >> 1)
    } else {
        OFFERED_FEATURES
    };
    dev.set_acked_features(acked);
    let Ok(phys) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let mems: Vec<(u32, IommuMemory<GuestMemoryMmap, EndpointIommu>)> = ENDPOINTS
        .iter()
        .filter_map(|&e| {
            Some((
                e,
                IommuMemory::new(phys.clone(), dev.endpoint_iommu(e)?, true, ()),
            ))
        })
        .collect();
    for _ in 0..MAX_OPS {
        let Some([op]) = take::<1>(&mut ops) else {
            return;
        };
        match op % 8 {
            0 => {
                let Some([n, w]) = take::<2>(&mut ops) else {
                    return;
                };
                let n = usize::from(n).min(ops.len());
                let (req, rest) = ops.split_at(n);
                ops = rest;
                let _ = dev.handle_request(req, u64::from(w), Some(&phys));
            }
            1..=3 => {
                let Some(req) = structured(&mut ops) else {
                    return;
                };
                let w = writable_len(req.kind(), dev.config().probe_size);
                let _ = dev.handle_request(&encode(&req), w, Some(&phys));
            }
            4 | 5 => {
                let (Some([e, sel, len]), Some(a)) = (take::<3>(&mut ops), take::<8>(&mut ops))
                else {
                    return;
                };
                let Some((id, m)) = mems.get(usize::from(e) % mems.len()) else {
                    return;
                };
                let iova = GuestAddress(addr(sel, u64_of(a)));
                let mut buf = vec![0u8; usize::from(len) * 32];
                let ok = if sel & 0x80 != 0 {
                    m.write_slice(&buf, iova).is_ok()
                } else {
                    m.read_slice(&mut buf, iova).is_ok()
                };
                let blocked = dev.attached_domain(*id).is_none() && !dev.bypass();
                assert!(
                    !(ok && blocked && !buf.is_empty()),
                    "unattached endpoint translated"
                );
            }
            6 => {
                let Some([off, v]) = take::<2>(&mut ops) else {
                    return;
                };
                dev.write_config(u64::from(off % 48), &[v % 3]);
            }
            _ => {
                if op & 0x80 != 0 {
                    dev.reset();
                    dev.set_acked_features(acked);
                } else {
                    // Drain waiting faults as if the event queue had buffers.
                    let _ = phys.read_obj::<u8>(GuestAddress(0));
                    while dev.engine.shared.faults.pop().is_some() {}
                }
            }
        }
    }
}
