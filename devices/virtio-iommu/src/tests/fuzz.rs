//! The fuzz body on pseudo-random inputs: no panic, no hang.

use std::time::Instant;

#[test]
fn fuzz_body_survives_random_inputs() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let t = Instant::now();
    for i in 0..3000 {
        let len = (next() % 2048) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Every other input biased towards well-formed requests so deep paths are reached.
        if i % 2 == 0 {
            for (j, b) in data.iter_mut().enumerate() {
                if j % 3 == 0 {
                    *b &= 0x0f;
                }
            }
        }
        crate::fuzzing::run(&data);
    }
    assert!(t.elapsed().as_secs() < 60);
}
