//! The platform a run emulates, separate from the CPU backend that runs it.
//!
//! [`MachineSpec`] says what the guest's machine is (architecture, QEMU machine type, console,
//! firmware, how IOMMU topology reaches the guest, the platform's kernel command line, the
//! QEMU binary). Both backends take one: `x86_q35` runs under both, arm64 `virt` under the qemu
//! backend (with Sluice's SMMUv3 as a platform device); s390x `s390-ccw-virtio` is described
//! but refused until its device side exists.

use std::path::Path;

use thiserror::Error;

/// Guest CPU architecture. x86_64 is what both backends run today; the others are the targets of
/// the arm64 (SMMUv3) and s390x (zPCI) guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Arch {
    /// x86_64 (q35 under QEMU, Sluice's own VMM under KVM).
    #[default]
    X86_64,
    /// arm64 (`virt` under QEMU).
    Aarch64,
    /// s390x (`s390-ccw-virtio` under QEMU).
    S390x,
}

impl Arch {
    /// Every architecture, in the order lists show them.
    pub const ALL: [Arch; 3] = [Arch::X86_64, Arch::Aarch64, Arch::S390x];

    /// The name used on the command line, in variant names and in QEMU's binary name
    /// (`qemu-system-<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::S390x => "s390x",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `name()` did not name an architecture.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown architecture `{0}` (known: x86_64, aarch64 or arm64, s390x)")]
pub struct UnknownArch(pub String);

impl std::str::FromStr for Arch {
    type Err = UnknownArch;

    /// The [`Arch::name`]s, plus the kernel's and Debian's spellings (`arm64`, `s390`, `amd64`)
    /// that users type as often.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "x86-64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            "s390x" | "s390" => Ok(Arch::S390x),
            other => Err(UnknownArch(other.to_string())),
        }
    }
}

/// How a QEMU-run guest's vCPUs execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Multi-threaded TCG (software emulation).
    Tcg,
    /// Hardware KVM.
    Kvm,
}

impl Accel {
    /// KVM when `/dev/kvm` is real hardware virtualization, TCG otherwise (kvm_pvm, absent).
    pub fn detect() -> Self {
        let kvm = Path::new("/dev/kvm").exists();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        if kvm && !pvm { Accel::Kvm } else { Accel::Tcg }
    }
}

/// Which CPU backend runs the guest; the kernel command line differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// QEMU runs the vCPUs (`sluice-qemu`).
    Qemu,
    /// Sluice's own VMM runs them under KVM (`sluice-vmm`).
    Kvm,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Kvm => "kvm",
        })
    }
}

/// The firmware QEMU starts before the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (x86 q35): it runs QEMU's linuxboot option ROM, which enters the kernel.
    SeaBios,
    /// None: QEMU loads `-kernel` and enters it directly (arm64 `virt` without UEFI).
    Direct,
    /// QEMU's `s390-ccw.img` BIOS, which IPLs the kernel (s390x).
    S390Ccw,
}

/// How the guest learns which devices sit behind which IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareTables {
    /// ACPI tables Sluice writes (the VIOT), handed to QEMU as `-acpitable file=` and built
    /// into the kvm backend's own ACPI.
    AcpiFiles,
    /// QEMU generates them from the machine options (arm64 `virt`: device tree and IORT);
    /// Sluice passes none.
    QemuGenerated,
    /// The architecture has none: s390x finds PCI functions and their translation through
    /// CLP and zPCI instructions.
    None,
}

