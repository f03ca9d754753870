//! Starting QEMU with one `x-pci-proxy-dev` per Sluice device, supervising it, and reading the
//! guest's serial console.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_host::machine::{FirmwareTables, MachineError, MachineSpec};
use sluice_host::supervisor::{self, Ending, Observed};
use sluice_host::{DeviceSet, RunOutcome};
use thiserror::Error;

use crate::console::{self, ConsoleState, ConsoleSummary};
use crate::error_chain;
use crate::platform::{PlatformInterrupts, PlatformServer};
use crate::server::{DeviceServer, ServeError};
use crate::zpci::{ZpciServer, ZpciTraffic};

/// How QEMU runs the vCPUs (shared with the platform description, which picks `-cpu` by it).
pub use sluice_host::machine::Accel;

/// Everything needed to start the guest.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The platform: machine type, firmware, console, CPU model, how tables are passed.
    pub machine: MachineSpec,
    /// QEMU binary (for the platform's architecture).
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// vCPUs.
    pub cpus: u32,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Where the serial console goes (host-timestamped).
    pub serial_log: PathBuf,
    /// Kill the guest after this long.
    pub timeout: Duration,
    /// Extra ACPI tables (`-acpitable file=`); only on platforms that take ACPI tables
    /// ([`FirmwareTables::AcpiFiles`]).
    pub acpi_tables: Vec<PathBuf>,
    /// Extra raw QEMU arguments (in-process devices for comparisons, TCG plugins).
    pub extra_args: Vec<String>,
    /// Called with every console line as it arrives (the oracle's timeline, injection markers).
    pub console_sink: Option<ConsoleSink>,
    /// Where the device set's platform IOMMU (its register window) goes, when it has one.
    pub platform_iommu: Option<PlatformIommu>,
}

/// A platform IOMMU whose registers and interrupt lines this process serves, on its own
/// channel (arm64 `virt`'s SMMUv3 through the patched QEMU's `x-smmuv3-proxy`).
#[derive(Clone)]
pub struct PlatformIommu {
    /// Machine option that makes QEMU place the IOMMU and describe it to the guest
    /// (`iommu=smmuv3`); the launcher adds `x-smmuv3-proxy-fd=` with the channel.
    pub machine_option: String,
    /// Guest-physical base of its register window on this machine.
    pub base: u64,
    /// Its interrupt lines, the sink the model was built with.
    pub irq: Arc<PlatformInterrupts>,
}

impl std::fmt::Debug for PlatformIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformIommu")
            .field("machine_option", &self.machine_option)
            .field("base", &format_args!("{:#x}", self.base))
            .finish()
    }
}

/// A live consumer of guest console lines.
#[derive(Clone)]
pub struct ConsoleSink(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleSink")
    }
}

