//! `sluice run`: assemble devices, pick the backend, boot, verify, report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use sluice_devapi::{Fanout, Hooks};
use sluice_host::iommu::FirmwareDescription;
use sluice_host::machine::{Arch, BackendKind, MachineSpec};
use sluice_host::points;
use sluice_host::{
    DeviceSet, DiskSpec, DmaEngineSpec, DmaStats, GuestExit, HostOptions, IommuChoice, IommuKind,
    IommuModel, ModelBug, RunOutcome,
};
use sluice_inject::registry::GUEST_SYM_PREFIX;
use sluice_inject::{Firing, Injector, Plan, PluginServer, PointRegistry, SymbolMap};
use sluice_oracle::topology::Topology;
use sluice_oracle::{Oracle, OracleConfig};
use sluice_qemu::launcher::PlatformIommu;
use sluice_qemu::{Accel, ConsoleSink, PlatformInterrupts, QemuConfig};

use crate::report::{self, DiskVerdict};
use crate::rogue::{RogueArm, RogueRule};
use crate::verify::GuestReport;
use crate::{image, verify};

/// IOMMU in front of the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IommuArg {
    /// No IOMMU.
    None,
    /// virtio-iommu on PCI (00:02.0), described by a VIOT table.
    Virtio,
    /// Arm SMMUv3 (needs an arm64 guest: refused on x86).
    Smmuv3,
    /// s390 zPCI (needs an s390x guest: refused on x86).
    Zpci,
}

impl IommuArg {
    /// The IOMMU model this names, if any.
    pub fn kind(self) -> Option<IommuKind> {
        match self {
            IommuArg::None => None,
            IommuArg::Virtio => Some(IommuKind::Virtio),
            IommuArg::Smmuv3 => Some(IommuKind::Smmuv3),
            IommuArg::Zpci => Some(IommuKind::Zpci),
        }
    }
}

/// CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// QEMU runs the CPU (TCG, or KVM on hardware-virtualization hosts).
    Qemu,
    /// Sluice's own rust-vmm VMM (hardware virtualization hosts).
    Kvm,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// CPU backend (default: qemu where /dev/kvm is absent or nested PVM).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Guest architecture: x86_64 (q35), aarch64 (virt; the qemu backend, IOMMU smmuv3 or
    /// none) or s390x (s390-ccw-virtio; the qemu backend, IOMMU zpci or none).
    #[arg(long, default_value = "x86_64", value_parser = parse_arch)]
    arch: Arch,
    /// Guest variant to build or find (guest-images/variants/<name>).
    /// Default: 6.12 on x86_64, arm64-6.12 on aarch64.
    #[arg(long, conflicts_with_all = ["kernel"])]
    guest: Option<String>,
    /// Kernel image (instead of --guest).
    #[arg(long, requires = "initrd")]
    kernel: Option<PathBuf>,
    /// Initramfs (with --kernel).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest RAM, e.g. 512M or 1G.
    #[arg(long, default_value = "512M", value_parser = parse_size_mib)]
    mem: u64,
    /// A raw disk image: PATH[,ro][,iommu=on|off]. Repeat for several disks. Default: a fresh
    /// 64 MiB scratch disk. With an IOMMU, disks sit behind it unless `iommu=off`.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Put an IOMMU in front of the disks.
    #[arg(long, value_enum, default_value = "none")]
    iommu: IommuArg,
    /// virtio-iommu boot bypass (unattached endpoints bypass until the driver clears it).
    // An explicit Set action: for a bool field clap would otherwise make this a flag that
    // takes no value, so neither `on` nor `off` could be given.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set)]
    iommu_boot_bypass: bool,
    /// A deliberate bug in the IOMMU model, for the escape oracle's positive controls:
    /// `skip-rpcit-invalidation` (zPCI: RPCIT keeps shadow entries the tables no longer map).
    /// The report names it.
    #[arg(long, value_name = "BUG")]
    iommu_model_bug: Option<ModelBug>,
    /// Extra kernel command line (appended).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest workload (/init's sluice.workload).
    #[arg(long, default_value = "disk")]
    workload: String,
    /// Seed for the guest's disk pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Serial console log (host-timestamped).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Write a JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Kill the guest after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// QEMU binary (default: the project's patched build under TCG, stock QEMU under KVM).
    #[arg(long, env = "SLUICE_QEMU")]
    qemu: Option<PathBuf>,
    /// Directory for scratch disks and logs.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Race injection rules, e.g. 'virtio-iommu.req.attach:delay=300ms,nth=1,mode=defer'
    /// (repeatable; several rules in one value are separated by ';'). See `sluice points`.
    #[arg(long = "inject", value_name = "RULES")]
    inject: Vec<String>,
    /// Injection plan as TOML (seed, [[rule]]).
    #[arg(long)]
    inject_file: Option<PathBuf>,
    /// Seed of the injection plan (same seed, same firings).
    #[arg(long)]
    inject_seed: Option<u64>,
    /// System.map for guest.sym points when booting --kernel (default: next to the kernel).
    #[arg(long)]
    system_map: Option<PathBuf>,
    /// kvm backend: CPUID features to hide, comma-separated.
    #[arg(long, value_delimiter = ',')]
    cpuid_mask: Vec<String>,
    /// Add Sluice's DMA engine (after the disks and the marker): behind the run's IOMMU
    /// (`iommu`) or not (`direct`). /init's `own` workload hands it to userspace with VFIO.
    #[arg(long, value_enum)]
    dma_engine: Option<DmaEngineArg>,
    /// A rogue DMA of the engine: `iova=X|kernel,len=N,after=MARKER[,write=BYTE][,delay=D]`
    /// (repeatable). Fires once, D after the first guest marker line starting with MARKER.
    #[arg(long = "rogue", value_name = "RULE", requires = "dma_engine")]
    rogue: Vec<String>,
}

/// Where Debian installs its QEMU binaries (`qemu-system-<arch>`), used under hardware KVM
/// when installed.
const STOCK_QEMU_DIR: &str = "/usr/bin";

/// Where the DMA engine sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DmaEngineArg {
    /// Behind the run's IOMMU (direct when the run has none).
    Iommu,
    /// Never translated.
    Direct,
}

/// Guest RAM limits, MiB.
const MEM_MIB: std::ops::RangeInclusive<u64> = 64..=65536;
/// vCPUs a q35 guest can have without x2APIC.
const CPUS: std::ops::RangeInclusive<u32> = 1..=255;

fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?} (use e.g. 512M or 1G)"))?;
    match n.checked_mul(mul) {
        Some(v) if MEM_MIB.contains(&v) => Ok(v),
        _ => Err(format!("size {s:?} out of range (64M..64G)")),
    }
}

pub(crate) fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
        .map_err(|e: sluice_host::machine::UnknownArch| e.to_string())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

