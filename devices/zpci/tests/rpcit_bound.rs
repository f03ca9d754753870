//! RPCIT's work is bounded per instruction, whatever the range and however the guest aliases
//! its tables: a refresh cut short answers cc 2 (busy) and the guest's retry with the same
//! operands continues where it stopped (Linux's `zpci_refresh_trans` loops on cc 2).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sluice_zpci::codes::status;
use sluice_zpci::*;
use vm_memory::{Bytes, GuestAddress};

/// Region-third table, segment table and page table of the aliased layout.
const RT: u64 = 0x40_0000;
const ST: u64 = RT + 0x4000;
const PT: u64 = RT + 0x8000;
const FRAME: u64 = 0x10_0000;
/// The whole reach of a region-third table above `PBA`: about 2^30 pages.
const HUGE_PAL: u64 = (1 << 42) - 1;

fn put(m: &Mem, addr: u64, v: u64) {
    m.write_slice(&v.to_be_bytes(), GuestAddress(addr)).unwrap();
}

/// Every region entry names one segment table, every segment entry one page table, every page
/// entry one frame: each 4 KiB of the 4 TiB reach is a valid translation.
fn aliased_tables(m: &Mem) -> u64 {
    for i in 0..2048 {
        put(m, RT + i * 8, ST | 0x4 | 0x3);
        put(m, ST + i * 8, PT);
    }
    for i in 0..256 {
        put(m, PT + i * 8, FRAME);
    }
    RT | 0x800 | (1 << 2)
}

fn model(budget: Option<u64>, limit: u64) -> (Zpci, Mem, u32) {
    let opts = ZpciOptions {
        mapping_budget: budget,
        rpcit_step_limit: limit,
        ..ZpciOptions::default()
    };
    let z = model_with(opts, cfg(), Arc::new(RecordingHooks::default()));
    let m = mem();
    let iota = aliased_tables(&m);
    let fh = enable(&z, FID);
    let fib = Fib {
        pba: PBA,
        pal: HUGE_PAL,
        iota,
        ..Fib::default()
    };
    assert_eq!(
        z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::RegIoat, &fib),
        Ok(InsnStatus::OK)
    );
    (z, m, fh)
}

#[test]
fn a_huge_rpcit_over_aliased_tables_is_bounded_and_answers_busy() {
    let limit = 4096;
    let (z, m, fh) = model(None, limit);
    let t0 = Instant::now();
    assert_eq!(
        z.rpcit(&m, fh, PBA, HUGE_PAL - PBA + 1),
        InsnStatus::BUSY,
        "2^30 pages cannot be refreshed in one instruction"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "one instruction took {:?}",
        t0.elapsed()
    );
    assert_eq!(z.budget_used(), limit, "one step limit's worth of frames");
    // The retry continues: the next chunk is installed, nothing is redone.
    assert_eq!(z.rpcit(&m, fh, PBA, HUGE_PAL - PBA + 1), InsnStatus::BUSY);
    assert_eq!(z.budget_used(), 2 * limit);
    let tr = z
        .translate(&m, fh, PBA + (2 * limit - 1) * 0x1000, 8, false)
        .expect("last page of the second chunk");
    assert_eq!(tr.pieces[0].gpa, FRAME);
    assert!(
        z.translate(&m, fh, PBA + 2 * limit * 0x1000, 8, false)
            .is_err(),
        "not refreshed yet: fail closed"
    );
}

#[test]
fn the_default_step_limit_bounds_one_instruction_too() {
    let (z, m, fh) = model(Some(DEFAULT_MAPPING_BUDGET), DEFAULT_RPCIT_STEP_LIMIT);
    let t0 = Instant::now();
    assert_eq!(z.rpcit(&m, fh, PBA, HUGE_PAL - PBA + 1), InsnStatus::BUSY);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(z.budget_used(), DEFAULT_RPCIT_STEP_LIMIT);
}

#[test]
fn a_huge_rpcit_stops_at_the_budget_with_insufficient_resources() {
    let (z, m, fh) = model(Some(1000), 4096);
    assert_eq!(
        z.rpcit(&m, fh, PBA, HUGE_PAL - PBA + 1),
        InsnStatus::error(status::RPCIT_INSUFF_RES)
    );
    assert_eq!(z.budget_used(), 1000);
    // Insufficient resources is final: a retry starts over, and answers the same.
    assert_eq!(
        z.rpcit(&m, fh, PBA, HUGE_PAL - PBA + 1),
        InsnStatus::error(status::RPCIT_INSUFF_RES)
    );
    assert_eq!(z.budget_used(), 1000);
}

#[test]
fn retries_complete_a_long_refresh_with_cc0() {
    let limit = 100;
    let (z, m, fh) = model(None, limit);
    let len = 2048 * 0x1000;
    let mut busy = 0;
    loop {
        match z.rpcit(&m, fh, PBA, len) {
            InsnStatus::BUSY => busy += 1,
            st => {
                assert_eq!(st, InsnStatus::OK);
                break;
            }
        }
        assert!(busy < 100, "no progress");
        // Another refresh in between (another CPU) does not lose the first one's progress.
        assert_eq!(z.rpcit(&m, fh, PBA + (1 << 30), 0x1000), InsnStatus::OK);
    }
    assert_eq!(busy, 2048 / limit);
    for page in 0..2048 {
        assert!(
            z.translate(&m, fh, PBA + page * 0x1000, 8, true).is_ok(),
            "page {page}"
        );
    }
}

#[test]
fn unmaps_of_a_resumed_refresh_are_applied_in_every_chunk() {
    let limit = 64;
    let (z, m, fh) = model(None, limit);
    let len = 512 * 0x1000;
    while z.rpcit(&m, fh, PBA, len) == InsnStatus::BUSY {}
    // Unmap every page of the (aliased) page table: every page of the range is now invalid.
    for i in 0..256 {
        put(&m, PT + i * 8, 0x400);
    }
    let mut rounds = 0;
    while z.rpcit(&m, fh, PBA, len) == InsnStatus::BUSY {
        rounds += 1;
        assert!(rounds < 1000);
    }
    assert_eq!(z.budget_used(), 0, "every chunk dropped its entries");
    assert!(z.translate(&m, fh, PBA + 300 * 0x1000, 8, false).is_err());
}

#[test]
fn an_ioat_change_forgets_the_resume_point() {
    let limit = 100;
    let (z, m, fh) = model(None, limit);
    let len = 1024 * 0x1000;
    assert_eq!(z.rpcit(&m, fh, PBA, len), InsnStatus::BUSY);
    assert_eq!(dereg_ioat(&z, &m, fh), InsnStatus::OK);
    let fib = Fib {
        pba: PBA,
        pal: HUGE_PAL,
        iota: RT | 0x800 | (1 << 2),
        ..Fib::default()
    };
    assert_eq!(
        z.mpcifc_with_fib(&m, fh, 0, MpcifcOp::RegIoat, &fib),
        Ok(InsnStatus::OK)
    );
    assert_eq!(z.rpcit(&m, fh, PBA, len), InsnStatus::BUSY);
    assert!(
        z.translate(&m, fh, PBA, 8, false).is_ok(),
        "the refresh started over at the first page"
    );
    assert!(z.translate(&m, fh, PBA + limit * 0x1000, 8, false).is_err());
}
