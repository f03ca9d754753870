//! Applying parsed requests: domains, endpoint attachment, mappings; one status per request.
//!
//! Every check runs before any state changes, so a refused request leaves no trace. Cache
//! invalidation follows each state change, after the per-endpoint and per-domain write locks
//! are released and before the status goes back to the driver: when the driver sees the
//! completion of an UNMAP or DETACH, no DMA can use the old translation any more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use sluice_devapi::{
    Bdf, CacheKind, ContextSel, Endpoint, EndpointIommu, Hooks, Invalidation, MapEvent, StateEvent,
    ViommuState,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::ViommuConfig;
use crate::request::{Request, encode_probe};
use crate::spec::{ATTACH_F_BYPASS, MAP_F_MASK, MAP_F_MMIO, Status, features};
use crate::store::Mapping;
use crate::translate::{Domain, EpState, Shared};

/// One endpoint behind the IOMMU: its DMA-path state and its translation seam.
#[derive(Debug)]
pub struct EpSlot {
    /// Attachment, read by the DMA path.
    pub state: Arc<EpState>,
    /// The seam (and its cache) for this endpoint.
    pub iommu: EndpointIommu,
}

/// The endpoints behind the IOMMU, fixed at construction.
pub type Endpoints = BTreeMap<u32, EpSlot>;

struct DomainEntry {
    dom: Arc<Domain>,
    members: BTreeSet<u32>,
}

/// What applying a request produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Status for the tail.
    pub status: Status,
    /// PROBE properties (exactly `probe_size` bytes) when the status is OK.
    pub probe: Option<Vec<u8>>,
}

impl From<Status> for Applied {
    fn from(status: Status) -> Self {
        Applied {
            status,
            probe: None,
        }
    }
}

/// Per-request facts the model does not own.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyCtx<'a> {
    /// Features the driver accepted.
    pub acked: u64,
    /// Guest memory, to refuse MAPs of non-RAM without MAP_F_MMIO (when configured).
    pub mem: Option<&'a GuestMemoryMmap>,
}

impl ApplyCtx<'_> {
    fn has(&self, bit: u32) -> bool {
        self.acked & (1u64 << bit) != 0
    }
}

/// Deliberate model bugs, for tests of the escape oracle only. Every other step of the request
/// runs the real code path, so the oracle sees exactly what a buggy model would produce.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultInjection {
    /// UNMAP removes the mappings but leaves the endpoints' translation caches alone, so a
    /// cached translation outlives the UNMAP's completion.
    pub skip_unmap_invalidation: bool,
}

/// The device's translation state.
pub struct Model {
    name: String,
    cfg: Arc<ViommuConfig>,
    hooks: Arc<dyn Hooks>,
    shared: Arc<Shared>,
    endpoints: Arc<Endpoints>,
    domains: BTreeMap<u32, DomainEntry>,
    ep_domain: BTreeMap<u32, u32>,
    total_mappings: usize,
    faults: FaultInjection,
}

fn wlock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn rlock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

impl Model {
    /// A model with every endpoint unattached and no domain.
    pub fn new(
        name: &str,
        cfg: Arc<ViommuConfig>,
        hooks: Arc<dyn Hooks>,
        shared: Arc<Shared>,
        endpoints: Arc<Endpoints>,
    ) -> Self {
        Model {
            name: name.to_string(),
            cfg,
            hooks,
            shared,
            endpoints,
            domains: BTreeMap::new(),
            ep_domain: BTreeMap::new(),
            total_mappings: 0,
            faults: FaultInjection::default(),
        }
    }

    /// Breaks the model on purpose (oracle tests only; see [`FaultInjection`]).
    pub fn set_fault_injection(&mut self, faults: FaultInjection) {
        self.faults = faults;
    }

    /// Number of live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Number of mappings over all domains.
    pub fn mapping_count(&self) -> usize {
        self.total_mappings
    }

    /// The domain `endpoint` is attached to.
    pub fn attached(&self, endpoint: u32) -> Option<u32> {
        self.ep_domain.get(&endpoint).copied()
    }

    /// Applies one request.
    pub fn apply(&mut self, req: &Request, ctx: &ApplyCtx<'_>) -> Applied {
        match *req {
            Request::Attach {
                domain,
                endpoint,
                flags,
            } => self.attach(domain, endpoint, flags, ctx).into(),
            Request::Detach { domain, endpoint } => self.detach(domain, endpoint).into(),
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => self
                .map(domain, virt_start, virt_end, phys_start, flags, ctx)
                .into(),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => self.unmap(domain, virt_start, virt_end, ctx).into(),
            Request::Probe { endpoint } => self.probe(endpoint),
        }
    }

