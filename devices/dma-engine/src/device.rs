//! The DMA engine as a PCI function: register file, doorbell, interrupt, rogue DMAs.

use std::sync::{Arc, Mutex, MutexGuard};

use sluice_devapi::{DeviceState, Endpoint, Hooks, InterruptSink, PointCtx, StateEvent};
use sluice_pci::config::CMD_INTX_DISABLE;
use sluice_pci::{BarKind, BarSpec, ConfigError, ConfigSpace, PciFunction, PciIds, PciInterrupt};
use sluice_virtio_pci::DmaMemory;

use crate::copy::{self, Access, AccessError, DmaPath};

use crate::regs::{FLAG_FILL, FLAG_IRQ, IRQ_DONE, Program, Registers, Status};
use crate::{BAR_SIZE, DMA_ENGINE_CLASS, DMA_ENGINE_DEVICE, DMA_ENGINE_VENDOR, points};

/// Source name of this device's timeline events.
const SOURCE: &str = "dma-engine";

/// A DMA the host makes the device issue on its own, at a moment a scenario chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RogueDma {
    /// Device address.
    pub iova: u64,
    /// Bytes, 1..=[`crate::MAX_LEN`].
    pub len: u32,
    /// `Some(byte)`: write `byte` over the range; `None`: read it.
    pub write: Option<u8>,
}

/// What a rogue DMA achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RogueOutcome {
    /// [`Status::Ok`] when every byte went through.
    pub status: Status,
    /// Bytes that reached memory (write) or were read.
    pub moved: u64,
    /// The first refused IOVA, if any.
    pub fault: Option<u64>,
}

struct Inner {
    cfg: ConfigSpace,
    regs: Registers,
}

/// The DMA engine PCI function.
pub struct DmaEngine {
    name: String,
    endpoint: Endpoint,
    inner: Mutex<Inner>,
    dma: DmaMemory,
    interrupt: PciInterrupt,
    hooks: Arc<dyn Hooks>,
    doorbell_point: String,
    complete_point: String,
    rogue_point: String,
}