/// A platform: everything about the emulated machine that is not the CPU backend. Both
/// backends take one; [`MachineSpec::x86_q35`] is the only one that runs today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineSpec {
    /// Guest architecture.
    pub arch: Arch,
    /// QEMU machine type (`-M <type>`).
    pub machine_type: &'static str,
    /// QEMU machine options after the type (`-M <type>,<opt>,...`), before the launcher's own
    /// `memory-backend=`.
    pub machine_options: &'static [&'static str],
    /// The kernel's name for the console device (`console=<name>`).
    pub console: &'static str,
    /// The firmware QEMU runs.
    pub firmware: Firmware,
    /// QEMU's firmware search directories (`-L`), in order.
    pub firmware_dirs: &'static [&'static str],
    /// How IOMMU topology reaches the guest.
    pub tables: FirmwareTables,
    /// Kernel command line pieces after `console=` for every backend.
    pub cmdline: &'static [&'static str],
    /// Further pieces for the qemu backend only.
    pub qemu_cmdline: &'static [&'static str],
    /// QEMU binary name (`qemu-system-<arch>`), as Debian and build-qemu.sh name it.
    pub qemu_binary: &'static str,
    /// `-cpu` under TCG.
    pub cpu_tcg: &'static str,
    /// `-cpu` under KVM.
    pub cpu_kvm: &'static str,
    /// Where the machine places a platform IOMMU's register window (arm64 `virt`: the
    /// SMMUv3 at 0x0905_0000), if it has a place for one.
    pub platform_iommu_base: Option<u64>,
    /// Why runs of this platform are refused, while its device side is missing.
    pub not_yet_runnable: Option<&'static str>,
    /// PCI devices are zPCI functions (s390): each proxied device gets a `zpci` companion
    /// (FID = its RID), its BARs are never assigned by the guest, and the zPCI instructions of
    /// its function go to the run's zPCI model.
    pub zpci_functions: bool,
}

/// A platform or backend that cannot run a guest (yet).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MachineError {
    /// The platform's device side or guest images are missing.
    #[error("{arch} guests ({machine}) cannot run yet: {reason}")]
    NotYetRunnable {
        /// Architecture.
        arch: Arch,
        /// QEMU machine type.
        machine: &'static str,
        /// What is missing.
        reason: &'static str,
    },
    /// The backend does not emulate this architecture.
    #[error("the {backend} backend runs x86_64 guests only, not {arch}")]
    Backend {
        /// The backend asked for.
        backend: BackendKind,
        /// Architecture.
        arch: Arch,
    },
}

impl MachineSpec {
    /// x86_64 q35 with SeaBIOS, ACPI tables and a 16550 at `ttyS0`: the platform both backends
    /// run today (Sluice's own VMM builds the same q35-like ACPI platform itself).
    pub const fn x86_q35() -> Self {
        MachineSpec {
            arch: Arch::X86_64,
            machine_type: "q35",
            machine_options: &[],
            console: "ttyS0",
            firmware: Firmware::SeaBios,
            firmware_dirs: &["/usr/share/seabios", "/usr/share/qemu"],
            tables: FirmwareTables::AcpiFiles,
            // No PS/2 ports: the keyboard and mouse bind asynchronously (kseriod), and a bind
            // re-runs deferred probes. The mouse's lands around 1.2 s, as /init loads
            // virtio_iommu, and once in about a hundred boots it re-probed the disk inside
            // viommu_probe()'s registration window (the registration-window race, stock 6.12):
            // a scenario about another race then failed on this one (docs/findings.md,
            // finding 4). Serial-console guests need neither port, and the keyboard-controller
            // reset writes port 0x64 itself, not through the driver.
            cmdline: &["panic=-1", "nokaslr", "i8042.nokbd", "i8042.noaux"],
            // Under a busy TCG host the guest sometimes miscalibrates the TSC against the PIT
            // and its clock runs ~10x fast, which breaks timings and /init watchdogs.
            qemu_cmdline: &["tsc=unstable"],
            qemu_binary: "qemu-system-x86_64",
            cpu_tcg: "max",
            cpu_kvm: "host",
            platform_iommu_base: None,
            not_yet_runnable: None,
            zpci_functions: false,
        }
    }

