//! Event records (32 bytes) and the circular-queue pointer arithmetic shared with the command
//! queue.

use std::fmt;

/// Event type codes (EVT_ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventType {
    /// Unsupported upstream transaction.
    FUut = 0x01,
    /// StreamID out of range of the stream table.
    CBadStreamid = 0x02,
    /// External abort fetching an STE.
    FSteFetch = 0x03,
    /// Invalid or illegal STE.
    CBadSte = 0x04,
    /// Bad ATS translation request.
    FBadAtsTreq = 0x05,
    /// Non-substream transaction to a stream whose STE.S1DSS says terminate.
    FStreamDisabled = 0x06,
    /// Translation forbidden (ATS).
    FTranslForbidden = 0x07,
    /// SubstreamID out of range or its L1 CD invalid.
    CBadSubstreamid = 0x08,
    /// External abort fetching a CD.
    FCdFetch = 0x09,
    /// Invalid or illegal CD.
    CBadCd = 0x0a,
    /// External abort during a table walk.
    FWalkEabt = 0x0b,
    /// Translation fault.
    FTranslation = 0x10,
    /// Address size fault.
    FAddrSize = 0x11,
    /// Access flag fault.
    FAccess = 0x12,
    /// Permission fault.
    FPermission = 0x13,
    /// TLB conflict.
    FTlbConflict = 0x20,
    /// Configuration cache conflict.
    FCfgConflict = 0x21,
    /// Page request (PRI).
    EPageRequest = 0x24,
}

impl EventType {
    /// The EVT_ID code.
    pub fn code(self) -> u8 {
        self as u8
    }
    /// The Linux/QEMU spelling, e.g. `F_TRANSLATION`.
    pub fn name(self) -> &'static str {
        match self {
            EventType::FUut => "F_UUT",
            EventType::CBadStreamid => "C_BAD_STREAMID",
            EventType::FSteFetch => "F_STE_FETCH",
            EventType::CBadSte => "C_BAD_STE",
            EventType::FBadAtsTreq => "F_BAD_ATS_TREQ",
            EventType::FStreamDisabled => "F_STREAM_DISABLED",
            EventType::FTranslForbidden => "F_TRANSL_FORBIDDEN",
            EventType::CBadSubstreamid => "C_BAD_SUBSTREAMID",
            EventType::FCdFetch => "F_CD_FETCH",
            EventType::CBadCd => "C_BAD_CD",
            EventType::FWalkEabt => "F_WALK_EABT",
            EventType::FTranslation => "F_TRANSLATION",
            EventType::FAddrSize => "F_ADDR_SIZE",
            EventType::FAccess => "F_ACCESS",
            EventType::FPermission => "F_PERMISSION",
            EventType::FTlbConflict => "F_TLB_CONFLICT",
            EventType::FCfgConflict => "F_CFG_CONFLICT",
            EventType::EPageRequest => "E_PAGE_REQUEST",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which part of a translation a stage-2 fault hit (event CLASS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultClass {
    /// Fetching a CD through stage 2.
    Cd = 0,
    /// Fetching a stage-1 table descriptor through stage 2.
    Tt = 1,
    /// Translating the input address.
    #[default]
    In = 2,
}

/// One event record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Type.
    pub kind: EventType,
    /// StreamID.
    pub sid: u32,
    /// SubstreamID, if the transaction carried one.
    pub ssid: Option<u32>,
    /// Input address (translation faults) or zero.
    pub input_addr: u64,
    /// Read (true) or write.
    pub rnw: bool,
    /// Privileged (false) or unprivileged (true).
    pub pnu: bool,
    /// Instruction fetch.
    pub ind: bool,
    /// The fault was raised by stage 2.
    pub s2: bool,
    /// CLASS for stage-2 faults.
    pub class: FaultClass,
    /// Fault came from a table-walk read (TT_READ).
    pub tt_read: bool,
    /// Dword 3: the IPA of a stage-2 fault, or the fetch address of F_*_FETCH / F_WALK_EABT.
    pub addr2: u64,
}

impl Event {
    /// A bare event of `kind` for `sid`/`ssid`.
    pub fn new(kind: EventType, sid: u32, ssid: Option<u32>) -> Self {
        Event {
            kind,
            sid,
            ssid,
            input_addr: 0,
            rnw: true,
            pnu: false,
            ind: false,
            s2: false,
            class: FaultClass::In,
            tt_read: false,
            addr2: 0,
        }
    }

    /// Encodes into the four little-endian dwords of the record.
    pub fn encode(&self) -> [u64; 4] {
        let mut d0 = u64::from(self.kind.code()) | (u64::from(self.sid) << 32);
        if let Some(ssid) = self.ssid {
            d0 |= (1 << 11) | (u64::from(ssid & 0xf_ffff) << 12);
        }
        let mut d1 = 0u64;
        d1 |= u64::from(self.pnu) << 33;
        d1 |= u64::from(self.ind) << 34;
        d1 |= u64::from(self.rnw) << 35;
        d1 |= u64::from(self.s2) << 39;
        d1 |= (self.class as u64) << 40;
        d1 |= u64::from(self.tt_read) << 44;
        [d0, d1, self.input_addr, self.addr2]
    }

    /// Decodes a record (for tests and tools). Unknown types are `None`.
    pub fn decode(d: [u64; 4]) -> Option<Self> {
        let kind = match d[0] & 0xff {
            0x01 => EventType::FUut,
            0x02 => EventType::CBadStreamid,
            0x03 => EventType::FSteFetch,
            0x04 => EventType::CBadSte,
            0x05 => EventType::FBadAtsTreq,
            0x06 => EventType::FStreamDisabled,
            0x07 => EventType::FTranslForbidden,
            0x08 => EventType::CBadSubstreamid,
            0x09 => EventType::FCdFetch,
            0x0a => EventType::CBadCd,
            0x0b => EventType::FWalkEabt,
            0x10 => EventType::FTranslation,
            0x11 => EventType::FAddrSize,
            0x12 => EventType::FAccess,
            0x13 => EventType::FPermission,
            0x20 => EventType::FTlbConflict,
            0x21 => EventType::FCfgConflict,
            0x24 => EventType::EPageRequest,
            _ => return None,
        };
        let class = match (d[1] >> 40) & 3 {
            0 => FaultClass::Cd,
            1 => FaultClass::Tt,
            _ => FaultClass::In,
        };
        Some(Event {
            kind,
            sid: (d[0] >> 32) as u32,
            ssid: (d[0] & (1 << 11) != 0).then_some(((d[0] >> 12) & 0xf_ffff) as u32),
            input_addr: d[2],
            rnw: d[1] & (1 << 35) != 0,
            pnu: d[1] & (1 << 33) != 0,
            ind: d[1] & (1 << 34) != 0,
            s2: d[1] & (1 << 39) != 0,
            class,
            tt_read: d[1] & (1 << 44) != 0,
            addr2: d[3],
        })
    }
}

/// What happened to an event record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the event queue.
    Written,
    /// Not recorded because the configuration says so (CD.R / STE.S2R clear).
    Suppressed,
    /// The event queue is disabled (CR0.EVTQEN=0): dropped.
    QueueDisabled,
    /// The event queue was full: dropped, overflow flagged.
    Overflow,
    /// Writing the record to memory failed: GERROR.EVTQ_ABT_ERR.
    WriteAbort,
}

/// Pointer arithmetic of an SMMU circular queue with `2^log2` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePtrs {
    /// log2 of the number of entries.
    pub log2: u32,
}

