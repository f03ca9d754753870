//! Operation-sequence fuzzer over table memory, FIBs, RPCIT, DMA and the lifecycle.
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run zpci_ops` from `devices/zpci/` (see docs/zpci.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = sluice_zpci::fuzzing::run(data) {
        panic!("{e}");
    }
});
