//! The body of the fuzz target (`fuzz/fuzz_targets/smmuv3_ops.rs`), kept in the crate so the
//! plain `#[test]` that runs it on random inputs and the fuzzer exercise the same code.
//!
//! Input layout: the first 32 KiB (or less) become guest memory at 0 (queues, stream table,
//! CDs and page tables all live there); the rest is a sequence of operations (register
//! writes, register reads, translations). Memory beyond 32 KiB is absent, so wild pointers
//! exercise the external-abort paths.

use crate::regs::off;
use crate::{Access, SmmuConfig, SmmuV3};
use sluice_devapi::{NoHooks, NullInterrupts};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the guest memory the fuzzer controls.
pub const MEM_SIZE: usize = 0x8000;
const MAX_OPS: usize = 512;

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

/// Runs one input. Never panics, never hangs (for a correct model).
pub fn run(data: &[u8]) {
    let split = data.len().min(MEM_SIZE);
    let (image, mut ops) = data.split_at(split);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return;
    }
    let smmu = SmmuV3::new(
        SmmuConfig::default(),
        Arc::new(NullInterrupts),
        Arc::new(NoHooks),
    );
    // A plausible starting point so short inputs reach translation: queues and a linear
    // stream table inside the image, everything enabled.
    let setup = [
        (off::STRTAB_BASE, 8, 0x1000u64),
        (off::STRTAB_BASE_CFG, 4, 6),
        (off::CMDQ_BASE, 8, 0x4000 | 8),
        (off::EVENTQ_BASE, 8, 0x6000 | 6),
        (off::IRQ_CTRL, 4, 5),
        (off::CR2, 4, 2),
        (off::CR0, 4, 0xd),
    ];
    for (o, size, v) in setup {
        smmu.mmio_write(&mem, o, size, v);
    }
    for _ in 0..MAX_OPS {
        let Some([kind]) = take::<1>(&mut ops) else {
            return;
        };
        match kind % 4 {
            0 | 1 => {
                let (Some(o), Some(v)) = (take::<2>(&mut ops), take::<8>(&mut ops)) else {
                    return;
                };
                let o = u64::from(u16::from_le_bytes(o));
                let offset = if kind & 0x80 != 0 {
                    0x1_0000 | (o & 0xfc)
                } else {
                    o & 0x1fc
                };
                let size = if kind & 0x40 != 0 { 8 } else { 4 };
                smmu.mmio_write(
                    &mem,
                    offset & !(u64::from(size) - 1),
                    size,
                    u64::from_le_bytes(v),
                );
            }
            2 => {
                let Some(o) = take::<4>(&mut ops) else {
                    return;
                };
                let _ = smmu.mmio_read_mem(&mem, u64::from(u32::from_le_bytes(o)) % 0x2_0000, 4);
            }
            _ => {
                let (Some(sid), Some(iova), Some(len)) = (
                    take::<2>(&mut ops),
                    take::<8>(&mut ops),
                    take::<2>(&mut ops),
                ) else {
                    return;
                };
                let ssid = (kind & 0x10 != 0).then_some(u32::from(kind >> 5));
                let access = Access {
                    write: kind & 0x04 != 0,
                    privileged: kind & 0x08 == 0,
                    instruction: kind & 0x80 != 0,
                };
                let len = u64::from(u16::from_le_bytes(len));
                let iova = u64::from_le_bytes(iova);
                if let Ok(t) = smmu.translate(
                    &mem,
                    u32::from(u16::from_le_bytes(sid)),
                    ssid,
                    iova,
                    len,
                    access,
                ) {
                    // Invariant: the pieces cover exactly the requested range, in order.
                    let mut next = iova;
                    let mut total = 0u64;
                    for s in &t.segments {
                        assert_eq!(s.iova, next, "segments out of order");
                        next = s.iova.wrapping_add(s.len);
                        total += s.len;
                    }
                    assert!(
                        len == 0 || total == len || iova.checked_add(len).is_none(),
                        "coverage"
                    );
                }
            }
        }
    }
}
