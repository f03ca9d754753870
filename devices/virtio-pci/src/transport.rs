//! The PCI function that carries a virtio device.

use std::sync::{Arc, Mutex, MutexGuard};

use sluice_devapi::{
    Bdf, DeviceState, Endpoint, EndpointIommu, Hooks, InterruptSink, PointCtx, StateEvent,
};
use sluice_pci::config::ConfigWriteEffect;
use sluice_pci::{BarKind, BarSpec, ConfigSpace, MsixTable, PciFunction, PciIds, PciInterrupt};
use virtio_queue::{Queue, QueueT};

use crate::caps::{self, pci_cfg};
use crate::common::{CommonConfig, CommonWrite};
use crate::interrupt::VirtioInterrupt;
use crate::mem::{DmaMemory, DmaView, SharedMemory};
use crate::status::{DEVICE_NEEDS_RESET, DeviceStatus, StatusWrite};
use crate::{
    ActivateError, ActivationContext, QueueEvent, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VirtioDevice,
};

/// Size of the BAR holding the virtio structures (32-bit memory BAR 0).
pub const BAR_SIZE: u64 = 0x4000;
const VIRTIO_BAR: u8 = 0;
const MSIX_BAR: u8 = 1;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_PBA_OFFSET: u32 = 0x800;
const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_DEVICE_BASE: u16 = 0x1040;

/// How a transport instance is set up.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Where the function sits; used as its DMA endpoint identity in hooks.
    pub bdf: Bdf,
    /// Offer VIRTIO_F_ACCESS_PLATFORM (the device sits behind an IOMMU); the driver must
    /// accept it.
    pub access_platform: bool,
    /// MSI-X vectors (0: INTx only, as QEMU's proxy requires).
    pub msix_vectors: u16,
    /// PCI class code.
    pub class_code: u32,
    /// The IOMMU endpoint this function's DMA goes through, if it sits behind one. Implies
    /// offering VIRTIO_F_ACCESS_PLATFORM.
    pub iommu: Option<EndpointIommu>,
}

struct Inner {
    cfg: ConfigSpace,
    common: CommonConfig,
    status: DeviceStatus,
    needs_reset: bool,
    device: Box<dyn VirtioDevice>,
    mem: SharedMemory,
    offered: u64,
    pci_cfg_cap: u8,
    msix_cap: Option<u8>,
    iommu: Option<EndpointIommu>,
    /// Doorbell eventfds the backend handed over for the device to wait on
    /// ([`VirtioPciFunction::hand_queue_doorbells`]); each activation gets copies.
    queue_doorbells: Vec<QueueEvent>,
}

/// A virtio device on the modern PCI transport.
pub struct VirtioPciFunction {
    inner: Mutex<Inner>,
    interrupt: Arc<VirtioInterrupt>,
    msix: Option<Arc<Mutex<MsixTable>>>,
    hooks: Arc<dyn Hooks>,
    endpoint: Endpoint,
    notify_point: String,
    status_point: String,
}