    /// arm64 `virt`, GICv3, booted directly. The facts are the measured feasibility runs
    /// (`console=ttyAMA0`, `-cpu max`); `highmem=off` because proxied BARs must sit below
    /// 4 GiB there. QEMU generates the device tree and IORT.
    pub const fn arm64_virt() -> Self {
        MachineSpec {
            arch: Arch::Aarch64,
            machine_type: "virt",
            machine_options: &["gic-version=3", "highmem=off"],
            console: "ttyAMA0",
            firmware: Firmware::Direct,
            firmware_dirs: &["/usr/share/qemu"],
            tables: FirmwareTables::QemuGenerated,
            cmdline: &["panic=-1"],
            qemu_cmdline: &[],
            qemu_binary: "qemu-system-aarch64",
            cpu_tcg: "max",
            cpu_kvm: "host",
            // hw/arm/virt.c memmap: VIRT_SMMU.
            platform_iommu_base: Some(0x0905_0000),
            not_yet_runnable: None,
            zpci_functions: false,
        }
    }

    /// s390x `s390-ccw-virtio` with the SCLP console; PCI devices appear as zPCI functions.
    pub const fn s390x_ccw() -> Self {
        MachineSpec {
            arch: Arch::S390x,
            machine_type: "s390-ccw-virtio",
            machine_options: &[],
            console: "ttysclp0",
            firmware: Firmware::S390Ccw,
            firmware_dirs: &["/usr/share/qemu"],
            tables: FirmwareTables::None,
            // nokaslr: guest.sym points are System.map addresses (s390 randomizes its base).
            cmdline: &["panic=-1", "nokaslr"],
            qemu_cmdline: &[],
            qemu_binary: "qemu-system-s390x",
            cpu_tcg: "max",
            cpu_kvm: "host",
            platform_iommu_base: None,
            not_yet_runnable: None,
            zpci_functions: true,
        }
    }

    /// The zPCI UID of the `index`-th proxied device (its position in the device set) on a
    /// platform with [`MachineSpec::zpci_functions`]: position + 1 (UID 0 is not valid).
    pub fn zpci_uid(index: usize) -> u32 {
        u32::try_from(index)
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }

    /// The guest's PCI address of the `index`-th device, placed at `bdf`: `bdf` itself, or on
    /// zPCI, where each function is alone on a bus of its own, Linux's `<uid>:00:00.0` (with
    /// UID checking, which QEMU reports, the domain is the UID).
    pub fn guest_pci_address(&self, index: usize, bdf: sluice_devapi::Bdf) -> String {
        if self.zpci_functions {
            format!("{:04x}:00:00.0", Self::zpci_uid(index))
        } else {
            bdf.to_string()
        }
    }

    /// The platform Sluice uses for `arch`.
    pub const fn for_arch(arch: Arch) -> Self {
        match arch {
            Arch::X86_64 => Self::x86_q35(),
            Arch::Aarch64 => Self::arm64_virt(),
            Arch::S390x => Self::s390x_ccw(),
        }
    }

    /// `-cpu` for `accel`.
    pub fn cpu(&self, accel: Accel) -> &'static str {
        match accel {
            Accel::Tcg => self.cpu_tcg,
            Accel::Kvm => self.cpu_kvm,
        }
    }

    /// The platform's kernel command line for `backend`: `console=`, then the shared pieces,
    /// then the backend's own (x86 qemu: `console=ttyS0 panic=-1 nokaslr i8042.nokbd i8042.noaux tsc=unstable`).
    pub fn base_cmdline(&self, backend: BackendKind) -> String {
        let mut parts = vec![format!("console={}", self.console)];
        parts.extend(self.cmdline.iter().map(|s| s.to_string()));
        if backend == BackendKind::Qemu {
            parts.extend(self.qemu_cmdline.iter().map(|s| s.to_string()));
        }
        parts.join(" ")
    }

    /// Whether guests of this platform can run at all today.
    pub fn check_runnable(&self) -> Result<(), MachineError> {
        match self.not_yet_runnable {
            None => Ok(()),
            Some(reason) => Err(MachineError::NotYetRunnable {
                arch: self.arch,
                machine: self.machine_type,
                reason,
            }),
        }
    }

    /// Whether `backend` can run this platform: the qemu backend any runnable one, the kvm
    /// backend (an x86 VMM) x86_64 only.
    pub fn check_backend(&self, backend: BackendKind) -> Result<(), MachineError> {
        if backend == BackendKind::Kvm && self.arch != Arch::X86_64 {
            return Err(MachineError::Backend {
                backend,
                arch: self.arch,
            });
        }
        self.check_runnable()
    }
}

