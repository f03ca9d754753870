//! The common configuration structure (virtio 1.x §4.1.4.3) as a register file.

use crate::interrupt::NO_VECTOR;

/// Register offsets.
#[allow(dead_code)]
pub mod reg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    pub const END: u64 = 0x38;
}

/// Driver-visible state of one queue before activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegs {
    pub max: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub vector: u16,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs {
            max,
            size: max,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
            vector: NO_VECTOR,
        }
    }
}

/// Something a common-config write asks the transport to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommonWrite {
    /// Nothing beyond the register update.
    None,
    /// The driver wrote the status byte.
    Status(u8),
    /// Queue `q` got MSI-X vector `v`.
    QueueVector(u16, u16),
    /// The configuration MSI-X vector changed.
    ConfigVector(u16),
}

/// Register file. `msix` tells whether the function has MSI-X (vectors read back NO_VECTOR
/// otherwise, as the spec requires when the driver cannot use them).
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub config_vector: u16,
    pub queue_select: u16,
    pub queues: Vec<QueueRegs>,
    pub config_generation: u8,
    /// Set when FEATURES_OK is accepted, cleared by reset: DRIVER_FEATURE is then read-only, so
    /// what activates is what was checked (virtio 1.x 3.1.1).
    pub features_frozen: bool,
    msix: bool,
}

impl CommonConfig {
    pub fn new(queue_max_sizes: &[u16], msix: bool) -> Self {
        CommonConfig {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: queue_max_sizes.iter().map(|m| QueueRegs::new(*m)).collect(),
            config_generation: 0,
            features_frozen: false,
            msix,
        }
    }

    pub fn reset(&mut self) {
        let maxes: Vec<u16> = self.queues.iter().map(|q| q.max).collect();
        *self = CommonConfig::new(&maxes, self.msix);
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// Reads `size` bytes at `offset`; the status byte comes from the caller.
    pub fn read(&self, offset: u64, size: usize, device_features: u64, status: u8) -> u64 {
        // Multi-byte fields are read as a whole; a narrower or misaligned read gets the
        // containing field shifted, which is what a byte-addressed register file does.
        let (base, value, width) = match offset {
            0x00..=0x03 => (0x00, u64::from(self.device_feature_select), 4),
            0x04..=0x07 => {
                let word = match self.device_feature_select {
                    0 => device_features as u32,
                    1 => (device_features >> 32) as u32,
                    _ => 0,
                };
                (0x04, u64::from(word), 4)
            }
            0x08..=0x0b => (0x08, u64::from(self.driver_feature_select), 4),
            0x0c..=0x0f => {
                let word = match self.driver_feature_select {
                    0 => self.driver_features as u32,
                    1 => (self.driver_features >> 32) as u32,
                    _ => 0,
                };
                (0x0c, u64::from(word), 4)
            }
            0x10..=0x11 => (0x10, u64::from(self.config_vector), 2),
            0x12..=0x13 => (0x12, self.queues.len() as u64, 2),
            0x14 => (0x14, u64::from(status), 1),
            0x15 => (0x15, u64::from(self.config_generation), 1),
            0x16..=0x17 => (0x16, u64::from(self.queue_select), 2),
            0x18..=0x19 => (0x18, self.selected().map_or(0, |q| u64::from(q.size)), 2),
            0x1a..=0x1b => (
                0x1a,
                self.selected()
                    .map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
                2,
            ),
            0x1c..=0x1d => (0x1c, self.selected().map_or(0, |q| u64::from(q.enabled)), 2),
            0x1e..=0x1f => (0x1e, u64::from(self.queue_select), 2),
            0x20..=0x27 => (0x20, self.selected().map_or(0, |q| q.desc), 8),
            0x28..=0x2f => (0x28, self.selected().map_or(0, |q| q.driver), 8),
            0x30..=0x37 => (0x30, self.selected().map_or(0, |q| q.device), 8),
            _ => return 0,
        };
        let shift = 8 * (offset - base);
        let v = value.checked_shr(shift as u32).unwrap_or(0);
        let keep = (width as u64 - (offset - base)).min(size as u64);
        if keep >= 8 {
            v
        } else {
            v & ((1u64 << (8 * keep)) - 1)
        }
    }

    /// Writes `value` (`size` bytes) at `offset`. Queue registers are frozen once enabled.
    pub fn write(&mut self, offset: u64, size: usize, value: u64) -> CommonWrite {
        use reg::*;
        let lo32 = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
        let hi32 = |old: u64| (old & 0xffff_ffff) | (value << 32);
        let msix = self.msix;
        let queue_frozen = self.selected().is_none_or(|q| q.enabled);
        match (offset, size) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) if self.features_frozen => {
                log::warn!("virtio: DRIVER_FEATURE written after FEATURES_OK; ignored");
            }
            (DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.driver_features = lo32(self.driver_features),
                1 => self.driver_features = hi32(self.driver_features),
                _ => {}
            },
            (CONFIG_MSIX_VECTOR, 2) => {
                self.config_vector = if msix { value as u16 } else { NO_VECTOR };
                return CommonWrite::ConfigVector(self.config_vector);
            }
            (DEVICE_STATUS, 1) => return CommonWrite::Status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_SIZE, 2) if !queue_frozen => {
                if let Some(q) = self.selected_mut() {
                    q.size = value as u16;
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                let sel = self.queue_select;
                if let Some(q) = self.selected_mut() {
                    q.vector = if msix { value as u16 } else { NO_VECTOR };
                    return CommonWrite::QueueVector(sel, q.vector);
                }
            }
            // Only 1 may be written; 0 is reserved (queues are disabled by reset).
            (QUEUE_ENABLE, 2) if value == 1 => {
                if let Some(q) = self.selected_mut() {
                    q.enabled = true;
                }
            }
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 4 | 8) | (0x24 | 0x2c | 0x34, 4)
                if !queue_frozen =>
            {
                if let Some(q) = self.selected_mut() {
                    let field = match offset & !0x7 {
                        QUEUE_DESC => &mut q.desc,
                        QUEUE_DRIVER => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = match (size, offset & 0x4) {
                        (8, _) => value,
                        (_, 0) => lo32(*field),
                        _ => hi32(*field),
                    };
                }
            }
            _ => log::debug!("virtio-pci: ignored common-config write {offset:#x}/{size}"),
        }
        CommonWrite::None
    }
}

