//! [`Backoff`]: the one retry delay of the code base. It starts at a
//! minimum, doubles on every failure up to a maximum, and returns to the
//! minimum on success; optional jitter spreads a fleet's retries so they
//! do not arrive in step.

use std::time::Duration;

/// An exponential retry delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,     // first delay
    max: Duration,     // ceiling
    current: Duration, // delay the next failure gets
    jitter: bool,      // spread each delay over [d/2, d]
}

impl Backoff {
    /// A backoff from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            current: min,
            jitter: false,
        }
    }

    /// The same with each delay drawn from `[d/2, d]`.
    pub fn with_jitter(mut self) -> Backoff {
        self.jitter = true;
        self
    }

    /// The delay for this failure; the next one doubles (up to the maximum).
    pub fn next(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        if self.jitter {
            let half = d / 2;
            let spread = half.as_nanos() as u64;
            let r = if spread == 0 {
                0
            } else {
                cheap_random() % spread
            };
            half + Duration::from_nanos(r)
        } else {
            d
        }
    }

    /// The delay the next failure would get, without counting one.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// After a success: back to the minimum.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// A cheap, non-cryptographic random number (jitter only).
fn cheap_random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_ceiling_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        assert_eq!(b.next(), ms(100));
        assert_eq!(b.next(), ms(200));
        assert_eq!(b.next(), ms(400));
        assert_eq!(b.next(), ms(500));
        assert_eq!(b.next(), ms(500));
        b.reset();
        assert_eq!(b.peek(), ms(100));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(100)).with_jitter();
        for _ in 0..100 {
            let d = b.next();
            assert!(d >= ms(50) && d <= ms(100), "{d:?}");
        }
    }
}
