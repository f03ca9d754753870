//! Delays: fixed, uniform, exponential (capped), from 1 µs to [`MAX_DELAY`]; and the small
//! seeded PRNG every rule owns.

use std::fmt;
use std::time::Duration;

use crate::plan::PlanError;

/// The longest single delay a plan may ask for. The guest's soft-lockup and RCU-stall
/// watchdogs fire at about 20 s; longer stalls are refused rather than silently clamped.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Where a plan starts to risk the guest's soft-lockup (~20 s) and RCU-stall (~21 s)
/// watchdogs: a warning is given when one firing, or the sum over a plan, can reach this.
pub const WATCHDOG_BUDGET: Duration = Duration::from_secs(20);

/// How long one firing holds its point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delay {
    /// Always this long.
    Fixed(Duration),
    /// Uniform in `[lo, hi]`.
    Uniform(Duration, Duration),
    /// Exponential with this mean, cut at `max` (default 10 × mean, at most [`MAX_DELAY`]).
    Exp {
        /// Mean.
        mean: Duration,
        /// Cap.
        max: Duration,
    },
}

impl Delay {
    /// The longest delay one firing can have.
    pub fn max(&self) -> Duration {
        match *self {
            Delay::Fixed(d) => d,
            Delay::Uniform(_, hi) => hi,
            Delay::Exp { max, .. } => max,
        }
    }

    /// Draws one delay.
    pub fn sample(&self, rng: &mut Rng) -> Duration {
        match *self {
            Delay::Fixed(d) => d,
            Delay::Uniform(lo, hi) => {
                let span = (hi - lo).as_nanos() as f64;
                lo + Duration::from_nanos((rng.unit() * span) as u64)
            }
            Delay::Exp { mean, max } => {
                // Inverse CDF; 1 - u is in (0, 1], so ln is finite.
                let x = -(1.0 - rng.unit()).ln() * mean.as_nanos() as f64;
                Duration::from_nanos(x.min(max.as_nanos() as f64) as u64)
            }
        }
    }

    /// Parses `300ms`, `uniform(1ms..5ms)` (or `1ms..5ms`), `exp(5ms)`.
    pub fn parse(s: &str) -> Result<Delay, PlanError> {
        let s = s.trim();
        let bad = |why: &str| PlanError::BadDelay {
            value: s.into(),
            why: why.into(),
        };
        let inner = |prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(')'))
                .map(str::trim)
        };
        if let Some(body) = inner("exp(") {
            let mean = parse_duration(body).map_err(|e| bad(&e))?;
            let max = (mean * 10).min(MAX_DELAY);
            return Ok(Delay::Exp { mean, max });
        }
        let range = inner("uniform(").unwrap_or(s);
        if let Some((lo, hi)) = range.split_once("..") {
            let lo = parse_duration(lo).map_err(|e| bad(&e))?;
            let hi = parse_duration(hi).map_err(|e| bad(&e))?;
            if lo > hi {
                return Err(bad("uniform range has lo > hi"));
            }
            return Ok(Delay::Uniform(lo, hi));
        }
        if inner("uniform(").is_some() {
            return Err(bad("uniform needs lo..hi"));
        }
        parse_duration(s).map(Delay::Fixed).map_err(|e| bad(&e))
    }
}

impl fmt::Display for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delay::Fixed(d) => write!(f, "{d:?}"),
            Delay::Uniform(lo, hi) => write!(f, "uniform({lo:?}..{hi:?})"),
            Delay::Exp { mean, max } => write!(f, "exp({mean:?}, max {max:?})"),
        }
    }
}

/// Parses one duration with a unit: `us`/`µs`, `ms`, `s` (decimals allowed: `1.5ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit"))?;
    let (num, unit) = s.split_at(split);
    let scale = match unit.trim() {
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "" => return Err(format!("`{s}` has no unit")),
        u => return Err(format!("unknown unit `{u}`")),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{num}` is not a number"))?;
    let ns = v * scale;
    if !(1e3..=MAX_DELAY.as_nanos() as f64).contains(&ns) {
        return Err(format!("`{s}` is outside 1us..{}s", MAX_DELAY.as_secs()));
    }
    Ok(Duration::from_nanos(ns.round() as u64))
}

/// xorshift64* seeded through splitmix64: small, fast, and entirely ours, so a seed gives the
/// same sequence on every build.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for rule `stream` of a plan seeded with `seed`.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_forms() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("7µs"), Ok(Duration::from_micros(7)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("300").is_err());
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("500ns").is_err());
        assert!(parse_duration("61s").is_err());
        assert!(parse_duration("3h").is_err());
        let ms = Duration::from_millis;
        assert_eq!(Delay::parse("2ms"), Ok(Delay::Fixed(ms(2))));
        assert_eq!(
            Delay::parse("uniform(1ms..5ms)"),
            Ok(Delay::Uniform(ms(1), ms(5)))
        );
        assert_eq!(Delay::parse("1ms..5ms"), Ok(Delay::Uniform(ms(1), ms(5))));
        assert_eq!(
            Delay::parse("exp(5ms)"),
            Ok(Delay::Exp {
                mean: ms(5),
                max: ms(50)
            })
        );
        assert!(Delay::parse("uniform(5ms..1ms)").is_err());
        assert!(Delay::parse("uniform(5ms)").is_err());
        assert!(Delay::parse("exp()").is_err());
    }

    /// One line that says what is wrong and what would do, once each.
    #[test]
    fn bad_delay_messages_read_as_one_sentence() {
        let forms = "(forms: 300ms, 250us, 1.5s, uniform(1ms..5ms), exp(5ms); units us, ms, s; \
                     1us to 60s)";
        let msg = |s: &str| Delay::parse(s).unwrap_err().to_string();
        assert_eq!(
            msg("1banana"),
            format!("bad delay `1banana`: unknown unit `banana` {forms}")
        );
        assert_eq!(
            msg("300"),
            format!("bad delay `300`: `300` has no unit {forms}")
        );
        assert_eq!(
            msg("90s"),
            format!("bad delay `90s`: `90s` is outside 1us..60s {forms}")
        );
        assert_eq!(
            msg("uniform(5ms..1ms)"),
            format!("bad delay `uniform(5ms..1ms)`: uniform range has lo > hi {forms}")
        );
        assert!(!msg("1banana").contains("expected unknown"));
    }

    #[test]
    fn samples_stay_in_bounds_and_repeat_per_seed() {
        let ms = Duration::from_millis;
        let u = Delay::Uniform(ms(1), ms(5));
        let e = Delay::parse("exp(2ms)").unwrap();
        let (mut a, mut b) = (Rng::new(7, 0), Rng::new(7, 0));
        let mut sum = Duration::ZERO;
        for _ in 0..2000 {
            let x = u.sample(&mut a);
            assert!((ms(1)..=ms(5)).contains(&x));
            assert_eq!(x, u.sample(&mut b));
            let y = e.sample(&mut a);
            assert!(y <= ms(20));
            assert_eq!(y, e.sample(&mut b));
            sum += y;
        }
        // The mean of the capped exponential is close to 2 ms.
        let mean = sum / 2000;
        assert!((ms(1)..ms(3)).contains(&mean), "{mean:?}");
        assert_ne!(Rng::new(7, 0).next_u64(), Rng::new(8, 0).next_u64());
        assert_ne!(Rng::new(7, 0).next_u64(), Rng::new(7, 1).next_u64());
    }
}