#[cfg(test)]
mod tests {
    use super::reg::*;
    use super::*;

    #[test]
    fn feature_windows_and_queue_setup() {
        let mut c = CommonConfig::new(&[256, 128], false);
        let feats = (1u64 << 32) | 0x244;
        assert_eq!(c.read(DEVICE_FEATURE, 4, feats, 0), 0x244);
        c.write(DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(c.read(DEVICE_FEATURE, 4, feats, 0), 1);
        c.write(DEVICE_FEATURE_SELECT, 4, 7);
        assert_eq!(c.read(DEVICE_FEATURE, 4, feats, 0), 0);
        c.write(DRIVER_FEATURE_SELECT, 4, 1);
        c.write(DRIVER_FEATURE, 4, 1);
        c.write(DRIVER_FEATURE_SELECT, 4, 0);
        c.write(DRIVER_FEATURE, 4, 0x4);
        assert_eq!(c.driver_features, (1 << 32) | 4);
        assert_eq!(c.read(NUM_QUEUES, 2, 0, 0), 2);
        c.write(QUEUE_SELECT, 2, 1);
        assert_eq!(c.read(QUEUE_SIZE, 2, 0, 0), 128);
        c.write(QUEUE_SIZE, 2, 64);
        c.write(QUEUE_DESC, 4, 0x1000);
        c.write(QUEUE_DESC + 4, 4, 0x2);
        c.write(QUEUE_DRIVER, 8, 0x3000);
        c.write(QUEUE_DEVICE, 4, 0x4000);
        assert_eq!(c.queues[1].desc, 0x2_0000_1000);
        assert_eq!(c.read(QUEUE_DESC, 8, 0, 0), 0x2_0000_1000);
        assert_eq!(c.read(QUEUE_DESC + 4, 4, 0, 0), 0x2);
        assert_eq!(c.read(QUEUE_NOTIFY_OFF, 2, 0, 0), 1);
        c.write(QUEUE_ENABLE, 2, 1);
        // Frozen after enable.
        c.write(QUEUE_SIZE, 2, 32);
        c.write(QUEUE_DESC, 8, 0x9000);
        assert_eq!(c.queues[1].size, 64);
        assert_eq!(c.queues[1].desc, 0x2_0000_1000);
        assert_eq!(c.read(QUEUE_ENABLE, 2, 0, 0), 1);
        // Without MSI-X, vectors read back as NO_VECTOR.
        c.write(QUEUE_MSIX_VECTOR, 2, 3);
        assert_eq!(c.read(QUEUE_MSIX_VECTOR, 2, 0, 0), u64::from(NO_VECTOR));
        // Selecting a queue that does not exist reads zero size.
        c.write(QUEUE_SELECT, 2, 9);
        assert_eq!(c.read(QUEUE_SIZE, 2, 0, 0), 0);
        c.reset();
        assert_eq!(c.queues[1], QueueRegs::new(128));
        assert_eq!(c.read(0x100, 4, 0, 0), 0);
    }

    #[test]
    fn status_write_is_reported() {
        let mut c = CommonConfig::new(&[8], true);
        assert_eq!(c.write(DEVICE_STATUS, 1, 1), CommonWrite::Status(1));
        assert_eq!(
            c.write(QUEUE_MSIX_VECTOR, 2, 2),
            CommonWrite::QueueVector(0, 2)
        );
        assert_eq!(c.read(DEVICE_STATUS, 1, 0, 0xf), 0xf);
    }
}