/// QEMU could not be started.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// The device set has a platform IOMMU but the configuration does not say where it goes.
    #[error("the run's IOMMU is a platform device, but this machine has no place for it")]
    PlatformIommuUnplaced,
    /// A file the guest needs is missing or unreadable.
    #[error("{what} {path}")]
    Input {
        /// "kernel", "initrd", "QEMU binary".
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// socketpair or spawn failed.
    #[error("cannot start QEMU")]
    Spawn(#[source] std::io::Error),
    /// The platform cannot run under this backend (yet), or cannot take what was asked of it.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// ACPI tables for a platform that has none.
    #[error("{arch} {machine} takes no ACPI tables, but {count} were given")]
    NoAcpi {
        /// Architecture.
        arch: sluice_host::machine::Arch,
        /// QEMU machine type.
        machine: &'static str,
        /// How many tables.
        count: usize,
    },
    /// The serial log cannot be written.
    #[error("cannot write the serial log {path}")]
    SerialLog {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), LaunchError> {
    File::open(path)
        .and_then(|mut f| f.read(&mut [0u8; 1]).map(|_| ()))
        .map_err(|source| LaunchError::Input {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// A socketpair whose second end survives exec (it is handed to QEMU by number).
fn proxy_socketpair() -> std::io::Result<(UnixStream, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: setting FD_CLOEXEC on our own end, a valid descriptor.
    if unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((UnixStream::from(ours), theirs))
}

/// The QEMU argument list for `cfg` with proxy devices on the given descriptors.
pub fn qemu_args(cfg: &QemuConfig, proxies: &[(String, u8, i32)]) -> Vec<String> {
    qemu_args_with(cfg, proxies, None)
}

/// QEMU's end of an IOMMU channel: the platform IOMMU's, or the zPCI model's when the
/// machine's PCI devices are zPCI functions.
#[derive(Debug, Clone, Copy)]
struct IommuChannelArgs {
    /// The descriptor QEMU inherits.
    fd: i32,
    /// zPCI: how long a forwarded instruction polls for the answer before it sleeps
    /// (`x-zpci-proxy-spin-us`); None leaves QEMU's default (it sleeps at once).
    zpci_spin_us: Option<u32>,
}

/// [`qemu_args`], with an IOMMU channel.
fn qemu_args_with(
    cfg: &QemuConfig,
    proxies: &[(String, u8, i32)],
    iommu: Option<IommuChannelArgs>,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let m = &cfg.machine;
    for dir in m.firmware_dirs {
        push(&["-L", dir]);
    }
    match cfg.accel {
        Accel::Tcg => push(&["-accel", "tcg,thread=multi"]),
        Accel::Kvm => push(&["-accel", "kvm"]),
    }
    push(&["-cpu", m.cpu(cfg.accel)]);
    let mem = format!("{}M", cfg.mem_mib);
    // Guest RAM is a shared memfd so that this process can map it for the devices' DMA.
    let mut machine: Vec<String> = vec![m.machine_type.to_string()];
    machine.extend(m.machine_options.iter().map(|o| o.to_string()));
    if let (Some(p), Some(ch)) = (&cfg.platform_iommu, iommu) {
        machine.push(p.machine_option.clone());
        machine.push(format!("x-smmuv3-proxy-fd={}", ch.fd));
    } else if let (true, Some(ch)) = (m.zpci_functions, iommu) {
        machine.push(format!("x-zpci-proxy-fd={}", ch.fd));
        if let Some(us) = ch.zpci_spin_us {
            machine.push(format!("x-zpci-proxy-spin-us={us}"));
        }
    }
    machine.push("memory-backend=mem".to_string());
    push(&[
        "-M",
        &machine.join(","),
        "-smp",
        &cfg.cpus.to_string(),
        "-m",
        &mem,
    ]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]);
    // QEMU names its threads ("CPU 0/TCG", "worker", ...) so a profile, `ps -L` or
    // benches/sched-sampler.py can tell the vCPUs from the main loop.
    push(&["-name", "sluice,debug-threads=on"]);
    push(&[
        "-kernel",
        &cfg.kernel.to_string_lossy(),
        "-initrd",
        &cfg.initrd.to_string_lossy(),
    ]);
    push(&["-append", &cfg.cmdline]);
    for (i, (id, slot, fd)) in proxies.iter().enumerate() {
        if m.zpci_functions {
            // The zPCI function QEMU wraps the device in: FID = the device's RID (bus 0,
            // function 0), which is how the run's zPCI model names it; UID = position + 1.
            // It must precede its target, or plugging the device creates another one.
            push(&[
                "-device",
                &format!(
                    "zpci,uid={},fid={},target={id}",
                    MachineSpec::zpci_uid(i),
                    u32::from(*slot) << 3
                ),
                "-device",
                &format!("x-pci-proxy-dev,id={id},fd={fd},addr={slot:#x},x-unassigned-bars=on"),
            ]);
        } else {
            push(&[
                "-device",
                &format!("x-pci-proxy-dev,id={id},fd={fd},addr={slot:#x}"),
            ]);
        }
    }
    if m.tables == FirmwareTables::AcpiFiles {
        for t in &cfg.acpi_tables {
            push(&["-acpitable", &format!("file={}", t.display())]);
        }
    }
    a.extend(cfg.extra_args.iter().cloned());
    a
}

/// Console pieces in flight between the reader thread and the supervisor.
const CONSOLE_QUEUE: usize = 4096;
/// How long the console may stay open after QEMU exited before the run ends without its end.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);
/// How long QEMU may take to exit after a device's socket reports it gone before that counts
/// as a device error (a socket QEMU dropped while it runs on).
const PEER_GONE_GRACE: Duration = Duration::from_secs(2);

/// A finished QEMU run: the outcome every backend reports, and how much of the console was
/// kept in memory.
#[derive(Debug, Clone)]
pub struct QemuRun {
    /// How the run ended, with the console lines held in memory.
    pub outcome: RunOutcome,
    /// Lines seen, and what was cut or left out of `outcome.console`.
    pub console: ConsoleSummary,
    /// What crossed the platform IOMMU's socket, when the run had one.
    pub platform: Option<PlatformTraffic>,
    /// What crossed the zPCI channel, when the run had one (s390x).
    pub zpci: Option<ZpciTraffic>,
    /// What each proxied PCI device cost: socket round trips, and what took the fast paths.
    pub devices: Vec<DeviceTraffic>,
    /// How many of QEMU's vCPU threads ran SCHED_FIFO (`SLUICE_VCPU_SCHED=fifo`).
    pub vcpus_fifo: usize,
}

/// How the launcher serves the proxied devices.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Devices (by name) whose doorbells stay socket round trips: the run's injection plan has
    /// a rule on one of their doorbell points, and a stall there must hold the vCPU that rang
    /// (with an ioeventfd the vCPU runs on and the device's doorbell thread would stall).
    pub sync_doorbells: Vec<String>,
}

/// Traffic of one proxied PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTraffic {
    /// Device name.
    pub name: String,
    /// Config-space accesses (one round trip each).
    pub config_accesses: u64,
    /// BAR accesses over the socket (one round trip each).
    pub bar_accesses: u64,
    /// INTx resamples (the guest's EOI stand-in).
    pub resamples: u64,
    /// Doorbells QEMU absorbed as ioeventfds.
    pub ioeventfds: u64,
    /// Doorbell eventfd signals served (no round trip).
    pub doorbells_served: u64,
    /// The doorbell thread's polls after a doorbell that found the next one (no wake-up).
    pub poll_caught: u64,
    /// Its polls that ended without one.
    pub polls_expired: u64,
    /// Whether its doorbell thread runs SCHED_FIFO.
    pub doorbell_fifo: bool,
    /// Wake-ups of that thread beside a waiting vCPU thread after which it moved to another
    /// core.
    pub stepped_aside: u64,
    /// Whether the device's worker waits on the doorbell eventfds itself (no doorbell thread).
    pub doorbells_in_worker: bool,
    /// MSI-X vectors QEMU emulates for it (eventfds received).
    pub msix_vectors: u64,
    /// Interrupts sent as MSI-X vector eventfds.
    pub msix_signals: u64,
    /// INTx assertions.
    pub intx_raised: u64,
}

/// Traffic of a platform IOMMU served over its own socket: what the guest's driver cost in
/// round trips (each register access is one), and how its interrupts were delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformTraffic {
    /// Register accesses served (one socket round trip each, but for the posted ones).
    pub register_accesses: u64,
    /// Of those, posted writes (the SMMU's CMDQ_PROD doorbell): QEMU did not wait.
    pub posted_writes: u64,
    /// Register accesses refused before they reached the model.
    pub refused_accesses: u64,
    /// Wired-line interrupts signalled to QEMU (eventfd writes, no round trip).
    pub line_interrupts: u64,
    /// MSIs the model wrote into guest memory itself (CMD_SYNC completions), or refused.
    pub msis: u64,
    /// Translations QEMU asked for (a translated PCI function's MSI-X writes) and got.
    pub translations: u64,
    /// Of QEMU's translation requests, those refused (the model's fault, or no such stream).
    pub translation_faults: u64,
    /// Whether the server thread ran SCHED_FIFO.
    pub server_fifo: bool,
    /// Messages that arrived while the server thread polled (no wake-up).
    pub poll_caught: u64,
    /// Polls that ended without a message.
    pub polls_expired: u64,
}

/// Boots the guest with `devices` served by this process, and waits for it to finish.
pub fn run(cfg: &QemuConfig, devices: &DeviceSet) -> Result<RunOutcome, LaunchError> {
    run_qemu(cfg, devices).map(|r| r.outcome)
}

/// [`run`], also saying how much of the console was kept in memory.
pub fn run_qemu(cfg: &QemuConfig, devices: &DeviceSet) -> Result<QemuRun, LaunchError> {
    run_qemu_with(cfg, devices, &ProxyOptions::default())
}

/// [`run_qemu`] with `proxy` deciding which devices keep their doorbells on the socket.
pub fn run_qemu_with(
    cfg: &QemuConfig,
    devices: &DeviceSet,
    proxy: &ProxyOptions,
) -> Result<QemuRun, LaunchError> {
    cfg.machine
        .check_backend(sluice_host::machine::BackendKind::Qemu)?;
    if !cfg.acpi_tables.is_empty() && cfg.machine.tables != FirmwareTables::AcpiFiles {
        return Err(LaunchError::NoAcpi {
            arch: cfg.machine.arch,
            machine: cfg.machine.machine_type,
            count: cfg.acpi_tables.len(),
        });
    }
    check_readable("kernel", &cfg.kernel)?;
    check_readable("initrd", &cfg.initrd)?;
    check_readable("QEMU binary", &cfg.qemu)?;
    let mut serial = File::create(&cfg.serial_log).map_err(|source| LaunchError::SerialLog {
        path: cfg.serial_log.clone(),
        source,
    })?;

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut proxies = Vec::new();
    for d in &devices.devices {
        let (a, b) = proxy_socketpair().map_err(LaunchError::Spawn)?;
        proxies.push((d.name.clone(), d.bdf.dev(), b.as_raw_fd()));
        ours.push((a, d.clone()));
        theirs.push(b);
    }
    // The platform IOMMU's register window gets a channel of its own.
    let platform = match (&devices.iommu_mmio, &cfg.platform_iommu) {
        (None, _) => None,
        (Some(window), Some(p)) => {
            let (a, b) = proxy_socketpair().map_err(LaunchError::Spawn)?;
            let fd = b.as_raw_fd();
            theirs.push(b);
            Some((a, window.clone(), p.clone(), fd))
        }
        (Some(_), None) => return Err(LaunchError::PlatformIommuUnplaced),
    };
    // zPCI instructions get a channel of their own (the machine's, not a device's).
    let zpci = match (&devices.iommu_zpci, cfg.machine.zpci_functions) {
        (Some(model), true) => {
            let (a, b) = proxy_socketpair().map_err(LaunchError::Spawn)?;
            let fd = b.as_raw_fd();
            theirs.push(b);
            Some((a, model.clone(), fd))
        }
        _ => None,
    };
    let iommu_channel = platform
        .as_ref()
        .map(|p| IommuChannelArgs {
            fd: p.3,
            zpci_spin_us: None,
        })
        .or(zpci.as_ref().map(|z| IommuChannelArgs {
            fd: z.2,
            zpci_spin_us: crate::sched::zpci_spin_us(&cfg.qemu),
        }));
    let args = qemu_args_with(cfg, &proxies, iommu_channel);
    log::info!("starting {} {}", cfg.qemu.display(), args.join(" "));
    let start = Instant::now();
    let mut child: Child = Command::new(&cfg.qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LaunchError::Spawn)?;
    drop(theirs);
    let mut vcpu_raiser = crate::sched::VcpuRaiser::requested(child.id(), cfg.cpus);
    let mut vcpus_fifo = 0;

    let stop = Arc::new(AtomicBool::new(false));
    let (dev_tx, dev_rx) = mpsc::channel::<Result<(), ServeError>>();
    let mut counters = Vec::new();
    for (sock, dev) in ours {
        let server = DeviceServer::new(sock, dev.clone(), devices.mem.clone(), stop.clone())
            .with_sync_doorbells(proxy.sync_doorbells.contains(&dev.name))
            .with_qemu_pid(child.id());
        counters.push((dev.clone(), server.stats(), server.fast_path_stats()));
        spawn_server(format!("{}-proxy", dev.name), &dev_tx, None, move |_| {
            server.run()
        });
    }
    // Whether the platform IOMMU's or the zPCI channel's server thread runs SCHED_FIFO.
    let iommu_fifo = Arc::new(AtomicBool::new(false));
    let mut platform_counters = None;
    if let Some((sock, window, p, _)) = platform {
        let server = PlatformServer::new(
            sock,
            "iommu",
            p.base,
            window,
            devices.mem.clone(),
            p.irq.clone(),
        )
        .with_msi_translation(devices.iommu_msi.clone());
        platform_counters = Some((server.stats(), p.irq));
        spawn_server(
            "iommu-proxy".into(),
            &dev_tx,
            Some((&iommu_fifo, crate::sched::smmu_server_spin_us(cfg.cpus))),
            move |budget| server.with_poll_budget(budget).run(),
        );
    }
    let mut zpci_counters = None;
    if let Some((sock, model, _)) = zpci {
        let server = ZpciServer::new(sock, model);
        zpci_counters = Some(server.stats());
        spawn_server(
            "zpci-proxy".into(),
            &dev_tx,
            Some((&iommu_fifo, crate::sched::ZPCI_SERVER_SPIN_US)),
            move |budget| server.with_poll_budget(budget).run(),
        );
    }
    drop(dev_tx);

    // Bounded, so a guest that floods its console slows QEMU's pipe down instead of growing
    // this queue: at most CONSOLE_QUEUE pieces of at most MAX_LINE bytes wait here.
    let (con_tx, con_rx) = mpsc::sync_channel(CONSOLE_QUEUE);
    if let Some(out) = child.stdout.take() {
        let sink = cfg.console_sink.clone();
        std::thread::spawn(move || {
            console::read_console(out, &con_tx, sink.as_ref(), start);
        });
    }
    let (err_tx, err_rx) = mpsc::channel();
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            let _ = err_tx.send(console::read_stderr_tail(err));
        });
    }

    let mut seen = ConsoleState::default();
    let mut device_error = None;
    // A device socket QEMU's side closed, and when: QEMU's exit explains it (the reset often
    // arrives before QEMU is reaped), unless QEMU runs on past PEER_GONE_GRACE.
    let mut peer_gone: Option<(Instant, String)> = None;
    let mut timed_out = false;
    let mut exited_at: Option<Instant> = None;
    let status = loop {
        // Wait briefly for console output; this is also the supervision tick.
        if let Ok(msg) = con_rx.recv_timeout(Duration::from_millis(20)) {
            seen.take(msg, &mut serial);
            // A bounded batch, so a flooding guest cannot keep the supervisor from its
            // timeout and device-error checks.
            for msg in con_rx.try_iter().take(CONSOLE_QUEUE) {
                seen.take(msg, &mut serial);
            }
        }
        if let Some(n) = vcpu_raiser.as_mut().and_then(|r| r.tick()) {
            log::info!("{n} of {} vCPU threads SCHED_FIFO", cfg.cpus);
            vcpus_fifo = n;
            vcpu_raiser = None;
        }
        while let Ok(r) = dev_rx.try_recv() {
            if let Err(e) = r {
                let text = error_chain(&e);
                if e.peer_gone() {
                    log::warn!("{text}");
                    peer_gone.get_or_insert((Instant::now(), text));
                } else {
                    log::error!("{text}");
                    device_error.get_or_insert(text);
                }
            }
        }
        if device_error.is_none()
            && exited_at.is_none()
            && peer_gone
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() > PEER_GONE_GRACE)
        {
            device_error = peer_gone.take().map(|(_, text)| text);
        }
        if device_error.is_some() || start.elapsed() > cfg.timeout {
            timed_out = device_error.is_none();
            let _ = child.kill();
        }
        match child.try_wait() {
            // Keep reading until the console pipe closes so no last line is lost, but not for
            // ever: a pipe that stays open after QEMU's exit (held by another process) must
            // not turn a finished run into a timeout.
            Ok(Some(status)) => {
                let exited = *exited_at.get_or_insert_with(Instant::now);
                if seen.ended
                    || exited.elapsed() > CONSOLE_DRAIN
                    || start.elapsed() > cfg.timeout + CONSOLE_DRAIN
                {
                    if !seen.ended {
                        log::warn!(
                            "QEMU exited but its console did not close within {CONSOLE_DRAIN:?}; \
                             the console may be incomplete"
                        );
                        seen.summary.unfinished = true;
                    }
                    break Some(status);
                }
            }
            Ok(None) => {}
            Err(_) => break None,
        }
    };
    let wall = start.elapsed();
    stop.store(true, Ordering::Release);
    // Servers end when QEMU closes their sockets. A socket gone with QEMU's exit is not a
    // device error; anything else (a malformed message) still is.
    while let Ok(r) = dev_rx.recv_timeout(Duration::from_millis(200)) {
        if let Err(e) = r
            && device_error.is_none()
            && !e.peer_gone()
        {
            device_error = Some(error_chain(&e));
        }
    }
    // QEMU has exited, so its stderr is at its end; a child QEMU left behind could still
    // hold the pipe open, hence the bound.
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    let exit = supervisor::classify(Observed {
        ending: match status {
            _ if timed_out => Ending::Timeout,
            Some(s) => Ending::ProcessExited {
                code: s.code(),
                stderr: tail(&stderr, 2000),
            },
            None => Ending::ProcessLost {
                stderr: tail(&stderr, 2000),
            },
        },
        device_error,
        panic_seen: seen.panicked,
        init_seen: seen.init_at.is_some(),
    });
    let boot_to_init = seen.init_at;
    let (console, summary) = seen.into_lines();
    Ok(QemuRun {
        outcome: RunOutcome {
            exit,
            wall,
            boot_to_init,
            console,
        },
        console: summary,
        platform: platform_counters.map(|(s, irq)| PlatformTraffic {
            register_accesses: s.accesses.load(Ordering::Relaxed),
            posted_writes: s.posted_writes.load(Ordering::Relaxed),
            refused_accesses: s.refused_accesses.load(Ordering::Relaxed),
            line_interrupts: irq.stats().signalled.load(Ordering::Relaxed),
            msis: irq.stats().msi_seen.load(Ordering::Relaxed),
            translations: s.translations.load(Ordering::Relaxed),
            translation_faults: s.translation_faults.load(Ordering::Relaxed),
            server_fifo: iommu_fifo.load(Ordering::Relaxed),
            poll_caught: s.poll.caught.load(Ordering::Relaxed),
            polls_expired: s.poll.expired.load(Ordering::Relaxed),
        }),
        zpci: zpci_counters.map(|s| ZpciTraffic {
            server_fifo: iommu_fifo.load(Ordering::Relaxed),
            answer_poll_us: iommu_channel.and_then(|c| c.zpci_spin_us),
            ..s.snapshot()
        }),
        devices: counters
            .into_iter()
            .map(|(dev, s, f)| DeviceTraffic {
                name: dev.name.clone(),
                config_accesses: s.config_accesses.load(Ordering::Relaxed),
                bar_accesses: s.bar_accesses.load(Ordering::Relaxed),
                resamples: s.resamples.load(Ordering::Relaxed),
                ioeventfds: f.ioeventfds.load(Ordering::Relaxed),
                doorbells_served: f.doorbells_served.load(Ordering::Relaxed),
                poll_caught: f.poll.caught.load(Ordering::Relaxed),
                polls_expired: f.poll.expired.load(Ordering::Relaxed),
                doorbell_fifo: f.fifo_threads.load(Ordering::Relaxed) > 0,
                stepped_aside: f.stepped_aside.load(Ordering::Relaxed),
                doorbells_in_worker: f.device_doorbells.load(Ordering::Relaxed) > 0,
                msix_vectors: f.msix_fds.load(Ordering::Relaxed),
                msix_signals: f.msix_signals.load(Ordering::Relaxed),
                intx_raised: dev.intx.raised(),
            })
            .collect(),
        vcpus_fifo,
    })
}

