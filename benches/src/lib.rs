//! Bench-only package; see benches/*.rs.
