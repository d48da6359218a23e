//! The subscriber side of a worker's Redis client: a connection in
//! subscribe mode per node that holds subscribed channels, the set of
//! channels it listens to (the client keeps their handlers, apart from the
//! command FIFO, as in hiredis), and a self-probe that proves the link
//! delivers. On a cluster it speaks sharded pub/sub (`SSUBSCRIBE`, one
//! command per channel since each names a slot; messages arrive as
//! `smessage`) and its probe channel hashes to a slot of its own node.
//!
//! A quiet subscriber publishes a probe to a channel only it listens to;
//! if the probe does not come back within [`PROBE_TIMEOUT`] the link is
//! declared dead, reconnected and resubscribed, and logged. Until a probe
//! has come back on the current connection the link is *unverified*, and
//! the application's `/ready` says so: "health green, nothing delivered"
//! cannot happen.

use std::collections::HashSet;
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

/// A subscriber connection.
#[derive(Debug)]
pub struct Subscriber {
    pub(crate) link: Link,                     // the socket
    channels: HashSet<Vec<u8>>,                // what it listens to
    sharded: bool,                             // SSUBSCRIBE (a cluster)
    probe_channel: Vec<u8>,                    // ours alone
    pub(crate) health: Health,                 // see Health
    pub(crate) ready: Vec<(Vec<u8>, Vec<u8>)>, // (channel, payload) to dispatch
    pub(crate) lost: Vec<Vec<u8>>,             // channels the server dropped (slot moved)
    pub(crate) probes_failed: u64,             // times a probe did not return
    pub(crate) generation: u64, // connections so far (messages may be missed between two)
}

impl Subscriber {
    /// A subscriber over `link`; `probe_channel` must be unique to it.
    pub fn new(link: Link, probe_channel: Vec<u8>, sharded: bool) -> Subscriber {
        Subscriber {
            link,
            channels: HashSet::new(),
            sharded,
            probe_channel,
            health: Health::Unverified { probe_sent: None },
            ready: Vec::new(),
            lost: Vec::new(),
            probes_failed: 0,
            generation: 0,
        }
    }

    /// Whether it listens to anything (else its link need not be up).
    pub fn wanted(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Whether it listens to `channel`.
    pub fn has(&self, channel: &[u8]) -> bool {
        self.channels.contains(channel)
    }

    /// The channels it listens to.
    pub fn channels(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.channels.iter()
    }

    fn command(&self, verb: &str, channel: &[u8]) -> redis::Cmd {
        let mut c = redis::cmd(&if self.sharded {
            format!("S{verb}")
        } else {
            verb.to_string()
        });
        c.arg(channel);
        c
    }

    /// Forgets `channel` without telling the server (the server dropped it).
    pub fn forget(&mut self, channel: &[u8]) {
        self.channels.remove(channel);
    }

    /// A new probe channel (its slot moved to another node); the link
    /// starts over to subscribe to it.
    pub fn set_probe_channel(&mut self, channel: Vec<u8>, now: Instant) {
        if channel != self.probe_channel {
            self.probe_channel = channel;
            self.link.fail(now);
        }
    }

    /// Stops listening to `channel` (it moved to another node).
    pub fn unsubscribe(&mut self, channel: &[u8]) {
        if self.channels.remove(channel) && self.link.is_up() {
            self.command("UNSUBSCRIBE", channel)
                .write_packed_command(self.link.queue());
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

    /// Listens to `channel`: now if connected (otherwise on connect).
    pub fn subscribe(&mut self, channel: Vec<u8>) {
        if !self.channels.insert(channel.clone()) {
            return;
        }
        if self.link.is_up() || matches!(self.link.state, super::link::LinkState::Connecting { .. })
        {
            self.command("SUBSCRIBE", &channel)
                .write_packed_command(self.link.queue());
        }
    }

    /// A connect has started: subscribe to everything, probe channel first
    /// (one command per channel when sharded: each names its own slot).
    pub fn on_dial(&mut self) {
        self.generation += 1;
        self.health = Health::Unverified { probe_sent: None };
        if self.sharded {
            let mut out = Vec::new();
            self.command("SUBSCRIBE", &self.probe_channel)
                .write_packed_command(&mut out);
            for ch in &self.channels {
                self.command("SUBSCRIBE", ch).write_packed_command(&mut out);
            }
            self.link.queue().extend_from_slice(&out);
        } else {
            let mut c = redis::cmd("SUBSCRIBE");
            c.arg(self.probe_channel.as_slice());
            for ch in &self.channels {
                c.arg(ch.as_slice());
            }
            c.write_packed_command(self.link.queue());
        }
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
        if kind == b"sunsubscribe" {
            // The server dropped a shard channel (its slot moved away); a
            // confirmation of our own SUNSUBSCRIBE names a channel we no
            // longer hold.
            if let Some(Value::BulkString(ch)) = it.next() {
                if self.channels.contains(&ch) {
                    self.lost.push(ch);
                }
            }
            return;
        }
        if kind != b"message" && kind != b"smessage" {
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
