//! The body of the `marker_ops` fuzz target (`fuzz/fuzz_targets/`): operation sequences of
//! BAR writes and reads (both BARs and a missing one, 1/2/4/8 bytes, inside the BAR as the
//! bus guarantees), config-space accesses, BAR decoding and resets against one
//! [`MarkerDevice`], compared with a reference model of the line assembler.
//!
//! Invariants (`assert!`, so the fuzzer reports a violation as a crash):
//! - the sink receives exactly the model's lines, in order, each at most [`MAX_LINE`] input
//!   bytes, never containing NUL, `\r` or `\n`;
//! - register reads return the magic and the model's committed/truncated counts, and change
//!   nothing; accesses to a BAR that does not exist change nothing;
//! - the IDs, class, header type and BAR types never change;
//! - `decode_bar` answers only with the matching space enabled, with an offset inside the BAR.
#![allow(clippy::panic, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex};

use sluice_pci::PciFunction;

use crate::{IO_BAR_SIZE, MARKER_MAGIC, MAX_LINE, MEM_BAR_SIZE, MarkerDevice};

const MAX_OPS: usize = 1024;

/// What the device should do.
#[derive(Default)]
struct Model {
    line: Vec<u8>,
    overflow: bool,
    committed: u32,
    truncated: u32,
    lines: Vec<Vec<u8>>,
}

impl Model {
    fn push(&mut self, data: &[u8]) {
        for &b in data {
            match b {
                0 | b'\r' => {}
                b'\n' => {
                    self.lines.push(std::mem::take(&mut self.line));
                    if self.overflow {
                        self.truncated = self.truncated.wrapping_add(1);
                    }
                    self.overflow = false;
                    self.committed = self.committed.wrapping_add(1);
                }
                _ if self.line.len() >= MAX_LINE => self.overflow = true,
                _ => self.line.push(b),
            }
        }
    }

    fn reg(&self, offset: u64) -> u32 {
        match offset {
            0 => MARKER_MAGIC,
            4 => self.committed,
            8 => self.truncated,
            _ => 0,
        }
    }
}

use sluice_devapi::fuzz_support::FuzzInput as Input;

fn cfg_read(dev: &MarkerDevice, off: u16, len: usize) -> u64 {
    let mut b = [0u8; 8];
    let b = &mut b[..len.min(8)];
    dev.config_read(off, b);
    sluice_pci::le_value(b)
}

/// Config bytes that never change: IDs, revision and class, header type, subsystem IDs.
const FIXED: [u16; 13] = [0, 1, 2, 3, 8, 9, 10, 11, 0x0e, 0x2c, 0x2d, 0x2e, 0x2f];

/// The [`FIXED`] bytes, read a dword at a time (four config reads rather than thirteen).
fn fixed_bytes(dev: &MarkerDevice) -> [u8; 13] {
    let mut out = [0u8; 13];
    let mut dword: Option<(u16, [u8; 4])> = None;
    for (o, b) in FIXED.iter().zip(out.iter_mut()) {
        let base = o & !3;
        let bytes = match dword {
            Some((d, bytes)) if d == base => bytes,
            _ => {
                let mut bytes = [0u8; 4];
                dev.config_read(base, &mut bytes);
                dword = Some((base, bytes));
                bytes
            }
        };
        *b = bytes[usize::from(o & 3)];
    }
    out
}

fn bar_size(bar: u8) -> u64 {
    match bar {
        0 => IO_BAR_SIZE,
        1 => MEM_BAR_SIZE,
        _ => 0x1000,
    }
}

