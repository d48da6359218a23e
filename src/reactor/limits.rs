//! Per-peer limits the reactor enforces before the application sees
//! anything: connections per source IP (`max_conn_per_ip`, checked at
//! accept) and WebSocket messages per second per connection
//! (`max_messages_per_second`, a token bucket checked before `on_message`).
//!
//! Both are per worker, like `max_conn`: the kernel spreads one IP's
//! connections over the `SO_REUSEPORT` slots, so the effective ceiling for
//! one address is up to `worker_num ×` the setting. 0 disables either.
//!
//! Answers: past `max_conn_per_ip` a new connection gets `HTTP 503` and is
//! closed before its request is read (same as `max_conn`); past
//! `max_messages_per_second` the message is dropped (never dispatched) and
//! the connection is closed with `1008 "rate limit"`.
//!
//! Costs: one `HashMap<IpAddr, u32>` entry per distinct peer address
//! (removed when its count drops to zero) and 16 bytes per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Live accepted connections per source address, for `max_conn_per_ip`.
#[derive(Debug, Default)]
pub struct IpCounter {
    counts: HashMap<IpAddr, u32>, // address → live connections
}

impl IpCounter {
    /// Counts one more connection from `ip` unless it already has `max`
    /// (0: no limit). Returns whether it was admitted (and counted). O(1).
    pub fn admit(&mut self, ip: IpAddr, max: usize) -> bool {
        let n = self.counts.entry(ip).or_insert(0);
        if max > 0 && *n as usize >= max {
            if *n == 0 {
                self.counts.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// Forgets one connection from `ip` (one that `admit` counted). O(1).
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.counts.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&ip);
            }
        }
    }

    /// Live connections counted for `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.counts.get(&ip).copied().unwrap_or(0)
    }

    /// Distinct addresses with live connections.
    pub fn addresses(&self) -> usize {
        self.counts.len()
    }
}

/// A token bucket: `rate` tokens per second, at most `rate` banked (so a
/// burst of one second's worth passes, then the steady rate).
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f32,   // available now
    last: Instant, // last refill
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: rate as f32,
            last: now,
        }
    }

    /// Takes one token at `now` if there is one. O(1).
    pub fn take(&mut self, rate: u32, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + dt * rate as f32).min(rate as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the limits know about one connection.
#[derive(Debug, Clone, Default)]
pub struct ConnLimits {
    /// Counted in the worker's [`IpCounter`] (release on teardown).
    pub ip_counted: bool,
    /// Accepted on the admin listener (`admin_listen`).
    pub admin: bool,
    /// Exempt from `max_messages_per_second` (a trusted peer that carries
    /// many users' traffic, such as an IM server's link to the Route).
    pub unlimited: bool,
    /// This connection's own idle limit in ms, in place of
    /// `heartbeat_idle_time` (0: the setting). Set by the application
    /// through [`crate::reactor::Server::set_idle_limit`], e.g. the Route's
    /// grace time for silent IM servers. (Here, beside the two flags, it
    /// fills padding: an idle connection costs no byte more.)
    pub idle_limit_ms: u32,
    /// Message budget (accepted WebSocket connections, when limited;
    /// boxed: off by default, and every idle connection pays for inline
    /// bytes).
    pub bucket: Option<Box<TokenBucket>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ip_counter_admits_up_to_max_and_releases() {
        let mut c = IpCounter::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(c.admit(a, 2) && c.admit(a, 2));
        assert!(!c.admit(a, 2));
        assert!(c.admit(b, 2));
        c.release(a);
        assert!(c.admit(a, 2));
        c.release(a);
        c.release(a);
        c.release(a); // extra releases are harmless
        assert_eq!(c.count(a), 0);
        assert_eq!(c.addresses(), 1);
        assert!((0..100).all(|_| c.admit(a, 0)), "0 disables");
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert_eq!((0..20).filter(|_| b.take(10, t0)).count(), 10);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| b.take(10, t1)).count(), 5);
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.take(10, t2)).count(), 10, "capped");
    }
}
