//! virtio-iommu (virtio 1.2/1.3 §5.13, device ID 23), spec-strict, with the translation seam
//! every endpoint behind it uses.
//!
//! Layout, one concern per file:
//! - [`spec`]: wire constants (features, request types, statuses, flags, sizes);
//! - [`config`]: [`ViommuConfig`] and the device configuration space;
//! - [`request`]: bytes → typed [`request::Request`] (pure, fuzzable);
//! - [`store`]: a domain's mappings, an interval map keyed by IOVA;
//! - [`model`]: domains and endpoints; `apply(Request) -> Status`;
//! - [`translate`]: the per-endpoint [`sluice_devapi::DmaTranslate`] the DMA path calls on a
//!   cache miss, and the bounded fault queue it feeds;
//! - [`events`]: fault records written to the event queue;
//! - [`engine`]: one request in, one reply out, with counters and hook points;
//! - [`queues`]: descriptor-chain I/O for the request and event queues;
//! - [`device`]: [`VirtioIommu`], the `VirtioDevice` with its queue worker;
//! - [`fuzzing`]: the fuzz target's body.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod device;
pub mod engine;
pub mod events;
pub mod fuzzing;
pub mod model;
pub mod queues;
pub mod request;
pub mod spec;
pub mod store;
pub mod translate;

pub use config::ViommuConfig;
pub use device::{Reply, ViommuCounters, VirtioIommu};
pub use sluice_devapi::EndpointIommu;

/// Every hook point this device announces.
pub const POINTS: &[&str] = &[
    POINT_ATTACH,
    POINT_DETACH,
    POINT_MAP,
    POINT_UNMAP,
    POINT_PROBE,
    POINT_CONFIG_WRITE,
];
/// Points whose completion the device can publish later (`Hooks::defer`, mode=defer): the
/// request is applied to the model, answered and its used-ring entry published only when the
/// deferral is due, on the device's worker, while the vCPU that rang the doorbell runs on.
pub const DEFER_POINTS: &[&str] = REQUEST_POINTS;
/// The completion of every request type (reached inline, inside the doorbell write, when the
/// device answers requests on the vCPU that rang, its default).
pub const REQUEST_POINTS: &[&str] = &[
    POINT_ATTACH,
    POINT_DETACH,
    POINT_MAP,
    POINT_UNMAP,
    POINT_PROBE,
];
/// Every point of this device with its properties: a request completion is reached inside the
/// doorbell write (requests are answered on the vCPU that rang, the default) and can be
/// deferred; MAP and UNMAP come once per I/O of a device behind the IOMMU.
pub fn point_decls() -> Vec<sluice_devapi::PointDecl> {
    POINTS
        .iter()
        .map(|&name| {
            let mut d = sluice_devapi::PointDecl::new(name);
            if REQUEST_POINTS.contains(&name) {
                d = d.on_doorbell();
            }
            if DEFER_POINTS.contains(&name) {
                d = d.deferrable();
            }
            if name == POINT_MAP || name == POINT_UNMAP {
                d = d.hot();
            }
            d
        })
        .collect()
}

/// An ATTACH request completed (value: status).
pub const POINT_ATTACH: &str = "virtio-iommu.req.attach";
/// A DETACH request completed (value: status).
pub const POINT_DETACH: &str = "virtio-iommu.req.detach";
/// A MAP request completed (value: status).
pub const POINT_MAP: &str = "virtio-iommu.req.map";
/// An UNMAP request completed, caches invalidated, status not yet returned (value: status).
pub const POINT_UNMAP: &str = "virtio-iommu.req.unmap";
/// A PROBE request completed (value: status).
pub const POINT_PROBE: &str = "virtio-iommu.req.probe";
/// The driver wrote the configuration space (value: the byte written at `bypass`, or the
/// offset for other fields).
pub const POINT_CONFIG_WRITE: &str = "virtio-iommu.config.write";

#[cfg(test)]
mod tests;
