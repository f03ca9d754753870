//! The virtio 1.x modern PCI transport and the trait virtio devices implement.
//!
//! A device ([`VirtioDevice`]) knows its type, features, configuration and how to process its
//! queues; the transport ([`VirtioPciFunction`]) owns everything the PCI side of the spec
//! defines: the vendor capabilities, the common configuration structure, feature negotiation,
//! the status state machine, notifications, the ISR and reset. Queues are rust-vmm
//! `virtio_queue::Queue`s built at DRIVER_OK and moved into the device with
//! [`ActivationContext`].
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

mod caps;
mod common;
#[doc(hidden)]
pub mod fuzzing;
pub mod interrupt;
pub mod mem;
pub mod notify;
pub mod request_queue;
mod status;
mod transport;
pub mod worker_wait;

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;

pub use interrupt::VirtioInterrupt;
pub use mem::{DmaMemory, DmaView, SharedMemory, TranslatedMemory};
pub use notify::driver_wants_interrupt;
pub use request_queue::{
    DeferState, RequestHandler, next_messages, serve_requests, serve_requests_with,
};
pub use status::DeviceStatus;
pub use transport::{BAR_SIZE, TransportOptions, VirtioPciFunction};
pub use worker_wait::{QueueEvent, WorkerWait, WorkerWake};

/// Hook point names the transport announces (see `docs/injection.md`).
pub mod points {
    /// The guest wrote the PCI command register (Bus Master Enable; value: the bytes written).
    pub const CFG_WRITE_COMMAND: &str = "pci.cfg.write.command";
    /// Doorbell of device `name` (value: queue index), announced before the device sees it.
    pub fn notify(name: &str) -> String {
        format!("virtio.{name}.notify")
    }
    /// Device status write of device `name` (value: the status written, e.g. DRIVER_OK).
    pub fn status(name: &str) -> String {
        format!("virtio.{name}.status")
    }
    /// The transport's own points (every virtio-pci function).
    pub fn model() -> Vec<sluice_devapi::PointDecl> {
        vec![sluice_devapi::PointDecl::new(CFG_WRITE_COMMAND)]
    }
    /// The points of device instance `name`: its doorbell is reached inside the doorbell write
    /// and once per request.
    pub fn instance(name: &str) -> Vec<sluice_devapi::PointDecl> {
        vec![
            sluice_devapi::PointDecl::new(notify(name))
                .on_doorbell()
                .hot(),
            sluice_devapi::PointDecl::new(status(name)),
        ]
    }
}

/// VIRTIO_RING_F_EVENT_IDX (virtio 1.x §2.7.10): the driver's `used_event` and the device's
/// `avail_event` replace the flags for suppressing interrupts and doorbells. A device offers
/// it; the transport enables it on every queue when the driver accepts it.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// VIRTIO_F_VERSION_1: the modern interface. A modern-only device requires it.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// VIRTIO_F_ACCESS_PLATFORM: the device's DMA goes through the platform IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivationContext {
    /// Guest-physical memory. Only for devices that are not DMA masters behind an IOMMU (the
    /// IOMMU device itself); everything else must use `dma`.
    pub mem: SharedMemory,
    /// Guest memory as this device's DMA sees it: translated when the device sits behind an
    /// IOMMU and the driver negotiated VIRTIO_F_ACCESS_PLATFORM.
    pub dma: DmaMemory,
    /// The enabled queues, by queue index.
    pub queues: Vec<(u16, Queue)>,
    /// Interrupt delivery (used-buffer and configuration-change notifications).
    pub interrupt: Arc<VirtioInterrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Queue doorbells as eventfds, for a device that waits on them itself
    /// ([`VirtioDevice::waits_on_queue_events`]); a doorbell signalled here is not also a
    /// `queue_notify` call. Empty when the backend delivers every doorbell as `queue_notify`.
    pub queue_events: Vec<QueueEvent>,
}

impl ActivationContext {
    /// A context for driving a device directly, without a transport (tests, benchmarks): one
    /// queue (index 0), memory `mem`, DMA through `dma`, interrupts dropped.
    pub fn single_queue(
        mem: &vm_memory::GuestMemoryMmap,
        dma: DmaMemory,
        queue: Queue,
        acked_features: u64,
    ) -> Self {
        ActivationContext {
            mem: SharedMemory::new(mem.clone()),
            dma,
            queues: vec![(0, queue)],
            interrupt: Arc::new(VirtioInterrupt::new(
                sluice_pci::PciInterrupt::new(Arc::new(sluice_devapi::NullInterrupts), None),
                1,
            )),
            acked_features,
            queue_events: Vec::new(),
        }
    }
}

/// Activation failed; the transport sets DEVICE_NEEDS_RESET.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// A queue the device needs is not enabled or not valid.
    #[error("queue {0} is missing or invalid")]
    BadQueue(u16),
    /// Could not start the device's worker.
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
    /// The features in force at DRIVER_OK are not the ones FEATURES_OK accepted (the transport
    /// freezes them; this is the second line of defence).
    #[error("driver features {0:#x} are not acceptable at DRIVER_OK")]
    Features(u64),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 23 = IOMMU, ...).
    fn device_type(&self) -> u16;
    /// Short name used in point names and logs (`blk0`).
    fn name(&self) -> &str;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits (the transport adds VERSION_1 and, when configured, ACCESS_PLATFORM).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration structure.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration structure.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device.
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError>;
    /// The driver notified queue `queue`. Must not block.
    fn queue_notify(&self, queue: u16);
    /// Whether the device's worker waits on its queues' doorbell eventfds itself
    /// ([`ActivationContext::queue_events`]), sparing the backend a thread that turns each into
    /// a `queue_notify` call and the wake-up between the two threads.
    fn waits_on_queue_events(&self) -> bool {
        false
    }
    /// Serves what the driver made available on `queue` without a doorbell, for a backend
    /// thread that polls after serving a doorbell ([`sluice_pci::PciFunction::poll_doorbell`]
    /// has the contract). `None` (the default): the device cannot be polled.
    fn poll_queue(&self, _queue: u16, _quiet: bool) -> Option<bool> {
        None
    }
    /// Stops the device and drops its queues; on return no DMA is in flight.
    fn reset(&mut self);
    /// Per-device counters for reports, as (name, value) pairs.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests;
