//! The subscriber side of a worker's Redis client: its own connection in
//! subscribe mode, a table of channel handlers (apart from the command
//! FIFO, as in hiredis), and a self-probe that proves the link delivers.
//!
//! A quiet subscriber publishes a probe to a channel only it listens to;
//! if the probe does not come back within [`PROBE_TIMEOUT`] the link is
//! declared dead, reconnected and resubscribed, and logged. Until a probe
//! has come back on the current connection the link is *unverified*, and
//! the application's `/ready` says so: "health green, nothing delivered"
//! cannot happen.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::Value;

use super::link::Link;

/// A quiet link sends a probe after this long.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A probe that has not come back after this long means the link is dead.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A channel's handler: gets each message's payload.
pub type Handler<A, S> = Box<dyn FnMut(&mut A, &mut S, &[u8])>;

/// Whether the link is known to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not connected, or connected and no probe has come back yet.
    Unverified {
        /// When the first probe on this connection went out.
        probe_sent: Option<Instant>,
    },
    /// A probe or a message came back.
    Verified {
        /// When the link last delivered something.
        last_heard: Instant,
    },
    /// Verified before; a probe is out.
    Probing {
        /// When it went out.
        sent: Instant,
    },
}

/// The subscriber connection.
pub struct Subscriber<A, S> {
    pub(crate) link: Link,                     // the socket
    handlers: HashMap<Vec<u8>, Handler<A, S>>, // channel → handler
    probe_channel: Vec<u8>,                    // ours alone
    pub(crate) health: Health,                 // see Health
    pub(crate) ready: Vec<(Vec<u8>, Vec<u8>)>, // (channel, payload) to dispatch
    pub(crate) probes_failed: u64,             // times a probe did not return
    pub(crate) generation: u64, // connections so far (messages may be missed between two)
}

impl<A, S> Subscriber<A, S> {
    /// A subscriber over `link`; `probe_channel` must be unique to it.
    pub fn new(link: Link, probe_channel: String) -> Subscriber<A, S> {
        Subscriber {
            link,
            handlers: HashMap::new(),
            probe_channel: probe_channel.into_bytes(),
            health: Health::Unverified { probe_sent: None },
            ready: Vec::new(),
            probes_failed: 0,
            generation: 0,
        }
    }

    /// The channel probes go to.
    pub fn probe_channel(&self) -> &[u8] {
        &self.probe_channel
    }

    /// Whether a probe has come back on this connection.
    pub fn verified(&self) -> bool {
        !matches!(self.health, Health::Unverified { .. })
    }

    /// Adds (or replaces) the handler of `channel` and subscribes now if
    /// connected (otherwise on connect).
    pub fn subscribe(&mut self, channel: Vec<u8>, h: Handler<A, S>) {
        if self.link.is_up() || matches!(self.link.state, super::link::LinkState::Connecting { .. })
        {
            let mut c = redis::cmd("SUBSCRIBE");
            c.arg(channel.as_slice());
            c.write_packed_command(self.link.queue());
        }
        self.handlers.insert(channel, h);
    }

    /// A connect has started: subscribe to everything, probe channel first.
    pub fn on_dial(&mut self) {
        self.generation += 1;
        self.health = Health::Unverified { probe_sent: None };
        let mut c = redis::cmd("SUBSCRIBE");
        c.arg(self.probe_channel.as_slice());
        for ch in self.handlers.keys() {
            c.arg(ch.as_slice());
        }
        c.write_packed_command(self.link.queue());
    }

    /// Takes a channel's handler out (to call it), or `None`.
    pub fn take(&mut self, channel: &[u8]) -> Option<Handler<A, S>> {
        self.handlers.remove(channel)
    }

    /// Puts a handler back after its call, unless it was replaced meanwhile.
    pub fn put_back(&mut self, channel: Vec<u8>, h: Handler<A, S>) {
        self.handlers.entry(channel).or_insert(h);
    }

    /// One push from the server.
    pub fn on_reply(&mut self, v: Value, now: Instant) {
        let parts = match v {
            Value::Array(a) => a,
            Value::Push { data, .. } => data,
            other => {
                log::debug!("redis pub/sub: unexpected reply {other:?}");
                return;
            }
        };
        let mut it = parts.into_iter();
        let kind = match it.next() {
            Some(Value::BulkString(k)) => k,
            Some(Value::SimpleString(k)) => k.into_bytes(),
            _ => return,
        };
        if kind != b"message" {
            return; // subscribe confirmations and the like
        }
        let (Some(Value::BulkString(ch)), Some(Value::BulkString(payload))) =
            (it.next(), it.next())
        else {
            return;
        };
        self.health = Health::Verified { last_heard: now };
        if ch == self.probe_channel {
            return;
        }
        self.ready.push((ch, payload));
    }

    /// What the periodic check wants: `Some(true)` to send a probe now,
    /// `Some(false)` when the probe is overdue (reconnect), `None` nothing.
    pub fn check(&mut self, now: Instant) -> Option<bool> {
        if !self.link.is_up() {
            return None;
        }
        match self.health {
            Health::Unverified { probe_sent: None } => {
                self.health = Health::Unverified {
                    probe_sent: Some(now),
                };
                Some(true)
            }
            Health::Unverified {
                probe_sent: Some(t),
            }
            | Health::Probing { sent: t } => {
                if now.duration_since(t) > PROBE_TIMEOUT {
                    self.probes_failed += 1;
                    Some(false)
                } else {
                    None
                }
            }
            Health::Verified { last_heard } if now.duration_since(last_heard) > PROBE_EVERY => {
                self.health = Health::Probing { sent: now };
                Some(true)
            }
            Health::Verified { .. } => None,
        }
    }
}

impl<A, S> std::fmt::Debug for Subscriber<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("link", &self.link)
            .field("channels", &self.handlers.len())
            .field("health", &self.health)
            .finish()
    }
}
