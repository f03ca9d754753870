//! Per-endpoint DMA outcome counters: the `Hooks` a run installs so its report can say, for every
//! endpoint behind an IOMMU, how many DMAs were translated, bypassed or faulted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sluice_devapi::{DmaOutcome, DmaRecord, Endpoint, Hooks};

/// Counts for one endpoint.
#[derive(Debug, Default)]
pub struct EndpointDma {
    /// Translated through a mapping.
    pub translated: AtomicU64,
    /// Passed untranslated (bypass).
    pub bypassed: AtomicU64,
    /// Refused.
    pub faulted: AtomicU64,
    /// Not behind an IOMMU.
    pub direct: AtomicU64,
    /// Bytes of the accesses that reached memory.
    pub bytes: AtomicU64,
}

/// A snapshot of [`EndpointDma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointDmaCounts {
    /// Translated.
    pub translated: u64,
    /// Bypassed.
    pub bypassed: u64,
    /// Faulted.
    pub faulted: u64,
    /// Direct.
    pub direct: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Hooks that count DMA outcomes per endpoint. The hot path takes a shared lock and bumps
/// relaxed atomics; the map is written only the first time an endpoint is seen.
#[derive(Debug, Default)]
pub struct DmaStats {
    endpoints: RwLock<HashMap<Endpoint, Arc<EndpointDma>>>,
}

impl DmaStats {
    fn entry(&self, ep: Endpoint) -> Arc<EndpointDma> {
        if let Some(e) = self.endpoints.read().ok().and_then(|m| m.get(&ep).cloned()) {
            return e;
        }
        let mut map = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        map.entry(ep).or_default().clone()
    }

    /// Counts for every endpoint seen, sorted by endpoint.
    pub fn snapshot(&self) -> Vec<(Endpoint, EndpointDmaCounts)> {
        let map = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map
            .iter()
            .map(|(ep, c)| {
                (
                    *ep,
                    EndpointDmaCounts {
                        translated: c.translated.load(Ordering::Relaxed),
                        bypassed: c.bypassed.load(Ordering::Relaxed),
                        faulted: c.faulted.load(Ordering::Relaxed),
                        direct: c.direct.load(Ordering::Relaxed),
                        bytes: c.bytes.load(Ordering::Relaxed),
                    },
                )
            })
            .collect();
        v.sort_by_key(|(ep, _)| ep.to_string());
        v
    }
}

impl Hooks for DmaStats {
    fn dma(&self, rec: &DmaRecord) {
        let e = self.entry(rec.endpoint);
        let counter = match rec.outcome {
            DmaOutcome::Translated { .. } => &e.translated,
            DmaOutcome::Bypassed => &e.bypassed,
            DmaOutcome::Faulted { .. } => {
                e.faulted.fetch_add(1, Ordering::Relaxed);
                return;
            }
            DmaOutcome::Direct => &e.direct,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        e.bytes.fetch_add(rec.len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_devapi::{Bdf, DmaDirection};

    #[test]
    fn counts_by_endpoint_and_outcome() {
        let s = DmaStats::default();
        let a = Endpoint::Pci(Bdf::new(0, 3, 0));
        let b = Endpoint::Pci(Bdf::new(0, 4, 0));
        let rec = |endpoint, outcome| DmaRecord {
            endpoint,
            iova: 0x1000,
            len: 512,
            direction: DmaDirection::Read,
            outcome,
        };
        s.dma(&rec(
            a,
            DmaOutcome::Translated {
                gpa: 0x9000,
                domain: 1,
            },
        ));
        s.dma(&rec(
            a,
            DmaOutcome::Translated {
                gpa: 0x9000,
                domain: 1,
            },
        ));
        s.dma(&rec(a, DmaOutcome::Faulted { reason: 1 }));
        s.dma(&rec(b, DmaOutcome::Bypassed));
        let snap = s.snapshot();
        assert_eq!(
            snap[0],
            (
                a,
                EndpointDmaCounts {
                    translated: 2,
                    faulted: 1,
                    bytes: 1024,
                    ..Default::default()
                }
            )
        );
        assert_eq!(
            snap[1],
            (
                b,
                EndpointDmaCounts {
                    bypassed: 1,
                    bytes: 512,
                    ..Default::default()
                }
            )
        );
    }
}
