//! The DMA path's view of the model: per-endpoint attachment, per-domain mappings, and the
//! [`DmaTranslate`] implementation the seam calls on a cache miss.
//!
//! Locks here are per endpoint (`EpState::attached`) and per domain (`Domain::store`); the DMA
//! path only ever takes them for reading, so translations of different endpoints (or of one
//! endpoint from several threads) never serialise on a global lock. Request processing takes
//! them for writing, and always releases them before invalidating an endpoint's cache (see
//! `sluice_devapi::dma` for why).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use sluice_devapi::{DmaFault, DmaResolution, DmaTranslate};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::events::{FaultQueue, FaultRecord};
use crate::spec::{
    FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING, MAP_F_READ,
    MAP_F_WRITE,
};
use crate::store::{MapStore, Mapping};

/// A domain: an address space shared by the endpoints attached to it.
#[derive(Debug)]
pub struct Domain {
    /// Domain ID.
    pub id: u32,
    /// Created with ATTACH_F_BYPASS: attached endpoints bypass, MAP/UNMAP are refused.
    pub bypass: bool,
    /// Mappings (empty for a bypass domain).
    pub store: RwLock<MapStore>,
}

impl Domain {
    /// A new, empty domain.
    pub fn new(id: u32, bypass: bool) -> Self {
        Domain {
            id,
            bypass,
            store: RwLock::new(MapStore::new()),
        }
    }
}

/// What the DMA path needs to know about one endpoint.
#[derive(Debug)]
pub struct EpState {
    /// Endpoint ID.
    pub id: u32,
    /// The domain it is attached to.
    pub attached: RwLock<Option<Arc<Domain>>>,
}

/// Device-wide state the DMA path reads.
#[derive(Debug)]
pub struct Shared {
    /// `config.bypass`.
    pub bypass: AtomicBool,
    /// Faults waiting for the event queue.
    pub faults: FaultQueue,
}

/// The [`DmaTranslate`] of one endpoint.
#[derive(Debug)]
pub struct EndpointTranslator {
    ep: Arc<EpState>,
    shared: Arc<Shared>,
}

impl EndpointTranslator {
    /// The translator for `ep`.
    pub fn new(ep: Arc<EpState>, shared: Arc<Shared>) -> Self {
        EndpointTranslator { ep, shared }
    }

    fn fault(&self, reason: u8, access: Permissions, address: u64, why: &str) -> DmaFault {
        let rw = match access {
            Permissions::Write => FAULT_F_WRITE,
            Permissions::ReadWrite => FAULT_F_READ | FAULT_F_WRITE,
            Permissions::Read | Permissions::No => FAULT_F_READ,
        };
        self.shared.faults.push(FaultRecord {
            reason,
            flags: rw | FAULT_F_ADDRESS,
            endpoint: self.ep.id,
            address,
        });
        DmaFault::new(
            u32::from(reason),
            format!("endpoint {:#x}: {why} at {address:#x}", self.ep.id),
        )
    }
}

/// vm-memory permissions of a mapping.
pub fn mapping_permissions(flags: u32) -> Permissions {
    match (flags & MAP_F_READ != 0, flags & MAP_F_WRITE != 0) {
        (true, true) => Permissions::ReadWrite,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (false, false) => Permissions::No,
    }
}

fn fill_identity(fill: &mut Iotlb) -> Result<(), DmaFault> {
    // [0, 2^64 - 1): every address an access can reach (the seam refuses accesses that wrap).
    let all = usize::try_from(u64::MAX).unwrap_or(usize::MAX);
    fill.set_mapping(
        GuestAddress(0),
        GuestAddress(0),
        all,
        Permissions::ReadWrite,
    )
    .map_err(|e| DmaFault::new(0, e.to_string()))
}

fn cache_len(start: u64, m: &Mapping) -> usize {
    // Exclusive length; a mapping ending at 2^64 - 1 loses its last byte, which no access can
    // reach through the seam anyway.
    let len = (m.end - start).saturating_add(u64::from(m.end != u64::MAX));
    usize::try_from(len).unwrap_or(usize::MAX)
}

impl DmaTranslate for EndpointTranslator {
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        let last = iova.saturating_add(len.saturating_sub(1));
        let domain = self
            .ep
            .attached
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(domain) = domain else {
            if self.shared.bypass.load(Ordering::Acquire) {
                fill_identity(fill)?;
                return Ok(DmaResolution::Bypassed);
            }
            return Err(self.fault(FAULT_R_DOMAIN, access, iova, "not attached"));
        };
        if domain.bypass {
            fill_identity(fill)?;
            return Ok(DmaResolution::Bypassed);
        }
        let store = domain.store.read().unwrap_or_else(|p| p.into_inner());
        // Walk the mappings covering [iova, last]; they need not be contiguous in GPA.
        let mut spans: Vec<(u64, Mapping)> = Vec::with_capacity(1);
        let mut cur = iova;
        let mut covered = false;
        for (start, m) in store.starting_at(iova) {
            if start > cur {
                break;
            }
            if !mapping_permissions(m.flags).allow(access) {
                return Err(self.fault(FAULT_R_MAPPING, access, cur, "permission denied"));
            }
            spans.push((start, *m));
            if m.end >= last {
                covered = true;
                break;
            }
            cur = m.end + 1;
        }
        drop(store);
        if covered {
            for (s, m) in &spans {
                fill.set_mapping(
                    GuestAddress(*s),
                    GuestAddress(m.phys),
                    cache_len(*s, m),
                    mapping_permissions(m.flags),
                )
                .map_err(|e| DmaFault::new(0, e.to_string()))?;
            }
            return Ok(DmaResolution::Translated { domain: domain.id });
        }
        Err(self.fault(FAULT_R_MAPPING, access, cur, "not mapped"))
    }
}
