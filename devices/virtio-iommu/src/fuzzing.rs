//! Placeholder, filled below.
pub fn run(_data: &[u8]) {}
