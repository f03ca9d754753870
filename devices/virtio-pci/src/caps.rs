//! The virtio vendor capabilities (virtio 1.x §4.1.4) and where each structure sits in the BAR.

use sluice_pci::{ConfigError, ConfigSpace};

/// PCI capability ID for vendor-specific capabilities.
const CAP_ID_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// Offsets of the structures inside the transport's BAR.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Size reserved for the common configuration.
pub const COMMON_SIZE: u64 = 0x1000;
/// ISR status.
pub const ISR_OFFSET: u64 = 0x1000;
/// ISR window size.
pub const ISR_SIZE: u64 = 0x1000;
/// Device-specific configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Device-specific configuration window size.
pub const DEVICE_SIZE: u64 = 0x1000;
/// Notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Notification area size.
pub const NOTIFY_SIZE: u64 = 0x1000;
/// Bytes between two queues' doorbells.
pub const NOTIFY_MULTIPLIER: u32 = 4;

fn cap_body(cfg_type: u8, bar: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = (16 + extra.len()) as u8;
    let mut body = vec![cap_len, cfg_type, bar, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// Adds the five virtio capabilities for structures in BAR `bar`. Returns the offset of the
/// PCI configuration access capability (its bar/offset/length/data fields are writable).
pub fn add_virtio_caps(cfg: &mut ConfigSpace, bar: u8) -> Result<u8, ConfigError> {
    cfg.add_capability(
        CAP_ID_VENDOR,
        &cap_body(CFG_COMMON, bar, COMMON_OFFSET, COMMON_SIZE, &[]),
        &[],
    )?;
    cfg.add_capability(
        CAP_ID_VENDOR,
        &cap_body(
            CFG_NOTIFY,
            bar,
            NOTIFY_OFFSET,
            NOTIFY_SIZE,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        ),
        &[],
    )?;
    cfg.add_capability(
        CAP_ID_VENDOR,
        &cap_body(CFG_ISR, bar, ISR_OFFSET, ISR_SIZE, &[]),
        &[],
    )?;
    cfg.add_capability(
        CAP_ID_VENDOR,
        &cap_body(CFG_DEVICE, bar, DEVICE_OFFSET, DEVICE_SIZE, &[]),
        &[],
    )?;
    // VIRTIO_PCI_CAP_PCI_CFG: a window into the BAR through config space. bar (1 byte),
    // offset and length (4 bytes each) and the 4-byte data field are driver-writable.
    let mut writable = vec![0u8; 2];
    writable.extend_from_slice(&[0xff, 0, 0, 0]);
    writable.extend_from_slice(&[0xff; 8]);
    writable.extend_from_slice(&[0xff; 4]);
    cfg.add_capability(
        CAP_ID_VENDOR,
        &cap_body(CFG_PCI, 0, 0, 0, &[0; 4]),
        &writable,
    )
}

/// Field offsets inside the PCI configuration access capability.
pub mod pci_cfg {
    /// `cap.bar`.
    pub const BAR: u8 = 4;
    /// `cap.offset`.
    pub const OFFSET: u8 = 8;
    /// `cap.length`.
    pub const LENGTH: u8 = 12;
    /// `pci_cfg_data`.
    pub const DATA: u8 = 16;
}