impl Default for MachineSpec {
    fn default() -> Self {
        Self::x86_q35()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_cmdlines_are_todays() {
        let m = MachineSpec::x86_q35();
        assert_eq!(
            m.base_cmdline(BackendKind::Qemu),
            "console=ttyS0 panic=-1 nokaslr i8042.nokbd i8042.noaux tsc=unstable"
        );
        assert_eq!(
            m.base_cmdline(BackendKind::Kvm),
            "console=ttyS0 panic=-1 nokaslr i8042.nokbd i8042.noaux"
        );
        assert_eq!(m.cpu(Accel::Tcg), "max");
        assert_eq!(m.cpu(Accel::Kvm), "host");
        assert_eq!(m.qemu_binary, "qemu-system-x86_64");
        assert_eq!(MachineSpec::default(), m);
    }

    #[test]
    fn every_arch_has_its_platform_and_names_parse_back() {
        for arch in Arch::ALL {
            let m = MachineSpec::for_arch(arch);
            assert_eq!(m.arch, arch);
            assert_eq!(m.qemu_binary, format!("qemu-system-{arch}"));
            assert_eq!(arch.name().parse::<Arch>(), Ok(arch));
        }
        assert_eq!("arm64".parse::<Arch>(), Ok(Arch::Aarch64));
        assert_eq!(
            "riscv64".parse::<Arch>().unwrap_err().to_string(),
            "unknown architecture `riscv64` (known: x86_64, aarch64 or arm64, s390x)"
        );
        assert_eq!(
            MachineSpec::arm64_virt().base_cmdline(BackendKind::Qemu),
            "console=ttyAMA0 panic=-1"
        );
        assert_eq!(
            MachineSpec::s390x_ccw().base_cmdline(BackendKind::Qemu),
            "console=ttysclp0 panic=-1 nokaslr"
        );
    }

    #[test]
    fn zpci_functions_are_found_by_uid_domain() {
        let b = sluice_devapi::Bdf::new(0, 3, 0);
        assert_eq!(
            MachineSpec::x86_q35().guest_pci_address(0, b),
            "0000:00:03.0"
        );
        assert_eq!(
            MachineSpec::s390x_ccw().guest_pci_address(0, b),
            "0001:00:00.0"
        );
        assert_eq!(
            MachineSpec::s390x_ccw().guest_pci_address(10, b),
            "000b:00:00.0"
        );
        assert_eq!(MachineSpec::zpci_uid(0), 1);
    }

    #[test]
    fn x86_runs_everywhere_arm64_and_s390x_under_qemu() {
        let x86 = MachineSpec::x86_q35();
        x86.check_backend(BackendKind::Qemu).unwrap();
        x86.check_backend(BackendKind::Kvm).unwrap();
        let arm = MachineSpec::arm64_virt();
        arm.check_backend(BackendKind::Qemu).unwrap();
        assert_eq!(
            arm.check_backend(BackendKind::Kvm).unwrap_err().to_string(),
            "the kvm backend runs x86_64 guests only, not aarch64"
        );
        MachineSpec::s390x_ccw()
            .check_backend(BackendKind::Qemu)
            .unwrap();
        // A platform whose device side is missing is refused with its reason.
        let missing = MachineSpec {
            not_yet_runnable: Some("no device side"),
            ..MachineSpec::s390x_ccw()
        };
        assert_eq!(
            missing
                .check_backend(BackendKind::Qemu)
                .unwrap_err()
                .to_string(),
            "s390x guests (s390-ccw-virtio) cannot run yet: no device side"
        );
        assert_eq!(
            MachineSpec::s390x_ccw()
                .check_backend(BackendKind::Kvm)
                .unwrap_err()
                .to_string(),
            "the kvm backend runs x86_64 guests only, not s390x"
        );
    }
}
