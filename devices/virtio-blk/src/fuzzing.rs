//! The body of the `virtio_blk_requests` fuzz target (`fuzz/fuzz_targets/`): a split queue of
//! 16 entries in 64 KiB of guest memory that the operations build (raw descriptors,
//! descriptor chains, request headers, raw words, avail-ring entries and a raw avail index),
//! served by the device's own loop, [`crate::device::process_available`], over an in-memory
//! disk. One head is published per processing step, so each step is one request.
//!
//! Invariants (`assert!`, so the fuzzer reports a violation as a crash):
//! - the disk is accessed only inside its capacity, and never written when read-only;
//! - the device writes guest memory only inside the chain's device-writable buffers and the
//!   used ring;
//! - the used length is at most the chain's writable bytes; a used entry names the published
//!   head;
//! - a request that does not end in S_OK changes nothing: no disk write, and no guest byte
//!   beyond the status byte and the used ring;
//! - a successful IN uses exactly its data length plus the status byte, a successful OUT
//!   writes exactly its data to the disk; FLUSH and GET_ID never write the disk.
#![allow(clippy::panic, clippy::indexing_slicing)]

use std::sync::Mutex;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::{BlockCounters, process_available};
use crate::disk::Disk;
use crate::request::{ID_LEN, RequestEnv, S_OK, T_FLUSH, T_GET_ID, T_IN, T_OUT};

const MEM_SIZE: usize = 0x1_0000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x0100;
const USED: u64 = 0x0200;
const USED_END: u64 = USED + 4 + 8 * QSIZE as u64 + 2;
const DATA: u64 = 0x1000;
const MAX_OPS: usize = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// An in-memory disk that checks every access.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    writes: Mutex<Vec<(u64, usize)>>,
}

impl MemDisk {
    fn bounds(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let size = self.size();
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|e| e <= size),
            "disk access outside the disk: {len} bytes at {offset:#x} of {size:#x}"
        );
        offset as usize..offset as usize + len
    }
}

impl Disk for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let r = self.bounds(offset, buf.len());
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&d[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert!(!self.read_only, "write to a read-only disk");
        let r = self.bounds(offset, buf.len());
        self.data.lock().unwrap_or_else(|e| e.into_inner())[r].copy_from_slice(buf);
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((offset, buf.len()));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
}

use sluice_devapi::fuzz_support::FuzzInput as Input;

fn write_desc(mem: &GuestMemoryMmap, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * u64::from(idx % QSIZE);
    let _ = mem.write_obj(addr, GuestAddress(at));
    let _ = mem.write_obj(len, GuestAddress(at + 8));
    let _ = mem.write_obj(flags, GuestAddress(at + 12));
    let _ = mem.write_obj(next, GuestAddress(at + 14));
}

/// Copies all of guest memory into `buf` (kept by the rig, so the 64 KiB buffer is allocated
/// once per input rather than twice per request).
fn snapshot(mem: &GuestMemoryMmap, buf: &mut Vec<u8>) {
    buf.resize(MEM_SIZE, 0);
    let _ = mem.read_slice(buf, GuestAddress(0));
}

/// The chain at the next avail position, as the device will walk it: writable regions in
/// order (inside guest memory), their total, and the first readable bytes (the header).
struct ChainView {
    writable: Vec<(u64, u64)>,
    writable_total: u64,
    walkable: bool,
}

fn view_chain(queue: &mut Queue, mem: &GuestMemoryMmap) -> Option<ChainView> {
    let chain = queue.pop_descriptor_chain(mem)?;
    queue.go_to_previous_position();
    let mut writable = Vec::new();
    let mut total = 0u64;
    for d in chain.clone() {
        if d.is_write_only() {
            writable.push((d.addr().0, u64::from(d.len())));
            total = total.saturating_add(u64::from(d.len()));
        }
    }
    // The device refuses chains it cannot walk to the end (virtio-queue stops an iterator
    // early on a bad descriptor, so compare with the reader's view).
    let walkable = virtio_queue::Reader::new(mem, chain.clone()).is_ok()
        && virtio_queue::Writer::new(mem, chain).is_ok();
    Some(ChainView {
        writable,
        writable_total: total,
        walkable,
    })
}

fn in_regions(addr: u64, regions: &[(u64, u64)]) -> bool {
    regions.iter().any(|(a, l)| addr >= *a && addr - *a < *l)
}

/// The byte the status goes to: the last writable byte in chain order.
fn status_addr(regions: &[(u64, u64)]) -> Option<u64> {
    regions
        .iter()
        .rev()
        .find(|(_, l)| *l > 0)
        .map(|(a, l)| a + l - 1)
}