fn parse_disk(spec: &str, have_iommu: bool) -> Result<DiskSpec> {
    let mut parts = spec.split(',');
    let path = PathBuf::from(parts.next().unwrap_or(""));
    let mut read_only = false;
    let mut iommu = have_iommu;
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => read_only = true,
            None if opt == "rw" => read_only = false,
            Some(("iommu", v)) => {
                iommu = parse_on_off(v).map_err(|e| anyhow::anyhow!("{e} in {spec:?}"))?
            }
            _ => bail!("unknown disk option {opt:?} in {spec:?} (known: ro, rw, iommu=on|off)"),
        }
    }
    if path.as_os_str().is_empty() {
        bail!("empty disk path in {spec:?}");
    }
    if iommu && !have_iommu {
        bail!("{spec:?} asks for iommu=on but the run has no IOMMU (add --iommu virtio)");
    }
    Ok(DiskSpec {
        path,
        read_only,
        iommu,
    })
}

fn default_backend() -> Backend {
    // The kvm backend has only run bare-metal guests so far (these machines have nested PVM, not
    // VT-x/SVM); until a Linux boot has passed on hardware KVM, qemu stays the default.
    Backend::Qemu
}

/// Where the guest kernel comes from.
#[derive(Debug, Clone)]
pub enum GuestSource {
    /// A variant built (or found cached) by `guest-images/build.sh`.
    Variant(String),
    /// Explicit files.
    Files {
        /// Kernel image.
        kernel: PathBuf,
        /// Initramfs.
        initrd: PathBuf,
    },
}

/// Everything one guest run needs; `sluice run` and the harness both build one.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Guest architecture; its platform is [`MachineSpec::for_arch`].
    pub arch: Arch,
    pub guest: GuestSource,
    pub qemu: Option<PathBuf>,
    pub cpus: u32,
    pub mem_mib: u64,
    /// Disks; empty means one 64 MiB scratch disk (behind the IOMMU if there is one).
    pub disks: Vec<DiskSpec>,
    pub iommu: IommuArg,
    pub boot_bypass: bool,
    /// A deliberate model bug (oracle positive controls), if any.
    pub model_bug: Option<ModelBug>,
    /// Appended to the kernel command line.
    pub cmdline: String,
    pub workload: String,
    pub seed: u64,
    pub timeout: Duration,
    pub run_dir: PathBuf,
    pub serial_log: Option<PathBuf>,
    /// Where the JSON report goes (always written; default `run_dir/report.json`).
    pub report: Option<PathBuf>,
    pub backend: Backend,
    /// Injection rules (one-line form) and plan file.
    pub inject: Vec<String>,
    pub inject_file: Option<PathBuf>,
    pub inject_seed: Option<u64>,
    /// System.map for `guest.sym` points with `GuestSource::Files`.
    pub system_map: Option<PathBuf>,
    pub cpuid_mask: Vec<String>,
    /// The DMA engine, if the run has one.
    pub dma_engine: Option<DmaEngineSpec>,
    /// Rogue DMAs of the engine.
    pub rogue: Vec<RogueRule>,
    /// No per-run chatter on stderr (boot line, plan warnings): the harness prints one progress
    /// line per run and checks plans once before its runs.
    pub quiet: bool,
}

/// What one run produced.
pub struct RunRecord {
    pub outcome: RunOutcome,
    pub guest: GuestReport,
    pub disks: Vec<DiskVerdict>,
    pub verdict: report::Verdict,
    /// Translation faults over all endpoints.
    pub faults: u64,
    /// Escapes by class (the oracle's verdict).
    pub escapes: std::collections::BTreeMap<String, u64>,
    pub escape_count: u64,
    /// Injection firings per rule.
    pub firings: Vec<u64>,
    /// Escapes by class: the devices they came from (see [`site_of`]).
    pub escape_sites: std::collections::BTreeMap<String, Vec<String>>,
    /// Devices with refused DMAs.
    pub fault_sites: Vec<String>,
    /// DMA outcomes per endpoint, in the IOMMU's terms (`pci:…`, `sid:…`, `fh:…`).
    pub dma: Vec<(String, sluice_host::EndpointDmaCounts)>,
    pub timeline: Option<PathBuf>,
}

/// A file the run reads must be there and readable; `write` also asks for write access.
fn check_file(what: &str, path: &Path, write: bool) -> Result<()> {
    let context = || format!("cannot open {what} {}", path.display());
    let meta = std::fs::metadata(path).with_context(context)?;
    if meta.is_dir() {
        bail!("{}: is a directory", context());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .with_context(context)?;
    Ok(())
}

impl RunSpec {
    /// The platform this run emulates.
    pub fn machine(&self) -> MachineSpec {
        MachineSpec::for_arch(self.arch)
    }

    /// Everything that can be checked without building or booting anything: sizes, files,
    /// the injection plan against this run's points. A bad command line then fails in
    /// milliseconds, not after minutes of kernel and QEMU builds.
    pub fn check(&self) -> Result<()> {
        // First: nothing else matters for a platform that cannot run, and a variant of another
        // architecture must not be built only to be refused.
        let backend = match self.backend {
            Backend::Qemu => BackendKind::Qemu,
            Backend::Kvm => BackendKind::Kvm,
        };
        self.machine().check_backend(backend)?;
        if let GuestSource::Variant(v) = &self.guest {
            let variant_arch = image::variant_arch(v)?;
            if variant_arch != self.arch {
                bail!(
                    "guest variant {v} is an {variant_arch} guest, but the run is --arch {}",
                    self.arch
                );
            }
        }
        if !CPUS.contains(&self.cpus) {
            bail!(
                "--cpus {}: a guest has {} to {} vCPUs",
                self.cpus,
                CPUS.start(),
                CPUS.end()
            );
        }
        if !MEM_MIB.contains(&self.mem_mib) {
            bail!(
                "--mem {}M: guest RAM is {}M to {}M",
                self.mem_mib,
                MEM_MIB.start(),
                MEM_MIB.end()
            );
        }
        if self.timeout.is_zero() {
            bail!("--timeout 0: the guest would be killed before it starts");
        }
        for d in &self.disks {
            check_file("disk", &d.path, !d.read_only)?;
            let len = std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0);
            if len < 512 {
                bail!(
                    "disk {}: {len} bytes, smaller than one 512-byte sector",
                    d.path.display()
                );
            }
        }
        if let GuestSource::Files { kernel, initrd } = &self.guest {
            check_file("kernel", kernel, false)?;
            check_file("initrd", initrd, false)?;
        }
        if let Some(q) = &self.qemu {
            check_file("QEMU binary", q, false)?;
        }
        if let Some(m) = &self.system_map {
            check_file("System.map", m, false)?;
        }
        // guest.sym rules need the guest's System.map; with a variant that is only there
        // once the image is built, so they are checked again then (build_injector).
        let symbols = match (&self.guest, &self.system_map) {
            (GuestSource::Files { .. }, Some(m)) => Some(m.as_path()),
            _ => None,
        };
        if let Some(bug) = self.model_bug
            && self.iommu.kind() != Some(bug.kind())
        {
            bail!(
                "--iommu-model-bug {} breaks the {} model, but the run's IOMMU is {}",
                bug.name(),
                bug.kind(),
                self.iommu.kind().map_or("none", |k| k.name())
            );
        }
        if let Some(model) = self.iommu_model(&[], false) {
            model.firmware(self.arch)?;
        }
        let disks = self.disks.len().max(1);
        check_plan(self, disks, symbols)?;
        Ok(())
    }

    /// The run's IOMMU with its configuration: the one place the command line's choice and
    /// options become a model configuration.
    pub fn iommu_choice(&self) -> Option<IommuChoice> {
        let kind = self.iommu.kind()?;
        let choice = IommuChoice::with_boot_bypass(kind, self.boot_bypass);
        match self.model_bug {
            // check() refused a bug of another model.
            Some(bug) => choice.with_bug(bug),
            None => Some(choice),
        }
    }

    /// The run's IOMMU in front of `disks` (and the DMA engine); `marker`: whether the run
    /// places the marker device, which moves the engine's slot.
    fn iommu_model(&self, disks: &[DiskSpec], marker: bool) -> Option<Arc<dyn IommuModel>> {
        let endpoints = sluice_host::iommu_endpoints(disks, marker, self.dma_engine);
        self.iommu_choice().map(|c| c.model(endpoints))
    }
}

