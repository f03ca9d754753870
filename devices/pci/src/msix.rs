//! MSI-X table and pending-bit array.

use sluice_devapi::InterruptSink;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;
/// Widest access a bus delivers (a QWORD); the table ignores anything wider.
const MAX_ACCESS: usize = 8;

/// One function's MSI-X state. The table lives in a BAR at `table_offset`, the PBA at
/// `pba_offset` (both in BAR `bar`).
#[derive(Debug, Clone)]
pub struct MsixTable {
    entries: Vec<[u32; 4]>,
    pending: Vec<bool>,
    control: u16,
    bar: u8,
    table_offset: u32,
    pba_offset: u32,
}

impl MsixTable {
    /// `vectors` entries (1..=2048), with every vector masked as the spec requires at reset.
    pub fn new(vectors: u16, bar: u8, table_offset: u32, pba_offset: u32) -> Self {
        let n = usize::from(vectors.clamp(1, 2048));
        MsixTable {
            entries: vec![[0, 0, 0, VECTOR_MASKED]; n],
            pending: vec![false; n],
            control: 0,
            bar,
            table_offset,
            pba_offset,
        }
    }

    /// The capability body (after ID/next) to pass to `ConfigSpace::add_capability`, and its
    /// writable mask (only Enable and Function Mask).
    pub fn capability(&self) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        let size_field = (self.entries.len() - 1) as u16;
        body[0..2].copy_from_slice(&size_field.to_le_bytes());
        body[2..6].copy_from_slice(&(self.table_offset | u32::from(self.bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(self.pba_offset | u32::from(self.bar)).to_le_bytes());
        let mut mask = [0u8; 10];
        mask[1] = 0xc0;
        (body, mask)
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never empty (at least one vector).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// BAR holding table and PBA.
    pub fn bar(&self) -> u8 {
        self.bar
    }

    /// MSI-X Enable.
    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    /// The guest wrote Message Control; delivers anything that became unmasked.
    pub fn set_control(&mut self, control: u16, sink: &dyn InterruptSink) {
        self.control = control & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
        self.flush_pending(sink);
    }

    /// True if `offset` (within the BAR) falls in the table or the PBA.
    pub fn claims(&self, offset: u64) -> bool {
        self.table_range().contains(&offset) || self.pba_range().contains(&offset)
    }

    fn table_range(&self) -> std::ops::Range<u64> {
        let start = u64::from(self.table_offset);
        start..start + self.entries.len() as u64 * ENTRY_SIZE
    }

    fn pba_range(&self) -> std::ops::Range<u64> {
        let start = u64::from(self.pba_offset);
        start..start + (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// Guest read from the table or PBA (offset within the BAR). Accesses wider than 8 bytes
    /// (the widest a bus carries) read as zero rather than reaching the table.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if data.len() > MAX_ACCESS {
            data.fill(0);
            return;
        }
        for (i, out) in data.iter_mut().enumerate() {
            // Each byte is stored where it goes: no shifting of an accumulated value, which
            // would run out of range for wide accesses.
            *out = match offset.checked_add(i as u64) {
                Some(at) => self.read_byte(at),
                None => 0,
            };
        }
    }

    fn read_byte(&self, at: u64) -> u8 {
        if self.table_range().contains(&at) {
            let rel = at - self.table_range().start;
            let entry = self.entries.get((rel / ENTRY_SIZE) as usize);
            let word = entry.and_then(|e| e.get(((rel % ENTRY_SIZE) / 4) as usize));
            word.map_or(0, |w| (w >> (8 * (rel % 4))) as u8)
        } else if self.pba_range().contains(&at) {
            let bit0 = (at - self.pba_range().start) * 8;
            (0..8).fold(0u8, |acc, b| {
                let set = self
                    .pending
                    .get((bit0 + b) as usize)
                    .copied()
                    .unwrap_or(false);
                acc | (u8::from(set) << b)
            })
        } else {
            0
        }
    }

    /// Guest write to the table (the PBA is read-only). Unmasking delivers a pending message.
    /// Accesses wider than 8 bytes are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8], sink: &dyn InterruptSink) {
        if data.len() > MAX_ACCESS {
            return;
        }
        for (i, v) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if !self.table_range().contains(&at) {
                continue;
            }
            let rel = at - self.table_range().start;
            let shift = 8 * (rel % 4);
            if let Some(word) = self
                .entries
                .get_mut((rel / ENTRY_SIZE) as usize)
                .and_then(|e| e.get_mut(((rel % ENTRY_SIZE) / 4) as usize))
            {
                *word = (*word & !(0xff << shift)) | (u32::from(*v) << shift);
            }
        }
        self.flush_pending(sink);
    }

    fn masked(&self, vector: usize) -> bool {
        self.control & CTRL_FUNCTION_MASK != 0
            || self
                .entries
                .get(vector)
                .is_none_or(|e| e[3] & VECTOR_MASKED != 0)
    }

    /// Signals `vector`. Returns false if MSI-X is disabled (the caller falls back to INTx) or
    /// the vector does not exist. A masked vector becomes pending.
    pub fn notify(&mut self, vector: u16, sink: &dyn InterruptSink) -> bool {
        let v = usize::from(vector);
        if !self.enabled() || v >= self.entries.len() {
            return false;
        }
        if self.masked(v) {
            if let Some(p) = self.pending.get_mut(v) {
                *p = true;
            }
        } else if let Some(e) = self.entries.get(v) {
            sink.msi(u64::from(e[1]) << 32 | u64::from(e[0]), e[2]);
        }
        true
    }

