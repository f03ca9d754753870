//! Condition codes, status codes, PCI error-event codes and the model's DMA refusal reasons.
//!
//! Values follow the s390 definitions as Linux (`arch/s390/include/asm/pci_insn.h`) and QEMU
//! (`hw/s390x/s390-pci-inst.h`, `s390-pci-bus.h`) spell them.

use thiserror::Error;

/// Condition code set by a zPCI instruction (PSW bits 18-19).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cc {
    /// 0: completed.
    Ok = 0,
    /// 1: not completed; a status code is stored in bits 32-39 of R1.
    Error = 1,
    /// 2: busy; the program retries the instruction with the same operands. The model answers
    /// it only from RPCIT, when a refresh needs more than one instruction's worth of work.
    Busy = 2,
    /// 3: the function handle is not valid for this instruction.
    InvalidHandle = 3,
}

/// What a zPCI instruction answered: a condition code and, with cc 1, a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InsnStatus {
    /// Condition code.
    pub cc: Cc,
    /// Status code (meaningful with [`Cc::Error`]; 0 otherwise).
    pub status: u8,
}

impl InsnStatus {
    /// cc 0.
    pub const OK: InsnStatus = InsnStatus {
        cc: Cc::Ok,
        status: 0,
    };
    /// cc 2 (retry with the same operands).
    pub const BUSY: InsnStatus = InsnStatus {
        cc: Cc::Busy,
        status: 0,
    };
    /// cc 3.
    pub const INVALID_HANDLE: InsnStatus = InsnStatus {
        cc: Cc::InvalidHandle,
        status: 0,
    };

    /// cc 1 with `status`.
    pub const fn error(status: u8) -> Self {
        InsnStatus {
            cc: Cc::Error,
            status,
        }
    }

    /// True for cc 0.
    pub fn is_ok(self) -> bool {
        self.cc == Cc::Ok
    }
}

/// A program exception the instruction raises instead of setting a condition code.
///
/// A guest mistake the architecture answers with a program interrupt (operand, specification or
/// addressing exception). The model never panics on one; the caller injects the interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProgramException {
    /// Operand exception (PGM 0x15): bad FIB format, bad IOTA, bad window, unknown operation.
    #[error("operand exception")]
    Operand,
    /// Specification exception (PGM 0x06): misaligned FIB address, odd register pair.
    #[error("specification exception")]
    Specification,
    /// Addressing exception (PGM 0x05): an operand in guest memory could not be accessed.
    #[error("addressing exception at {addr:#x}")]
    Addressing {
        /// Guest address that could not be read.
        addr: u64,
    },
}

/// Status codes stored with cc 1 (load/store, MPCIFC and RPCIT families).
pub mod status {
    /// MPCIFC: resource not available (REG_INT could not map the indicators).
    pub const MOD_RES_NOT_AVAIL: u8 = 4;
    /// PCILG/PCISTG/RPCIT: function is in the error state.
    pub const PCI_FUNC_IN_ERR: u8 = 8;
    /// PCILG/PCISTG: loads and stores are blocked (error state).
    pub const PCI_BLOCKED: u8 = 12;
    /// RPCIT: insufficient host resources (the mapping budget ran out).
    pub const RPCIT_INSUFF_RES: u8 = 16;
    /// PCILG/PCISTG: invalid PCI address space (PCIAS).
    pub const PCI_INVAL_AS: u8 = 20;
    /// MPCIFC: operation not valid in the current sequence (already/not registered, wrong state).
    pub const MOD_SEQUENCE: u8 = 24;
    /// MPCIFC: invalid DMA address space number.
    pub const MOD_DMAAS_INVAL: u8 = 28;
    /// MPCIFC/RPCIT: error recovery is required first (function in the error state).
    pub const MOD_ERROR_RECOVER: u8 = 40;
}

/// PCI error-event codes (the PEC of a CHSC store-event-information CCDF), recorded by the model
/// in its error log whenever a function enters the error state.
pub mod pec {
    /// Invalid DMA address space (no IOTA registered).
    pub const INVALAS: u16 = 0x1;
    /// DMA or RPCIT address out of the registered `[pba, pal]` window.
    pub const OORANGE: u16 = 0x2;
    /// Translation protection: no valid translation, or a write to a protected page.
    pub const TPROTE: u16 = 0x4;
    /// Invalid translation-table entry (an all-zero entry, or an unreadable table).
    pub const INVALTE: u16 = 0x7;
    /// Invalid table length or offset in a region-third entry.
    pub const INVALTL: u16 = 0x8;
    /// Wrong table type, a null table origin, or a format the function does not support.
    pub const TT: u16 = 0x9;
    /// Function-measurement block address has a protection key (SET_MEASURE).
    pub const FMBPRO: u16 = 0x2c;
}

/// Reason codes in [`sluice_devapi::DmaOutcome::Faulted`] for refusals that are *not* PCI error
/// events (the function's state does not change). Faults that are error events carry the
/// [`pec`] code instead (all below `0x100`).
pub mod reason {
    /// The function was released: deconfigured (standby), reserved, or the DMA names a handle of
    /// an earlier configuration. The oracle classifies these as `after-release`.
    pub const AFTER_RELEASE: u32 = 0x1000;
    /// No function has this handle's index.
    pub const NO_SUCH_FUNCTION: u32 = 0x1001;
    /// The function is configured but not enabled (disabled), or was never configured.
    pub const NOT_ENABLED: u32 = 0x1002;
    /// The function is in the error state: DMA is ignored until RESET_ERROR.
    pub const IN_ERROR: u32 = 0x1003;
    /// The function is in the blocked state: DMA stays refused until RESET_ERROR.
    pub const BLOCKED: u32 = 0x1004;
    /// The function is enabled but no DMA address space (IOTA) is registered.
    pub const NO_IOAT: u32 = 0x1005;
    /// Zero-length DMA.
    pub const ZERO_LENGTH: u32 = 0x1006;
}
