//! MSI-X through KVM irq routing: every MSI-X vector of every function owns a GSI with an MSI
//! route (`KVM_SET_GSI_ROUTING`) and an irqfd (`KVM_IRQFD`), so a device worker's interrupt is
//! one eventfd write instead of a synchronous `KVM_SIGNAL_MSI` ioctl.
//!
//! Device models stay behind `InterruptSink`: the MSI-X table (`sluice_pci::MsixTable`) still
//! decides whether a vector fires or becomes pending, and hands the backend the message it
//! fires. The VMM follows the guest's programming of each table (re-read after every config
//! write and every write into the table) and routes each vector's message while the vector is
//! enabled and unmasked. A message is delivered through the irqfd of a vector routed to that
//! very message; anything else (a vector whose re-read has not run yet, e.g. the pending message
//! the unmasking write itself delivers, or a VM where routing failed) goes through
//! `KVM_SIGNAL_MSI`. The result is the same interrupt either way.
//!
//! Masking needs no route change: a masked vector's message is never handed to the backend (the
//! table sets its pending bit instead), so its irqfd is never written. Its last route is kept,
//! so an injection KVM still has in flight is never dropped by a route removal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_msi,
};
use kvm_ioctls::VmFd;
use sluice_devapi::Bdf;
use sluice_host::MsiDelivery;
use sluice_pci::PciFunction;
use vmm_sys_util::eventfd::EventFd;

use crate::pci_caps::{MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK, MsixLayout};
use crate::stats::{VmmStats, bump};

/// GSIs 0..24 are the irqchip's (PIC and IOAPIC pins); MSI routes start here.
pub const FIRST_MSI_GSI: u32 = 24;
/// MSI vectors routed at most, VM-wide (KVM allows 4096 routes; Sluice functions have 8).
pub const MAX_MSI_ROUTES: usize = 1024;

/// One GSI routing entry, as the VMM reasons about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// GSI to a pin of the PIC (chip 0 master, 1 slave) or the IOAPIC (chip 2).
    Irqchip {
        /// GSI.
        gsi: u32,
        /// `KVM_IRQCHIP_*`.
        chip: u32,
        /// Pin on that chip.
        pin: u32,
    },
    /// GSI to an MSI message.
    Msi {
        /// GSI.
        gsi: u32,
        /// Message address.
        address: u64,
        /// Message data.
        data: u32,
    },
}

impl Route {
    fn entry(self) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry::default();
        match self {
            Route::Irqchip { gsi, chip, pin } => {
                e.gsi = gsi;
                e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                e.u.irqchip.irqchip = chip;
                e.u.irqchip.pin = pin;
            }
            Route::Msi { gsi, address, data } => {
                e.gsi = gsi;
                e.type_ = KVM_IRQ_ROUTING_MSI;
                e.u.msi.address_lo = address as u32;
                e.u.msi.address_hi = (address >> 32) as u32;
                e.u.msi.data = data;
            }
        }
        e
    }
}

/// The routes KVM sets up itself with the in-kernel irqchip (GSIs 0–15 to both the PIC and
/// the IOAPIC, 16–23 to the IOAPIC): `KVM_SET_GSI_ROUTING` replaces the whole table, so every
/// call must carry them again or the serial port and INTx irqfds would lose their pins.
pub fn irqchip_routes() -> Vec<Route> {
    let mut v = Vec::new();
    for gsi in 0..FIRST_MSI_GSI {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(Route::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
        v.push(Route::Irqchip {
            gsi,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: gsi,
        });
    }
    v
}

/// Which GSIs belong to MSI-X vectors and the message each is routed to.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Indexed by `gsi - FIRST_MSI_GSI`: the routed message, if any yet.
    vectors: Vec<Option<(u64, u32)>>,
}

impl RouteTable {
    /// Gives one more vector a GSI (stable for the VM's life), or `None` when
    /// [`MAX_MSI_ROUTES`] are taken.
    pub fn add_vector(&mut self) -> Option<u32> {
        if self.vectors.len() >= MAX_MSI_ROUTES {
            return None;
        }
        self.vectors.push(None);
        Some(FIRST_MSI_GSI + (self.vectors.len() - 1) as u32)
    }

