//! The kvm backend: Sluice's own rust-vmm VMM.
//!
//! KVM runs the vCPUs (one thread each, in-kernel LAPIC/IOAPIC/PIC and PIT); this crate
//! provides guest RAM, kernel loading (ELF/PVH `vmlinux`, bzImage, or a bare-metal ELF), CPUID
//! and boot state, a 16550 at 0x3f8, ACPI (RSDP, XSDT, FADT, FACS, MADT, DSDT, MCFG plus the
//! caller's extra tables such as the VIOT), ACPI S5 / 0xCF9 / i8042 shutdown and reset, and a
//! PCI host bridge (0xCF8/0xCFC and ECAM) serving the device host's [`PciFunction`]s. MSI-X
//! vectors go through KVM irq routes and irqfds (`KVM_SIGNAL_MSI` as the fallback), INTx
//! through irqfds with resamplefds, virtio doorbells through ioeventfds (MMIO exits as the
//! fallback), and `guest.sym.*` injection rules through hardware breakpoints.
//!
//! # Use
//!
//! The VM (and its irqchip) must exist before the devices, so that they can be given an MSI
//! path:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cfg: sluice_vmm::VmmConfig = unimplemented!();
//! # let disks = []; let hooks = std::sync::Arc::new(sluice_devapi::NoHooks);
//! let vmm = sluice_vmm::Vmm::new(&cfg)?;
//! // MSI-X vectors and their KVM routes; the caller adds its IOMMU choice.
//! let opts = sluice_host::HostOptions { iommu: None, ..vmm.host_options() };
//! let devices = sluice_host::DeviceSet::with_options(&disks, hooks, &opts)?;
//! // The VIOT is added automatically when `devices.iommu` is set.
//! let outcome = vmm.run(&devices)?;
//! # Ok(()) }
//! ```
//!
//! [`run`] does the same in one call with INTx-only devices. [`kvm_status`] tells a CLI whether
//! to refuse (`Absent`), warn (`Pvm`) or go ahead (`Hardware`).

mod acpi;
mod boot;
mod cpuid;
mod doorbell;
mod fast_paths;
mod guest_debug;
mod irq;
pub mod layout;
mod msi_routes;
mod pci;
mod pci_caps;
mod platform;
mod stats;
#[cfg(test)]
mod testing;
mod vcpu;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use sluice_devapi::Bdf;
use sluice_host::iommu::FirmwareDescription;
use sluice_host::machine::{BackendKind, MachineError, MachineSpec};
use sluice_host::supervisor::{self, Ending, Observed};
use sluice_host::{DeviceSet, HostOptions, IntxRelay, RunOutcome};
use sluice_inject::Injector;
use sluice_pci::PciFunction;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

pub use acpi::AcpiError;
pub use boot::BootError;
pub use cpuid::{UnknownFeature, known_features};
pub use guest_debug::{GuestDebugError, MAX_BREAKPOINTS, StepOver};
pub use pci::PciBusError;
pub use stats::{VmmCounters, VmmStats};

/// MSI-X vectors each function gets under this backend (queues + config for every current
/// device, with room to spare).
pub const MSIX_VECTORS: u16 = 8;

/// Most vCPUs (APIC IDs are 8 bits in the MADT we build; the guest images use NR_CPUS=8).
pub const MAX_CPUS: u32 = 64;

/// The CPUID features to hide for PVM guests (see `docs/kvm-backend.md`).
pub const PVM_CPUID_MASK: &[&str] = &[
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "avx",
    "smap",
    "smep",
    "fsgsbase",
    "pku",
    "rdpid",
    "popcnt",
    "arch_capabilities",
    "pcid",
    "invpcid",
    "umip",
    "la57",
];