/// `, N found while polling, M polls expired` for a server thread that polled for its next
/// message, nothing for one that never did.
fn polled(caught: u64, expired: u64) -> String {
    if caught == 0 && expired == 0 {
        String::new()
    } else {
        format!(", {caught} found while polling, {expired} polls expired")
    }
}

/// Boots the guest described by `spec`, verifies it, writes the report.
pub fn execute(spec: &RunSpec) -> Result<RunRecord> {
    spec.check()?;
    std::fs::create_dir_all(&spec.run_dir)
        .with_context(|| format!("cannot create {}", spec.run_dir.display()))?;
    let have_iommu = spec.iommu.kind().is_some();
    let mut disks = spec.disks.clone();
    if disks.is_empty() {
        let path = spec.run_dir.join("disk0.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(64 << 20))
            .with_context(|| format!("cannot create scratch disk {}", path.display()))?;
        disks.push(DiskSpec {
            path,
            read_only: false,
            iommu: have_iommu,
        });
    }
    let (kernel, vmlinux, initrd, system_map) = match &spec.guest {
        GuestSource::Files { kernel, initrd } => {
            let map = spec.system_map.clone().or_else(|| {
                let sibling = kernel.with_file_name("System.map");
                sibling.is_file().then_some(sibling)
            });
            (kernel.clone(), kernel.clone(), initrd.clone(), map)
        }
        GuestSource::Variant(v) => {
            eprintln!("sluice: guest image {v} (built once, then cached)");
            let img = image::build_guest(v, spec.arch)?;
            (img.kernel, img.vmlinux, img.initrd, Some(img.system_map))
        }
    };
    let machine = spec.machine();
    let accel = Accel::detect();
    let stock_qemu = Path::new(STOCK_QEMU_DIR).join(machine.qemu_binary);
    let qemu = match (&spec.qemu, accel) {
        (Some(q), _) => q.clone(),
        // Stock QEMU wires the proxy's INTx through KVM irqfds; the image build no longer
        // installs Debian's (it would displace a newer qemu-utils), so fall back to ours.
        (None, Accel::Kvm) if stock_qemu.is_file() => stock_qemu,
        (None, _) => {
            eprintln!("sluice: QEMU with the proxy INTx patch (built once, then cached)");
            image::build_qemu(spec.arch)?
        }
    };

    let stats = Arc::new(DmaStats::default());
    let injector = build_injector(spec, &disks, system_map.as_deref())?;
    // The kvm backend does not place the marker device (it delivers no marker lines yet), nor
    // does a zPCI platform (markers come over the console there).
    let marker = spec.backend == Backend::Qemu && !spec.machine().zpci_functions;
    let iommu = spec.iommu_model(&disks, marker);
    let topology = Topology {
        iommus: iommu.iter().map(|m| m.topology()).collect(),
    };
    // Points reached once per I/O are sampled on the timeline, as their models declare.
    let oracle_cfg = OracleConfig {
        hot_points: run_registry(spec, disks.len()).hot_points(),
        ..OracleConfig::default()
    };
    let oracle = Oracle::new(topology, oracle_cfg);
    {
        let o = oracle.clone();
        injector.set_sink(Arc::new(move |f: &Firing| {
            o.record_delay(&f.point, f.endpoint, f.delay)
        }));
    }
    // SLUICE_ORACLE=off leaves the oracle out of the DMA path (to measure what it costs); the
    // report then has no escapes and an empty timeline.
    let oracle_on = std::env::var("SLUICE_ORACLE")
        .map(|v| v != "off")
        .unwrap_or(true);
    let mut members: Vec<Arc<dyn Hooks>> = vec![injector.clone()];
    if oracle_on {
        members.push(oracle.clone());
    } else {
        eprintln!("sluice: SLUICE_ORACLE=off: DMA is not checked in this run");
    }
    members.push(stats.clone());
    let hooks: Arc<dyn Hooks> = Arc::new(Fanout(members));
    let rogue = Arc::new(RogueArm::new(spec.rogue.clone(), spec.quiet));
    let marker_sink: Arc<dyn Fn(&str) + Send + Sync> = {
        let (o, i, r) = (oracle.clone(), injector.clone(), rogue.clone());
        Arc::new(move |line: &str| {
            o.marker(line);
            i.marker(line);
            r.marker(line);
        })
    };
    // How the guest learns about the IOMMU; a platform device (arm64's SMMUv3) also needs its
    // interrupt lines before the model is built, and a place on the machine.
    let firmware = iommu.as_ref().map(|m| m.firmware(spec.arch)).transpose()?;
    let platform_iommu = match (&firmware, &iommu) {
        (
            Some(FirmwareDescription::PlatformDevice {
                machine_option,
                irq_lines,
            }),
            Some(model),
        ) => {
            let Some(base) = machine.platform_iommu_base else {
                bail!(
                    "the {} machine has no place for the {} IOMMU's registers",
                    machine.machine_type,
                    model.kind()
                );
            };
            Some(PlatformIommu {
                machine_option: machine_option.clone(),
                base,
                irq: PlatformInterrupts::new(model.name(), *irq_lines),
            })
        }
        _ => None,
    };
    let host_opts = HostOptions {
        // MSI-X through the proxy when this QEMU emulates it and its message write reaches the
        // GIC: arm64 behind the SMMUv3 only when QEMU asks Sluice to translate that write (the
        // kvm backend sets its own).
        msix_vectors: if spec.backend == Backend::Qemu {
            let msi_delivered = spec.arch != Arch::Aarch64
                || (platform_iommu.is_some() && sluice_qemu::smmu_proxy_translates_msi(&qemu));
            sluice_qemu::proxy_msix_vectors(&qemu, msi_delivered, iommu.is_some())
        } else {
            0
        },
        // s390 has no I/O space and a memory BAR's sysfs file cannot be written: the guest
        // sends its marker lines on the console there ("SLUICE-MARK: ", console_sink).
        marker: marker.then(|| marker_sink.clone()),
        iommu: iommu.clone(),
        iommu_irq: platform_iommu
            .as_ref()
            .map(|p| p.irq.clone() as Arc<dyn sluice_devapi::InterruptSink>),
        dma_engine: spec.dma_engine,
        ..Default::default()
    };
    if spec.backend == Backend::Kvm {
        if !rogue.is_empty() {
            bail!("--rogue needs guest marker lines, which the kvm backend does not deliver yet");
        }
        return execute_kvm(
            spec,
            &disks,
            (kernel, vmlinux, initrd),
            host_opts,
            hooks,
            stats,
            oracle,
            injector,
        );
    }
    let devices = DeviceSet::with_options(&disks, hooks, &host_opts)?;
    if let Some(engine) = devices.devices.iter().find_map(|d| d.dma_engine.clone()) {
        rogue.set_engine(engine);
    }
    let mut acpi_tables = Vec::new();
    if let Some(FirmwareDescription::AcpiTable(table)) = firmware {
        let signature = String::from_utf8_lossy(table.get(..4).unwrap_or_default()).to_lowercase();
        let path = spec.run_dir.join(format!("{signature}.aml"));
        std::fs::write(&path, table).with_context(|| format!("cannot write {}", path.display()))?;
        acpi_tables.push(path);
    }
    // The platform's pieces first (x86: `console=ttyS0 panic=-1 nokaslr i8042.nokbd
    // i8042.noaux tsc=unstable`).
    let cmdline = format!(
        "{} sluice.workload={} sluice.seed={} {}",
        machine.base_cmdline(BackendKind::Qemu),
        spec.workload,
        spec.seed,
        spec.cmdline
    );
    let serial_log = spec
        .serial_log
        .clone()
        .unwrap_or_else(|| spec.run_dir.join("serial.log"));
    let cfg = QemuConfig {
        machine,
        qemu,
        accel,
        cpus: spec.cpus,
        mem_mib: spec.mem_mib,
        kernel,
        initrd,
        cmdline: cmdline.trim().to_string(),
        serial_log: serial_log.clone(),
        timeout: spec.timeout,
        acpi_tables,
        extra_args: vec![],
        console_sink: Some(console_sink(&oracle, &injector, marker_sink)),
        platform_iommu,
    };
    let mut cfg = cfg;
    let plugin = if injector.guest_watch().is_empty() {
        None
    } else {
        let so = sluice_inject::find_plugin(Some(&cfg.qemu))
            .context("guest.sym rules need the sluice-stall TCG plugin (built by guest-images/qemu/build-qemu.sh)")?;
        let srv = PluginServer::start(&plugin_socket_path(&spec.run_dir), injector.clone())
            .context("cannot start the plugin socket")?;
        cfg.extra_args.extend(srv.qemu_args(&so));
        Some(srv)
    };
    if !spec.quiet {
        eprintln!(
            "sluice: booting ({} vCPUs, {:?}, {} disk(s)); console in {}",
            cfg.cpus,
            accel,
            disks.len(),
            serial_log.display()
        );
    }
    // Doorbell rules keep that device's doorbells on the socket (a stall holds the vCPU).
    let proxy = sluice_qemu::ProxyOptions {
        sync_doorbells: devices
            .devices
            .iter()
            .filter(|d| !sluice_host::points::doorbell_rules(&injector, d).is_empty())
            .map(|d| d.name.clone())
            .collect(),
    };
    let sluice_qemu::QemuRun {
        outcome,
        console: kept,
        platform,
        zpci,
        devices: traffic,
        vcpus_fifo,
    } = sluice_qemu::run_qemu_with(&cfg, &devices, &proxy)?;
    if vcpus_fifo > 0 && !spec.quiet {
        println!("vcpu threads:   {vcpus_fifo} SCHED_FIFO (SLUICE_VCPU_SCHED=fifo)");
    }
    for t in traffic.iter().filter(|_| !spec.quiet) {
        println!(
            "device proxy:   {}: {} BAR + {} config round trips, {} doorbells as ioeventfds \
             ({} served{}{}{}), {} MSI-X vectors ({} signalled), {} INTx raised, {} resamples",
            t.name,
            t.bar_accesses,
            t.config_accesses,
            t.ioeventfds,
            t.doorbells_served,
            if t.doorbells_in_worker {
                " by the device's worker"
            } else {
                ""
            },
            polled(t.poll_caught, t.polls_expired),
            match (t.doorbell_fifo, t.stepped_aside) {
                (false, _) => String::new(),
                (true, 0) => ", SCHED_FIFO".into(),
                (true, n) => format!(", SCHED_FIFO, {n} steps off a vCPU's core"),
            },
            t.msix_vectors,
            t.msix_signals,
            t.intx_raised,
            t.resamples
        );
    }
    if let Some(t) = platform.filter(|_| !spec.quiet) {
        println!(
            "iommu proxy:    {} register accesses over the socket ({} posted, {} refused), {} \
             wired interrupts, {} MSI writes in guest memory, {} device MSIs translated ({} \
             refused){}{}",
            t.register_accesses,
            t.posted_writes,
            t.refused_accesses,
            t.line_interrupts,
            t.msis,
            t.translations,
            t.translation_faults,
            if t.server_fifo {
                ", server SCHED_FIFO"
            } else {
                ""
            },
            polled(t.poll_caught, t.polls_expired)
        );
    }
    if let Some(t) = zpci.filter(|_| !spec.quiet) {
        println!(
            "zpci proxy:     {} MPCIFC, {} RPCIT ({} busy, resumed), {} refused, {} enable/disable, \
             {} configure/deconfigure ({} the model refused), {} error events to the guest \
             ({} dropped){}{}{}",
            t.mpcifc,
            t.rpcit,
            t.rpcit_busy,
            t.refused,
            t.enable_disable,
            t.configure_deconfigure,
            t.disagreements,
            t.error_events,
            t.error_events_dropped,
            if t.server_fifo {
                ", server SCHED_FIFO"
            } else {
                ""
            },
            t.answer_poll_us
                .map(|us| format!(", QEMU polls {us} µs for each answer"))
                .unwrap_or_default(),
            polled(t.poll_caught, t.polls_expired)
        );
    }
    if kept.unfinished && !spec.quiet {
        eprintln!(
            "sluice: console: QEMU exited but its console did not end; the last lines may be \
             missing from {}",
            serial_log.display()
        );
    }
    if (kept.dropped_lines > 0 || kept.long_lines > 0) && !spec.quiet {
        eprintln!(
            "sluice: console: {} line(s) left out of memory, {} over-long line(s) cut; the \
             full console is in {}",
            kept.dropped_lines,
            kept.long_lines,
            serial_log.display()
        );
    }
    let guest_hits = plugin.as_ref().map(|p| p.hits()).unwrap_or_default();
    let meta = serde_json::json!({
        "backend": "qemu",
        "model_bug": spec.model_bug.map(|b| b.name()),
        "accel": format!("{:?}", cfg.accel).to_lowercase(),
        "cpus": cfg.cpus,
        "mem_mib": cfg.mem_mib,
        "kernel": cfg.kernel,
        "cmdline": cfg.cmdline,
        "serial_log": cfg.serial_log,
        "guest_code_hits": guest_hits.len(),
        "rogue": rogue.reports(),
        "iommu_proxy": platform.map(|t| serde_json::json!({
            "register_accesses": t.register_accesses,
            "posted_writes": t.posted_writes,
            "refused_accesses": t.refused_accesses,
            "line_interrupts": t.line_interrupts,
            "msis": t.msis,
            "translations": t.translations,
            "translation_faults": t.translation_faults,
            "server_fifo": t.server_fifo,
            "poll_caught": t.poll_caught,
            "polls_expired": t.polls_expired,
        })),
        "zpci_proxy": zpci.map(|t| serde_json::json!({
            "mpcifc": t.mpcifc,
            "rpcit": t.rpcit,
            "rpcit_busy": t.rpcit_busy,
            "refused": t.refused,
            "enable_disable": t.enable_disable,
            "configure_deconfigure": t.configure_deconfigure,
            "disagreements": t.disagreements,
            "error_events": t.error_events,
            "error_events_dropped": t.error_events_dropped,
            "server_fifo": t.server_fifo,
            "answer_poll_us": t.answer_poll_us,
            "poll_caught": t.poll_caught,
            "polls_expired": t.polls_expired,
        })),
        // What the report's console-derived fields were computed from.
        "console": {
            "lines": kept.lines,
            "held_lines": outcome.console.len(),
            "dropped_lines": kept.dropped_lines,
            "long_lines_cut": kept.long_lines,
            "non_utf8_lines": kept.non_utf8_lines,
            "unfinished": kept.unfinished,
            "truncated": kept.truncated(),
        },
    });
    for r in rogue.reports().iter().filter(|_| !spec.quiet) {
        println!(
            "rogue DMA:      `{}` at {}: {} ({} bytes)",
            r.rule,
            r.iova.map_or("-".into(), |v| format!("{v:#x}")),
            r.status,
            r.moved
        );
    }
    finish_run(spec, outcome, &devices, &stats, &oracle, &injector, meta)
}

/// What every backend does after the guest stopped: stop injecting, close the timeline, check
/// the guest's and the host's view of the disks, judge, and write the report.
fn finish_run(
    spec: &RunSpec,
    outcome: RunOutcome,
    devices: &DeviceSet,
    stats: &DmaStats,
    oracle: &Oracle,
    injector: &Injector,
    meta: serde_json::Value,
) -> Result<RunRecord> {
    injector.disarm();
    let oreport = oracle
        .finish(&spec.run_dir)
        .context("cannot write the timeline")?;
    let guest = verify::parse_console(&outcome.console);
    let disk_verdicts = verify_disks(&spec.machine(), devices, &guest, &spec.workload, spec.seed);
    let verdict = report::verdict(&outcome, &guest, &disk_verdicts, &spec.workload, spec.cpus);
    let report_path = spec
        .report
        .clone()
        .unwrap_or_else(|| spec.run_dir.join("report.json"));
    let mut extras = serde_json::json!({
        "escapes": oreport.escapes,
        "escape_count": oreport.escape_count,
        "endpoints": oreport.endpoints,
        "timeline": oreport.timeline,
        "timeline_path": oreport.timeline_path,
        "injection": { "firings_per_rule": injector.fired() },
    });
    if let (Some(e), serde_json::Value::Object(m)) = (extras.as_object_mut(), meta) {
        e.extend(m);
    }
    report::write_json(
        &report_path,
        &outcome,
        &guest,
        &disk_verdicts,
        devices,
        stats,
        &verdict,
        extras,
    )?;
    Ok(RunRecord {
        faults: stats.snapshot().iter().map(|(_, c)| c.faulted).sum(),
        dma: stats
            .snapshot()
            .into_iter()
            .map(|(ep, c)| (ep.to_string(), c))
            .collect(),
        escapes: escape_classes(&oreport),
        escape_count: oreport.escape_count,
        firings: injector.fired(),
        escape_sites: escape_sites(&oreport, devices),
        fault_sites: oreport
            .endpoints
            .iter()
            .filter(|e| e.faulted > 0)
            .map(|e| site_of(&e.endpoint, devices))
            .collect(),
        timeline: oreport.timeline_path.clone(),
        outcome,
        guest,
        disks: disk_verdicts,
        verdict,
    })
}

/// The run's plan as written: `--inject-file`, then the `--inject` rules, then the seed.
fn load_plan(spec: &RunSpec) -> Result<Plan> {
    let mut plan = match &spec.inject_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            Plan::parse_toml(&text).with_context(|| format!("{}", p.display()))?
        }
        None => Plan::default(),
    };
    for r in &spec.inject {
        plan.add_cli(r).with_context(|| format!("--inject {r:?}"))?;
    }
    if let Some(seed) = spec.inject_seed {
        plan.seed = seed;
    }
    Ok(plan)
}

