//! The model's side of cache provenance, checked without the oracle: shadow entries carry the
//! refresh that installed or confirmed them, RPCIT reports the range it walked only when it
//! answered cc 0, and every drop of all entries is reported.

mod common;

use common::*;
use sluice_devapi::CacheKind;
use sluice_zpci::*;

const IOVA: u64 = PBA + 0x5000;

fn invalidations(r: &Rig) -> Vec<Inv> {
    invalidations_of(&r.rec)
}

#[test]
fn rpcit_reports_its_walked_range_and_dmas_their_entries() {
    let mut r = rig();
    // REG_IOAT dropped every (no) entry: refresh 1, everything.
    assert_eq!(
        invalidations(&r),
        vec![("REG_IOAT".into(), 0, 0, u64::MAX, Some(1), 1)]
    );
    r.t.map_range(&r.m, IOVA, 0x20_0000, 2, true).unwrap();
    assert_eq!(r.z.rpcit(&r.m, r.fh, IOVA, 0x2000), InsnStatus::OK);
    assert_eq!(
        invalidations(&r).last().cloned(),
        Some(("RPCIT".into(), 0, IOVA, IOVA + 0x1fff, Some(2), 2))
    );
    assert!(
        r.z.translate(&r.m, r.fh, IOVA + 0x800, 0x1000, false)
            .is_ok()
    );
    let cached = r.rec.cached_dmas();
    assert_eq!(cached.len(), 1);
    let (uses, seen) = (&cached[0].uses, cached[0].completions_seen);
    assert_eq!(seen, 2);
    assert_eq!(uses.len(), 1, "two pages of one refresh merge: {uses:?}");
    assert_eq!(
        (
            uses[0].cache,
            uses[0].context,
            uses[0].first,
            uses[0].last,
            uses[0].filled
        ),
        (CacheKind::Translation, 0, IOVA, IOVA + 0x1fff, 2)
    );
}

#[test]
fn an_rpcit_that_does_not_answer_cc0_claims_nothing() {
    let mut r = rig_with(
        ZpciOptions {
            mapping_budget: Some(1),
            ..Default::default()
        },
        cfg(),
    );
    let before = invalidations(&r).len();
    r.t.map_range(&r.m, IOVA, 0x20_0000, 2, true).unwrap();
    assert_eq!(
        r.z.rpcit(&r.m, r.fh, IOVA, 0x2000),
        InsnStatus::error(codes::status::RPCIT_INSUFF_RES)
    );
    assert_eq!(invalidations(&r).len(), before, "insufficient resources");
}

#[test]
fn drops_of_every_entry_are_reported_with_their_refresh() {
    let mut r = rig();
    r.t.map(&r.m, IOVA, 0x20_0000, true).unwrap();
    assert_eq!(r.z.rpcit(&r.m, r.fh, IOVA, 0x1000), InsnStatus::OK);
    assert_eq!(dereg_ioat(&r.z, &r.m, r.fh), InsnStatus::OK);
    r.z.deconfigure(FID).unwrap();
    let kinds: Vec<(String, Option<u64>)> = invalidations(&r)
        .into_iter()
        .map(|(k, _, first, last, g, _)| {
            if k != "RPCIT" {
                assert_eq!((first, last), (0, u64::MAX), "{k}");
            }
            (k, g)
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("REG_IOAT".into(), Some(1)),
            ("RPCIT".into(), Some(2)),
            ("DEREG_IOAT".into(), Some(3)),
            ("DECONFIGURE".into(), Some(4)),
        ]
    );
}
