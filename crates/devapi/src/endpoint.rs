//! DMA master identities.

use std::fmt;

/// A PCI bus/device/function triple packed as the 16-bit requester ID (`bus << 8 | dev << 3 | fn`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Bdf(pub u16);

impl Bdf {
    /// Builds a BDF from its parts; `dev` is truncated to 5 bits and `func` to 3 bits.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        Bdf(((bus as u16) << 8) | (((dev & 0x1f) as u16) << 3) | ((func & 0x7) as u16))
    }
    /// Bus number.
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Device number (0..32).
    pub const fn dev(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    /// Function number (0..8).
    pub const fn func(self) -> u8 {
        (self.0 & 0x7) as u8
    }
}

/// A string that is not a PCI function address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a PCI function (bb:dd.f or dddd:bb:dd.f, hex)")]
pub struct BdfParseError(pub String);

impl std::str::FromStr for Bdf {
    type Err = BdfParseError;

    /// `bb:dd.f` or `dddd:bb:dd.f` (hex; the domain is accepted and ignored, as everything here
    /// sits in domain 0), with device below 32 and function below 8.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || BdfParseError(s.to_string());
        let parts: Vec<&str> = s.trim().split(':').collect();
        let (bus, devfn) = match parts.as_slice() {
            [_, bus, devfn] | [bus, devfn] => (*bus, *devfn),
            _ => return Err(err()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(err)?;
        let hex = |v: &str, max: u8| {
            u8::from_str_radix(v, 16)
                .ok()
                .filter(|x| *x <= max)
                .ok_or_else(err)
        };
        Ok(Bdf::new(hex(bus, 0xff)?, hex(dev, 31)?, hex(func, 7)?))
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{}",
            self.bus(),
            self.dev(),
            self.func()
        )
    }
}

/// Who issued a DMA, in the terms of the IOMMU that translates it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Endpoint {
    /// A PCI function identified by its requester ID (virtio-iommu endpoint ID = BDF).
    Pci(Bdf),
    /// An Arm SMMUv3 stream, optionally with a substream (PASID).
    Stream {
        /// StreamID.
        sid: u32,
        /// SubstreamID, if the transaction carried one.
        ssid: Option<u32>,
    },
    /// An s390 zPCI function, identified by its function handle.
    Zpci {
        /// Function handle (FH).
        fh: u32,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pci(bdf) => write!(f, "pci:{bdf}"),
            Endpoint::Stream { sid, ssid: None } => write!(f, "sid:{sid:#x}"),
            Endpoint::Stream {
                sid,
                ssid: Some(ssid),
            } => write!(f, "sid:{sid:#x}/ssid:{ssid:#x}"),
            Endpoint::Zpci { fh } => write!(f, "fh:{fh:#010x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_parses_both_forms_and_refuses_the_rest() {
        assert_eq!("00:03.0".parse(), Ok(Bdf::new(0, 3, 0)));
        assert_eq!("0000:00:1f.7".parse(), Ok(Bdf::new(0, 0x1f, 7)));
        assert_eq!(" 0000:ff:00.1 ".parse(), Ok(Bdf::new(0xff, 0, 1)));
        for bad in [
            "",
            "03.0",
            "00:20.0",
            "00:03.8",
            "00:03",
            "x:00:03.0:1",
            "00:0g.0",
            "100:00.0",
        ] {
            assert_eq!(
                bad.parse::<Bdf>(),
                Err(BdfParseError(bad.to_string())),
                "{bad}"
            );
        }
        let b = Bdf::new(0, 5, 0);
        assert_eq!(b.to_string().parse(), Ok(b));
    }

    #[test]
    fn bdf_round_trips_and_prints_like_lspci() {
        let b = Bdf::new(0, 2, 0);
        assert_eq!(b.0, 0x10);
        assert_eq!((b.bus(), b.dev(), b.func()), (0, 2, 0));
        assert_eq!(b.to_string(), "0000:00:02.0");
        let b = Bdf::new(0xab, 31, 7);
        assert_eq!((b.bus(), b.dev(), b.func()), (0xab, 31, 7));
        assert_eq!(Endpoint::Pci(b).to_string(), "pci:0000:ab:1f.7");
    }
}
