//! The link to a Redis Sentinel that tells a worker where its master is.
//!
//! On each connect it asks `SENTINEL get-master-addr-by-name <name>` and,
//! on the same connection, subscribes to `+switch-master`, so a failover
//! is heard the moment the Sentinels decide it. A silent Sentinel is
//! pinged every [`PING_EVERY`]; one that does not answer within
//! [`PING_TIMEOUT`], or that closes, is left for the next in the list.
//! The client also starts over on purpose ([`SentinelLink::rediscover`])
//! when its master's link breaks or the master answers `ROLE` as a
//! replica: the answer to the question is then fresh, whether or not the
//! switch message was missed.

use std::time::{Duration, Instant};

use mio::{Registry, Token};
use redis::Value;

use super::link::{Link, LinkState, ReadOutcome};
use super::target::Addr;
use crate::reactor::resolve::Resolver;

/// A quiet Sentinel is pinged this often.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// A ping unanswered this long: try the next Sentinel.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Deliberate re-queries are at most this frequent.
const REDISCOVER_MIN: Duration = Duration::from_millis(300);

/// The Sentinel connection.
#[derive(Debug)]
pub struct SentinelLink {
    link: Link,                 // the current Sentinel
    token: Token,               // its token
    sentinels: Vec<Addr>,       // all of them
    next: usize,                // the next to try
    master: String,             // the master's name
    heard: Instant,             // last reply
    ping_sent: Option<Instant>, // an unanswered ping
    last_rediscover: Option<Instant>,
    pub(crate) found: Vec<Addr>, // master addresses heard, for the client
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl SentinelLink {
    /// A link over `sentinels` watching master `master`.
    pub fn new(token: Token, sentinels: Vec<Addr>, master: String) -> SentinelLink {
        let first = sentinels
            .first()
            .cloned()
            .unwrap_or(("127.0.0.1".into(), 26379));
        SentinelLink {
            link: Link::new("redis sentinel", token, Resolver::new(&first.0, first.1)),
            token,
            sentinels,
            next: 1,
            master,
            heard: Instant::now(),
            ping_sent: None,
            last_rediscover: None,
            found: Vec::new(),
        }
    }

    /// The Sentinel being talked to (for logs).
    pub fn target(&self) -> String {
        self.link.target()
    }

    fn leave(&mut self, why: &str, now: Instant) {
        log::warn!(
            "redis sentinel {}: {why}; trying the next one",
            self.link.target()
        );
        self.rotate(now);
    }

    fn rotate(&mut self, now: Instant) {
        self.link.fail(now);
        if self.sentinels.len() > 1 {
            let s = &self.sentinels[self.next % self.sentinels.len()];
            self.next = self.next.wrapping_add(1);
            self.link = Link::new("redis sentinel", self.token, Resolver::new(&s.0, s.1));
            // A fresh link dials at once; the backoff of the old one is
            // for the old address.
        }
        self.ping_sent = None;
    }

    /// Asks again now (rate-limited): the master's link broke, or it is
    /// not a master any more.
    pub fn rediscover(&mut self, now: Instant) {
        if self
            .last_rediscover
            .is_some_and(|t| now.duration_since(t) < REDISCOVER_MIN)
        {
            return;
        }
        self.last_rediscover = Some(now);
        self.rotate(now);
    }

    /// Periodic work: dial, ping, give up on a silent Sentinel.
    pub fn tick(&mut self, registry: &Registry, now: Instant) {
        if self.link.connect_overdue(now) {
            return self.leave("connect timed out", now);
        }
        match self.link.dial_if_due(registry, now) {
            Ok(true) => {
                let mut q = redis::cmd("SENTINEL");
                q.arg("get-master-addr-by-name").arg(&self.master);
                q.write_packed_command(self.link.queue());
                let mut s = redis::cmd("SUBSCRIBE");
                s.arg("+switch-master");
                s.write_packed_command(self.link.queue());
                self.heard = now;
                self.ping_sent = None;
            }
            Ok(false) => {}
            Err(e) => {
                log::debug!("{e}");
                self.rotate(now);
                return;
            }
        }
        if !self.link.is_up() {
            return;
        }
        match self.ping_sent {
            Some(t) if now.duration_since(t) > PING_TIMEOUT => {
                self.leave("no answer to a ping", now)
            }
            None if now.duration_since(self.heard) > PING_EVERY => {
                redis::cmd("PING").write_packed_command(self.link.queue());
                self.ping_sent = Some(now);
                self.flush(registry, now);
            }
            _ => {}
        }
    }

    /// A readiness event on the link.
    pub fn on_event(&mut self, registry: &Registry) {
        let now = Instant::now();
        if matches!(self.link.state, LinkState::Connecting { .. }) {
            match self.link.finish_connect() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return self.leave(&e, now),
            }
        }
        let mut replies = Vec::new();
        let outcome = self.link.read_replies(|v| replies.push(v));
        for v in replies {
            self.on_reply(v, now);
        }
        if let ReadOutcome::Broken(why) = outcome {
            return self.leave(&why, now);
        }
        self.flush(registry, now);
    }

    /// Writes what is queued.
    pub fn flush(&mut self, registry: &Registry, now: Instant) {
        if self.link.pending_out() > 0 {
            if let Err(e) = self.link.flush(registry) {
                self.leave(&e, now);
            }
        }
    }

    fn on_reply(&mut self, v: Value, now: Instant) {
        self.heard = now;
        let parts = match v {
            Value::Array(a) => a,
            Value::Push { data, .. } => data,
            Value::Nil => {
                log::warn!(
                    "redis sentinel {}: no master named {:?} (yet)",
                    self.link.target(),
                    self.master
                );
                return;
            }
            Value::ServerError(e) => {
                log::warn!("redis sentinel {}: {e:?}", self.link.target());
                return;
            }
            _ => return,
        };
        match parts.first().and_then(text).as_deref() {
            Some("pong") => self.ping_sent = None,
            Some("message") => {
                // "+switch-master" "<name> <old ip> <old port> <new ip> <new port>"
                let Some(body) = parts.get(2).and_then(text) else {
                    return;
                };
                let f: Vec<&str> = body.split_whitespace().collect();
                if let [name, _, _, ip, port] = f[..] {
                    if name == self.master {
                        if let Ok(port) = port.parse() {
                            log::info!(
                                "redis sentinel {}: +switch-master {name}: now {ip}:{port}",
                                self.link.target()
                            );
                            self.found.push((ip.to_string(), port));
                        }
                    }
                }
            }
            Some("subscribe") => {}
            Some(ip) if parts.len() == 2 => {
                // The answer to get-master-addr-by-name: [ip, port].
                if let Some(port) = parts.get(1).and_then(text).and_then(|p| p.parse().ok()) {
                    self.found.push((ip.to_string(), port));
                }
            }
            _ => {}
        }
    }
}
