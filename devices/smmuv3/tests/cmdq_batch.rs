//! The command queue is consumed in bounded batches: a doorbell (CMDQ_PROD write) does at most
//! `SmmuConfig::cmdq_batch` commands, the rest complete on later triggers (reads of CMDQ_CONS,
//! `process_pending`), in queue order, so CMD_SYNC still completes only after every command
//! before it.

mod common;

use common::*;
use sluice_devapi::RecordedInterrupt;
use sluice_smmuv3::regs::off;
use sluice_smmuv3::{DEFAULT_CMDQ_BATCH, IRQ_CMD_SYNC, SmmuConfig};

const TLBI_NSNH_ALL: u64 = 0x30;
const PREFETCH_CONFIG: u64 = 0x01;
/// CMD_SYNC with CS=SIG_IRQ.
const SYNC_IRQ: u64 = 0x46 | (1 << 12);
const WRAP: u64 = 2 << CMDQ_LOG2;

fn rig(batch: u32) -> Rig {
    let r = Rig::with(SmmuConfig {
        cmdq_batch: batch,
        ..SmmuConfig::default()
    });
    r.enable(4);
    r
}

fn cons(r: &Rig) -> u64 {
    r.smmu.mmio_read(off::CMDQ_CONS, 4) & (WRAP - 1)
}

/// Reads CONS the way a polling driver does: the queue moves on.
fn poll_cons(r: &Rig) -> u64 {
    r.smmu.mmio_read_mem(&r.mem, off::CMDQ_CONS, 4) & (WRAP - 1)
}

fn sync_irqs(r: &Rig) -> usize {
    r.irq
        .take()
        .into_iter()
        .filter(|i| {
            matches!(i, RecordedInterrupt::Level { line, asserted: true } if *line == IRQ_CMD_SYNC)
        })
        .count()
}

fn cmd_points(r: &Rig) -> Vec<String> {
    r.hooks
        .point_names()
        .into_iter()
        .filter(|p| p.starts_with("smmuv3.cmd."))
        .collect()
}

#[test]
fn a_full_queue_does_at_most_one_batch_per_doorbell_and_completes_on_polls() {
    let r = rig(16);
    let full = vec![[TLBI_NSNH_ALL, 0]; 1 << CMDQ_LOG2];
    r.cmds(&full);
    let prod = r.r32(off::CMDQ_PROD) & (WRAP - 1);
    assert_eq!(prod, 1 << CMDQ_LOG2, "full: same index, other wrap bit");
    assert_eq!(cons(&r), 16, "one batch on the doorbell");
    assert_eq!(cons(&r), 16, "a plain read does not consume");
    let mut polls = 0;
    while poll_cons(&r) != prod {
        polls += 1;
        assert!(polls <= 64, "no progress");
    }
    // 16 batches: the doorbell's, 14 polls that still see work, the poll that drains.
    assert_eq!(polls, (1 << CMDQ_LOG2) / 16 - 2);
    assert_eq!(
        cmd_points(&r).len(),
        1 << CMDQ_LOG2,
        "every command ran once"
    );
}

#[test]
fn process_pending_continues_the_queue() {
    let r = rig(10);
    r.cmds(&vec![[PREFETCH_CONFIG, 0]; 25]);
    assert_eq!(cons(&r), 10);
    assert!(r.smmu.process_pending(&r.mem), "more after 20");
    assert_eq!(cons(&r), 20);
    assert!(!r.smmu.process_pending(&r.mem), "drained");
    assert_eq!(cons(&r), 25);
    assert!(!r.smmu.process_pending(&r.mem));
}

#[test]
fn cmd_sync_completes_only_after_the_commands_before_it() {
    let r = rig(4);
    let _ = sync_irqs(&r);
    let mut list = vec![[TLBI_NSNH_ALL, 0]; 5];
    list.push([SYNC_IRQ, 0]);
    list.extend(vec![[PREFETCH_CONFIG, 0]; 3]);
    list.push([SYNC_IRQ, 0]);
    r.cmds(&list);
    assert_eq!(cons(&r), 4);
    assert_eq!(sync_irqs(&r), 0, "the first SYNC is behind a fifth TLBI");
    assert_eq!(poll_cons(&r), 8);
    assert_eq!(sync_irqs(&r), 1);
    assert_eq!(poll_cons(&r), 10);
    assert_eq!(sync_irqs(&r), 1);
    let mut want = vec!["smmuv3.cmd.TLBI_NSNH_ALL".to_string(); 5];
    want.push("smmuv3.cmd.CMD_SYNC".into());
    want.extend(vec!["smmuv3.cmd.PREFETCH_CONFIG".to_string(); 3]);
    want.push("smmuv3.cmd.CMD_SYNC".into());
    assert_eq!(cmd_points(&r), want, "queue order");
}

#[test]
fn the_invalidations_before_a_sync_are_reported_when_it_completes() {
    let r = rig(2);
    r.cmds(&[
        [TLBI_NSNH_ALL, 0],
        [TLBI_NSNH_ALL, 0],
        [TLBI_NSNH_ALL, 0],
        [0x46, 0],
    ]);
    assert!(r.hooks.invalidations().is_empty(), "no CMD_SYNC yet");
    assert_eq!(poll_cons(&r), 4);
    assert_eq!(r.hooks.invalidations().len(), 3);
}

#[test]
fn the_default_batch_bounds_a_large_queue() {
    let r = Rig::new();
    r.enable(4);
    // A 2^12-entry queue of its own (the rig's queue has 256 entries).
    let log2 = 12u64;
    let base = r.alloc(16 << log2, 16 << log2);
    r.w32(off::CR0, 0x5); // CMDQEN off to move the queue
    r.w64(off::CMDQ_BASE, base | log2);
    r.w32(off::CMDQ_PROD, 0);
    r.w32(off::CMDQ_CONS, 0);
    r.w32(off::CR0, 0xd);
    for i in 0..(1u64 << log2) {
        r.write_words(base + i * 16, &[PREFETCH_CONFIG, 0]);
    }
    let full = 1u64 << log2;
    r.w32(off::CMDQ_PROD, full);
    let mask = (2u64 << log2) - 1;
    assert_eq!(r.r32(off::CMDQ_CONS) & mask, u64::from(DEFAULT_CMDQ_BATCH));
    let mut polls = 0;
    while r.smmu.mmio_read_mem(&r.mem, off::CMDQ_CONS, 4) & mask != full {
        polls += 1;
        assert!(polls < 100);
    }
    // The doorbell's batch, then one batch per poll; the last poll sees the queue drained.
    assert_eq!(polls, full / u64::from(DEFAULT_CMDQ_BATCH) - 2);
}
