//! The narrow interface every Sluice device model is written against.
//!
//! Device models (PCI functions, virtio devices, IOMMU models) never see the VMM, the CPU
//! backend or KVM. They see guest memory through `vm-memory`, and the three things defined
//! here:
//!
//! - [`InterruptSink`]: how a device raises wired (INTx-style) and message-signalled
//!   interrupts. The backend decides what that means (an eventfd to QEMU's proxy, a KVM irqfd,
//!   `KVM_SIGNAL_MSI`, a test recorder).
//! - [`Endpoint`]: the identity of a DMA master as an IOMMU sees it (PCI requester ID,
//!   SMMU StreamID + SubstreamID, zPCI function handle).
//! - [`Hooks`]: one trait object through which models announce named points (where race
//!   injection may stall or defer) and report DMA outcomes and state changes (what the escape
//!   oracle and the timeline consume). [`NoHooks`] is the zero-cost default. IOMMU models also
//!   report completed invalidations, new mappings and which cached entries a DMA used
//!   ([`Invalidation`], [`MapEvent`], [`CachedTranslation`]) for the oracle's `stale-config` and
//!   `unsynced-config` rules.
//!
//! For unit tests of models, [`RecordingInterrupts`] and [`RecordingHooks`] record what a model
//! raised and announced.
#![forbid(unsafe_code)]

mod dma;
mod endpoint;
pub mod fuzz_support;
mod hooks;
mod irq;
pub mod key_hash;
mod point_decl;
mod provenance;
mod recording;
mod state;

pub use dma::{
    DmaFault, DmaResolution, DmaStats, DmaTranslate, EndpointIommu, SEAM_FAULT_REASON, SeamGuard,
    TableMemory,
};
pub use endpoint::{Bdf, BdfParseError, Endpoint};
pub use hooks::{
    DmaDirection, DmaOutcome, DmaRecord, Fanout, Hooks, NoHooks, PointCtx, StateEvent,
};
pub use irq::{InterruptSink, NullInterrupts, RecordedInterrupt, RecordingInterrupts};
pub use point_decl::PointDecl;
pub use provenance::{
    CacheKind, CacheUse, CachedTranslation, ContextSel, Derived, Divergence, Invalidation, MapEvent,
};
pub use recording::{
    CountingTranslator, RecordedCachedDma, RecordedEvent, RecordedInvalidation, RecordedMapping,
    RecordedPoint, RecordedState, RecordingHooks,
};
pub use state::{
    DeviceState, SmmuState, StateChange, SteConfig, SteMode, ViommuRequest, ViommuState, ZpciState,
};