/// Validates the plan against the points a run with `disks` disks has. Without a symbol table
/// `guest.sym` rules are left for later (the variant's System.map comes with its image).
fn check_plan(
    spec: &RunSpec,
    disks: usize,
    system_map: Option<&std::path::Path>,
) -> Result<sluice_inject::ValidPlan> {
    let mut plan = load_plan(spec)?;
    let mut reg = run_registry(spec, disks);
    let wants_symbols = plan
        .rules
        .iter()
        .any(|r| r.point.starts_with(GUEST_SYM_PREFIX));
    match system_map {
        Some(map) if wants_symbols => reg.set_symbols(
            SymbolMap::load(map)
                .with_context(|| format!("cannot read {}", map.display()))?
                .offset_by(image::kernel_text_bias(map)),
        ),
        Some(_) => {}
        None => plan
            .rules
            .retain(|r| !r.point.starts_with(GUEST_SYM_PREFIX)),
    }
    Ok(reg.validate(&plan)?)
}

/// The injection plan of this run, validated against the points its devices really have.
fn build_injector(
    spec: &RunSpec,
    disks: &[DiskSpec],
    system_map: Option<&std::path::Path>,
) -> Result<Arc<Injector>> {
    let valid = match system_map {
        Some(map) => check_plan(spec, disks.len(), Some(map))?,
        // No symbol table at all: guest.sym rules must still be refused, not dropped.
        None => {
            let plan = load_plan(spec)?;
            run_registry(spec, disks.len()).validate(&plan)?
        }
    };
    if !spec.quiet {
        for w in &valid.warnings {
            eprintln!("sluice: warning: {w}");
        }
    }
    Ok(Arc::new(Injector::new(valid)))
}