/// One run's machine.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// The platform. This VMM builds an x86 q35-like machine (16550 at `ttyS0`, ACPI) and
    /// refuses any other.
    pub machine: MachineSpec,
    /// Kernel: an ELF (`vmlinux` with a PVH note boots 32-bit PVH; other ELFs are entered in
    /// 64-bit mode) or a bzImage (64-bit boot protocol).
    pub kernel: PathBuf,
    /// Initramfs (optional for bare-metal guests).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// The run ends as a timeout after this long.
    pub timeout: Duration,
    /// Where the console goes, each line prefixed with host time since start.
    pub serial_log: PathBuf,
    /// CPUID features to hide (names as in /proc/cpuinfo; see [`known_features`]).
    pub cpuid_mask: Vec<String>,
    /// Extra ACPI tables (complete, checksummed). When the device set has an IOMMU, [`Vmm::run`]
    /// adds the table its model describes it with (the VIOT), unless one with that signature
    /// is here already.
    pub acpi_tables: Vec<Vec<u8>>,
}

/// The VMM could not run the guest.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The run's IOMMU is a platform device; this VMM places PCI functions only.
    #[error("the kvm backend cannot place a platform IOMMU (its register window)")]
    PlatformIommu,
    /// The run's IOMMU has no description on this machine.
    #[error(transparent)]
    Iommu(sluice_host::iommu::IommuError),
    /// `/dev/kvm` cannot be used.
    #[error("KVM is not available: {0}")]
    NoKvm(String),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A host I/O operation failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// The platform is not one this VMM emulates.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The configuration cannot work.
    #[error("bad VM configuration: {0}")]
    Config(String),
    /// Guest RAM could not be allocated.
    #[error("cannot allocate {mib} MiB of guest RAM: {reason}")]
    Memory {
        /// Size asked for.
        mib: u64,
        /// Why.
        reason: String,
    },
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// PCI bus.
    #[error(transparent)]
    Pci(#[from] PciBusError),
    /// `cpuid_mask`.
    #[error(transparent)]
    Cpuid(#[from] UnknownFeature),
    /// `guest.sym` rules (hardware breakpoints).
    #[error(transparent)]
    GuestDebug(#[from] GuestDebugError),
    /// The serial log.
    #[error("cannot write the serial log {path}: {source}")]
    SerialLog {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmStatus {
    /// No usable `/dev/kvm` (absent, or cannot be opened).
    Absent,
    /// `/dev/kvm` is provided by `kvm_pvm` (nested PVM): it runs the guest kernel through KVM's
    /// instruction emulator.
    Pvm,
    /// Hardware virtualization (VT-x/SVM).
    Hardware,
}

impl KvmStatus {
    /// A sentence for the user.
    pub fn message(&self) -> &'static str {
        match self {
            KvmStatus::Absent => {
                "no usable /dev/kvm: it is absent or cannot be opened (load kvm_intel/kvm_amd, \
                 check permissions, or use --backend qemu)"
            }
            KvmStatus::Pvm => {
                "/dev/kvm is nested PVM (kvm_pvm): the guest kernel runs through KVM's instruction \
                 emulator, so Linux guests will not boot at usable speed (minutes, and no user \
                 space); use --backend qemu for real runs"
            }
            KvmStatus::Hardware => "/dev/kvm uses hardware virtualization",
        }
    }
}

/// Detects what `/dev/kvm` is.
pub fn kvm_status() -> KvmStatus {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        KvmStatus::Absent
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        KvmStatus::Pvm
    } else {
        KvmStatus::Hardware
    }
}

/// A function the VMM serves besides the device set's (tests, bridges).
struct ExtraFunction {
    bdf: Bdf,
    function: Arc<dyn PciFunction>,
    intx: Option<Arc<IntxRelay>>,
}

/// A VM that exists (memory, irqchip, PIT) but has not started.
pub struct Vmm {
    cfg: VmmConfig,
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    msi: Arc<msi_routes::MsiRouter>,
    stats: Arc<VmmStats>,
    extra: Vec<ExtraFunction>,
    elf_64bit: bool,
    ioeventfd: bool,
    injector: Option<Arc<Injector>>,
    step_over: Option<StepOver>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, e)
}

impl Vmm {
    /// Creates the VM: RAM, TSS, in-kernel irqchip and PIT.
    pub fn new(cfg: &VmmConfig) -> Result<Self, VmmError> {
        cfg.machine.check_backend(BackendKind::Kvm)?;
        if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
            return Err(VmmError::Config(format!(
                "{} vCPUs (1..={MAX_CPUS})",
                cfg.cpus
            )));
        }
        if cfg.mem_mib < 16 {
            return Err(VmmError::Config(format!(
                "{} MiB of RAM (at least 16)",
                cfg.mem_mib
            )));
        }
        cpuid::CpuidMask::parse(&cfg.cpuid_mask)?;
        let kvm = Kvm::new().map_err(|e| VmmError::NoKvm(format!("/dev/kvm: {e}")))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if let Err(e) = vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR) {
            log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e} (ignored)");
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(cfg.mem_mib)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmmError::Memory {
            mib: cfg.mem_mib,
            reason: e.to_string(),
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Memory {
                    mib: cfg.mem_mib,
                    reason: e.to_string(),
                })?;
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vmm keeps (and the
            // device set's SharedMemory clones) for as long as the VM exists.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vm = Arc::new(vm);
        let stats = Arc::new(VmmStats::default());
        Ok(Vmm {
            cfg: cfg.clone(),
            kvm,
            msi: Arc::new(msi_routes::MsiRouter::new(vm.clone(), stats.clone())),
            stats,
            vm,
            mem,
            extra: Vec::new(),
            elf_64bit: false,
            ioeventfd: true,
            injector: None,
            step_over: None,
        })
    }

    /// What devices built for this VM may use: MSI-X, delivered through KVM irq routes.
    pub fn host_options(&self) -> HostOptions {
        HostOptions {
            msix_vectors: MSIX_VECTORS,
            msi: Some(self.msi.clone()),
            iommu: None,
            iommu_irq: None,
            marker: None,
            dma_engine: None,
        }
    }

    /// The run's counters (doorbell and MSI paths, breakpoint hits); live while it runs.
    pub fn stats(&self) -> Arc<VmmStats> {
        self.stats.clone()
    }

    /// Serve virtio doorbells through ioeventfds (default: yes). With `false` every doorbell is
    /// an MMIO exit, as before ioeventfds existed (to compare, or to rule them out).
    pub fn use_ioeventfd(&mut self, yes: bool) {
        self.ioeventfd = yes;
    }

    /// The run's race-injection plan. Its `guest.sym.*` rules become hardware breakpoints
    /// (at most 4 distinct addresses); a device with any rule at a point reached inside its
    /// doorbell write keeps MMIO-exit doorbells so that the stall holds the vCPU that rang
    /// (see `docs/backends.md`). Device points themselves are served by the device set's hooks.
    pub fn set_injector(&mut self, injector: Arc<Injector>) {
        self.injector = Some(injector);
    }

    /// How vCPUs get past a `guest.sym` breakpoint (default: [`StepOver::SingleStep`] where KVM
    /// has `KVM_GUESTDBG_BLOCKIRQ`, which it needs, else [`StepOver::ResumeFlag`]; see
    /// `docs/kvm-backend.md`).
    pub fn breakpoint_step(&mut self, step: StepOver) {
        self.step_over = Some(step);
    }

    /// Guest RAM (for tests and tools that inspect the guest).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Enter an ELF kernel that has a PVH note through the Linux 64-bit boot protocol
    /// (`startup_64` with `boot_params`, as for a bzImage) instead of PVH. Lets a `vmlinux`
    /// exercise the bzImage path's boot_params where decompressing a bzImage is too slow (PVM).
    pub fn prefer_64bit_elf_entry(&mut self, yes: bool) {
        self.elf_64bit = yes;
    }

    /// Serves one more function at `bdf` (bus 0). `intx`, if given, is wired to the IOAPIC
    /// pin the DSDT routes that slot's INTA# to.
    pub fn add_function(
        &mut self,
        bdf: Bdf,
        function: Arc<dyn PciFunction>,
        intx: Option<Arc<IntxRelay>>,
    ) {
        self.extra.push(ExtraFunction {
            bdf,
            function,
            intx,
        });
    }

    /// Boots the guest with `devices` (and any added functions) and waits until it powers
    /// off, resets, fails or times out.
    pub fn run(self, devices: &DeviceSet) -> Result<RunOutcome, VmmError> {
        let guest_debug = self.guest_debug()?;
        let mut serial =
            File::create(&self.cfg.serial_log).map_err(|source| VmmError::SerialLog {
                path: self.cfg.serial_log.clone(),
                source,
            })?;
        devices.mem.replace(self.mem.clone());

        // PCI: the device set's functions, then the extra ones; resources as firmware would.
        let mut bus = pci::PciBus::default();
        let mut intx_lines = Vec::new();
        for d in &devices.devices {
            bus.add(d.bdf, d.function.clone())?;
            intx_lines.push((d.bdf, d.intx.clone()));
        }
        for e in &self.extra {
            bus.add(e.bdf, e.function.clone())?;
            if let Some(i) = &e.intx {
                intx_lines.push((e.bdf, i.clone()));
            }
        }
        for (bdf, bar, base, size) in bus.assign_resources()? {
            log::info!("{bdf} BAR{bar}: {base:#x} ({size:#x} bytes)");
        }
        let doorbell_loop = self.follow_guest_programming(devices, &mut bus)?;
        let mut resample = irq::ResampleSet::new().map_err(|e| VmmError::Io("eventfd", e))?;
        for (bdf, relay) in intx_lines {
            resample.connect(&self.vm, relay, pci::intx_gsi(bdf))?;
        }

        // Guest memory contents.
        let loaded = boot::load(
            &self.mem,
            self.cfg.mem_mib,
            &self.cfg.kernel,
            self.cfg.initrd.as_deref(),
            &self.cfg.cmdline,
            self.elf_64bit,
        )?;
        log::info!(
            "kernel loaded: {:?}, ends at {:#x}",
            loaded.entry,
            loaded.kernel_end
        );
        let cpus = self.cfg.cpus as u8;
        let mut tables = self.cfg.acpi_tables.clone();
        if let Some(model) = &devices.iommu {
            match model.firmware(self.cfg.machine.arch) {
                Ok(FirmwareDescription::AcpiTable(t)) => {
                    if !tables.iter().any(|have| have.get(..4) == t.get(..4)) {
                        tables.push(t);
                    }
                }
                Ok(FirmwareDescription::Discovered) => {}
                // This VMM has no platform bus (the kvm backend runs x86 only).
                Ok(FirmwareDescription::PlatformDevice { .. }) => {
                    return Err(VmmError::PlatformIommu);
                }
                Err(e) => return Err(VmmError::Iommu(e)),
            }
        }
        for (addr, bytes) in acpi::build(cpus, &tables)?.blobs {
            self.mem
                .write_slice(&bytes, GuestAddress(addr))
                .map_err(|e| VmmError::Memory {
                    mib: self.cfg.mem_mib,
                    reason: format!("ACPI tables: {e}"),
                })?;
        }

        // Serial and its IRQ.
        let start = Instant::now();
        let (tx, rx) = mpsc::channel();
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Io("eventfd", e))?;
        self.vm
            .register_irqfd(&serial_irq, layout::SERIAL_GSI)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let platform = Arc::new(platform::Platform::new(
            platform::IrqEvt(serial_irq),
            platform::ConsoleSink::new(tx.clone(), start),
            bus,
        ));

        // vCPUs.
        let mask = cpuid::CpuidMask::parse(&self.cfg.cpuid_mask)?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..cpus {
            let vcpu = self
                .vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut c = supported.clone();
            cpuid::filter(&mut c, id, cpus, &mask);
            vcpu::configure(&vcpu, id, &c, loaded.entry)?;
            if let Some(d) = &guest_debug {
                d.arm(&vcpu, id)?;
            }
            vcpus.push(vcpu);
        }
        install_kick_handler();
        let resample_stop = resample.stopper().map_err(|e| VmmError::Io("eventfd", e))?;
        let resample_thread = std::thread::Builder::new()
            .name("intx-resample".into())
            .spawn(move || resample.run())
            .map_err(|e| VmmError::Io("spawn resample thread", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let (p, s, t) = (platform.clone(), stop.clone(), tx.clone());
            let d = guest_debug.clone();
            let id = id as u8;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let why = vcpu::run_loop(vcpu, id, &p, &s, d.as_deref());
                    let _ = t.send(platform::Event::VcpuEnded(id, why));
                })
                .map_err(|e| VmmError::Io("spawn vCPU thread", e))?;
            threads.push(h);
        }
        drop(tx);

        let (console, init_at, end) = supervise(&rx, start, self.cfg.timeout, &mut serial);
        let wall = start.elapsed();
        stop.store(true, Ordering::Release);
        stop_threads(&threads);
        for h in threads {
            let _ = h.join();
        }
        let _ = resample_stop.write(1);
        let _ = resample_thread.join();
        doorbell_loop.stop();
        platform.flush_console();
        let counters = self.stats.snapshot();
        log::info!("{counters:?}");
        if platform.unclaimed() > 0 || counters.msi_refused > 0 {
            log::info!(
                "{} unclaimed port/MMIO accesses, {} MSI messages refused by KVM",
                platform.unclaimed(),
                counters.msi_refused
            );
        }
        let mut console = console;
        let ended = match &end {
            End::Timeout => format!("timeout after {:.1} s", self.cfg.timeout.as_secs_f64()),
            End::Vcpu(id, why) => format!("vCPU {id} ended: {why}"),
        };
        let _ = writeln!(serial, "[{:9.3}] [sluice-vmm] {ended}", wall.as_secs_f64());
        for ev in rx.try_iter() {
            match ev {
                platform::Event::Console(line, at) => {
                    let _ = writeln!(serial, "[{:9.3}] {line}", at.as_secs_f64());
                    console.push(line);
                }
                // Where each vCPU was when the run ended: the first clue for a hang.
                platform::Event::VcpuEnded(id, why) => {
                    let _ = writeln!(
                        serial,
                        "[{:9.3}] [sluice-vmm] vCPU {id} ended: {why}",
                        wall.as_secs_f64()
                    );
                    log::info!("vCPU {id} ended: {why}");
                }
            }
        }
        let exit = supervisor::classify(Observed {
            ending: match &end {
                End::Timeout => Ending::Timeout,
                End::Vcpu(_, platform::VcpuStop::Error(e)) => Ending::VmmFailed(e.clone()),
                End::Vcpu(_, platform::VcpuStop::PowerOff | platform::VcpuStop::Reset(_)) => {
                    Ending::GuestStopped
                }
                End::Vcpu(id, platform::VcpuStop::Stopped { .. }) => {
                    Ending::VcpuStopped { vcpu: *id }
                }
            },
            device_error: None,
            panic_seen: console.iter().any(|l| supervisor::is_panic_line(l)),
            init_seen: init_at.is_some(),
        });
        if let End::Vcpu(id, platform::VcpuStop::Reset(why)) = &end {
            log::info!("guest reset ({why}) on vCPU {id}: run ends");
        }
        Ok(RunOutcome {
            exit,
            wall,
            boot_to_init: init_at,
            console,
        })
    }
}