    fn flush_pending(&mut self, sink: &dyn InterruptSink) {
        if !self.enabled() {
            return;
        }
        for v in 0..self.entries.len() {
            if self.pending.get(v).copied().unwrap_or(false) && !self.masked(v) {
                if let Some(p) = self.pending.get_mut(v) {
                    *p = false;
                }
                if let Some(e) = self.entries.get(v) {
                    sink.msi(u64::from(e[1]) << 32 | u64::from(e[0]), e[2]);
                }
            }
        }
    }

    /// Back to reset state: disabled, all vectors masked, nothing pending.
    pub fn reset(&mut self) {
        self.control = 0;
        self.entries
            .iter_mut()
            .for_each(|e| *e = [0, 0, 0, VECTOR_MASKED]);
        self.pending.iter_mut().for_each(|p| *p = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_devapi::{RecordedInterrupt, RecordingInterrupts};

    fn program(
        t: &mut MsixTable,
        v: u64,
        addr: u32,
        data: u32,
        masked: bool,
        s: &RecordingInterrupts,
    ) {
        t.write(v * 16, &addr.to_le_bytes(), s);
        t.write(v * 16 + 4, &0u32.to_le_bytes(), s);
        t.write(v * 16 + 8, &data.to_le_bytes(), s);
        t.write(v * 16 + 12, &u32::from(masked).to_le_bytes(), s);
    }

    #[test]
    fn accesses_wider_than_a_qword_do_not_reach_the_table() {
        let s = RecordingInterrupts::default();
        let mut t = MsixTable::new(4, 1, 0, 0x800);
        program(&mut t, 0, 0xfee0_0000, 0x31, false, &s);
        // A 16-byte read of entry 0 would shift bytes 8..16 out of a u64.
        let mut wide = [0xaau8; 16];
        t.read(0, &mut wide);
        assert_eq!(wide, [0; 16]);
        // A 16-byte write does not touch the entry.
        t.write(0, &[0x11; 16], &s);
        let mut e = [0u8; 8];
        t.read(0, &mut e);
        assert_eq!(u64::from_le_bytes(e), 0xfee0_0000);
        // An 8-byte read still works, byte for byte, and so does one at the top of u64.
        t.read(8, &mut e);
        assert_eq!(e[..4], 0x31u32.to_le_bytes());
        let mut top = [0xaau8; 4];
        t.read(u64::MAX - 1, &mut top);
        assert_eq!(top, [0; 4]);
        t.write(u64::MAX - 1, &[1; 4], &s);
    }

    #[test]
    fn disabled_table_declines_so_caller_uses_intx() {
        let s = RecordingInterrupts::default();
        let mut t = MsixTable::new(2, 1, 0, 0x800);
        assert!(!t.notify(0, &s));
        assert!(s.take().is_empty());
    }

    #[test]
    fn masked_vector_pends_and_fires_on_unmask() {
        let s = RecordingInterrupts::default();
        let mut t = MsixTable::new(4, 1, 0, 0x800);
        t.set_control(CTRL_ENABLE, &s);
        program(&mut t, 1, 0xfee0_0000, 0x31, true, &s);
        assert!(t.notify(1, &s));
        assert!(s.take().is_empty());
        let mut pba = [0u8; 8];
        t.read(0x800, &mut pba);
        assert_eq!(pba[0], 0b10);
        t.write(16 + 12, &0u32.to_le_bytes(), &s);
        assert_eq!(
            s.take(),
            vec![RecordedInterrupt::Msi {
                address: 0xfee0_0000,
                data: 0x31
            }]
        );
        t.read(0x800, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(t.notify(1, &s));
        assert_eq!(s.take().len(), 1);
        assert!(!t.notify(9, &s));
    }

    #[test]
    fn function_mask_holds_all_vectors() {
        let s = RecordingInterrupts::default();
        let mut t = MsixTable::new(1, 1, 0, 0x800);
        program(&mut t, 0, 0xfee0_1000, 7, false, &s);
        t.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK, &s);
        t.notify(0, &s);
        assert!(s.take().is_empty());
        t.set_control(CTRL_ENABLE, &s);
        assert_eq!(
            s.take(),
            vec![RecordedInterrupt::Msi {
                address: 0xfee0_1000,
                data: 7
            }]
        );
        let mut w = [0u8; 4];
        t.read(8, &mut w);
        assert_eq!(u32::from_le_bytes(w), 7);
        t.reset();
        assert!(!t.enabled());
    }

    #[test]
    fn capability_encodes_size_and_bir() {
        let t = MsixTable::new(3, 2, 0x2000, 0x3000);
        let (body, mask) = t.capability();
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2);
        assert_eq!(
            u32::from_le_bytes([body[2], body[3], body[4], body[5]]),
            0x2002
        );
        assert_eq!(
            u32::from_le_bytes([body[6], body[7], body[8], body[9]]),
            0x3002
        );
        assert_eq!(mask[1], 0xc0);
        assert!(t.claims(0x2000) && t.claims(0x3000) && !t.claims(0x2030));
    }
}
