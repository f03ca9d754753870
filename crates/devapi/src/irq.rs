//! Interrupt delivery as a device model sees it.

use std::sync::Mutex;

/// Where a device's interrupts go. One trait for wired lines and messages, so a model does not
/// care whether a backend routes INTx through an eventfd or MSI through `KVM_SIGNAL_MSI`.
pub trait InterruptSink: Send + Sync {
    /// Drives wired interrupt line `line` (a PCI function's INTx is line 0; an SMMU numbers its
    /// event/GERROR/sync lines). Level semantics: the line stays asserted until set low.
    fn set_level(&self, line: u32, asserted: bool);
    /// Delivers a message-signalled interrupt: a 32-bit `data` write to `address`.
    fn msi(&self, address: u64, data: u32);
}

/// Drops every interrupt. For tools and fuzzers that do not care.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullInterrupts;

impl InterruptSink for NullInterrupts {
    fn set_level(&self, _line: u32, _asserted: bool) {}
    fn msi(&self, _address: u64, _data: u32) {}
}

/// One interrupt as seen by [`RecordingInterrupts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordedInterrupt {
    /// A wired line changed level.
    Level {
        /// Line number.
        line: u32,
        /// New level.
        asserted: bool,
    },
    /// A message was written.
    Msi {
        /// Target address.
        address: u64,
        /// Payload.
        data: u32,
    },
}

/// Records every interrupt in order; for unit tests of device models.
#[derive(Debug, Default)]
pub struct RecordingInterrupts {
    log: Mutex<Vec<RecordedInterrupt>>,
}

impl RecordingInterrupts {
    /// Takes and clears what was recorded so far.
    pub fn take(&self) -> Vec<RecordedInterrupt> {
        match self.log.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    fn push(&self, ev: RecordedInterrupt) {
        match self.log.lock() {
            Ok(mut g) => g.push(ev),
            Err(poisoned) => poisoned.into_inner().push(ev),
        }
    }
}

impl InterruptSink for RecordingInterrupts {
    fn set_level(&self, line: u32, asserted: bool) {
        self.push(RecordedInterrupt::Level { line, asserted });
    }
    fn msi(&self, address: u64, data: u32) {
        self.push(RecordedInterrupt::Msi { address, data });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_keeps_order_and_take_clears() {
        let r = RecordingInterrupts::default();
        r.set_level(0, true);
        r.msi(0xfee0_0000, 0x41);
        r.set_level(0, false);
        assert_eq!(
            r.take(),
            vec![
                RecordedInterrupt::Level {
                    line: 0,
                    asserted: true
                },
                RecordedInterrupt::Msi {
                    address: 0xfee0_0000,
                    data: 0x41
                },
                RecordedInterrupt::Level {
                    line: 0,
                    asserted: false
                },
            ]
        );
        assert!(r.take().is_empty());
    }
}
