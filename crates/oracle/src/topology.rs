//! What firmware told the guest: which endpoints sit behind which IOMMU.

use std::fmt;

use sluice_devapi::{Bdf, Endpoint};

/// One IOMMU and the endpoints firmware tables (VIOT, IORT, CLP) declare behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IommuTopo {
    /// virtio-iommu on PCI (VIOT). Its driver takes over at the function's DRIVER_OK.
    Virtio {
        /// The virtio-iommu function's own address.
        bdf: Bdf,
        /// Endpoints it translates (virtio-iommu endpoint ID = BDF).
        endpoints: Vec<Bdf>,
    },
    /// An Arm SMMUv3 (IORT). Its driver takes over when SMMUEN becomes 1.
    Smmu {
        /// `StateEvent::source` of the model (`smmuv3`).
        source: String,
        /// StreamIDs behind it.
        sids: Vec<u32>,
    },
    /// s390 zPCI translation (CLP). A function is taken over while it is enabled.
    Zpci {
        /// Function handle indexes (`fh & 0xffff`) of the functions.
        indexes: Vec<u16>,
    },
}

/// The platform as firmware describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// IOMMUs, each with its endpoints.
    pub iommus: Vec<IommuTopo>,
}

impl Topology {
    /// One virtio-iommu at `bdf` in front of `endpoints` (what `sluice run --iommu virtio`
    /// builds).
    pub fn virtio(bdf: Bdf, endpoints: Vec<Bdf>) -> Self {
        Topology {
            iommus: vec![IommuTopo::Virtio { bdf, endpoints }],
        }
    }

    /// Every declared endpoint with the index of its IOMMU.
    pub(crate) fn declared(&self) -> Vec<(Key, usize)> {
        let mut out = Vec::new();
        for (i, t) in self.iommus.iter().enumerate() {
            match t {
                IommuTopo::Virtio { endpoints, .. } => {
                    out.extend(endpoints.iter().map(|b| (Key::Pci(b.0), i)));
                }
                IommuTopo::Smmu { sids, .. } => out.extend(sids.iter().map(|s| (Key::Sid(*s), i))),
                IommuTopo::Zpci { indexes } => {
                    out.extend(indexes.iter().map(|x| (Key::Zpci(*x), i)));
                }
            }
        }
        out
    }
}

/// The oracle's identity of an endpoint: SMMU substreams share their stream's shadow, zPCI
/// handles of every configuration of one function share the function's shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// PCI requester ID.
    Pci(u16),
    /// SMMU StreamID.
    Sid(u32),
    /// zPCI function handle index.
    Zpci(u16),
}

impl Key {
    /// The key of a reported endpoint.
    pub fn of(ep: Endpoint) -> Key {
        match ep {
            Endpoint::Pci(b) => Key::Pci(b.0),
            Endpoint::Stream { sid, .. } => Key::Sid(sid),
            Endpoint::Zpci { fh } => Key::Zpci((fh & 0xffff) as u16),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Pci(b) => write!(f, "pci:{}", Bdf(*b)),
            Key::Sid(s) => write!(f, "sid:{s:#x}"),
            Key::Zpci(x) => write!(f, "zpci:{x:#06x}"),
        }
    }
}

/// Parses an endpoint as markers write it: `0000:00:05.0`, `00:05.0`, `pci:0000:00:05.0`,
/// `sid:0x10`, `zpci:0x0001` or `fh:0x80020001`.
pub fn parse_endpoint(s: &str) -> Option<Key> {
    if let Some(v) = s.strip_prefix("sid:") {
        return parse_u64(v)
            .and_then(|v| u32::try_from(v).ok())
            .map(Key::Sid);
    }
    if let Some(v) = s.strip_prefix("zpci:") {
        return parse_u64(v)
            .and_then(|v| u16::try_from(v).ok())
            .map(Key::Zpci);
    }
    if let Some(v) = s.strip_prefix("fh:") {
        return parse_u64(v).map(|v| Key::Zpci((v & 0xffff) as u16));
    }
    let s = s.strip_prefix("pci:").unwrap_or(s);
    s.parse::<Bdf>().ok().map(|b| Key::Pci(b.0))
}

/// Parses `0x..` hex or decimal.
pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16).ok(),
        None => s.replace('_', "").parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_in_every_spelling() {
        let k = Key::Pci(Bdf::new(0, 5, 0).0);
        for s in ["0000:00:05.0", "00:05.0", "pci:0000:00:05.0"] {
            assert_eq!(parse_endpoint(s), Some(k), "{s}");
        }
        assert_eq!(parse_endpoint("sid:0x10"), Some(Key::Sid(16)));
        assert_eq!(parse_endpoint("fh:0x80020001"), Some(Key::Zpci(1)));
        assert_eq!(parse_endpoint("zpci:2"), Some(Key::Zpci(2)));
        for bad in ["", "00:40.0", "0000:00:05.9", "zz:00.0", "sid:x", "a:b:c:d"] {
            assert_eq!(parse_endpoint(bad), None, "{bad}");
        }
        assert_eq!(k.to_string(), "pci:0000:00:05.0");
        assert_eq!(
            Key::of(Endpoint::Stream {
                sid: 3,
                ssid: Some(1)
            }),
            Key::Sid(3)
        );
    }
}
