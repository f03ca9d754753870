//! Guest marker lines: what a guest program can declare (`docs/escape-oracle.md`, "Marker
//! channel").
//!
//! ```text
//! phase NAME [ARGS...]                      a named phase; timeline only
//! owner ENDPOINT user RANGE [RANGE...]      from now on only these IOVAs are legitimate
//! owner ENDPOINT kernel                     back to the kernel: the window is dropped
//! release ENDPOINT                          the guest released the endpoint
//! anything else                             a note; timeline only
//! ```
//!
//! `RANGE` is `[A,B)`, `A-B` (half-open) or `A+LEN`, numbers in hex (`0x`) or decimal.

use thiserror::Error;

use crate::topology::{Key, parse_endpoint, parse_u64};

/// A marker line that says something the oracle acts on but cannot be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MarkerError {
    /// The endpoint is not in any known spelling.
    #[error("unknown endpoint {0:?}")]
    Endpoint(String),
    /// `owner` needs `user` or `kernel`.
    #[error("owner needs an endpoint and `user RANGES` or `kernel`")]
    Owner,
    /// A range does not parse or is empty.
    #[error("bad IOVA range {0:?} (use [A,B), A-B or A+LEN)")]
    Range(String),
}

/// What a marker line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerCmd {
    /// `phase ...`.
    Phase,
    /// Anything unrecognised.
    Note,
    /// `owner EP user RANGES`.
    OwnerUser {
        /// Endpoint.
        endpoint: Key,
        /// Half-open IOVA ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// `owner EP kernel`.
    OwnerKernel {
        /// Endpoint.
        endpoint: Key,
    },
    /// `release EP`.
    Release {
        /// Endpoint.
        endpoint: Key,
    },
}

fn endpoint(s: Option<&str>) -> Result<Key, MarkerError> {
    let s = s.unwrap_or("");
    parse_endpoint(s).ok_or_else(|| MarkerError::Endpoint(s.to_string()))
}

fn range(s: &str) -> Result<(u64, u64), MarkerError> {
    let bad = || MarkerError::Range(s.to_string());
    let inner = s.trim_start_matches('[').trim_end_matches(')');
    let (a, b) = if let Some((a, len)) = inner.split_once('+') {
        let a = parse_u64(a).ok_or_else(bad)?;
        (
            a,
            a.checked_add(parse_u64(len).ok_or_else(bad)?)
                .ok_or_else(bad)?,
        )
    } else {
        let (a, b) = inner
            .split_once(',')
            .or_else(|| inner.split_once('-'))
            .ok_or_else(bad)?;
        (
            parse_u64(a.trim()).ok_or_else(bad)?,
            parse_u64(b.trim()).ok_or_else(bad)?,
        )
    };
    if a < b { Ok((a, b)) } else { Err(bad()) }
}

/// Parses one marker line.
pub fn parse_marker(line: &str) -> Result<MarkerCmd, MarkerError> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("phase") => Ok(MarkerCmd::Phase),
        Some("release") => Ok(MarkerCmd::Release {
            endpoint: endpoint(words.next())?,
        }),
        Some("owner") => {
            let ep = endpoint(words.next())?;
            match words.next() {
                Some("kernel") => Ok(MarkerCmd::OwnerKernel { endpoint: ep }),
                Some("user") => {
                    let ranges = words.map(range).collect::<Result<Vec<_>, _>>()?;
                    Ok(MarkerCmd::OwnerUser {
                        endpoint: ep,
                        ranges,
                    })
                }
                _ => Err(MarkerError::Owner),
            }
        }
        _ => Ok(MarkerCmd::Note),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_devapi::Bdf;

    #[test]
    fn marker_lines_parse() {
        let ep = Key::Pci(Bdf::new(0, 5, 0).0);
        assert_eq!(
            parse_marker("phase vfio-claim 0000:00:05.0"),
            Ok(MarkerCmd::Phase)
        );
        assert_eq!(parse_marker("hello"), Ok(MarkerCmd::Note));
        assert_eq!(parse_marker(""), Ok(MarkerCmd::Note));
        assert_eq!(
            parse_marker("owner 0000:00:05.0 user [0x1000,0x3000) 0x8000-0x9000 0x10000+0x1000"),
            Ok(MarkerCmd::OwnerUser {
                endpoint: ep,
                ranges: vec![(0x1000, 0x3000), (0x8000, 0x9000), (0x10000, 0x11000)]
            })
        );
        assert_eq!(
            parse_marker("owner 00:05.0 kernel"),
            Ok(MarkerCmd::OwnerKernel { endpoint: ep })
        );
        assert_eq!(
            parse_marker("release pci:0000:00:05.0"),
            Ok(MarkerCmd::Release { endpoint: ep })
        );
        assert!(matches!(
            parse_marker("owner nope user"),
            Err(MarkerError::Endpoint(_))
        ));
        assert_eq!(parse_marker("owner 00:05.0"), Err(MarkerError::Owner));
        assert!(matches!(
            parse_marker("owner 00:05.0 user 0x3000-0x1000"),
            Err(MarkerError::Range(_))
        ));
        assert!(matches!(
            parse_marker("owner 00:05.0 user 0xffffffffffffffff+2"),
            Err(MarkerError::Range(_))
        ));
    }
}
