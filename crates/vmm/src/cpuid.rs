//! CPUID for each vCPU: KVM's supported set, topology fixed up for `cpus` single-threaded
//! cores in one package, and named features hidden (`--cpuid-mask`).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};
use thiserror::Error;

/// A feature name in `--cpuid-mask` is unknown.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown CPUID feature {0:?} (known: {known})", known = known_features().join(", "))]
pub struct UnknownFeature(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// (name as in Linux's /proc/cpuinfo, leaf, subleaf, register, bit).
const FEATURES: &[(&str, u32, u32, Reg, u8)] = &[
    ("monitor", 1, 0, Reg::Ecx, 3),
    ("vmx", 1, 0, Reg::Ecx, 5),
    ("pdcm", 1, 0, Reg::Ecx, 15),
    ("pcid", 1, 0, Reg::Ecx, 17),
    ("x2apic", 1, 0, Reg::Ecx, 21),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("osxsave", 1, 0, Reg::Ecx, 27),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("hypervisor", 1, 0, Reg::Ecx, 31),
    ("mce", 1, 0, Reg::Edx, 7),
    ("mtrr", 1, 0, Reg::Edx, 12),
    ("pge", 1, 0, Reg::Edx, 13),
    ("fsgsbase", 7, 0, Reg::Ebx, 0),
    ("tsc_adjust", 7, 0, Reg::Ebx, 1),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("smep", 7, 0, Reg::Ebx, 7),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("invpcid", 7, 0, Reg::Ebx, 10),
    ("rtm", 7, 0, Reg::Ebx, 11),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("adx", 7, 0, Reg::Ebx, 19),
    ("smap", 7, 0, Reg::Ebx, 20),
    ("clflushopt", 7, 0, Reg::Ebx, 23),
    ("clwb", 7, 0, Reg::Ebx, 24),
    ("umip", 7, 0, Reg::Ecx, 2),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("waitpkg", 7, 0, Reg::Ecx, 5),
    ("la57", 7, 0, Reg::Ecx, 16),
    ("rdpid", 7, 0, Reg::Ecx, 22),
    ("md_clear", 7, 0, Reg::Edx, 10),
    ("arch_capabilities", 7, 0, Reg::Edx, 29),
    ("spec_ctrl", 7, 0, Reg::Edx, 26),
    ("xsaveopt", 0xd, 1, Reg::Eax, 0),
    ("xsavec", 0xd, 1, Reg::Eax, 1),
    ("xsaves", 0xd, 1, Reg::Eax, 3),
    ("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    ("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    ("invtsc", 0x8000_0007, 0, Reg::Edx, 8),
];

/// Names `--cpuid-mask` accepts.
pub fn known_features() -> Vec<&'static str> {
    FEATURES.iter().map(|f| f.0).collect()
}

/// Features to hide, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuidMask {
    bits: Vec<(u32, u32, Reg, u8)>,
}

impl CpuidMask {
    /// Parses names (case-insensitive; `-` and `_` are the same).
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, UnknownFeature> {
        let mut bits = Vec::new();
        for n in names {
            let norm = n.as_ref().trim().to_ascii_lowercase().replace('-', "_");
            if norm.is_empty() {
                continue;
            }
            let f = FEATURES
                .iter()
                .find(|f| f.0 == norm)
                .ok_or_else(|| UnknownFeature(n.as_ref().to_string()))?;
            bits.push((f.1, f.2, f.3, f.4));
        }
        Ok(CpuidMask { bits })
    }

    fn hides(&self, e: &mut kvm_cpuid_entry2) {
        for &(leaf, sub, reg, bit) in &self.bits {
            if e.function == leaf && (e.index == sub || !has_subleaves(leaf)) {
                let r = match reg {
                    Reg::Eax => &mut e.eax,
                    Reg::Ebx => &mut e.ebx,
                    Reg::Ecx => &mut e.ecx,
                    Reg::Edx => &mut e.edx,
                };
                *r &= !(1u32 << bit);
            }
        }
    }
}

fn has_subleaves(leaf: u32) -> bool {
    matches!(leaf, 4 | 7 | 0xb | 0xd | 0xf | 0x10 | 0x12 | 0x14 | 0x1f)
}

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Fixes `cpuid` (KVM's supported set) for vCPU `id` of `cpus`, then applies `mask`.
pub fn filter(cpuid: &mut CpuId, id: u8, cpus: u8, mask: &CpuidMask) {
    let cpus32 = u32::from(cpus.max(1));
    let core_bits = bits_for(cpus32);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                // APIC ID, logical processor count, CLFLUSH size 64 bytes.
                e.ebx = (u32::from(id) << 24) | (cpus32 << 16) | (8 << 8) | (e.ebx & 0xff);
                if cpus32 > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
                e.ecx |= 1 << 31; // hypervisor
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per cache.
                e.eax = (e.eax & 0x3ff) | ((cpus32 - 1) << 26);
            }
            6 => {
                e.ecx &= !(1 << 3); // no energy/performance bias
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // SMT level
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = cpus32;
                        e.ecx = (2 << 8) | 1; // core level
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            _ => {}
        }
        mask.hides(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32, ebx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ebx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0, (1 << 23) | (1 << 26) | (1 << 21), 0, 0),
            entry(4, 0, 0, 0, 0),
            entry(7, 0, 0, (1 << 20) | (1 << 7) | 1, 1 << 29),
            entry(0xb, 0, 0, 0, 0),
            entry(0xb, 1, 0, 0, 0),
        ])
        .unwrap()
    }

    #[test]
    fn topology_is_fixed_up_per_vcpu() {
        let mut c = sample();
        filter(&mut c, 2, 4, &CpuidMask::default());
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2, "APIC ID");
        assert_eq!((s[0].ebx >> 16) & 0xff, 4, "logical count");
        assert!(s[0].edx & (1 << 28) != 0 && s[0].ecx & (1 << 31) != 0);
        assert_eq!(s[1].eax >> 26, 3);
        assert_eq!((s[3].ebx, s[3].edx), (1, 2));
        assert_eq!((s[4].eax, s[4].ebx, s[4].ecx >> 8), (2, 4, 2));
    }

    #[test]
    fn mask_hides_named_features_only() {
        let mut c = sample();
        let m = CpuidMask::parse(&["popcnt", "XSAVE", "smap", "arch-capabilities"]).unwrap();
        filter(&mut c, 0, 1, &m);
        let s = c.as_slice();
        assert_eq!(s[0].ecx & (1 << 23), 0);
        assert_eq!(s[0].ecx & (1 << 26), 0);
        assert!(s[0].ecx & (1 << 21) != 0, "x2apic kept");
        assert_eq!(s[2].ebx & (1 << 20), 0);
        assert!(s[2].ebx & (1 << 7) != 0, "smep kept");
        assert_eq!(s[2].edx & (1 << 29), 0);
        assert_eq!(s[0].edx & (1 << 28), 0, "no HTT with one CPU");
    }

    #[test]
    fn unknown_names_are_refused() {
        let e = CpuidMask::parse(&["popcnt", "nonsense"]).unwrap_err();
        assert_eq!(e.0, "nonsense");
        assert!(e.to_string().contains("smap"));
        assert_eq!(CpuidMask::parse(&[""]).unwrap(), CpuidMask::default());
    }
}