impl Vmm {
    /// The `guest.sym` breakpoints of the injection plan, if it has any.
    fn guest_debug(&self) -> Result<Option<Arc<guest_debug::GuestDebug>>, VmmError> {
        let Some(injector) = &self.injector else {
            return Ok(None);
        };
        let breakpoints = guest_debug::Breakpoints::from_watch(&injector.guest_watch())?;
        if breakpoints.is_empty() {
            return Ok(None);
        }
        let step_flags = guest_debug::step_flags(&self.vm);
        let step = self
            .step_over
            .unwrap_or_else(|| StepOver::default_for(step_flags));
        if step == StepOver::SingleStep && step_flags == 0 {
            return Err(VmmError::Config(
                "breakpoint single-step needs KVM_GUESTDBG_BLOCKIRQ, which this KVM lacks".into(),
            ));
        }
        log::info!("guest.sym breakpoints: {breakpoints:?}, past them by {step:?}");
        Ok(Some(Arc::new(guest_debug::GuestDebug {
            breakpoints,
            injector: injector.clone(),
            stats: self.stats.clone(),
            step,
            step_flags,
        })))
    }

    /// Tracks every function's doorbells and MSI-X vectors and hooks the bus so that KVM's
    /// ioeventfds and MSI routes follow the guest's programming; starts the doorbell loop.
    fn follow_guest_programming(
        &self,
        devices: &DeviceSet,
        bus: &mut pci::PciBus,
    ) -> Result<fast_paths::DoorbellLoop, VmmError> {
        let io = |e| VmmError::Io("doorbell eventfd", e);
        let mut doorbells = doorbell::DoorbellSet::new(self.vm.clone(), self.stats.clone());
        for d in &devices.devices {
            let ruled = self
                .injector
                .as_ref()
                .map(|i| fast_paths::rules_needing_exits(i, d))
                .unwrap_or_default();
            if !ruled.is_empty() {
                log::info!(
                    "{} keeps MMIO-exit doorbells for the injection rules `{}`",
                    d.name,
                    ruled.join("`, `")
                );
            }
            let absorb = self.ioeventfd && ruled.is_empty();
            doorbells
                .track(d.bdf, d.function.clone(), absorb)
                .map_err(io)?;
        }
        for e in &self.extra {
            doorbells
                .track(e.bdf, e.function.clone(), self.ioeventfd)
                .map_err(io)?;
        }
        let functions: Vec<_> = bus
            .functions()
            .skip(1)
            .map(|(b, f)| (b, f.clone()))
            .collect();
        for (bdf, f) in functions {
            self.msi.track(bdf, f);
        }
        let doorbells = Arc::new(doorbells);
        doorbells.resync_all();
        bus.set_observer(Arc::new(fast_paths::Followers {
            doorbells: doorbells.clone(),
            msi: self.msi.clone(),
        }));
        fast_paths::DoorbellLoop::start(doorbells)
            .map_err(|e| VmmError::Io("spawn the doorbell thread", e))
    }
}