impl std::fmt::Debug for DmaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaEngine")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl DmaEngine {
    /// An engine called `name` (points `dma.<name>.*`) that issues DMAs as `endpoint` through
    /// `dma`, interrupting through `irq` (INTx; MSI-X is not offered) and reporting to `hooks`.
    pub fn new(
        name: &str,
        endpoint: Endpoint,
        dma: DmaMemory,
        irq: Arc<dyn InterruptSink>,
        hooks: Arc<dyn Hooks>,
    ) -> Result<Self, ConfigError> {
        let ids = PciIds {
            vendor: DMA_ENGINE_VENDOR,
            device: DMA_ENGINE_DEVICE,
            subsystem_vendor: DMA_ENGINE_VENDOR,
            subsystem_id: DMA_ENGINE_DEVICE,
            class_code: DMA_ENGINE_CLASS,
            revision: 1,
        };
        let mut cfg = ConfigSpace::new(ids, 1);
        cfg.add_bar(BarSpec {
            index: 0,
            size: BAR_SIZE,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        })?;
        Ok(DmaEngine {
            name: name.to_string(),
            endpoint,
            inner: Mutex::new(Inner {
                cfg,
                regs: Registers::default(),
            }),
            dma,
            interrupt: PciInterrupt::new(irq, None),
            hooks,
            doorbell_point: points::doorbell(name),
            complete_point: points::complete(name),
            rogue_point: points::rogue(name),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The register file as it is now (for hosts, reports and tests).
    pub fn registers(&self) -> Registers {
        self.lock().regs
    }

    /// The endpoint this engine's DMAs are issued as.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    fn point(&self, point: &str, value: u64) {
        self.hooks.point(&PointCtx {
            point,
            endpoint: Some(self.endpoint),
            domain: None,
            value,
        });
    }

    fn state(&self, change: DeviceState) {
        self.hooks.state(&StateEvent {
            source: SOURCE,
            endpoint: Some(self.endpoint),
            change: change.into(),
        });
    }

    fn path<'a>(&'a self, view: &'a sluice_virtio_pci::DmaView) -> DmaPath<'a> {
        DmaPath {
            view,
            endpoint: self.endpoint,
            hooks: self.hooks.as_ref(),
        }
    }

    fn bus_master(&self) -> bool {
        self.lock().cfg.bus_master_enabled()
    }

    /// Runs the programmed operation (the guest rang the doorbell). Synchronous: the ringing
    /// vCPU's access completes when the operation has (at most [`crate::MAX_LEN`] bytes).
    fn ring(&self) {
        let program = self.lock().regs.program;
        // Announced before any DMA, without the device lock: a stall holds only this vCPU.
        self.point(&self.doorbell_point, u64::from(program.len));
        // Bus Master Enable is sampled after the stall: clearing it meanwhile stops the DMA.
        let result = match program.check() {
            Err(status) => Err((status, None)),
            Ok(()) if !self.bus_master() => Err((Status::NoBusMaster, None)),
            Ok(()) => {
                let view = self.dma.view();
                copy::run(&self.path(&view), &program)
                    .map_err(|s| (status_of(s.error), Some(s.error.iova)))
            }
        };
        let status = match result {
            Ok(_) => Status::Ok,
            Err((s, _)) => s,
        };
        self.point(&self.complete_point, u64::from(status.code()));
        let raise = {
            let mut inner = self.lock();
            let regs = &mut inner.regs;
            regs.status = status.code();
            regs.done = regs.done.wrapping_add(1);
            if let Err((_, fault)) = result {
                regs.errors = regs.errors.wrapping_add(1);
                regs.fault = fault.unwrap_or(0);
            }
            let raise = program.flags & FLAG_IRQ != 0;
            if raise {
                regs.irq_status |= IRQ_DONE;
            }
            raise
        };
        if status != Status::Ok {
            log::debug!("dma-engine {}: operation ended with {status:?}", self.name);
        }
        if raise {
            self.interrupt.signal(0);
        }
    }

    /// Issues a DMA on the device's own initiative, now, through the same path as guest-programmed
    /// operations (the IOMMU translates and the oracle judges it). Ignores Bus Master Enable: a
    /// malicious device is exactly one that does not honour its own command register, and the
    /// IOMMU is what must stop it. Touches no register: the guest cannot tell it happened except
    /// by memory.
    pub fn rogue(&self, op: RogueDma) -> RogueOutcome {
        self.state(DeviceState::RogueDma { iova: op.iova });
        self.point(&self.rogue_point, op.iova);
        let out = self.rogue_dma(op);
        self.state(DeviceState::RogueDmaDone { moved: out.moved });
        out
    }

    fn rogue_dma(&self, op: RogueDma) -> RogueOutcome {
        let refused = |status| RogueOutcome {
            status,
            moved: 0,
            fault: None,
        };
        let program = Program {
            src: op.iova,
            dst: op.iova,
            len: op.len,
            flags: if op.write.is_some() { FLAG_FILL } else { 0 },
            pattern: u32::from(op.write.unwrap_or(0)),
        };
        if let Err(status) = program.check() {
            return refused(status);
        }
        let view = self.dma.view();
        let path = self.path(&view);
        let result = match op.write {
            Some(_) => copy::run(&path, &program),
            None => copy::read_through(&path, op.iova, op.len),
        };
        match result {
            Ok(moved) => RogueOutcome {
                status: Status::Ok,
                moved,
                fault: None,
            },
            Err(stopped) => RogueOutcome {
                status: status_of(stopped.error),
                moved: stopped.moved,
                fault: Some(stopped.error.iova),
            },
        }
    }
}

fn status_of(e: AccessError) -> Status {
    match e.access {
        Access::Read => Status::ReadFault,
        Access::Write => Status::WriteFault,
    }
}

impl PciFunction for DmaEngine {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.lock().cfg.read(offset, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let effect = self.lock().cfg.write(offset, data);
        if let Some((_, new)) = effect.command {
            self.interrupt
                .set_intx_disabled(new & CMD_INTX_DISABLE != 0);
        }
        if let Some(bme) = effect.bus_master_change() {
            self.state(DeviceState::BusMasterEnable { enabled: bme });
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0);
            return;
        }
        self.lock().regs.read(offset, data);
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let effect = self.lock().regs.write(offset, data);
        if effect.irq_cleared && self.lock().regs.irq_status & IRQ_DONE == 0 {
            self.interrupt.set_intx(false);
        }
        if effect.doorbell {
            self.ring();
        }
    }

    fn decode_bar(&self, addr: u64, memory: bool) -> Option<(u8, u64)> {
        self.lock().cfg.decode(addr, memory)
    }

    fn bar_size(&self, bar: u8) -> Option<u64> {
        (bar == 0).then_some(BAR_SIZE)
    }

    fn reset(&self) {
        {
            let mut inner = self.lock();
            inner.cfg.reset();
            inner.regs = Registers::default();
        }
        self.interrupt.set_intx_disabled(false);
        self.interrupt.set_intx(false);
        self.state(DeviceState::Reset);
    }
}
