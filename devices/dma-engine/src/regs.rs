//! The register file: offsets, the programmed operation, and byte-wise access.
//!
//! Accesses of any width and alignment are taken apart into bytes and applied in address order,
//! so a 64-bit write to SRC, two 32-bit halves, or a byte-wise `dd` from userspace all program the
//! same thing, and a straddling access can never reach outside the file.

/// MAGIC (RO).
pub const MAGIC: u64 = 0x00;
/// VERSION (RO).
pub const VERSION: u64 = 0x04;
/// SRC (RW, 64-bit).
pub const SRC: u64 = 0x08;
/// DST (RW, 64-bit).
pub const DST: u64 = 0x10;
/// LEN (RW).
pub const LEN: u64 = 0x18;
/// FLAGS (RW).
pub const FLAGS: u64 = 0x1c;
/// PATTERN (RW).
pub const PATTERN: u64 = 0x20;
/// DOORBELL (WO).
pub const DOORBELL: u64 = 0x24;
/// STATUS (RO).
pub const STATUS: u64 = 0x28;
/// DONE (RO).
pub const DONE: u64 = 0x2c;
/// FAULT (RO, 64-bit).
pub const FAULT: u64 = 0x30;
/// IRQ_STATUS (RW1C).
pub const IRQ_STATUS: u64 = 0x38;
/// ERRORS (RO).
pub const ERRORS: u64 = 0x3c;

/// Value of MAGIC: "SDMA" little-endian.
pub const MAGIC_VALUE: u32 = 0x414d_4453;
/// Value of VERSION.
pub const VERSION_VALUE: u32 = 1;

/// FLAGS bit 0: raise the interrupt when the operation completes.
pub const FLAG_IRQ: u32 = 1 << 0;
/// FLAGS bit 1: write PATTERN to DST instead of copying from SRC.
pub const FLAG_FILL: u32 = 1 << 1;
/// Every defined FLAGS bit.
pub const FLAGS_KNOWN: u32 = FLAG_IRQ | FLAG_FILL;

/// IRQ_STATUS bit 0: a completion is pending.
pub const IRQ_DONE: u32 = 1 << 0;

/// Outcome of an operation, as STATUS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Completed.
    Ok = 0,
    /// LEN is 0 or above [`crate::MAX_LEN`]; nothing was accessed.
    BadLength = 1,
    /// A read of the source was refused (by the IOMMU, or outside guest memory); FAULT says where.
    ReadFault = 2,
    /// A write of the destination was refused; FAULT says where.
    WriteFault = 3,
    /// Bus Master Enable is off in the command register; nothing was accessed.
    NoBusMaster = 4,
    /// FLAGS has bits this device does not define; nothing was accessed.
    BadFlags = 5,
    /// SRC + LEN or DST + LEN wraps the 64-bit space; nothing was accessed.
    RangeWraps = 6,
}

impl Status {
    /// The STATUS register value.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// The operation the guest programmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Program {
    /// Source IOVA.
    pub src: u64,
    /// Destination IOVA.
    pub dst: u64,
    /// Length in bytes.
    pub len: u32,
    /// FLAGS.
    pub flags: u32,
    /// PATTERN.
    pub pattern: u32,
}

impl Program {
    /// Checks the programmed values before any DMA: the first reason to refuse, if any.
    pub fn check(&self) -> Result<(), Status> {
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(Status::BadFlags);
        }
        if self.len == 0 || self.len > crate::MAX_LEN {
            return Err(Status::BadLength);
        }
        let len = u64::from(self.len);
        let wraps = |at: u64| at.checked_add(len).is_none();
        if wraps(self.dst) || (self.flags & FLAG_FILL == 0 && wraps(self.src)) {
            return Err(Status::RangeWraps);
        }
        Ok(())
    }

    /// Byte `at` of the RW registers, or `None` outside them.
    fn byte(&self, at: u64) -> Option<u8> {
        let (value, base) = match at {
            SRC..DST => (self.src, SRC),
            DST..LEN => (self.dst, DST),
            LEN..FLAGS => (u64::from(self.len), LEN),
            FLAGS..PATTERN => (u64::from(self.flags), FLAGS),
            PATTERN..DOORBELL => (u64::from(self.pattern), PATTERN),
            _ => return None,
        };
        Some((value >> (8 * (at - base))) as u8)
    }

    /// Stores byte `at` of the RW registers; false outside them.
    fn set_byte(&mut self, at: u64, b: u8) -> bool {
        fn put64(v: &mut u64, shift: u64, b: u8) {
            *v = (*v & !(0xff << shift)) | (u64::from(b) << shift);
        }
        fn put32(v: &mut u32, shift: u64, b: u8) {
            *v = (*v & !(0xff << shift)) | (u32::from(b) << shift);
        }
        match at {
            SRC..DST => put64(&mut self.src, 8 * (at - SRC), b),
            DST..LEN => put64(&mut self.dst, 8 * (at - DST), b),
            LEN..FLAGS => put32(&mut self.len, 8 * (at - LEN), b),
            FLAGS..PATTERN => put32(&mut self.flags, 8 * (at - FLAGS), b),
            PATTERN..DOORBELL => put32(&mut self.pattern, 8 * (at - PATTERN), b),
            _ => return false,
        }
        true
    }
}

/// The whole register state of one engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registers {
    /// The programmed operation.
    pub program: Program,
    /// STATUS.
    pub status: u32,
    /// DONE.
    pub done: u32,
    /// FAULT.
    pub fault: u64,
    /// IRQ_STATUS.
    pub irq_status: u32,
    /// ERRORS.
    pub errors: u32,
}

/// What a register write asked for beyond storing values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteEffect {
    /// The doorbell was written.
    pub doorbell: bool,
    /// IRQ_STATUS bits were cleared (write 1 to clear).
    pub irq_cleared: bool,
}

impl Registers {
    /// Byte `at` of the register file as the guest reads it.
    pub fn read_byte(&self, at: u64) -> u8 {
        if let Some(b) = self.program.byte(at) {
            return b;
        }
        let (value, base) = match at {
            MAGIC..VERSION => (u64::from(MAGIC_VALUE), MAGIC),
            VERSION..SRC => (u64::from(VERSION_VALUE), VERSION),
            STATUS..DONE => (u64::from(self.status), STATUS),
            DONE..FAULT => (u64::from(self.done), DONE),
            FAULT..IRQ_STATUS => (self.fault, FAULT),
            IRQ_STATUS..ERRORS => (u64::from(self.irq_status), IRQ_STATUS),
            ERRORS..0x40 => (u64::from(self.errors), ERRORS),
            _ => return 0,
        };
        (value >> (8 * (at - base))) as u8
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end of the address space read 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0, |at| self.read_byte(at));
        }
    }

    /// Applies a write of `data` at `offset`, byte by byte in address order.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> WriteEffect {
        let mut effect = WriteEffect::default();
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if self.program.set_byte(at, b) {
                continue;
            }
            match at {
                DOORBELL..STATUS => effect.doorbell = true,
                IRQ_STATUS..ERRORS => {
                    let mask = u32::from(b) << (8 * (at - IRQ_STATUS));
                    if self.irq_status & mask != 0 {
                        self.irq_status &= !mask;
                        effect.irq_cleared = true;
                    }
                }
                _ => {}
            }
        }
        effect
    }
}