/// Boots `cfg` with `devices` in one call (devices built without MSI get INTx only).
pub fn run(cfg: &VmmConfig, devices: &DeviceSet) -> Result<RunOutcome, VmmError> {
    Vmm::new(cfg)?.run(devices)
}

enum End {
    Timeout,
    Vcpu(u8, platform::VcpuStop),
}

fn supervise(
    rx: &mpsc::Receiver<platform::Event>,
    start: Instant,
    timeout: Duration,
    serial: &mut File,
) -> (Vec<String>, Option<Duration>, End) {
    let mut console = Vec::new();
    let mut init_at = None;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (console, init_at, End::Timeout);
        }
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(platform::Event::Console(line, at)) => {
                let _ = writeln!(serial, "[{:9.3}] {line}", at.as_secs_f64());
                if init_at.is_none() && supervisor::is_init_line(&line) {
                    init_at = Some(at);
                }
                console.push(line);
            }
            Ok(platform::Event::VcpuEnded(id, why)) => {
                return (console, init_at, End::Vcpu(id, why));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return (
                    console,
                    init_at,
                    End::Vcpu(0, platform::VcpuStop::Error("all vCPU threads gone".into())),
                );
            }
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    if let Err(e) = register_signal_handler(SIGRTMIN(), kick_handler) {
        log::warn!("cannot install the vCPU kick handler: {e}");
    }
}

/// Kicks vCPU threads out of KVM_RUN until they notice the stop flag (bounded).
fn stop_threads(threads: &[JoinHandle<()>]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_name_the_reason() {
        assert!(KvmStatus::Absent.message().contains("/dev/kvm"));
        assert!(KvmStatus::Pvm.message().contains("PVM"));
        assert!(cpuid::CpuidMask::parse(PVM_CPUID_MASK).is_ok());
    }

    /// Only x86 q35 runs here, and another platform is refused before `/dev/kvm` is touched.
    #[test]
    fn other_platforms_are_refused_first() {
        let cfg = VmmConfig {
            machine: MachineSpec::arm64_virt(),
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            mem_mib: 64,
            timeout: Duration::from_secs(1),
            serial_log: "/nonexistent/serial.log".into(),
            cpuid_mask: Vec::new(),
            acpi_tables: Vec::new(),
        };
        let err = Vmm::new(&cfg).err().expect("refused");
        assert_eq!(
            err.to_string(),
            "the kvm backend runs x86_64 guests only, not aarch64"
        );
    }
}