/// Longest path a Unix socket address holds (`sun_path` is 108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

/// Where the guest.sym plugin's socket goes: in the run directory when the path fits a Unix
/// socket address, else in the temporary directory (harness runs are named after their case,
/// and a sweep cell's name alone can be 60 characters). The server removes it when dropped.
fn plugin_socket_path(run_dir: &std::path::Path) -> PathBuf {
    let inside = run_dir.join("plugin.sock");
    if inside.as_os_str().len() <= SUN_PATH_MAX {
        return inside;
    }
    // Unique per process and run, so parallel harness jobs never share a socket.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("sluice-plugin-{}-{n}.sock", std::process::id()))
}

/// The IOMMU model of `iommu` for listing its points (its endpoints do not matter there).
fn point_model(iommu: IommuArg) -> Option<Arc<dyn IommuModel>> {
    iommu
        .kind()
        .map(|k| IommuChoice::default_for(k).model(Vec::new()))
}

/// The points of this run: its models and devices, the DMA engine's when it has one.
fn run_registry(spec: &RunSpec, disks: usize) -> PointRegistry {
    config_points(disks, spec.iommu, spec.dma_engine.is_some())
}

/// The points a run with this configuration can fire (`sluice points`): its devices' and its
/// IOMMU's. Rules on other points are refused with this list, nearest first.
pub fn config_points(disks: usize, iommu: IommuArg, dma_engine: bool) -> PointRegistry {
    points::run_registry(disks, point_model(iommu).as_deref(), dma_engine)
}