    /// Routes `gsi` to `message`. Returns true if that changed the table.
    pub fn set(&mut self, gsi: u32, message: (u64, u32)) -> bool {
        let slot = gsi
            .checked_sub(FIRST_MSI_GSI)
            .and_then(|i| self.vectors.get_mut(i as usize));
        match slot {
            Some(routed) if *routed != Some(message) => {
                *routed = Some(message);
                true
            }
            _ => false,
        }
    }

    /// Every routed vector GSI and its message, lowest GSI first.
    pub fn routed(&self) -> impl Iterator<Item = (u32, (u64, u32))> + '_ {
        self.vectors
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.map(|m| (FIRST_MSI_GSI + i as u32, m)))
    }

    /// The whole table KVM must get: irqchip routes, then every routed vector.
    pub fn routes(&self) -> Vec<Route> {
        let mut v = irqchip_routes();
        v.extend(
            self.routed()
                .map(|(gsi, (address, data))| Route::Msi { gsi, address, data }),
        );
        v
    }

    /// Delivery lookup: each routed message to the lowest GSI routed to it (two vectors
    /// programmed with one message raise the same interrupt, so either will do).
    pub fn by_message(&self) -> HashMap<(u64, u32), u32> {
        let mut m = HashMap::new();
        for (gsi, message) in self.routed() {
            m.entry(message).or_insert(gsi);
        }
        m
    }
}

/// A function whose MSI-X vectors have routes.
struct TrackedMsix {
    bdf: Bdf,
    function: Arc<dyn PciFunction>,
    layout: MsixLayout,
    /// GSI and irqfd per vector.
    vectors: Vec<(u32, Arc<EventFd>)>,
}

struct Routing {
    table: RouteTable,
    functions: Vec<TrackedMsix>,
}

/// The backend's [`MsiDelivery`]: irqfds where a route exists, `KVM_SIGNAL_MSI` otherwise.
pub struct MsiRouter {
    vm: Arc<VmFd>,
    stats: Arc<VmmStats>,
    /// Held across a function's re-read and the routing ioctl, so that two vCPUs re-reading
    /// one table cannot apply an older reading last. Never taken on the delivery path.
    routing: Mutex<Routing>,
    /// Delivery lookup: routed message → the irqfd of a GSI routed to it.
    by_message: RwLock<HashMap<(u64, u32), Arc<EventFd>>>,
    /// Where each tracked function's table is: checked on every BAR write, so kept out of
    /// the `routing` mutex.
    tables: RwLock<Vec<(Bdf, MsixLayout)>>,
    /// Routing or irqfd registration failed once: every message is signalled from then on.
    broken: AtomicBool,
}

