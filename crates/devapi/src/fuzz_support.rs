//! What every fuzz target shares: replaying files without libFuzzer, and fixed-seed inputs for
//! the unit tests that run each fuzz body on stable.

/// Replays every FILE, or every file in a DIRECTORY (sorted), given on the command line through
/// `run`, once each. Exits 2 when a file cannot be read; a failing input panics, which also
/// exits non-zero. The `main` of a fuzz target built without libFuzzer.
pub fn replay_main(run: impl Fn(&[u8])) {
    let mut files = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let path = std::path::PathBuf::from(arg);
        match std::fs::read_dir(&path) {
            Ok(dir) => {
                let mut inner: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
                inner.sort();
                files.extend(inner);
            }
            Err(_) => files.push(path),
        }
    }
    for path in &files {
        match std::fs::read(path) {
            Ok(data) => run(&data),
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                std::process::exit(2);
            }
        }
    }
    println!("{} inputs replayed, no failure", files.len());
}

/// `count` pseudo-random inputs of up to `max_len - 1` bytes from `seed` (splitmix64): the same
/// inputs on every run, so a failing unit test is reproducible.
pub fn pseudo_random_inputs(
    seed: u64,
    count: usize,
    max_len: u64,
) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..count).map(move |_| {
        let len = next() % max_len.max(1);
        (0..len).map(|_| next() as u8).collect()
    })
}

/// A fuzz input read front to back: each call takes the next bytes, `None` once it runs out.
pub struct FuzzInput<'a>(pub &'a [u8]);

impl FuzzInput<'_> {
    /// The next `N` bytes.
    pub fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    /// The next byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|[b]| b)
    }
    /// The next little-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes::<2>().map(u16::from_le_bytes)
    }
    /// The next little-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }
    /// The next little-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_reproducible_and_bounded() {
        let a: Vec<_> = pseudo_random_inputs(7, 50, 100).collect();
        let b: Vec<_> = pseudo_random_inputs(7, 50, 100).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 50);
        assert!(a.iter().all(|v| v.len() < 100));
        assert!(a.iter().any(|v| !v.is_empty()));
        assert_ne!(a, pseudo_random_inputs(8, 50, 100).collect::<Vec<_>>());
    }
}
