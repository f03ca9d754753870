//! The translation seam: how an IOMMU model sits inside a device's memory object.
//!
//! vm-memory 0.18's [`Iommu`] trait has a generic associated type, so it is not object-safe and
//! `IommuMemory<M, I>` needs a concrete `I`. This module supplies that concrete type,
//! [`EndpointIommu`], once for every IOMMU model:
//!
//! - a model implements [`DmaTranslate`] per endpoint: given an access that missed the cache, it
//!   fills the cache with the mappings that cover it (identity mappings when the endpoint
//!   bypasses) or refuses it with a [`DmaFault`];
//! - [`EndpointIommu`] owns that endpoint's translation cache (a vm-memory [`Iotlb`] behind the
//!   endpoint's own `RwLock`), answers every access from it, calls the model on a miss, fails
//!   closed on a fault, and reports **every** access to [`Hooks::dma`] — the escape oracle's
//!   single choke point;
//! - the model invalidates the cache exactly ([`EndpointIommu::invalidate`],
//!   [`EndpointIommu::invalidate_all`]) when mappings are removed or the endpoint moves.
//!
//! Models that own their translation cache (SMMUv3's IOTLB, zPCI's shadow IOTLB are part of
//! what is under test) use the seam's *model-owned* form instead
//! ([`EndpointIommu::model_owned`]): no seam cache, every access goes to the model, and the
//! model, which already reports each translation to the hooks with its own provenance, is the
//! only one that reports it. Either way every access is translated once and reported once.
//!
//! Concurrency: a cache hit takes only this endpoint's read lock. A miss takes the endpoint's
//! write lock and, inside it, whatever read locks the model needs. A model must therefore never
//! call `invalidate*` while holding a lock that its `resolve` takes (update the model state,
//! drop the model lock, then invalidate): that ordering both avoids deadlock and guarantees that
//! once `invalidate*` returns, no access can use the removed translation — in-flight accesses
//! hold the read guard until their copy finishes, so invalidation also waits for them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::iommu::{Error as IommuError, Iommu, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::endpoint::Endpoint;
use crate::hooks::{DmaDirection, DmaOutcome, DmaRecord, Hooks};

/// Fault reason used by the seam itself (an access whose range wraps the 64-bit space, or a
/// translation invalidated again and again while being filled). Models use their own codes.
pub const SEAM_FAULT_REASON: u32 = u32::MAX;

/// How many times a miss is resolved before the access is refused because concurrent
/// invalidations keep removing what was just filled.
const MAX_FILL_ATTEMPTS: usize = 4;

/// What the IOMMU did for an access that was resolved (reported to the oracle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaResolution {
    /// Translated through the mappings of `domain`.
    Translated {
        /// Domain / context identifier.
        domain: u32,
    },
    /// The endpoint is in bypass: IOVA = guest-physical address.
    Bypassed,
}

/// An access the IOMMU refused. Nothing reaches memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaFault {
    /// Model-specific reason code (virtio-iommu fault reason, SMMU event id, zPCI status).
    pub reason: u32,
    /// Human-readable detail for logs and the `iommu::Error` the device sees.
    pub detail: String,
}

impl DmaFault {
    /// A fault with `reason` and `detail`.
    pub fn new(reason: u32, detail: impl Into<String>) -> Self {
        DmaFault {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for DmaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IOMMU fault (reason {}): {}", self.reason, self.detail)
    }
}

impl std::error::Error for DmaFault {}

/// An IOMMU model's view of one endpoint, as the seam calls it on a cache miss.
pub trait DmaTranslate: Send + Sync + fmt::Debug {
    /// Resolves the access `[iova, iova + len)` with `access`.
    ///
    /// On success the implementation has inserted into `fill` mappings that cover the whole
    /// range with at least `access` (sized to the model's mappings, not to pages; identity
    /// mappings when the endpoint bypasses) and returns what happened. On failure it returns a
    /// fault and should not have filled anything. `len` is never 0 and `iova + len` never
    /// overflows.
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault>;
}

/// Where a model that walks tables in guest memory reads them: the guest's memory map as it is
/// at the time of the access (a device host may replace the map while the guest runs).
pub type TableMemory = Arc<dyn Fn() -> Arc<vm_memory::GuestMemoryMmap> + Send + Sync>;

/// Cumulative translation counts of one endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Accesses answered from the cache.
    pub hits: u64,
    /// Accesses that needed the model (and then succeeded).
    pub misses: u64,
    /// Accesses refused.
    pub faults: u64,
}

/// `ctx` value: nothing cached.
const CTX_NONE: u64 = u64::MAX;
/// `ctx` value: the cache holds bypass (identity) entries.
const CTX_BYPASS: u64 = 1 << 32;

fn ctx_encode(r: DmaResolution) -> u64 {
    match r {
        DmaResolution::Translated { domain } => u64::from(domain),
        DmaResolution::Bypassed => CTX_BYPASS,
    }
}

fn ctx_outcome(ctx: u64, gpa: u64) -> DmaOutcome {
    match u32::try_from(ctx) {
        Ok(domain) => DmaOutcome::Translated { gpa, domain },
        Err(_) => DmaOutcome::Bypassed,
    }
}

