//! Reading the guest's markers and checking the disks on the host after power-off.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where /init writes its pattern, and how much.
pub const PATTERN_OFFSET: u64 = 1 << 20;
/// Pattern length.
pub const PATTERN_LEN: usize = 4 << 20;

/// The bytes /init writes to disk `vd` with `seed`: one line repeated, cut at 4 MiB.
pub fn pattern(seed: u64, vd: &str) -> Vec<u8> {
    let line = format!("sluice pattern seed={seed} disk={vd}\n");
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(PATTERN_LEN)
        .collect()
}

/// Result of checking one disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCheck {
    /// The pattern is there.
    Match,
    /// Different bytes; first differing offset.
    Mismatch(u64),
    /// The image could not be read.
    Unreadable(String),
}

/// Compares the image against the pattern the guest should have written.
pub fn check_disk(path: &Path, seed: u64, vd: &str) -> HostCheck {
    let expected = pattern(seed, vd);
    let mut got = vec![0u8; PATTERN_LEN];
    match File::open(path).and_then(|f| f.read_exact_at(&mut got, PATTERN_OFFSET)) {
        Err(e) => HostCheck::Unreadable(e.to_string()),
        Ok(()) => match expected.iter().zip(&got).position(|(a, b)| a != b) {
            None => HostCheck::Match,
            Some(i) => HostCheck::Mismatch(PATTERN_OFFSET + i as u64),
        },
    }
}

/// What the guest reported about itself.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GuestReport {
    pub nproc: Option<u32>,
    pub kernel: Option<String>,
    /// (vdX, BDF, iommu group).
    pub disks: Vec<(String, String, String)>,
    /// (vdX, "write=ok read=ok verify=ok").
    pub disk_results: Vec<(String, String)>,
    /// IOMMU groups the guest listed: (group, BDF, default domain type such as DMA-FQ).
    pub iommu_groups: Vec<(String, String, String)>,
    /// /proc/interrupts lines that name a virtio device.
    pub virtio_interrupts: Vec<String>,
    /// `PASS` or `FAIL ...`.
    pub result: Option<String>,
    pub done: bool,
}

fn find_bdf(s: &str) -> Option<String> {
    s.split(['/', ' ', '='])
        .find(|w| {
            let b = w.as_bytes();
            b.len() == 12
                && b.get(4) == Some(&b':')
                && b.get(7) == Some(&b':')
                && b.get(10) == Some(&b'.')
        })
        .map(str::to_string)
}

/// Parses the console.
pub fn parse_console(lines: &[String]) -> GuestReport {
    let mut r = GuestReport::default();
    let mut in_interrupts = false;
    let mut in_groups = false;
    for line in lines {
        let Some(rest) = line.split("SLUICE: ").nth(1) else {
            if in_interrupts && line.contains("virtio") {
                r.virtio_interrupts.push(line.trim().to_string());
            }
            if in_groups && let Some(g) = line.trim().strip_prefix("group ") {
                // "N: BDF type=T"
                let (num, tail) = g.split_once(':').unwrap_or((g, ""));
                let mut words = tail.split_whitespace();
                let bdf = words.next().unwrap_or("").to_string();
                let kind = words
                    .find_map(|w| w.strip_prefix("type="))
                    .unwrap_or("")
                    .to_string();
                r.iommu_groups.push((num.to_string(), bdf, kind));
            }
            continue;
        };
        in_interrupts = rest.starts_with("interrupts");
        in_groups = rest.starts_with("iommu_groups");
        if let Some(n) = rest.strip_prefix("nproc=") {
            r.nproc = n.trim().parse().ok();
        } else if let Some(k) = rest.strip_prefix("kernel=") {
            r.kernel = Some(k.trim().to_string());
        } else if let Some(d) = rest.strip_prefix("disk ") {
            let mut words = d.split_whitespace();
            let vd = words.next().unwrap_or("").to_string();
            if d.contains(" pci=") {
                let group = d
                    .split("iommu_group=")
                    .nth(1)
                    .unwrap_or("")
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                r.disks.push((vd, find_bdf(d).unwrap_or_default(), group));
            } else if d.contains("write=") {
                r.disk_results
                    .push((vd, words.collect::<Vec<_>>().join(" ")));
            }
        } else if let Some(res) = rest.strip_prefix("RESULT ") {
            r.result = Some(res.trim().to_string());
        } else if rest.starts_with("done") {
            r.done = true;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let lines: Vec<String> = [
            "SLUICE: init started uptime=1.02",
            "SLUICE: nproc=2",
            "SLUICE: kernel=6.12.117-sluice",
            "SLUICE: disk vda pci=0000:00:03.0 iommu_group=none",
            "SLUICE: disk vda write=ok read=ok verify=ok",
            "SLUICE: interrupts",
            "           CPU0       CPU1",
            " 22:        10         31   IO-APIC  22-fasteoi   virtio0",
            "  4:        100          0   IO-APIC   4-edge      ttyS0",
            "SLUICE: iommu_groups",
            "group 0: 0000:00:03.0 type=DMA-FQ",
            "SLUICE: RESULT PASS",
            "[    2.1] SLUICE: done uptime=2.10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = parse_console(&lines);
        assert_eq!(r.nproc, Some(2));
        assert_eq!(
            r.disks,
            vec![("vda".into(), "0000:00:03.0".into(), "none".into())]
        );
        assert_eq!(
            r.disk_results,
            vec![("vda".into(), "write=ok read=ok verify=ok".into())]
        );
        assert_eq!(r.virtio_interrupts.len(), 1);
        assert_eq!(
            r.iommu_groups,
            vec![("0".into(), "0000:00:03.0".into(), "DMA-FQ".into())]
        );
        assert_eq!(r.result.as_deref(), Some("PASS"));
        assert!(r.done);
        assert_eq!(
            find_bdf("/sys/devices/pci0000:00/0000:00:04.0"),
            Some("0000:00:04.0".into())
        );
    }

    #[test]
    fn pattern_and_host_check() {
        let p = pattern(7, "vda");
        assert_eq!(p.len(), PATTERN_LEN);
        assert!(p.starts_with(b"sluice pattern seed=7 disk=vda\nsluice"));
        let path = std::env::temp_dir().join(format!("sluice-verify-{}.img", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        assert_eq!(
            check_disk(&path, 7, "vda"),
            HostCheck::Mismatch(PATTERN_OFFSET)
        );
        f.write_all_at(&p, PATTERN_OFFSET).unwrap();
        assert_eq!(check_disk(&path, 7, "vda"), HostCheck::Match);
        assert_eq!(
            check_disk(&path, 8, "vda"),
            HostCheck::Mismatch(PATTERN_OFFSET + 20)
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            check_disk(&path, 7, "vda"),
            HostCheck::Unreadable(_)
        ));
    }
}