impl MsiRouter {
    /// For `vm`, which must have its in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>, stats: Arc<VmmStats>) -> Self {
        MsiRouter {
            vm,
            stats,
            routing: Mutex::new(Routing {
                table: RouteTable::default(),
                functions: Vec::new(),
            }),
            by_message: RwLock::new(HashMap::new()),
            tables: RwLock::new(Vec::new()),
            broken: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routing> {
        self.routing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn give_up(&self, what: &str, e: &dyn std::fmt::Display) {
        bump(&self.stats.msi_routing_failures);
        if !self.broken.swap(true, Ordering::AcqRel) {
            log::warn!("{what} failed ({e}): MSI-X falls back to KVM_SIGNAL_MSI for this VM");
        }
        self.by_message
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Gives every MSI-X vector of `function` a GSI and an irqfd. A function without MSI-X is
    /// ignored.
    pub fn track(&self, bdf: Bdf, function: Arc<dyn PciFunction>) {
        let Some(layout) = MsixLayout::read(function.as_ref()) else {
            return;
        };
        let mut r = self.lock();
        let mut vectors = Vec::new();
        for v in 0..layout.vectors {
            let Some(gsi) = r.table.add_vector() else {
                log::warn!("{bdf}: no GSI left for MSI-X vector {v}; it is signalled");
                break;
            };
            let fd = match EventFd::new(libc::EFD_NONBLOCK) {
                Ok(fd) => Arc::new(fd),
                Err(e) => return self.give_up("eventfd", &e),
            };
            if let Err(e) = self.vm.register_irqfd(&fd, gsi) {
                return self.give_up("KVM_IRQFD", &e);
            }
            vectors.push((gsi, fd));
        }
        r.functions.push(TrackedMsix {
            bdf,
            function,
            layout,
            vectors,
        });
        self.tables
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((bdf, layout));
    }

    /// The guest wrote configuration space of `bdf` (MSI-X Enable / Function Mask).
    pub fn config_written(&self, bdf: Bdf) {
        self.resync(bdf);
    }

    /// The guest wrote BAR `bar` of `bdf` at `offset`; a write into the table is followed.
    pub fn bar_written(&self, bdf: Bdf, bar: u8, offset: u64) {
        let in_table = self
            .tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(b, layout)| *b == bdf && layout.in_table(bar, offset));
        if in_table {
            self.resync(bdf);
        }
    }

    /// Re-reads `bdf`'s MSI-X state and routes every enabled, unmasked vector's message.
    fn resync(&self, bdf: Bdf) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut guard = self.lock();
        let r = &mut *guard;
        let Some(t) = r.functions.iter().find(|t| t.bdf == bdf) else {
            return;
        };
        let f = t.function.as_ref();
        let control = t.layout.control(f);
        if control & MSIX_CTRL_ENABLE == 0 || control & MSIX_CTRL_FUNCTION_MASK != 0 {
            return;
        }
        let mut changed = false;
        for (v, (gsi, _)) in t.vectors.iter().enumerate() {
            let (address, data, masked) = t.layout.entry(f, v as u16);
            if !masked {
                changed |= r.table.set(*gsi, (address, data));
            }
        }
        if !changed {
            return;
        }
        let entries: Vec<kvm_irq_routing_entry> =
            r.table.routes().into_iter().map(Route::entry).collect();
        let routing = match KvmIrqRouting::from_entries(&entries) {
            Ok(routing) => routing,
            Err(e) => return self.give_up("building the GSI routing table", &format!("{e:?}")),
        };
        if let Err(e) = self.vm.set_gsi_routing(&routing) {
            return self.give_up("KVM_SET_GSI_ROUTING", &e);
        }
        bump(&self.stats.msi_route_updates);
        let fds: HashMap<u32, &Arc<EventFd>> = r
            .functions
            .iter()
            .flat_map(|t| t.vectors.iter().map(|(gsi, fd)| (*gsi, fd)))
            .collect();
        let lookup = r
            .table
            .by_message()
            .into_iter()
            .filter_map(|(m, gsi)| fds.get(&gsi).map(|fd| (m, Arc::clone(fd))))
            .collect();
        *self.by_message.write().unwrap_or_else(|p| p.into_inner()) = lookup;
    }

    fn signal(&self, address: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            Ok(_) => bump(&self.stats.msi_signalled),
            Err(e) => {
                if self.stats.msi_refused.fetch_add(1, Ordering::Relaxed) < 8 {
                    log::warn!("KVM_SIGNAL_MSI {address:#x}={data:#x} failed: {e}");
                }
            }
        }
    }
}