/// Every point of every model (`sluice points --all`), with the device instances of such a run.
pub fn all_points(disks: usize, iommu: IommuArg) -> PointRegistry {
    let mut reg = points::with_run_devices(points::all_models(), disks, false);
    if let Some(m) = point_model(iommu) {
        reg.add_instance(m.name(), &m.device_points());
    }
    points::add_dma_engine(&mut reg, "dma0");
    reg
}

/// Live console lines go to the timeline, and `SLUICE:` lines double as injection markers.
/// What the guest's console feeds: the oracle's timeline, the injector's `/init` markers, and
/// marker lines the guest sends on the console when it has no marker device
/// (`SLUICE-MARK: TEXT`, s390), to `markers` as the marker device would.
fn console_sink(
    oracle: &Arc<Oracle>,
    injector: &Arc<Injector>,
    markers: Arc<dyn Fn(&str) + Send + Sync>,
) -> ConsoleSink {
    let (o, i) = (oracle.clone(), injector.clone());
    ConsoleSink(Arc::new(move |line: &str| {
        o.console_line(line);
        if line.contains("SLUICE: ") {
            i.marker(line);
        }
        if let Some((_, text)) = line.split_once("SLUICE-MARK: ") {
            markers(text.trim_end());
        }
    }))
}

/// The device an oracle endpoint names (`blk0`; SMMU StreamIDs are requester IDs here), else
/// the endpoint itself: a hunt groups findings by the device's role, which does not change
/// when slots move.
fn site_of(endpoint: &str, devices: &DeviceSet) -> String {
    let rid = match sluice_oracle::topology::parse_endpoint(endpoint) {
        Some(sluice_oracle::Key::Pci(b)) => Some(b),
        Some(sluice_oracle::Key::Sid(s)) => u16::try_from(s).ok(),
        _ => None,
    };
    rid.and_then(|r| devices.devices.iter().find(|d| d.bdf.0 == r))
        .map(|d| d.name.clone())
        .unwrap_or_else(|| endpoint.to_string())
}

/// Escapes by class: the distinct devices they came from, sorted.
fn escape_sites(
    r: &sluice_oracle::report::OracleReport,
    devices: &DeviceSet,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut m: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    for e in &r.escapes {
        m.entry(e.class.to_string())
            .or_default()
            .insert(site_of(&e.endpoint, devices));
    }
    m.into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect()
}

fn escape_classes(
    r: &sluice_oracle::report::OracleReport,
) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for e in &r.escapes {
        *m.entry(e.class.to_string()).or_insert(0) += 1;
    }
    m
}

/// The kvm backend: Sluice's own VMM runs the vCPUs.
#[allow(clippy::too_many_arguments)]
fn execute_kvm(
    spec: &RunSpec,
    disks: &[DiskSpec],
    (kernel, vmlinux, initrd): (PathBuf, PathBuf, PathBuf),
    host_opts: HostOptions,
    hooks: Arc<dyn Hooks>,
    stats: Arc<DmaStats>,
    oracle: Arc<Oracle>,
    injector: Arc<Injector>,
) -> Result<RunRecord> {
    use sluice_vmm::{KvmStatus, Vmm, VmmConfig};
    let status = sluice_vmm::kvm_status();
    match status {
        KvmStatus::Absent => bail!("--backend kvm: {}", status.message()),
        KvmStatus::Pvm => eprintln!("sluice: warning: {}", status.message()),
        KvmStatus::Hardware => {}
    }
    let pvm = status == KvmStatus::Pvm;
    let machine = spec.machine();
    // x86: `console=ttyS0 panic=-1 nokaslr i8042.nokbd i8042.noaux`; the platform's qemu-only
    // pieces (tsc=unstable) are left out, as they always were here.
    let mut cmdline = format!(
        "{} sluice.workload={} sluice.seed={} {}",
        machine.base_cmdline(BackendKind::Kvm),
        spec.workload,
        spec.seed,
        spec.cmdline
    );
    let mut cpuid_mask = spec.cpuid_mask.clone();
    if pvm {
        // The PVM workarounds of ../shared/reference/guest-baseline (docs/kvm-backend.md).
        cmdline.push_str(" noxsave clearcpuid=smap,smep,popcnt,xsave,pku,fsgsbase,rdpid");
        cpuid_mask.extend(sluice_vmm::PVM_CPUID_MASK.iter().map(|s| s.to_string()));
    }
    let serial_log = spec
        .serial_log
        .clone()
        .unwrap_or_else(|| spec.run_dir.join("serial.log"));
    let mut vmm = Vmm::new(&VmmConfig {
        machine,
        // Under PVM the bzImage decompressor is far too slow; boot the PVH vmlinux.
        kernel: if pvm { vmlinux } else { kernel },
        initrd: Some(initrd),
        cmdline: cmdline.trim().to_string(),
        cpus: spec.cpus,
        mem_mib: spec.mem_mib,
        timeout: spec.timeout,
        serial_log: serial_log.clone(),
        cpuid_mask,
        acpi_tables: vec![],
    })?;
    // guest.sym rules become hardware breakpoints; doorbell-point rules keep MMIO exits.
    vmm.set_injector(injector.clone());
    let opts = HostOptions {
        iommu: host_opts.iommu,
        dma_engine: host_opts.dma_engine,
        ..vmm.host_options()
    };
    let devices = DeviceSet::with_options(disks, hooks, &opts)?;
    eprintln!(
        "sluice: booting under the kvm backend ({} vCPUs); console in {}",
        spec.cpus,
        serial_log.display()
    );
    let outcome = vmm.run(&devices)?;
    // This backend hands the console over at the end: the timeline gets the lines, untimed.
    for line in &outcome.console {
        oracle.console_line(line);
    }
    let meta = serde_json::json!({
        "backend": "kvm",
        "model_bug": spec.model_bug.map(|b| b.name()),
        "cpus": spec.cpus,
        "mem_mib": spec.mem_mib,
        "serial_log": serial_log,
    });
    finish_run(spec, outcome, &devices, &stats, &oracle, &injector, meta)
}