/// Addresses whose byte differs, in increasing order. Equal halves are skipped with one
/// memcmp each, so a request that changed a few bytes costs a few dozen memcmps of the 64 KiB
/// snapshot rather than a loop the fuzzer instruments per chunk or per byte.
fn changed(before: &[u8], after: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    changed_into(before, after, 0, &mut out);
    out
}

fn changed_into(before: &[u8], after: &[u8], base: u64, out: &mut Vec<u64>) {
    let n = before.len().min(after.len());
    let (a, b) = (&before[..n], &after[..n]);
    if a == b {
        return;
    }
    if n <= 64 {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x != y {
                out.push(base + i as u64);
            }
        }
        return;
    }
    let mid = n / 2;
    changed_into(&a[..mid], &b[..mid], base, out);
    changed_into(&a[mid..], &b[mid..], base + mid as u64, out);
}

struct Rig {
    mem: GuestMemoryMmap,
    queue: Queue,
    disk: MemDisk,
    avail_idx: u16,
    used_seen: u16,
    id: [u8; ID_LEN],
    /// Guest memory before and after the request being checked (reused buffers).
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Rig {
    /// Publishes `head` (or only moves the index when `head` is None) and lets the device
    /// process everything available, then checks the invariants.
    fn publish_and_process(&mut self, head: Option<u16>, raw_idx: Option<u16>) {
        if let Some(h) = head {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            let _ = self.mem.write_obj(h % QSIZE, GuestAddress(slot));
        }
        let next = raw_idx.unwrap_or(self.avail_idx.wrapping_add(1));
        let _ = self.mem.write_obj(next, GuestAddress(AVAIL + 2));
        // One request exactly when the device had consumed everything before this one.
        let single =
            raw_idx.is_none() && head.is_some() && self.queue.next_avail() == self.avail_idx;
        let view = if single {
            view_chain(&mut self.queue, &self.mem)
        } else {
            None
        };
        if view.is_some() {
            snapshot(&self.mem, &mut self.before);
        }
        self.disk
            .writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // Only an attributable request is compared with the disk before it.
        let disk_before = if view.is_some() {
            self.disk.data.lock().map(|d| d.clone()).unwrap_or_default()
        } else {
            Vec::new()
        };
        let env = RequestEnv {
            disk: &self.disk,
            id: &self.id,
            read_only: self.disk.read_only,
        };
        let counters = BlockCounters::default();
        let ok = process_available(&mut self.queue, &self.mem, &env, &counters, || {});
        self.avail_idx = next;
        if view.is_some() {
            snapshot(&self.mem, &mut self.after);
        }
        let writes = self
            .disk
            .writes
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default();
        // The device's own count (the guest may have scribbled over the ring's idx field).
        let used_idx = self.queue.next_used();
        let new_used = used_idx.wrapping_sub(self.used_seen);
        self.used_seen = used_idx;
        // Several (or no) requests, or a queue the device gave up on: nothing is attributable.
        let Some(view) = view else { return };
        if new_used == 0 || !ok {
            return;
        }
        let (before, after) = (&self.before, &self.after);
        assert_eq!(
            new_used, 1,
            "one published request gave {new_used} used entries"
        );
        let slot = USED + 4 + 8 * u64::from(used_idx.wrapping_sub(1) % QSIZE);
        let id = self
            .mem
            .read_obj::<u32>(GuestAddress(slot))
            .unwrap_or(u32::MAX);
        let used_len = u64::from(
            self.mem
                .read_obj::<u32>(GuestAddress(slot + 4))
                .unwrap_or(0),
        );
        assert_eq!(
            Some(id),
            head.map(|h| u32::from(h % QSIZE)),
            "used entry names another head"
        );
        assert!(
            used_len <= view.writable_total,
            "used length {used_len} > {} writable bytes",
            view.writable_total
        );
        // Footprint: only writable buffers and the used ring.
        let written: Vec<u64> = changed(before, after)
            .into_iter()
            .filter(|a| !(USED..USED_END).contains(a))
            .collect();
        for addr in &written {
            assert!(
                in_regions(*addr, &view.writable),
                "device wrote guest byte {addr:#x} outside the chain's writable buffers"
            );
        }
        // The status and request checks read guest memory after the fact, so they apply only
        // when every buffer lies in the data area (not over the rings or the table, which the
        // device also writes).
        let in_data =
            |a: u64, l: u64| a >= DATA && a.checked_add(l).is_some_and(|e| e <= MEM_SIZE as u64);
        let head_desc = self.queue_head_desc(before, head);
        if !view.writable.iter().all(|(a, l)| in_data(*a, *l))
            || head_desc.is_some_and(|(a, l, _)| !in_data(a, u64::from(l)))
        {
            return;
        }
        let status_at = status_addr(&view.writable);
        let status = if used_len > 0 && view.walkable {
            status_at.and_then(|s| after.get(s as usize).copied())
        } else {
            None
        };
        let header = view_header(before, &head_desc);
        if status != Some(S_OK) {
            assert!(
                writes.is_empty(),
                "failed request (status {status:?}) wrote the disk"
            );
            // A failed IN may have filled part of its buffer (the spec leaves it undefined).
            if header.is_some_and(|(k, _)| k == T_IN) {
                return;
            }
            for addr in &written {
                assert_eq!(
                    Some(*addr),
                    status_at,
                    "failed request (status {status:?}) wrote guest byte {addr:#x}"
                );
            }
            return;
        }
        let Some((kind, sector)) = header else {
            return;
        };
        match kind {
            T_IN => {
                let data_len = view.writable_total - 1;
                assert_eq!(used_len, data_len + 1, "IN used length");
                assert!(writes.is_empty(), "IN wrote the disk");
            }
            T_OUT => {
                let total: usize = writes.iter().map(|(_, l)| l).sum();
                let first = writes.first().map(|(o, _)| *o);
                if total > 0 {
                    assert_eq!(first, Some(sector * 512), "OUT wrote at the wrong offset");
                }
                assert_eq!(used_len, 1, "OUT used length");
                let d = self.disk.data.lock().map(|d| d.clone()).unwrap_or_default();
                let n = changed(&disk_before, &d).len();
                assert!(n <= total, "OUT changed more than it wrote");
            }
            T_FLUSH | T_GET_ID => {
                assert!(writes.is_empty(), "kind {kind} wrote the disk");
                assert!(
                    used_len <= 1 + ID_LEN as u64,
                    "kind {kind} used length {used_len}"
                );
            }
            _ => {}
        }
    }

    /// First descriptor (address, length, flags) of `head`, read from memory before processing.
    fn queue_head_desc(&self, before: &[u8], head: Option<u16>) -> Option<(u64, u32, u16)> {
        let at = (DESC + 16 * u64::from(head? % QSIZE)) as usize;
        let b = before.get(at..at + 16)?;
        let addr = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
        let len = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?);
        let flags = u16::from_le_bytes(b.get(12..14)?.try_into().ok()?);
        Some((addr, len, flags))
    }
}