impl VirtioPciFunction {
    /// Wraps `device`. `sink` receives INTx (line 0) and MSI-X messages.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        opts: TransportOptions,
        mem: SharedMemory,
        sink: Arc<dyn InterruptSink>,
        hooks: Arc<dyn Hooks>,
    ) -> Result<Self, sluice_pci::ConfigError> {
        let ids = PciIds {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE + device.device_type(),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem_id: 0x40,
            class_code: opts.class_code,
            revision: 1,
        };
        let mut cfg = ConfigSpace::new(ids, 1);
        cfg.add_bar(BarSpec {
            index: VIRTIO_BAR,
            size: BAR_SIZE,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        })?;
        let pci_cfg_cap = caps::add_virtio_caps(&mut cfg, VIRTIO_BAR)?;
        let (msix, msix_cap) = if opts.msix_vectors > 0 {
            let table = MsixTable::new(opts.msix_vectors, MSIX_BAR, 0, MSIX_PBA_OFFSET);
            cfg.add_bar(BarSpec {
                index: MSIX_BAR,
                size: MSIX_BAR_SIZE,
                kind: BarKind::Mem32 {
                    prefetchable: false,
                },
            })?;
            let (body, mask) = table.capability();
            let off = cfg.add_capability(sluice_pci::msix::CAP_ID_MSIX, &body, &mask)?;
            (Some(Arc::new(Mutex::new(table))), Some(off))
        } else {
            (None, None)
        };
        let queues = device.queue_max_sizes().len();
        let interrupt = Arc::new(VirtioInterrupt::new(
            PciInterrupt::new(sink, msix.clone()),
            queues,
        ));
        let mut offered = device.features() | (1u64 << VIRTIO_F_VERSION_1);
        if opts.access_platform || opts.iommu.is_some() {
            offered |= 1u64 << VIRTIO_F_ACCESS_PLATFORM;
        }
        let name = device.name().to_string();
        let common = CommonConfig::new(device.queue_max_sizes(), msix.is_some());
        Ok(VirtioPciFunction {
            inner: Mutex::new(Inner {
                cfg,
                common,
                status: DeviceStatus::Reset,
                needs_reset: false,
                device,
                mem,
                offered,
                pci_cfg_cap,
                msix_cap,
                iommu: opts.iommu,
                queue_doorbells: Vec::new(),
            }),
            interrupt,
            msix,
            hooks,
            endpoint: Endpoint::Pci(opts.bdf),
            notify_point: crate::points::notify(&name),
            status_point: crate::points::status(&name),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The interrupt object (backends poll `intx_pending` on INTx resample).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The queue doorbells (virtio 1.x §4.1.4.4: queue `q` at `NOTIFY_OFFSET + q *
    /// NOTIFY_MULTIPLIER`, the driver writes the 16-bit queue index there), for a backend that
    /// absorbs them into eventfds and replays them with `bar_write`. Writes of another size or
    /// elsewhere in the area still arrive as BAR writes and mean the same.
    pub fn doorbells(&self) -> Vec<sluice_pci::Doorbell> {
        let queues = self.lock().common.queues.len() as u64;
        (0..queues)
            .filter_map(|q| {
                let offset = caps::NOTIFY_OFFSET + q * u64::from(caps::NOTIFY_MULTIPLIER);
                (offset + 2 <= caps::NOTIFY_OFFSET + caps::NOTIFY_SIZE).then_some(
                    sluice_pci::Doorbell {
                        bar: VIRTIO_BAR,
                        offset,
                        size: 2,
                        datamatch: None,
                        value: q,
                    },
                )
            })
            .collect()
    }

    /// Hands the queue doorbell eventfds of [`Self::doorbells`] (as the backend registered
    /// them) to the device's worker, which then waits on them itself: no backend thread needs
    /// to replay them as `bar_write`s. False when the device does not wait on eventfds, or is
    /// running (it keeps what it was started with until the next activation): the backend
    /// then replays them itself, and nothing is kept here.
    pub fn hand_queue_doorbells(&self, events: Vec<QueueEvent>) -> bool {
        let mut inner = self.lock();
        inner.queue_doorbells = Vec::new();
        if !inner.device.waits_on_queue_events() || inner.status == DeviceStatus::Running {
            return false;
        }
        inner.queue_doorbells = events;
        true
    }

    /// Copies of the handed-over doorbells for one activation, each announcing the transport's
    /// doorbell hook point (as a replayed `bar_write` would) before the backend's own `rung`.
    fn queue_events_for_activation(&self, inner: &Inner) -> Result<Vec<QueueEvent>, ActivateError> {
        inner
            .queue_doorbells
            .iter()
            .map(|e| {
                let hooks = self.hooks.clone();
                let endpoint = self.endpoint;
                let point = self.notify_point.clone();
                let (queue, backend) = (e.queue, e.rung.clone());
                Ok(QueueEvent {
                    queue,
                    fd: e.fd.try_clone().map_err(ActivateError::Worker)?,
                    rung: Arc::new(move || {
                        hooks.point(&PointCtx {
                            point: &point,
                            endpoint: Some(endpoint),
                            domain: None,
                            value: u64::from(queue),
                        });
                        backend();
                    }),
                })
            })
            .collect()
    }

    /// Hands MSI-X delivery to `relay` (see [`sluice_pci::VectorRelay`]): the backend emulates
    /// this function's MSI-X table itself. False if the function has no MSI-X.
    pub fn set_vector_relay(&self, relay: Option<Arc<dyn sluice_pci::VectorRelay>>) -> bool {
        self.interrupt.pci().set_relay(relay)
    }

    /// MSI-X vectors of the function (0: INTx only).
    pub fn msix_vectors(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| {
            m.lock().unwrap_or_else(|p| p.into_inner()).len() as u16
        })
    }

    /// Current device status byte.
    pub fn status(&self) -> u8 {
        let inner = self.lock();
        inner.status.bits()
            | if inner.needs_reset {
                DEVICE_NEEDS_RESET
            } else {
                0
            }
    }

    /// Bus Master Enable as last written by the guest.
    pub fn bus_master_enabled(&self) -> bool {
        self.lock().cfg.bus_master_enabled()
    }

    /// The device's counters.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.lock().device.counters()
    }

    /// Device name (`blk0`).
    pub fn name(&self) -> String {
        self.lock().device.name().to_string()
    }

    fn point(&self, name: &str, value: u64) {
        self.hooks.point(&PointCtx {
            point: name,
            endpoint: Some(self.endpoint),
            domain: None,
            value,
        });
    }

    fn state(&self, change: DeviceState) {
        self.hooks.state(&StateEvent {
            source: "virtio-pci",
            endpoint: Some(self.endpoint),
            change: change.into(),
        });
    }

    fn reset_locked(&self, inner: &mut Inner) {
        inner.device.reset();
        inner.common.reset();
        inner.status = DeviceStatus::Reset;
        inner.needs_reset = false;
        self.interrupt.reset();
    }

    fn features_acceptable(inner: &Inner) -> bool {
        let acked = inner.common.driver_features;
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        let platform = 1u64 << VIRTIO_F_ACCESS_PLATFORM;
        let unknown = acked & !inner.offered;
        let missing_platform = inner.offered & platform != 0 && acked & platform == 0;
        if unknown != 0 || acked & version_1 == 0 || missing_platform {
            log::warn!(
                "virtio {}: refusing FEATURES_OK (acked {acked:#x}, offered {:#x})",
                inner.device.name(),
                inner.offered
            );
            return false;
        }
        true
    }

    /// The memory view the device's DMA must use: translated when it sits behind an IOMMU and
    /// the driver accepted ACCESS_PLATFORM (which `features_acceptable` insists on).
    fn dma_memory(inner: &Inner) -> DmaMemory {
        let platform = inner.common.driver_features & (1u64 << VIRTIO_F_ACCESS_PLATFORM) != 0;
        match (&inner.iommu, platform) {
            (Some(iommu), true) => DmaMemory::Translated {
                phys: inner.mem.clone(),
                iommu: iommu.clone(),
            },
            _ => DmaMemory::Direct(inner.mem.clone()),
        }
    }

    fn activate_locked(&self, inner: &mut Inner) -> Result<(), ActivateError> {
        // Never activate with features FEATURES_OK would have refused: without ACCESS_PLATFORM
        // a device behind an IOMMU would get untranslated memory.
        if !Self::features_acceptable(inner) {
            return Err(ActivateError::Features(inner.common.driver_features));
        }
        let dma = Self::dma_memory(inner);
        let view = dma.view();
        let mut queues = Vec::new();
        for (i, regs) in inner.common.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let index = i as u16;
            let mut q = Queue::new(regs.max).map_err(|_| ActivateError::BadQueue(index))?;
            q.set_size(regs.size);
            q.set_desc_table_address(Some(regs.desc as u32), Some((regs.desc >> 32) as u32));
            q.set_avail_ring_address(Some(regs.driver as u32), Some((regs.driver >> 32) as u32));
            q.set_used_ring_address(Some(regs.device as u32), Some((regs.device >> 32) as u32));
            q.set_event_idx(
                inner.common.driver_features & (1u64 << crate::VIRTIO_RING_F_EVENT_IDX) != 0,
            );
            q.set_ready(true);
            let valid = match &view {
                DmaView::Direct(m) => q.is_valid(m.as_ref()),
                DmaView::Translated(m) => q.is_valid(m),
            };
            if !valid {
                return Err(ActivateError::BadQueue(index));
            }
            queues.push((index, q));
        }
        let ctx = ActivationContext {
            mem: inner.mem.clone(),
            dma,
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: inner.common.driver_features,
            queue_events: self.queue_events_for_activation(inner)?,
        };
        inner.device.activate(ctx)
    }

    fn write_status(&self, inner: &mut Inner, value: u8) {
        log::debug!(
            "virtio {}: status write {value:#x} in {:?}",
            inner.device.name(),
            inner.status
        );
        match inner.status.on_write(value) {
            StatusWrite::Reset => {
                self.reset_locked(inner);
                self.state(DeviceState::Reset);
            }
            StatusWrite::Advance {
                to,
                features_ok,
                activate,
            } => {
                if features_ok {
                    if !Self::features_acceptable(inner) {
                        // The driver reads FEATURES_OK back and sees it missing.
                        inner.status = DeviceStatus::DriverLoaded;
                        return;
                    }
                    inner.common.features_frozen = true;
                    self.state(DeviceState::FeaturesOk {
                        features: inner.common.driver_features,
                    });
                }
                inner.status = to;
                if activate {
                    if let Err(e) = self.activate_locked(inner) {
                        log::warn!("virtio {}: activation failed: {e}", inner.device.name());
                        inner.needs_reset = true;
                        self.interrupt.signal_config();
                    }
                    self.state(DeviceState::DriverOk {
                        usable: !inner.needs_reset,
                    });
                }
            }
            StatusWrite::Illegal => log::warn!(
                "virtio {}: ignoring illegal status write {value:#x} in {:?}",
                inner.device.name(),
                inner.status
            ),
        }
    }

    fn virtio_bar_read(&self, inner: &mut Inner, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        // Each structure serves only accesses that lie wholly inside its window: a straddling
        // access reads 0 and a device never sees an offset past its config.
        let inside =
            |start: u64, size: u64| offset >= start && offset.saturating_add(len) <= start + size;
        let value = match offset {
            o if inside(caps::COMMON_OFFSET, caps::COMMON_SIZE) => {
                let status = inner.status.bits()
                    | if inner.needs_reset {
                        DEVICE_NEEDS_RESET
                    } else {
                        0
                    };
                inner.common.read(o, data.len(), inner.offered, status)
            }
            // ISR is one byte: only a read of its first byte returns (and clears) it.
            caps::ISR_OFFSET => u64::from(self.interrupt.read_isr()),
            o if inside(caps::DEVICE_OFFSET, caps::DEVICE_SIZE) => {
                inner.device.read_config(o - caps::DEVICE_OFFSET, data);
                return;
            }
            _ => 0,
        };
        sluice_pci::put_le(data, value);
    }

    /// Returns the queue to notify, if the write was a doorbell.
    fn virtio_bar_write(&self, inner: &mut Inner, offset: u64, data: &[u8]) -> Option<u16> {
        let value = sluice_pci::le_value(data);
        let len = data.len() as u64;
        let inside =
            |start: u64, size: u64| offset >= start && offset.saturating_add(len) <= start + size;
        match offset {
            o if inside(caps::COMMON_OFFSET, caps::COMMON_SIZE) => {
                match inner.common.write(o, data.len(), value) {
                    CommonWrite::Status(v) => self.write_status(inner, v),
                    CommonWrite::QueueVector(q, v) => self.interrupt.set_queue_vector(q, v),
                    CommonWrite::ConfigVector(v) => self.interrupt.set_config_vector(v),
                    CommonWrite::None => {}
                }
            }
            o if inside(caps::DEVICE_OFFSET, caps::DEVICE_SIZE) => {
                inner.device.write_config(o - caps::DEVICE_OFFSET, data);
            }
            o if inside(caps::NOTIFY_OFFSET, caps::NOTIFY_SIZE) => {
                let q = ((o - caps::NOTIFY_OFFSET) / u64::from(caps::NOTIFY_MULTIPLIER)) as u16;
                return Some(q);
            }
            _ => {}
        }
        None
    }

    fn bar_access(
        &self,
        inner: &mut Inner,
        bar: u8,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Option<u16> {
        match bar {
            VIRTIO_BAR if write => return self.virtio_bar_write(inner, offset, data),
            VIRTIO_BAR => self.virtio_bar_read(inner, offset, data),
            MSIX_BAR => {
                if let Some(m) = &self.msix {
                    let mut t = m.lock().unwrap_or_else(|p| p.into_inner());
                    if write {
                        t.write(offset, data, self.interrupt.pci().sink());
                    } else {
                        t.read(offset, data);
                    }
                }
            }
            _ => data.iter_mut().for_each(|b| *b = 0xff),
        }
        None
    }

    /// The guest accessed `pci_cfg_data` of the configuration-access capability: perform the
    /// BAR access it describes (only naturally sized 1/2/4-byte accesses to our BAR).
    fn pci_cfg_window(&self, inner: &mut Inner, data: &mut [u8], write: bool) -> Option<u16> {
        let cap = u16::from(inner.pci_cfg_cap);
        let mut bar = [0u8];
        inner.cfg.read(cap + u16::from(pci_cfg::BAR), &mut bar);
        let offset = u64::from(inner.cfg.read_u32(cap + u16::from(pci_cfg::OFFSET)));
        let length = inner.cfg.read_u32(cap + u16::from(pci_cfg::LENGTH)) as usize;
        if !matches!(length, 1 | 2 | 4) || length > data.len() {
            return None;
        }
        // This window reaches the BAR without the bus guard: apply the same rule here, the
        // access must lie inside the BAR it names.
        let bar_size = match bar[0] {
            VIRTIO_BAR => BAR_SIZE,
            MSIX_BAR if self.msix.is_some() => MSIX_BAR_SIZE,
            _ => 0,
        };
        if offset.saturating_add(length as u64) > bar_size {
            return None;
        }
        let (head, _) = data.split_at_mut(length);
        self.bar_access(inner, bar[0], offset, head, write)
    }

    fn after_config_write(
        &self,
        inner: &mut Inner,
        offset: u16,
        len: usize,
        effect: ConfigWriteEffect,
    ) {
        if let Some((_, new)) = effect.command {
            self.interrupt
                .pci()
                .set_intx_disabled(new & sluice_pci::config::CMD_INTX_DISABLE != 0);
        }
        if let Some(bme) = effect.bus_master_change() {
            self.state(DeviceState::BusMasterEnable { enabled: bme });
        }
        if let (Some(cap), Some(m)) = (inner.msix_cap, &self.msix) {
            let ctrl = u16::from(cap) + 2;
            if offset < ctrl + 2 && offset + len as u16 > ctrl {
                let v = inner.cfg.read_u16(ctrl);
                m.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_control(v, self.interrupt.pci().sink());
            }
        }
    }
}