/// Runs one input; panics when an invariant is violated.
pub fn run(data: &[u8]) {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = got.clone();
    let Ok(dev) = MarkerDevice::new(Arc::new(move |l: &str| {
        sink.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l.to_string());
    })) else {
        return;
    };
    let fixed = fixed_bytes(&dev);
    let mut model = Model::default();
    let mut checked = 0;
    let mut inp = Input(data);
    for _ in 0..MAX_OPS {
        let Some(op) = inp.u8() else { break };
        let size = [1usize, 2, 4, 8][usize::from(op >> 6)];
        match op % 8 {
            0..=2 => {
                // A write of `size` bytes; bar 2 does not exist.
                let (Some(sel), Some(off)) = (inp.u8(), inp.u16()) else {
                    break;
                };
                let Some(bytes) = inp.bytes::<8>() else { break };
                let bar = sel % 3;
                let off = (u64::from(off) % bar_size(bar)).min(bar_size(bar) - size as u64);
                let data = &bytes[..size];
                dev.bar_write(bar, off, data);
                if bar <= 1 {
                    model.push(data);
                }
            }
            3 => {
                // Text-like write: a run of printable bytes with an optional newline.
                let (Some(n), Some(c)) = (inp.u8(), inp.u8()) else {
                    break;
                };
                let mut data = vec![b'a' + c % 26; usize::from(n)];
                if c & 0x80 != 0 {
                    data.push(b'\n');
                }
                dev.bar_write(1, 0, &data);
                model.push(&data);
            }
            4 => {
                let (Some(sel), Some(off)) = (inp.u8(), inp.u16()) else {
                    break;
                };
                let bar = sel % 3;
                let off = (u64::from(off) % bar_size(bar)).min(bar_size(bar) - size as u64);
                let mut b = vec![0xa5u8; size];
                dev.bar_read(bar, off, &mut b);
                let expect: Vec<u8> = (0..size as u64)
                    .map(|i| {
                        if bar > 1 {
                            return 0;
                        }
                        let at = off + i;
                        (model.reg(at & !3) >> (8 * (at & 3))) as u8
                    })
                    .collect();
                assert_eq!(b, expect, "BAR {bar} read at {off:#x}/{size}");
            }
            5 => {
                let (Some(o), Some(v)) = (inp.u8(), inp.u32()) else {
                    break;
                };
                let len = [1usize, 2, 4][usize::from(op >> 6) % 3];
                dev.config_write(u16::from(o), &v.to_le_bytes()[..len]);
            }
            6 => {
                let (Some(addr), Some(sel)) = (inp.u32(), inp.u8()) else {
                    break;
                };
                let memory = sel & 1 != 0;
                if let Some((bar, off)) = dev.decode_bar(u64::from(addr), memory) {
                    let cmd = cfg_read(&dev, 0x04, 2);
                    let enable = if memory { 2 } else { 1 };
                    assert!(cmd & enable != 0, "decode with the space disabled");
                    assert_eq!(bar, u8::from(memory), "decode to the wrong kind of BAR");
                    assert!(
                        off < bar_size(bar),
                        "decode offset {off:#x} outside BAR {bar}"
                    );
                }
            }
            _ => {
                dev.reset();
                model.line.clear();
                model.overflow = false;
            }
        }
        // Lines: exactly the model's, in order.
        let lines = got
            .lock()
            .map(|l| l.get(checked..).map(<[_]>::to_vec).unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(
            checked + lines.len(),
            model.lines.len(),
            "committed lines differ from the model"
        );
        for (g, m) in lines.iter().zip(model.lines.iter().skip(checked)) {
            assert!(m.len() <= MAX_LINE, "model line over MAX_LINE");
            assert_eq!(
                *g,
                String::from_utf8_lossy(m),
                "line content differs from the model"
            );
            assert!(
                !g.contains(['\0', '\r', '\n']),
                "committed line contains a control byte"
            );
        }
        checked += lines.len();
        assert_eq!(dev.committed(), model.committed, "committed count");
        let now = fixed_bytes(&dev);
        for ((o, v), n) in FIXED.iter().zip(&fixed).zip(&now) {
            assert_eq!(n, v, "read-only config byte {o:#x} changed");
        }
        let bar0 = cfg_read(&dev, 0x10, 4);
        let bar1 = cfg_read(&dev, 0x14, 4);
        assert_eq!(bar0 & 1, 1, "BAR 0 lost its I/O type");
        assert_eq!(bar1 & 0xf, 0, "BAR 1 type bits changed");
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz body on fixed-seed pseudo-random inputs (the corpus replays in
    /// `tests/fuzz-replay.sh`).
    #[test]
    fn fuzz_body_on_pseudo_random_inputs() {
        for data in sluice_devapi::fuzz_support::pseudo_random_inputs(0x5eed, 500, 700) {
            super::run(&data);
        }
    }
}