struct Inner {
    endpoint: Endpoint,
    translator: Arc<dyn DmaTranslate>,
    hooks: Arc<dyn Hooks>,
    /// The model caches (or not) and reports its translations; the seam only carries them and
    /// reports what it refuses on its own.
    model_owned: bool,
    cache: RwLock<Iotlb>,
    /// What every entry in `cache` came from (one resolution at a time; changed only under the
    /// write lock, so a reader holding the read lock sees the value matching the entries).
    ctx: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    faults: AtomicU64,
}

/// One endpoint's translated view of guest memory: the `I` of
/// `vm_memory::IommuMemory<GuestMemoryMmap, EndpointIommu>`.
///
/// A cheap handle (clones share the cache), so the IOMMU model keeps one to invalidate and the
/// device's memory object owns another.
#[derive(Clone)]
pub struct EndpointIommu {
    inner: Arc<Inner>,
}

impl fmt::Debug for EndpointIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointIommu")
            .field("endpoint", &self.inner.endpoint)
            .field("translator", &self.inner.translator)
            .field("stats", &self.stats())
            .finish()
    }
}

fn direction(access: Permissions) -> DmaDirection {
    match access {
        Permissions::Write | Permissions::ReadWrite => DmaDirection::Write,
        Permissions::No | Permissions::Read => DmaDirection::Read,
    }
}

impl EndpointIommu {
    /// The seam for `endpoint`, resolving misses through `translator` and reporting to `hooks`.
    pub fn new(
        endpoint: Endpoint,
        translator: Arc<dyn DmaTranslate>,
        hooks: Arc<dyn Hooks>,
    ) -> Self {
        Self::with_mode(endpoint, translator, hooks, false)
    }

    /// The seam for an endpoint whose model owns the translation cache and reports every access
    /// itself: each access is resolved by `translator` (which must report it, once, as a
    /// translation or a fault) into a private one-access table. Nothing is cached here; only
    /// what the seam refuses on its own (a wrapping range, a model answer that does not cover
    /// the access) is reported here, to `hooks`, since the model never saw it.
    pub fn model_owned(
        endpoint: Endpoint,
        translator: Arc<dyn DmaTranslate>,
        hooks: Arc<dyn Hooks>,
    ) -> Self {
        Self::with_mode(endpoint, translator, hooks, true)
    }

    fn with_mode(
        endpoint: Endpoint,
        translator: Arc<dyn DmaTranslate>,
        hooks: Arc<dyn Hooks>,
        model_owned: bool,
    ) -> Self {
        EndpointIommu {
            inner: Arc::new(Inner {
                endpoint,
                translator,
                hooks,
                model_owned,
                cache: RwLock::new(Iotlb::new()),
                ctx: AtomicU64::new(CTX_NONE),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                faults: AtomicU64::new(0),
            }),
        }
    }

    /// The endpoint whose accesses this object translates.
    pub fn endpoint(&self) -> Endpoint {
        self.inner.endpoint
    }

    /// Counts so far.
    pub fn stats(&self) -> DmaStats {
        DmaStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            faults: self.inner.faults.load(Ordering::Relaxed),
        }
    }

    /// Drops every cached translation overlapping `[iova, iova + len)`. On return no access can
    /// use them any more (accesses in flight on them have finished).
    pub fn invalidate(&self, iova: u64, len: u64) {
        let end = iova.saturating_add(len);
        let Ok(length) = usize::try_from(end - iova) else {
            self.invalidate_all();
            return;
        };
        if length == 0 {
            return;
        }
        self.write_cache()
            .invalidate_mapping(GuestAddress(iova), length);
    }

    /// Drops every cached translation of this endpoint (it moved between domains, or its
    /// bypass state changed).
    pub fn invalidate_all(&self) {
        let mut cache = self.write_cache();
        cache.invalidate_all();
        self.inner.ctx.store(CTX_NONE, Ordering::Relaxed);
    }

    fn read_cache(&self) -> RwLockReadGuard<'_, Iotlb> {
        self.inner.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_cache(&self) -> RwLockWriteGuard<'_, Iotlb> {
        self.inner.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    /// True when the model, not this seam, caches and reports.
    pub fn is_model_owned(&self) -> bool {
        self.inner.model_owned
    }

    fn report(&self, iova: u64, len: u64, access: Permissions, outcome: DmaOutcome) {
        self.inner.hooks.dma(&DmaRecord {
            endpoint: self.inner.endpoint,
            iova,
            len,
            direction: direction(access),
            outcome,
        });
    }

    /// Refuses an access and reports the refusal.
    fn refuse(&self, iova: u64, len: usize, access: Permissions, fault: &DmaFault) -> IommuError {
        self.report(
            iova,
            len as u64,
            access,
            DmaOutcome::Faulted {
                reason: fault.reason,
            },
        );
        self.refused(iova, len, fault)
    }

    /// Refuses an access already reported (by the model that refused it).
    fn refused(&self, iova: u64, len: usize, fault: &DmaFault) -> IommuError {
        self.inner.faults.fetch_add(1, Ordering::Relaxed);
        IommuError::CannotResolve {
            iova_range: IovaRange {
                base: GuestAddress(iova),
                length: len,
            },
            reason: fault.to_string(),
        }
    }

    /// Resolves a miss into the (write-locked) cache, keeping the invariant that all cached
    /// entries come from one resolution.
    fn fill(
        &self,
        cache: &mut Iotlb,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(), DmaFault> {
        let translator = &self.inner.translator;
        let prev = self.inner.ctx.load(Ordering::Relaxed);
        let mut res = translator.resolve(iova, len, access, cache)?;
        if prev != CTX_NONE && prev != ctx_encode(res) {
            // The endpoint changed domain (or bypass state) and the invalidation that goes with
            // it has not run yet: start over so the cache never mixes two contexts.
            cache.invalidate_all();
            res = translator.resolve(iova, len, access, cache)?;
        }
        self.inner.ctx.store(ctx_encode(res), Ordering::Relaxed);
        Ok(())
    }
}