impl PciFunction for VirtioPciFunction {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        let mut inner = self.lock();
        let window = u16::from(inner.pci_cfg_cap) + u16::from(pci_cfg::DATA);
        if offset == window {
            self.pci_cfg_window(&mut inner, data, false);
            return;
        }
        inner.cfg.read(offset, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        if offset <= 0x04 && offset as usize + data.len() > 0x04 {
            self.point(crate::points::CFG_WRITE_COMMAND, sluice_pci::le_value(data));
        }
        let notify = {
            let mut inner = self.lock();
            let window = u16::from(inner.pci_cfg_cap) + u16::from(pci_cfg::DATA);
            if offset == window {
                let mut buf = data.to_vec();
                self.pci_cfg_window(&mut inner, &mut buf, true)
            } else {
                let effect = inner.cfg.write(offset, data);
                self.after_config_write(&mut inner, offset, data.len(), effect);
                None
            }
        };
        if let Some(q) = notify {
            self.notify(q);
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        let mut inner = self.lock();
        self.bar_access(&mut inner, bar, offset, data, false);
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        let is_status = bar == VIRTIO_BAR && offset == crate::common::reg::DEVICE_STATUS;
        if is_status {
            self.point(&self.status_point, sluice_pci::le_value(data));
        }
        let mut buf = data.to_vec();
        let notify = {
            let mut inner = self.lock();
            self.bar_access(&mut inner, bar, offset, &mut buf, true)
        };
        if let Some(q) = notify {
            self.notify(q);
        }
    }

    fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
        self.lock().cfg.decode(addr, memory)
    }

    fn bar_size(&self, bar: u8) -> Option<u64> {
        self.lock().cfg.bar(bar).map(|b| b.size)
    }

    /// The doorbells of [`Self::doorbells`] replay their queue index: poll that queue.
    fn poll_doorbell(&self, doorbell: &sluice_pci::Doorbell, quiet: bool) -> Option<bool> {
        let queue = u16::try_from(doorbell.value).ok()?;
        let inner = self.lock();
        if inner.status != DeviceStatus::Running || inner.needs_reset {
            return None;
        }
        inner.device.poll_queue(queue, quiet)
    }

    fn reset(&self) {
        let mut inner = self.lock();
        self.reset_locked(&mut inner);
        inner.cfg.reset();
        if let Some(m) = &self.msix {
            m.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
    }
}

impl VirtioPciFunction {
    fn notify(&self, queue: u16) {
        // The hook runs without the transport lock so a stall holds only this vCPU.
        self.point(&self.notify_point, u64::from(queue));
        let inner = self.lock();
        if inner.status == DeviceStatus::Running && !inner.needs_reset {
            inner.device.queue_notify(queue);
        }
    }
}