/// Request type and sector when the first descriptor is a plain readable header of 16 bytes
/// or more inside memory (the only case this checker interprets).
fn view_header(before: &[u8], desc: &Option<(u64, u32, u16)>) -> Option<(u32, u64)> {
    let (addr, len, flags) = (*desc)?;
    if flags & (F_WRITE | F_INDIRECT) != 0 || len < 16 {
        return None;
    }
    let a = usize::try_from(addr).ok()?;
    let b = before.get(a..a.checked_add(16)?)?;
    let kind = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?);
    let sector = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    Some((kind, sector))
}

/// Byte `i` of the disk is `i as u8`; built 256 bytes at a time (a memcpy each), not by an
/// instrumented loop over every byte.
fn disk_pattern(len: usize) -> Vec<u8> {
    const RAMP: [u8; 256] = {
        let mut r = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            r[i] = i as u8;
            i += 1;
        }
        r
    };
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = (len - v.len()).min(RAMP.len());
        v.extend_from_slice(&RAMP[..n]);
    }
    v
}

/// Runs one input; panics when an invariant is violated.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let Some(flags) = inp.u8() else { return };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let Ok(mut queue) = Queue::new(QSIZE) else {
        return;
    };
    queue.set_size(QSIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        return;
    }
    let sectors = 1 + usize::from(flags & 0xf);
    let extra = if flags & 0x40 != 0 { 100 } else { 0 };
    let disk = MemDisk {
        data: Mutex::new(disk_pattern(sectors * 512 + extra)),
        read_only: flags & 0x20 != 0,
        writes: Mutex::new(Vec::new()),
    };
    let mut r = Rig {
        mem,
        queue,
        disk,
        avail_idx: 0,
        used_seen: 0,
        id: *b"fuzz-disk-id-0123456",
        before: Vec::new(),
        after: Vec::new(),
    };
    for _ in 0..MAX_OPS {
        let Some(op) = inp.u8() else { break };
        match op % 7 {
            0 => {
                let (Some(idx), Some(addr), Some(len), Some(fl), Some(next)) =
                    (inp.u8(), inp.u16(), inp.u16(), inp.u8(), inp.u8())
                else {
                    break;
                };
                let addr = if op & 0x80 != 0 {
                    u64::from(addr) << 16 | u64::from(addr)
                } else {
                    u64::from(addr)
                };
                let len = if op & 0x40 != 0 {
                    u32::from(len) << 16
                } else {
                    u32::from(len)
                };
                write_desc(
                    &r.mem,
                    u16::from(idx),
                    addr,
                    len,
                    u16::from(fl & 7),
                    u16::from(next),
                );
            }
            1 => {
                // A chain of n descriptors at head, head+1, ... with NEXT links.
                let (Some(head), Some(mask)) = (inp.u8(), inp.u8()) else {
                    break;
                };
                let n = 1 + u16::from((op >> 4) & 3);
                for k in 0..n {
                    let (Some(addr), Some(len)) = (inp.u16(), inp.u16()) else {
                        return;
                    };
                    let idx = (u16::from(head) + k) % QSIZE;
                    let last = k + 1 == n;
                    let flags = (if last { 0 } else { F_NEXT })
                        | (if mask >> k & 1 != 0 { F_WRITE } else { 0 });
                    let addr = DATA + u64::from(addr) % (MEM_SIZE as u64 - DATA);
                    write_desc(
                        &r.mem,
                        idx,
                        addr,
                        u32::from(len % 0x2000),
                        flags,
                        (idx + 1) % QSIZE,
                    );
                }
            }
            2 => {
                let (Some(addr), Some(kind), Some(sector)) = (inp.u16(), inp.u8(), inp.u64())
                else {
                    break;
                };
                let kind = match kind % 6 {
                    0 => T_IN,
                    1 => T_OUT,
                    2 => T_FLUSH,
                    3 => T_GET_ID,
                    4 => u32::from(kind),
                    _ => u32::from(kind) << 24 | 1,
                };
                let sector = if op & 0x80 != 0 { sector } else { sector % 24 };
                let at = GuestAddress(u64::from(addr));
                let _ = r.mem.write_obj(kind, at);
                let _ = r.mem.write_obj(0u32, GuestAddress(u64::from(addr) + 4));
                let _ = r.mem.write_obj(sector, GuestAddress(u64::from(addr) + 8));
            }
            3 => {
                let (Some(addr), Some(v)) = (inp.u16(), inp.u64()) else {
                    break;
                };
                let _ = r.mem.write_obj(v, GuestAddress(u64::from(addr)));
            }
            4 => {
                let Some(head) = inp.u8() else { break };
                r.publish_and_process(Some(u16::from(head)), None);
            }
            5 => {
                let Some(idx) = inp.u16() else { break };
                r.publish_and_process(None, Some(idx));
            }
            _ => {
                // A well-formed request: header, data, status, at head..head+2.
                let (Some(head), Some(kind), Some(sector), Some(len)) =
                    (inp.u8(), inp.u8(), inp.u8(), inp.u16())
                else {
                    break;
                };
                let head = u16::from(head) % QSIZE;
                let kind = [T_IN, T_OUT, T_FLUSH, T_GET_ID][usize::from(kind % 4)];
                let hdr = DATA + 0x100 * u64::from(head);
                let buf = 0x4000 + 0x800 * u64::from(head % 8);
                let status = 0xf000 + u64::from(head);
                let _ = r.mem.write_obj(kind, GuestAddress(hdr));
                let _ = r.mem.write_obj(0u32, GuestAddress(hdr + 4));
                let _ = r
                    .mem
                    .write_obj(u64::from(sector % 20), GuestAddress(hdr + 8));
                let data_flags = if kind == T_OUT { 0 } else { F_WRITE };
                let (i1, i2) = ((head + 1) % QSIZE, (head + 2) % QSIZE);
                write_desc(&r.mem, head, hdr, 16, F_NEXT, i1);
                write_desc(
                    &r.mem,
                    i1,
                    buf,
                    u32::from(len % 0x800),
                    F_NEXT | data_flags,
                    i2,
                );
                write_desc(&r.mem, i2, status, 1, F_WRITE, 0);
                r.publish_and_process(Some(head), None);
            }
        }
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

    #[test]
    fn disk_pattern_is_the_byte_index() {
        for len in [0, 1, 255, 256, 257, 512 * 16 + 100] {
            let v = super::disk_pattern(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().enumerate().all(|(i, b)| *b == i as u8));
        }
    }

    /// The bisecting diff finds exactly the bytes a per-byte scan finds.
    #[test]
    fn changed_matches_a_byte_scan() {
        let before: Vec<u8> = (0..super::MEM_SIZE).map(|i| i as u8).collect();
        for edits in [
            vec![],
            vec![0],
            vec![super::MEM_SIZE - 1],
            vec![63, 64, 65, 4095, 4096, 0x8001],
            (0..300).map(|i| i * 211 % super::MEM_SIZE).collect(),
        ] {
            let mut after = before.clone();
            for &e in &edits {
                after[e] ^= 0x5a;
            }
            let naive: Vec<u64> = (0..before.len())
                .filter(|&i| before[i] != after[i])
                .map(|i| i as u64)
                .collect();
            assert_eq!(super::changed(&before, &after), naive);
        }
    }
}
