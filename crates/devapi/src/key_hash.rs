//! One hasher for the models' translation caches: their keys are integers (page and frame
//! numbers, StreamIDs, domain IDs) and every DMA probes them, where SipHash cost more than the
//! rest of a cache hit. A multiply-rotate per integer written spreads them over the table's
//! low bits. Not collision-resistant: the caches are bounded, so a guest that makes its own
//! keys collide slows only its own lookups, never makes one wrong.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-rotate hasher for integer keys.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        // The product's high bits depend on every input bit; rotate them to where the table
        // takes its bucket index (the low bits).
        self.0 = (n ^ self.0)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(26);
    }
}

/// A `HashMap` keyed through [`KeyHasher`].
pub type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hash;

    fn hash<T: Hash>(t: T) -> u64 {
        let mut h = KeyHasher::default();
        t.hash(&mut h);
        h.finish()
    }

    #[test]
    fn neighbouring_keys_land_in_different_low_bits() {
        let buckets: std::collections::BTreeSet<u64> = (0u64..64).map(|k| hash(k) & 63).collect();
        assert!(
            buckets.len() > 32,
            "{} distinct buckets of 64",
            buckets.len()
        );
        assert_ne!(
            hash((1u32, 2u32)),
            hash((2u32, 1u32)),
            "tuple order matters"
        );
    }
}
