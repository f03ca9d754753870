//! Counters of the VMM's interrupt, doorbell and breakpoint paths: which path each event took,
//! so tests and reports can tell an ioeventfd doorbell from an MMIO exit and an irqfd MSI from
//! a `KVM_SIGNAL_MSI`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by the vCPU threads, the doorbell loop and the device workers.
/// Take a [`VmmStats::snapshot`] to read them.
#[derive(Debug, Default)]
pub struct VmmStats {
    pub(crate) doorbell_exits: AtomicU64,
    pub(crate) doorbell_eventfds: AtomicU64,
    pub(crate) ioeventfd_registrations: AtomicU64,
    pub(crate) ioeventfd_failures: AtomicU64,
    pub(crate) msi_irqfd: AtomicU64,
    pub(crate) msi_signalled: AtomicU64,
    pub(crate) msi_refused: AtomicU64,
    pub(crate) msi_route_updates: AtomicU64,
    pub(crate) msi_routing_failures: AtomicU64,
    pub(crate) breakpoint_hits: AtomicU64,
    pub(crate) breakpoint_stalls: AtomicU64,
    pub(crate) breakpoint_stalled_us: AtomicU64,
}

/// One reading of [`VmmStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmCounters {
    /// virtio queue doorbells that reached the device through an MMIO exit.
    pub doorbell_exits: u64,
    /// virtio queue doorbells served from an ioeventfd (one per wake-up; KVM coalesces
    /// doorbells rung before the loop read the eventfd, which the device sees as one notify,
    /// as it would see back-to-back notifies of an empty queue).
    pub doorbell_eventfds: u64,
    /// Times a function's doorbells were registered with KVM (BAR placed, DRIVER_OK, moves).
    pub ioeventfd_registrations: u64,
    /// `KVM_IOEVENTFD` calls KVM refused, registrations (those doorbells stay on the MMIO-exit
    /// path) or removals.
    pub ioeventfd_failures: u64,
    /// MSI messages delivered by writing a vector's irqfd.
    pub msi_irqfd: u64,
    /// MSI messages delivered with `KVM_SIGNAL_MSI` (no route for that message yet, or
    /// routing unavailable).
    pub msi_signalled: u64,
    /// MSI messages KVM refused.
    pub msi_refused: u64,
    /// `KVM_SET_GSI_ROUTING` calls that changed an MSI route.
    pub msi_route_updates: u64,
    /// `KVM_SET_GSI_ROUTING`/`KVM_IRQFD` failures (the VM then signals every MSI).
    pub msi_routing_failures: u64,
    /// Debug exits at a `guest.sym` breakpoint.
    pub breakpoint_hits: u64,
    /// Hits the injector turned into a stall.
    pub breakpoint_stalls: u64,
    /// Total time those stalls held their vCPUs, in microseconds.
    pub breakpoint_stalled_us: u64,
}

impl VmmStats {
    /// Current values.
    pub fn snapshot(&self) -> VmmCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VmmCounters {
            doorbell_exits: r(&self.doorbell_exits),
            doorbell_eventfds: r(&self.doorbell_eventfds),
            ioeventfd_registrations: r(&self.ioeventfd_registrations),
            ioeventfd_failures: r(&self.ioeventfd_failures),
            msi_irqfd: r(&self.msi_irqfd),
            msi_signalled: r(&self.msi_signalled),
            msi_refused: r(&self.msi_refused),
            msi_route_updates: r(&self.msi_route_updates),
            msi_routing_failures: r(&self.msi_routing_failures),
            breakpoint_hits: r(&self.breakpoint_hits),
            breakpoint_stalls: r(&self.breakpoint_stalls),
            breakpoint_stalled_us: r(&self.breakpoint_stalled_us),
        }
    }
}

/// Adds one to a counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
