//! Arbitrary bytes as queue, stream-table, CD and page-table memory plus register writes and
//! translations: no panic, no hang. Body: `sluice_smmuv3::fuzzing::run`.
//!
//! Fuzz: `RUSTC_BOOTSTRAP=1 cargo fuzz run smmuv3_ops` (from devices/smmuv3).
//! Replay without libFuzzer: `cargo run --bin smmuv3_ops -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_smmuv3::fuzzing::run(data));

#[cfg(not(fuzzing))]
fn main() {
    for path in std::env::args().skip(1) {
        match std::fs::read(&path) {
            Ok(data) => {
                sluice_smmuv3::fuzzing::run(&data);
                println!("{path}: ok");
            }
            Err(e) => eprintln!("{path}: {e}"),
        }
    }
}
