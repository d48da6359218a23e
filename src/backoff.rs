//! Exponential backoff: the one retry-delay policy of the crate.
//!
//! This module owns [`Backoff`], a delay that starts at `min`, doubles on
//! every [`Backoff::next`] up to `max`, and goes back to `min` on
//! [`Backoff::reset`] (after a success). With [`Backoff::with_jitter`] each
//! delay handed out is scaled by a random factor in [50 %, 100 %], so peers
//! that failed together (every IM server when the Route restarts) do not
//! retry together.
//!
//! ```
//! use std::time::Duration;
//! use swocloud::backoff::Backoff;
//!
//! let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
//! let delays: Vec<u64> = (0..6).map(|_| b.next().as_millis() as u64).collect();
//! assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
//! b.reset();
//! assert_eq!(b.next(), Duration::from_millis(100));
//! ```
//!
//! It is plain data (no clock, no sleeping): the caller decides whether the
//! delay is slept, armed on a timer wheel, or stored as a deadline.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// A doubling delay between `min` and `max`, optionally jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,     // first delay, and the delay after a reset
    max: Duration,     // cap of the doubling
    current: Duration, // the delay the next `next()` hands out (before jitter)
    jitter: bool,      // scale each delay by [0.5, 1.0]
    rng: u64,          // xorshift64 state; 0 until first used
}

impl Backoff {
    /// A backoff whose first delay is `min`, doubling up to `max` (a `max`
    /// below `min` is raised to `min`).
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        let max = if max.as_nanos() < min.as_nanos() {
            min
        } else {
            max
        };
        Backoff {
            min,
            max,
            current: min,
            jitter: false,
            rng: 0,
        }
    }

    /// The same backoff with each delay scaled by a random factor in
    /// [0.5, 1.0] ("equal jitter").
    pub const fn with_jitter(mut self) -> Backoff {
        self.jitter = true;
        self
    }

    /// The delay to wait now; the following one doubles (capped at `max`).
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        if self.jitter {
            base.mul_f64(self.factor())
        } else {
            base
        }
    }

    /// The delay [`next`](Self::next) will hand out (before jitter),
    /// without advancing.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// Back to `min`: call it after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The first delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// A factor in [0.5, 1.0) from a xorshift64 seeded by std's random
    /// hasher keys (different in every process).
    fn factor(&mut self) -> f64 {
        if self.rng == 0 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            self.rng = h.finish() | 1;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        0.5 + (self.rng % 1000) as f64 / 2000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_min_to_max_and_resets() {
        let mut b = Backoff::new(100 * MS, 5000 * MS);
        let got: Vec<Duration> = (0..9).map(|_| b.next()).collect();
        let want: Vec<Duration> = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
            .iter()
            .map(|&n| n * MS)
            .collect();
        assert_eq!(got, want);
        assert_eq!(b.peek(), 5000 * MS);
        b.reset();
        assert_eq!(b.peek(), 100 * MS);
        assert_eq!(b.next(), 100 * MS);
        assert_eq!((b.min(), b.max()), (100 * MS, 5000 * MS));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::MAX / 4, Duration::MAX);
        for _ in 0..10 {
            assert!(b.next() <= Duration::MAX);
        }
        assert_eq!(b.peek(), Duration::MAX);
    }

    #[test]
    fn a_max_below_min_is_min() {
        let mut b = Backoff::new(200 * MS, 100 * MS);
        assert_eq!((b.next(), b.next()), (200 * MS, 200 * MS));
    }

    #[test]
    fn jitter_stays_within_half_to_full_and_varies() {
        let mut b = Backoff::new(100 * MS, 5000 * MS).with_jitter();
        let mut plain = Backoff::new(100 * MS, 5000 * MS);
        let mut factors = Vec::new();
        for _ in 0..40 {
            let base = plain.next();
            let d = b.next();
            assert!(d >= base / 2 && d <= base, "{d:?} of {base:?}");
            factors.push(d.as_secs_f64() / base.as_secs_f64());
        }
        factors.dedup();
        assert!(factors.len() > 1, "jitter varies: {factors:?}");
    }
}