    fn in_domain_range(&self, d: u32) -> bool {
        (self.cfg.domain_range.0..=self.cfg.domain_range.1).contains(&d)
    }

    fn state(&self, change: ViommuState, endpoint: Option<u32>) {
        self.hooks.state(&StateEvent {
            source: &self.name,
            endpoint: endpoint.map(|e| Endpoint::Pci(Bdf(e as u16))),
            change: change.into(),
        });
    }

    /// Removes `ep` from `domain`'s members; frees the domain when it was the last one.
    fn leave(&mut self, domain: u32, ep: u32) {
        let empty = self.domains.get_mut(&domain).is_some_and(|e| {
            e.members.remove(&ep);
            e.members.is_empty()
        });
        if empty && let Some(e) = self.domains.remove(&domain) {
            self.total_mappings = self
                .total_mappings
                .saturating_sub(rlock(&e.dom.store).len());
            self.state(ViommuState::DomainFree { domain }, None);
        }
        self.ep_domain.remove(&ep);
    }

    fn attach(&mut self, domain: u32, ep: u32, flags: u32, ctx: &ApplyCtx<'_>) -> Status {
        if flags & !ATTACH_F_BYPASS != 0 {
            return Status::Inval;
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if bypass && !ctx.has(features::BYPASS_CONFIG) {
            return Status::Inval;
        }
        let endpoints = self.endpoints.clone();
        let Some(slot) = endpoints.get(&ep) else {
            return Status::NoEnt;
        };
        if !self.in_domain_range(domain) {
            return Status::Range;
        }
        if self
            .domains
            .get(&domain)
            .is_some_and(|e| e.dom.bypass != bypass)
        {
            return Status::Inval;
        }
        let old = self.ep_domain.get(&ep).copied();
        // ATTACH to the domain the endpoint is already in (with the same bypass flag, checked
        // above) changes nothing. The spec's implicit detach speaks of "another domain"; taking
        // it literally here would free the domain, and all its mappings, when the endpoint is
        // its only member, and a guest that re-attaches defensively would lose its DMA mappings.
        if old == Some(domain) {
            return Status::Ok;
        }
        // Moving from another domain behaves as DETACH then ATTACH: the old domain dies if this
        // was its last endpoint.
        let old_dies = old
            .and_then(|o| self.domains.get(&o))
            .is_some_and(|e| e.members.len() == 1);
        let after_leave = self.domains.len() - usize::from(old_dies);
        let exists_after = self.domains.contains_key(&domain);
        if !exists_after && after_leave >= self.cfg.max_domains {
            return Status::NoMem;
        }
        // Every check passed: announce the change before it starts, so an observer knows that
        // both the old and the new context are legitimate until `attach` (completion).
        self.state(ViommuState::AttachBegin { domain, bypass }, Some(ep));
        if let Some(o) = old {
            self.leave(o, ep);
        }
        let entry = self.domains.entry(domain).or_insert_with(|| DomainEntry {
            dom: Arc::new(Domain::new(domain, bypass)),
            members: BTreeSet::new(),
        });
        entry.members.insert(ep);
        let dom = entry.dom.clone();
        self.ep_domain.insert(ep, domain);
        *wlock(&slot.state.attached) = Some(dom);
        slot.iommu.invalidate_all();
        self.state(ViommuState::Attach { domain }, Some(ep));
        Status::Ok
    }

    fn detach(&mut self, domain: u32, ep: u32) -> Status {
        let endpoints = self.endpoints.clone();
        let Some(slot) = endpoints.get(&ep) else {
            return Status::NoEnt;
        };
        if !self.in_domain_range(domain) {
            return Status::Range;
        }
        if self.ep_domain.get(&ep) != Some(&domain) {
            return Status::Inval;
        }
        self.state(ViommuState::DetachBegin { domain }, Some(ep));
        self.leave(domain, ep);
        *wlock(&slot.state.attached) = None;
        slot.iommu.invalidate_all();
        self.state(ViommuState::Detach { domain }, Some(ep));
        Status::Ok
    }

    /// Checks shared by MAP and UNMAP: flags aside, the domain and range must be usable.
    fn check_range_request(
        &self,
        domain: u32,
        start: u64,
        end: u64,
    ) -> Result<Arc<Domain>, Status> {
        if !self.in_domain_range(domain) {
            return Err(Status::Range);
        }
        let entry = self.domains.get(&domain).ok_or(Status::NoEnt)?;
        if entry.dom.bypass || end < start {
            return Err(Status::Inval);
        }
        if start < self.cfg.input_range.0 || end > self.cfg.input_range.1 {
            return Err(Status::Range);
        }
        Ok(entry.dom.clone())
    }

    fn map(
        &mut self,
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
        ctx: &ApplyCtx<'_>,
    ) -> Status {
        if !ctx.has(features::MAP_UNMAP) {
            return Status::Unsupp;
        }
        if flags & !MAP_F_MASK != 0 || (flags & MAP_F_MMIO != 0 && !ctx.has(features::MMIO)) {
            return Status::Inval;
        }
        let dom = match self.check_range_request(domain, start, end) {
            Ok(d) => d,
            Err(s) => return s,
        };
        let g = self.cfg.granule();
        let aligned = |a: u64| a & (g - 1) == 0;
        if !aligned(start) || !aligned(phys) || !aligned(end.wrapping_add(1)) {
            return Status::Range;
        }
        let Some(phys_end) = phys.checked_add(end - start) else {
            return Status::Range;
        };
        if self
            .cfg
            .resv_regions()
            .any(|(s, e, _)| s <= end && start <= e)
        {
            return Status::Inval;
        }
        let mut store = wlock(&dom.store);
        if store.overlaps(start, end) {
            return Status::Inval;
        }
        if store.len() >= self.cfg.max_mappings_per_domain
            || self.total_mappings >= self.cfg.max_mappings_total
        {
            return Status::NoMem;
        }
        if self.cfg.check_phys_ram
            && flags & MAP_F_MMIO == 0
            && let Some(mem) = ctx.mem
            && !ram_backed(mem, phys, phys_end)
        {
            return Status::Fault;
        }
        // Announced before the mapping is visible (the store's write lock is held), so no
        // translation through it can reach the oracle before the oracle knows it is legitimate.
        self.hooks.mapped(&MapEvent {
            source: &self.name,
            context: u64::from(domain),
            first: start,
            last: end,
        });
        if store.insert(start, Mapping { end, phys, flags }).is_err() {
            return Status::Inval;
        }
        drop(store);
        self.total_mappings += 1;
        Status::Ok
    }

    fn unmap(&mut self, domain: u32, start: u64, end: u64, ctx: &ApplyCtx<'_>) -> Status {
        if !ctx.has(features::MAP_UNMAP) {
            return Status::Unsupp;
        }
        let dom = match self.check_range_request(domain, start, end) {
            Ok(d) => d,
            Err(s) => return s,
        };
        let removed = match wlock(&dom.store).remove(start, end) {
            Ok(r) => r,
            Err(_) => return Status::Range,
        };
        self.total_mappings = self.total_mappings.saturating_sub(removed.len());
        // Exact invalidation: only the removed mappings, only this domain's endpoints.
        let members = self
            .domains
            .get(&domain)
            .map(|e| &e.members)
            .into_iter()
            .flatten();
        for ep in members.filter(|_| !self.faults.skip_unmap_invalidation) {
            if let Some(slot) = self.endpoints.get(ep) {
                for &(s, e) in &removed {
                    slot.iommu.invalidate(s, (e - s).saturating_add(1));
                }
            }
        }
        // Nothing in [start, end] is mapped any more and every cached translation of it is
        // gone (in-flight accesses finished): the guest may rely on that once it sees the
        // status, so the oracle hears it first.
        self.hooks.invalidated(&Invalidation {
            source: &self.name,
            kind: "UNMAP",
            cache: CacheKind::Translation,
            endpoint: None,
            contexts: ContextSel::exact(u64::from(domain)),
            first: start,
            last: end,
            generation: None,
            completion: 0,
            completed_at: std::time::Instant::now(),
        });
        Status::Ok
    }

    fn probe(&self, ep: u32) -> Applied {
        if !self.endpoints.contains_key(&ep) {
            return Status::NoEnt.into();
        }
        match encode_probe(self.cfg.resv_regions(), self.cfg.probe_size) {
            Some(props) => Applied {
                status: Status::Ok,
                probe: Some(props),
            },
            None => Status::Inval.into(),
        }
    }

    /// `config.bypass` changed: unattached endpoints change translation.
    pub fn bypass_changed(&self) {
        for (id, slot) in self.endpoints.iter() {
            if !self.ep_domain.contains_key(id) {
                slot.iommu.invalidate_all();
            }
        }
    }

    /// Device reset: every endpoint detached, every domain gone (`bypass` is kept).
    pub fn reset(&mut self) {
        self.domains.clear();
        self.ep_domain.clear();
        self.total_mappings = 0;
        for slot in self.endpoints.values() {
            *wlock(&slot.state.attached) = None;
            slot.iommu.invalidate_all();
        }
        self.shared.faults.clear();
    }
}

/// True if `[start, end]` is guest RAM.
fn ram_backed(mem: &GuestMemoryMmap, start: u64, end: u64) -> bool {
    usize::try_from(end - start)
        .ok()
        .and_then(|n| n.checked_add(1))
        .is_some_and(|n| mem.check_range(GuestAddress(start), n))
}