impl MsiDelivery for MsiRouter {
    fn deliver(&self, address: u64, data: u32) {
        let fd = self
            .by_message
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(address, data))
            .cloned();
        match fd {
            Some(fd) if fd.write(1).is_ok() => bump(&self.stats.msi_irqfd),
            _ => self.signal(address, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irqchip_routes_mirror_kvm_defaults() {
        let r = irqchip_routes();
        assert_eq!(r.len(), 16 * 2 + 8);
        assert!(r.contains(&Route::Irqchip {
            gsi: 4,
            chip: KVM_IRQCHIP_PIC_MASTER,
            pin: 4
        }));
        assert!(r.contains(&Route::Irqchip {
            gsi: 12,
            chip: KVM_IRQCHIP_PIC_SLAVE,
            pin: 4
        }));
        assert!(r.contains(&Route::Irqchip {
            gsi: 19,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: 19
        }));
        assert!(!r.iter().any(|x| matches!(x,
            Route::Irqchip { gsi: 19, chip, .. } if *chip != KVM_IRQCHIP_IOAPIC)));
    }

    #[test]
    fn vectors_get_stable_gsis_and_routes_change_only_with_the_message() {
        let mut t = RouteTable::default();
        let (a0, a1, b0) = (
            t.add_vector().unwrap(),
            t.add_vector().unwrap(),
            t.add_vector().unwrap(),
        );
        assert_eq!((a0, a1, b0), (24, 25, 26));
        assert_eq!(
            t.routes().len(),
            irqchip_routes().len(),
            "nothing routed yet"
        );
        assert!(t.set(a1, (0xfee0_0000, 0x41)));
        assert!(!t.set(a1, (0xfee0_0000, 0x41)), "same message: no update");
        assert!(t.set(a1, (0xfee0_1000, 0x41)), "retargeted");
        assert!(!t.set(99, (0, 0)), "not a vector GSI");
        assert!(!t.set(3, (0, 0)), "irqchip GSI");
        let lookup = t.by_message();
        assert_eq!(lookup.get(&(0xfee0_1000, 0x41)), Some(&a1));
        assert_eq!(lookup.get(&(0xfee0_0000, 0x41)), None, "old message gone");
        assert_eq!(
            t.routes().last(),
            Some(&Route::Msi {
                gsi: 25,
                address: 0xfee0_1000,
                data: 0x41
            })
        );
        // Two vectors with one message: delivery takes the lowest GSI.
        assert!(t.set(b0, (0xfee0_1000, 0x41)));
        assert!(t.set(a0, (0xfee0_0000, 0x42)));
        let lookup = t.by_message();
        assert_eq!(lookup.len(), 2);
        assert_eq!(lookup.get(&(0xfee0_1000, 0x41)), Some(&a1));
        assert_eq!(t.routes().len(), irqchip_routes().len() + 3);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = RouteTable::default();
        for _ in 0..MAX_MSI_ROUTES {
            assert!(t.add_vector().is_some());
        }
        assert_eq!(t.add_vector(), None);
    }

    /// Against a real VM: routes follow MSI-X Enable and the table, deliveries of routed
    /// messages use the irqfd, anything else is signalled.
    #[test]
    fn routes_follow_the_table_and_delivery_picks_the_path() {
        let Some(vm) = crate::testing::vm_or_skip() else {
            return;
        };
        let (f, dir) = crate::testing::virtio_blk("kvm-msi", 4);
        let stats = Arc::new(VmmStats::default());
        let bdf = Bdf::new(0, 3, 0);
        let router = MsiRouter::new(vm, stats.clone());
        router.track(bdf, f.clone());
        let program = |v: u64, address: u32, data: u32, masked: bool| {
            f.bar_write(1, v * 16, &address.to_le_bytes());
            f.bar_write(1, v * 16 + 8, &data.to_le_bytes());
            f.bar_write(1, v * 16 + 12, &u32::from(masked).to_le_bytes());
            router.bar_written(bdf, 1, v * 16 + 12);
        };
        program(0, 0xfee0_0000, 0x41, false);
        assert_eq!(
            stats.snapshot().msi_route_updates,
            0,
            "MSI-X still disabled"
        );
        let cap = MsixLayout::read(f.as_ref()).unwrap().cap;
        f.config_write(cap + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
        router.config_written(bdf);
        assert_eq!(stats.snapshot().msi_route_updates, 1);
        router.deliver(0xfee0_0000, 0x41);
        assert_eq!(stats.snapshot().msi_irqfd, 1);
        program(1, 0xfee0_0000, 0x42, true);
        assert_eq!(stats.snapshot().msi_route_updates, 1, "masked: no route");
        program(1, 0xfee0_0000, 0x42, false);
        assert_eq!(stats.snapshot().msi_route_updates, 2, "unmasked: routed");
        program(0, 0xfee0_0000, 0x41, false);
        assert_eq!(
            stats.snapshot().msi_route_updates,
            2,
            "rewritten unchanged: no update"
        );
        router.deliver(0xfee0_0000, 0x42);
        router.deliver(0xfee0_0000, 0x77);
        let s = stats.snapshot();
        assert_eq!(s.msi_irqfd, 2);
        assert_eq!(
            s.msi_signalled + s.msi_refused,
            1,
            "unrouted message: KVM_SIGNAL_MSI"
        );
        assert_eq!(s.msi_routing_failures, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