/// Runs one channel's server on a thread named `name`, its result sent to `done`. With `fifo`
/// (an IOMMU's server, whose answers the guest busy-polls for: where to record whether it got
/// SCHED_FIFO, and its default poll budget in µs) the thread first tries SCHED_FIFO
/// ([`crate::sched::iommu_server_fifo`]); `run` gets the poll budget for the next message,
/// which only a SCHED_FIFO thread has ([`crate::sched::iommu_server_spin`]).
fn spawn_server(
    name: String,
    done: &mpsc::Sender<Result<(), ServeError>>,
    fifo: Option<(&Arc<AtomicBool>, u32)>,
    run: impl FnOnce(std::time::Duration) -> Result<(), ServeError> + Send + 'static,
) {
    let done = done.clone();
    let fifo = fifo.map(|(got, poll_us)| (got.clone(), poll_us));
    let _ = std::thread::Builder::new().name(name).spawn(move || {
        let mut budget = std::time::Duration::ZERO;
        if let Some((got, poll_us)) = fifo
            && crate::sched::iommu_server_fifo()
            && crate::sched::raise_to_fifo()
        {
            got.store(true, Ordering::Relaxed);
            budget = crate::sched::iommu_server_spin(poll_us);
        }
        let _ = done.send(run(budget));
    });
}

fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    s.get(i..).unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_host::GuestExit;

    fn cfg() -> QemuConfig {
        QemuConfig {
            machine: MachineSpec::x86_q35(),
            qemu: "/bin/false".into(),
            accel: Accel::Tcg,
            cpus: 2,
            mem_mib: 512,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0".into(),
            serial_log: "/tmp/x".into(),
            timeout: Duration::from_secs(1),
            acpi_tables: vec!["/t/viot.aml".into()],
            extra_args: vec![],
            console_sink: None,
            platform_iommu: None,
        }
    }

    #[test]
    fn args_carry_memfd_ram_and_one_proxy_per_device() {
        let a = qemu_args(&cfg(), &[("blk0".into(), 3, 7), ("blk1".into(), 4, 9)]).join(" ");
        assert!(a.contains("-M q35,memory-backend=mem"));
        assert!(a.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(a.contains("-device x-pci-proxy-dev,id=blk0,fd=7,addr=0x3"));
        assert!(a.contains("-device x-pci-proxy-dev,id=blk1,fd=9,addr=0x4"));
        assert!(a.contains("-accel tcg,thread=multi"));
        assert!(a.contains("-acpitable file=/t/viot.aml"));
    }

    /// The full x86 q35 argument list, captured from the launcher before the platform became
    /// a [`MachineSpec`] value: describing the machine must not change one argument.
    #[test]
    fn x86_q35_args_are_unchanged() {
        let proxies = [("blk0".to_string(), 3, 7)];
        let expected = |accel: [&'static str; 4]| {
            let mut v = vec!["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"];
            v.extend(accel);
            v.extend([
                "-M",
                "q35,memory-backend=mem",
                "-smp",
                "2",
                "-m",
                "512M",
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-name",
                "sluice,debug-threads=on",
                "-kernel",
                "/k",
                "-initrd",
                "/i",
                "-append",
                "console=ttyS0",
                "-device",
                "x-pci-proxy-dev,id=blk0,fd=7,addr=0x3",
                "-acpitable",
                "file=/t/viot.aml",
                "-plugin",
                "x.so",
            ]);
            v
        };
        let cfg = QemuConfig {
            extra_args: vec!["-plugin".into(), "x.so".into()],
            ..cfg()
        };
        assert_eq!(
            qemu_args(&cfg, &proxies),
            expected(["-accel", "tcg,thread=multi", "-cpu", "max"])
        );
        let kvm = QemuConfig {
            accel: Accel::Kvm,
            ..cfg
        };
        assert_eq!(
            qemu_args(&kvm, &proxies),
            expected(["-accel", "kvm", "-cpu", "host"])
        );
    }

    #[test]
    fn other_platforms_shape_the_args() {
        let arm = QemuConfig {
            machine: MachineSpec::arm64_virt(),
            cmdline: MachineSpec::arm64_virt()
                .base_cmdline(sluice_host::machine::BackendKind::Qemu),
            ..cfg()
        };
        let a = qemu_args(&arm, &[]).join(" ");
        assert!(
            a.starts_with("-L /usr/share/qemu -accel tcg,thread=multi -cpu max "),
            "{a}"
        );
        assert!(
            a.contains("-M virt,gic-version=3,highmem=off,memory-backend=mem"),
            "{a}"
        );
        assert!(a.contains("-append console=ttyAMA0 panic=-1"), "{a}");
        assert!(
            !a.contains("-acpitable"),
            "virt's tables come from QEMU: {a}"
        );
        // A platform IOMMU joins the machine options with its channel.
        let smmu = QemuConfig {
            platform_iommu: Some(PlatformIommu {
                machine_option: "iommu=smmuv3".into(),
                base: 0x0905_0000,
                irq: PlatformInterrupts::new("smmuv3", 4),
            }),
            ..arm.clone()
        };
        let channel = |fd, zpci_spin_us| Some(IommuChannelArgs { fd, zpci_spin_us });
        let a = qemu_args_with(&smmu, &[], channel(11, Some(200))).join(" ");
        assert!(
            a.contains(
                "-M virt,gic-version=3,highmem=off,iommu=smmuv3,x-smmuv3-proxy-fd=11,memory-backend=mem"
            ),
            "{a}"
        );
        let s390 = QemuConfig {
            machine: MachineSpec::s390x_ccw(),
            acpi_tables: vec![],
            ..cfg()
        };
        assert!(
            qemu_args(&s390, &[])
                .join(" ")
                .contains("-M s390-ccw-virtio,memory-backend=mem")
        );
        // With a zPCI model: the machine's channel, and each device as a zPCI function named
        // before its target (FID = RID, UID = position + 1), with unassigned BARs.
        let a = qemu_args_with(
            &s390,
            &[("blk0".into(), 3, 20), ("blk1".into(), 4, 21)],
            channel(12, None),
        )
        .join(" ");
        assert!(
            a.contains("-M s390-ccw-virtio,x-zpci-proxy-fd=12,memory-backend=mem"),
            "{a}"
        );
        assert!(
            a.contains(
                "-device zpci,uid=1,fid=24,target=blk0 \
                 -device x-pci-proxy-dev,id=blk0,fd=20,addr=0x3,x-unassigned-bars=on \
                 -device zpci,uid=2,fid=32,target=blk1"
            ),
            "{a}"
        );
        // the zPCI answer's poll budget goes with the channel; the SMMUv3's has none
        let a = qemu_args_with(&s390, &[], channel(12, Some(200))).join(" ");
        assert!(
            a.contains("-M s390-ccw-virtio,x-zpci-proxy-fd=12,x-zpci-proxy-spin-us=200,"),
            "{a}"
        );
        let a = qemu_args_with(&smmu, &[], channel(11, Some(200))).join(" ");
        assert!(!a.contains("spin"), "{a}");
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let set = DeviceSet {
            mem: Default::default(),
            devices: vec![],
            iommu: None,
            iommu_mmio: None,
            iommu_zpci: None,
            iommu_msi: Default::default(),
        };
        let err = run(&cfg(), &set).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel /k",
            "the cause is the source, not the message"
        );
        assert_eq!(
            error_chain(&err),
            "kernel /k: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("ab", 10), "ab");
    }

    /// A stand-in for QEMU: a shell script with `body`, plus a kernel and initrd to pass the
    /// launcher's checks.
    fn fake(name: &str, body: &str) -> (QemuConfig, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sluice-fake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let qemu = dir.join("qemu.sh");
        std::fs::write(&qemu, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["k", "i"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let cfg = QemuConfig {
            qemu,
            kernel: dir.join("k"),
            initrd: dir.join("i"),
            serial_log: dir.join("serial.log"),
            timeout: Duration::from_secs(30),
            acpi_tables: vec![],
            ..cfg()
        };
        (cfg, dir)
    }

    fn no_devices() -> DeviceSet {
        DeviceSet {
            mem: Default::default(),
            devices: vec![],
            iommu: None,
            iommu_mmio: None,
            iommu_zpci: None,
            iommu_msi: Default::default(),
        }
    }

    #[test]
    fn console_with_invalid_utf8_is_read_to_the_end() {
        let (cfg, dir) = fake(
            "utf8",
            r"printf 'SLUICE: init started\n\377\376 not utf-8 \303\n'
printf 'SLUICE: RESULT PASS\r\nSLUICE: done\n'",
        );
        let r = run_qemu(&cfg, &no_devices()).unwrap();
        assert_eq!(r.outcome.exit, GuestExit::PoweredOff);
        assert_eq!(
            r.outcome.console,
            [
                "SLUICE: init started",
                "\u{fffd}\u{fffd} not utf-8 \u{fffd}",
                "SLUICE: RESULT PASS",
                "SLUICE: done"
            ]
        );
        assert!(r.outcome.boot_to_init.is_some());
        assert_eq!(r.console.non_utf8_lines, 1);
        assert!(!r.console.truncated());
        let log = std::fs::read(&cfg.serial_log).unwrap();
        let needles: [&[u8]; 3] = [
            b"] \xff\xfe not utf-8 \xc3\n",
            b"] SLUICE: RESULT PASS\n",
            b"] SLUICE: done\n",
        ];
        for needle in needles {
            assert!(
                log.windows(needle.len()).any(|w| w == needle),
                "{needle:?} not in {}",
                String::from_utf8_lossy(&log)
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_console_held_open_after_qemu_exits_does_not_make_a_timeout() {
        // A background child inherits QEMU's stdout and keeps the pipe open for 20 s after the
        // "QEMU" exits: the run must end as powered off about CONSOLE_DRAIN later, not at the
        // 30 s timeout, and say that its console may be incomplete.
        let (cfg, dir) = fake(
            "held",
            "printf 'SLUICE: init started\nSLUICE: RESULT PASS\n'\n(sleep 20) &\nexit 0",
        );
        let start = Instant::now();
        let r = run_qemu(&cfg, &no_devices()).unwrap();
        assert_eq!(r.outcome.exit, GuestExit::PoweredOff);
        assert!(r.console.unfinished);
        assert!(r.console.truncated());
        assert!(
            r.outcome.console.iter().any(|l| l == "SLUICE: RESULT PASS"),
            "{:?}",
            r.outcome.console
        );
        assert!(
            start.elapsed() < cfg.timeout,
            "ended by the drain bound, not the timeout"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn qemu_exiting_zero_before_init_is_a_failure() {
        let (cfg, dir) = fake("exit0", "echo 'qemu: ignoring everything' >&2\nexit 0");
        let out = run(&cfg, &no_devices()).unwrap();
        match &out.exit {
            GuestExit::QemuFailed { code, stderr } => {
                assert_eq!(*code, Some(0));
                assert_eq!(
                    stderr,
                    "QEMU exited with status 0 before the guest's /init started; stderr: \
                     qemu: ignoring everything"
                );
            }
            other => panic!("expected qemu-failed, got {other:?}"),
        }
        // The same clean exit after /init started is a power-off.
        let (cfg, dir2) = fake("exit0-init", "echo 'SLUICE: init started'\nexit 0");
        assert_eq!(
            run(&cfg, &no_devices()).unwrap().exit,
            GuestExit::PoweredOff
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&dir2).unwrap();
    }
}