impl QueuePtrs {
    /// Mask of index + wrap bit.
    pub fn mask(self) -> u32 {
        ((1u64 << (self.log2 + 1)) - 1) as u32
    }
    /// Index part of a pointer.
    pub fn index(self, p: u32) -> u32 {
        p & (((1u64 << self.log2) - 1) as u32)
    }
    /// Wrap bit of a pointer.
    pub fn wrap(self, p: u32) -> bool {
        p & (1 << self.log2) != 0
    }
    /// The queue is empty.
    pub fn empty(self, prod: u32, cons: u32) -> bool {
        prod & self.mask() == cons & self.mask()
    }
    /// The queue is full.
    pub fn full(self, prod: u32, cons: u32) -> bool {
        self.index(prod) == self.index(cons) && self.wrap(prod) != self.wrap(cons)
    }
    /// The pointer after `p` (index + wrap only).
    pub fn next(self, p: u32) -> u32 {
        (p & self.mask()).wrapping_add(1) & self.mask()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trips() {
        let mut e = Event::new(EventType::FPermission, 0x1234, Some(7));
        e.input_addr = 0xdead_b000;
        e.rnw = false;
        e.s2 = true;
        e.class = FaultClass::Tt;
        e.addr2 = 0x8000;
        let d = e.encode();
        assert_eq!(d[0] & 0xff, 0x13);
        assert_eq!(d[0] >> 32, 0x1234);
        assert_eq!(Event::decode(d), Some(e));
    }

    #[test]
    fn queue_wrap_rules() {
        let q = QueuePtrs { log2: 2 };
        assert!(q.empty(0, 0));
        assert!(q.full(4, 0));
        assert!(!q.full(3, 0));
        assert_eq!(q.next(7), 0);
        assert_eq!(q.next(3), 4);
        assert!(q.empty(0x80 | 5, 5), "bits above the wrap bit are ignored");
    }
}