/// First guest-physical address of a range the cache fully covers, or None on a miss.
fn cached_gpa(cache: &Iotlb, iova: GuestAddress, len: usize, access: Permissions) -> Option<u64> {
    let mut it = Iotlb::lookup(cache, iova, len, access).ok()?;
    Some(it.next().map_or(iova.0, |r| r.base.0))
}

/// The table an access's translation is read from: the endpoint's shared cache, or the private
/// table of one model-owned access.
pub enum SeamGuard<'a> {
    /// The seam's cache, read-locked for the duration of the access.
    Cached(RwLockReadGuard<'a, Iotlb>),
    /// What the model resolved for this access alone.
    Private(Box<Iotlb>),
}

impl std::ops::Deref for SeamGuard<'_> {
    type Target = Iotlb;

    fn deref(&self) -> &Iotlb {
        match self {
            SeamGuard::Cached(g) => g,
            SeamGuard::Private(t) => t,
        }
    }
}

impl EndpointIommu {
    /// One access of a model-owned endpoint: the model resolves (and reports) it; the seam
    /// refuses anything the model did not fully cover.
    fn translate_model_owned(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<SeamGuard<'_>>, IommuError> {
        let len = length as u64;
        let mut table = Iotlb::new();
        if let Err(fault) = self
            .inner
            .translator
            .resolve(iova.0, len, access, &mut table)
        {
            return Err(self.refused(iova.0, length, &fault));
        }
        if cached_gpa(&table, iova, length, access).is_none() {
            // The model said yes but did not cover the access: fail closed.
            log::error!(
                "{}: the IOMMU model accepted iova {:#x} len {length} but left it unmapped",
                self.inner.endpoint,
                iova.0
            );
            let fault = DmaFault::new(SEAM_FAULT_REASON, "model left the access unmapped");
            return Err(self.refuse(iova.0, length, access, &fault));
        }
        self.inner.misses.fetch_add(1, Ordering::Relaxed);
        Iotlb::lookup(SeamGuard::Private(Box::new(table)), iova, length, access).map_err(|_| {
            IommuError::IommuMisconfigured {
                reason: "model-owned lookup failed after a covering check".into(),
            }
        })
    }
}

impl Iommu for EndpointIommu {
    type IotlbGuard<'a> = SeamGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let len = length as u64;
        if len == 0 {
            // Touches nothing: nothing to translate or report.
            return Iotlb::lookup(SeamGuard::Cached(self.read_cache()), iova, 0, access).map_err(
                |_| IommuError::IommuMisconfigured {
                    reason: "empty lookup failed".into(),
                },
            );
        }
        if iova.0.checked_add(len).is_none() {
            let fault = DmaFault::new(SEAM_FAULT_REASON, "access wraps the 64-bit IOVA space");
            return Err(self.refuse(iova.0, length, access, &fault));
        }
        if self.is_model_owned() {
            return self.translate_model_owned(iova, length, access);
        }
        let mut missed = false;
        for _ in 0..MAX_FILL_ATTEMPTS {
            {
                let guard = self.read_cache();
                if let Some(gpa) = cached_gpa(&guard, iova, length, access) {
                    let ctx = self.inner.ctx.load(Ordering::Relaxed);
                    if let Ok(it) = Iotlb::lookup(SeamGuard::Cached(guard), iova, length, access) {
                        let counter = if missed {
                            &self.inner.misses
                        } else {
                            &self.inner.hits
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        self.report(iova.0, len, access, ctx_outcome(ctx, gpa));
                        return Ok(it);
                    }
                }
            }
            missed = true;
            let mut cache = self.write_cache();
            if let Err(fault) = self.fill(&mut cache, iova.0, len, access) {
                drop(cache);
                return Err(self.refuse(iova.0, length, access, &fault));
            }
        }
        let fault = DmaFault::new(
            SEAM_FAULT_REASON,
            "translation invalidated repeatedly while being filled",
        );
        Err(self.refuse(iova.0, length, access, &fault))
    }
}

#[cfg(test)]
mod tests;