/// Matches each disk function to the guest's name for it and checks its contents.
fn verify_disks(
    machine: &MachineSpec,
    devices: &DeviceSet,
    guest: &GuestReport,
    workload: &str,
    seed: u64,
) -> Vec<DiskVerdict> {
    let mut out = Vec::new();
    for (index, d) in devices.devices.iter().enumerate() {
        if d.disk.is_none() {
            continue;
        }
        // Where the guest finds it: the BDF, or on zPCI the function's UID domain.
        let bdf = machine.guest_pci_address(index, d.bdf);
        let entry = guest.disks.iter().find(|(_, b, _)| *b == bdf);
        let vd = entry.map(|(v, _, _)| v.clone());
        let iommu_group = entry.map(|(_, _, g)| g.clone());
        let guest_result = vd
            .as_ref()
            .and_then(|v| guest.disk_results.iter().find(|(n, _)| n == v))
            .map(|(_, r)| r.clone());
        let host = match (&vd, &d.disk, workload) {
            (Some(v), Some(path), "disk") => Some(verify::check_disk(path, seed, v)),
            _ => None,
        };
        out.push(DiskVerdict {
            name: d.name.clone(),
            bdf,
            guest_name: vd,
            guest_result,
            host,
            behind_iommu: d.behind_iommu,
            iommu_group,
        });
    }
    out
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let backend = args.backend.unwrap_or_else(default_backend);
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        image::repo_root()
            .join("target/sluice-runs")
            .join(format!("run-{stamp}-{}", std::process::id()))
    });
    let have_iommu = args.iommu.kind().is_some();
    let disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d, have_iommu))
        .collect::<Result<Vec<_>>>()?;
    let guest = match (&args.kernel, &args.initrd) {
        (Some(kernel), Some(initrd)) => GuestSource::Files {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
        },
        _ => GuestSource::Variant(
            args.guest
                .clone()
                .unwrap_or_else(|| image::default_variant(args.arch).to_string()),
        ),
    };
    let spec = RunSpec {
        arch: args.arch,
        guest,
        qemu: args.qemu.clone(),
        cpus: args.cpus,
        mem_mib: args.mem,
        disks,
        iommu: args.iommu,
        boot_bypass: args.iommu_boot_bypass,
        model_bug: args.iommu_model_bug,
        cmdline: args.cmdline.clone(),
        workload: args.workload.clone(),
        seed: args.seed,
        timeout: Duration::from_secs(args.timeout),
        run_dir,
        serial_log: args.serial_log.clone(),
        report: args.report.clone(),
        backend,
        inject: args.inject.clone(),
        inject_file: args.inject_file.clone(),
        inject_seed: args.inject_seed,
        system_map: args.system_map.clone(),
        cpuid_mask: args.cpuid_mask.clone(),
        dma_engine: args.dma_engine.map(|a| DmaEngineSpec {
            iommu: a == DmaEngineArg::Iommu,
        }),
        rogue: args
            .rogue
            .iter()
            .map(|r| RogueRule::parse(r))
            .collect::<Result<_, _>>()?,
        quiet: false,
    };
    let rec = execute(&spec)?;
    if !spec.inject.is_empty() || spec.inject_file.is_some() {
        println!("injection:      firings per rule {:?}", rec.firings);
    }
    let classes: Vec<String> = rec
        .escapes
        .iter()
        .map(|(c, n)| format!("{c} x{n}"))
        .collect();
    println!(
        "DMA escapes:    {}{}",
        rec.escape_count,
        if classes.is_empty() {
            String::new()
        } else {
            format!(" ({})", classes.join(", "))
        }
    );
    if let Some(t) = &rec.timeline {
        println!(
            "timeline:       {} (sluice report {})",
            t.display(),
            spec.run_dir.display()
        );
    }
    for (ep, c) in &rec.dma {
        println!(
            "DMA {ep}: {} translated, {} bypassed, {} faulted, {} direct ({} bytes)",
            c.translated, c.bypassed, c.faulted, c.direct, c.bytes
        );
    }
    if let Some(bug) = spec.model_bug {
        println!(
            "model bug:      {} (deliberate, for the oracle's positive control)",
            bug.name()
        );
    }
    match spec.iommu.kind() {
        // zPCI has no bypass: a function without a registered IOAT is refused.
        Some(IommuKind::Zpci) => println!("iommu:          {}", IommuKind::Zpci.long_name()),
        Some(kind) => println!(
            "iommu:          {}, boot bypass {}",
            kind.long_name(),
            if spec.boot_bypass { "on" } else { "off" }
        ),
        None => {}
    }
    report::print_summary(&rec.outcome, &rec.guest, &rec.disks, &rec.verdict);
    Ok(if rec.verdict.pass {
        ExitCode::SUCCESS
    } else if matches!(rec.outcome.exit, GuestExit::PoweredOff) {
        ExitCode::from(1)
    } else {
        ExitCode::from(3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_socket_fits_a_unix_address() {
        let short = std::path::Path::new("/tmp/run-1");
        assert_eq!(plugin_socket_path(short), short.join("plugin.sock"));
        let long = std::path::Path::new("/work/wt/target/sluice-harness/sweep-1").join(
            "registration-window-sweep--c02-guest.sym.bus_iommu_probe@10ms-stall--6.12-regwin--s1",
        );
        let (a, b) = (plugin_socket_path(&long), plugin_socket_path(&long));
        assert!(a.as_os_str().len() <= SUN_PATH_MAX, "{}", a.display());
        assert_ne!(a, b, "two runs never share a socket");
        // The real constraint: binding works.
        let listener = std::os::unix::net::UnixListener::bind(&a).unwrap();
        drop(listener);
        let _ = std::fs::remove_file(&a);
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    fn parse(line: &str) -> Result<RunArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("run").chain(line.split_whitespace())).map(|c| c.args)
    }

    #[test]
    fn boot_bypass_takes_on_and_off() {
        let bypass = |line: &str| parse(line).map(|a| a.iommu_boot_bypass);
        assert!(!bypass("--iommu virtio --iommu-boot-bypass off").unwrap());
        assert!(bypass("--iommu virtio --iommu-boot-bypass on").unwrap());
        assert!(!bypass("--iommu virtio --iommu-boot-bypass=off").unwrap());
        assert!(bypass("--iommu virtio").unwrap(), "on by default");
        assert!(
            bypass("--iommu-boot-bypass").is_err(),
            "a value is required"
        );
        let e = bypass("--iommu-boot-bypass maybe").unwrap_err().to_string();
        assert!(e.contains("expected on or off, got \"maybe\""), "{e}");
    }

    fn spec(dir: &Path) -> RunSpec {
        RunSpec {
            arch: Arch::X86_64,
            guest: GuestSource::Variant("6.12".into()),
            qemu: None,
            cpus: 2,
            mem_mib: 512,
            disks: vec![],
            iommu: IommuArg::Virtio,
            boot_bypass: true,
            model_bug: None,
            cmdline: String::new(),
            workload: "disk".into(),
            seed: 1,
            timeout: Duration::from_secs(10),
            run_dir: dir.to_path_buf(),
            serial_log: None,
            report: None,
            backend: Backend::Qemu,
            inject: vec![],
            inject_file: None,
            inject_seed: None,
            system_map: None,
            cpuid_mask: vec![],
            dma_engine: None,
            rogue: vec![],
            quiet: true,
        }
    }

    /// Everything `check` can refuse, each with one line naming what is wrong.
    #[test]
    fn check_refuses_bad_specs_before_building_anything() {
        let dir = std::env::temp_dir().join(format!("sluice-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let tiny = dir.join("tiny.img");
        std::fs::write(&tiny, b"x").unwrap();
        let err = |s: &RunSpec| format!("{:#}", s.check().unwrap_err());
        let ok = spec(&dir);
        ok.check().unwrap();
        let disk = |path: &Path| DiskSpec {
            path: path.to_path_buf(),
            read_only: false,
            iommu: true,
        };
        let s = RunSpec {
            disks: vec![disk(&img), disk(&dir.join("absent.img"))],
            ..spec(&dir)
        };
        assert_eq!(
            err(&s),
            format!(
                "cannot open disk {}: No such file or directory (os error 2)",
                dir.join("absent.img").display()
            )
        );
        let s = RunSpec {
            disks: vec![disk(&tiny)],
            ..spec(&dir)
        };
        assert!(err(&s).contains("smaller than one 512-byte sector"));
        let s = RunSpec {
            disks: vec![disk(&dir)],
            ..spec(&dir)
        };
        assert!(err(&s).ends_with(": is a directory"));
        assert!(
            err(&RunSpec {
                cpus: 0,
                ..spec(&dir)
            })
            .starts_with("--cpus 0:")
        );
        assert!(
            err(&RunSpec {
                mem_mib: 1,
                ..spec(&dir)
            })
            .starts_with("--mem 1M:")
        );
        let files = GuestSource::Files {
            kernel: dir.join("bzImage"),
            initrd: img.clone(),
        };
        assert!(
            err(&RunSpec {
                guest: files,
                ..spec(&dir)
            })
            .starts_with("cannot open kernel ")
        );
        let s = RunSpec {
            inject: vec!["smmuv3.cmd.CFGI_STE:delay=1ms".into()],
            ..spec(&dir)
        };
        assert!(
            err(&s).contains("belongs to the smmuv3 model, which this run does not have"),
            "{}",
            err(&s)
        );
        let s = RunSpec {
            inject: vec!["virtio-iommu.req.attach:delay=1ms".into()],
            iommu: IommuArg::None,
            ..spec(&dir)
        };
        assert!(err(&s).contains("virtio-iommu model"), "{}", err(&s));
        let s = RunSpec {
            inject: vec!["virtio-iommu.req.attach:delay=1banana".into()],
            ..spec(&dir)
        };
        assert!(err(&s).contains("bad delay `1banana`: unknown unit `banana`"));
        let s = RunSpec {
            inject_file: Some(dir.join("plan.toml")),
            ..spec(&dir)
        };
        assert!(err(&s).starts_with("cannot read "));
        // The DMA engine's points exist only in runs that have the engine.
        let s = RunSpec {
            inject: vec!["dma.dma0.doorbell:delay=1ms".into()],
            ..spec(&dir)
        };
        assert!(err(&s).contains("dma.dma0.doorbell"), "{}", err(&s));
        RunSpec {
            dma_engine: Some(DmaEngineSpec { iommu: true }),
            ..s
        }
        .check()
        .unwrap();
        // guest.sym rules wait for the variant's System.map, which comes with its image.
        let s = RunSpec {
            inject: vec!["guest.sym.bus_iommu_probe:delay=1ms".into()],
            ..spec(&dir)
        };
        s.check().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A run whose architecture cannot run, or whose variant is another architecture's, is
    /// refused in one line, before anything is built.
    #[test]
    fn architectures_that_cannot_run_are_refused_before_any_build() {
        assert_eq!(parse("").unwrap().arch, Arch::X86_64, "x86_64 by default");
        assert_eq!(parse("--arch arm64").unwrap().arch, Arch::Aarch64);
        let e = parse("--arch mips").unwrap_err().to_string();
        assert!(e.contains("unknown architecture `mips`"), "{e}");
        let dir = std::env::temp_dir().join(format!("sluice-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = |s: &RunSpec| format!("{:#}", s.check().unwrap_err());
        // arm64 runs, but not an x86 variant: refused before the image is built.
        let arm = RunSpec {
            arch: Arch::Aarch64,
            guest: GuestSource::Variant("6.12".into()),
            ..spec(&dir)
        };
        assert_eq!(
            err(&arm),
            "guest variant 6.12 is an x86_64 guest, but the run is --arch aarch64"
        );
        // s390x runs too (zPCI), but not an x86 variant either.
        let s390 = RunSpec {
            arch: Arch::S390x,
            guest: GuestSource::Variant("6.12".into()),
            ..spec(&dir)
        };
        assert_eq!(
            err(&s390),
            "guest variant 6.12 is an x86_64 guest, but the run is --arch s390x"
        );
        let s390_kvm = RunSpec {
            arch: Arch::S390x,
            backend: Backend::Kvm,
            ..spec(&dir)
        };
        assert_eq!(
            err(&s390_kvm),
            "the kvm backend runs x86_64 guests only, not s390x"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_and_disk_specs() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert!(parse_size_mib("1T").is_err());
        assert!(parse_size_mib("3M").is_err());
        let d = parse_disk("/tmp/a.img,ro", false).unwrap();
        assert!(d.read_only && !d.iommu);
        assert!(parse_disk("/tmp/a.img,bogus", false).is_err());
        assert!(parse_disk(",ro", false).is_err());
        assert!(parse_disk("/tmp/a.img", true).unwrap().iommu);
        assert!(!parse_disk("/tmp/a.img,iommu=off", true).unwrap().iommu);
        assert!(
            parse_disk("/tmp/a.img,iommu=on", false).is_err(),
            "no IOMMU to sit behind"
        );
        assert!(parse_disk("/tmp/a.img,iommu=maybe", true).is_err());
    }
}
