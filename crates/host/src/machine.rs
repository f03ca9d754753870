//! The platform a run emulates, separate from the CPU backend that runs it.

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
