//! One Redis server a worker talks to: its command connection
//! ([`Commands`]) and its subscriber connection ([`Subscriber`]), with
//! the connect, timeout, probe and read/write handling of both. One
//! server has one node; a Sentinel's master is one node at a time; a
//! cluster has one node per master, created from the slot map (one
//! connection per node, not per channel).

use std::time::Instant;

use mio::{Registry, Token};

use super::client::{Commands, Follow};
use super::link::{Link, LinkState, ReadOutcome};
use super::pubsub::{self, Subscriber};
use super::request::Request;
use super::target::Addr;
use crate::reactor::resolve::Resolver;

/// The first token of the Redis range; token `FIRST + 1 + 2i` is node
/// `i`'s command link, `FIRST + 2 + 2i` its subscriber, `FIRST` the
/// Sentinel link.
pub const FIRST_TOKEN: usize = usize::MAX - (1 << 14);
/// Nodes a client may hold at once (tokens in the range).
pub const MAX_NODES: usize = (1 << 13) - 16;

/// Node `i`'s tokens.
pub fn tokens(i: usize) -> (Token, Token) {
    (
        Token(FIRST_TOKEN + 1 + 2 * i),
        Token(FIRST_TOKEN + 2 + 2 * i),
    )
}

/// What happened to a node's links, for the client's logs and topology.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// The command link is connected.
    Up,
    /// The command link broke (why).
    Down(String),
    /// A subscriber link broke or its probe failed (why).
    SubDown(String),
}

/// One server's two connections.
pub struct Node<A, S> {
    /// `host:port` as the topology names it.
    pub addr: Addr,
    /// Requests and callbacks.
    pub cmd: Commands<A, S>,
    /// Channels and the probe.
    pub sub: Subscriber,
    probe_seq: u64,         // probe payload counter
    sharded: bool,          // SPUBLISH probes
    pub(crate) probe: bool, // a probe is due on the command link
    pub(crate) fresh: bool, // never dialled: requests wait for the first dial
}

impl<A, S> std::fmt::Debug for Node<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("addr", &self.addr)
            .field("cmd", &self.cmd)
            .field("sub", &self.sub)
            .finish()
    }
}

/// How a node is built.
#[derive(Clone)]
pub struct Spec {
    /// What its command link sends first.
    pub hello: Vec<redis::Cmd>,
    /// `redis_timeout`.
    pub timeout: std::time::Duration,
    /// Which redirections it follows.
    pub follow: Follow,
    /// Sharded pub/sub.
    pub sharded: bool,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field("hello", &self.hello.len())
            .field("follow", &self.follow)
            .finish()
    }
}

impl<A, S> Node<A, S> {
    /// Node `i` at `addr`, probing on `probe_channel`.
    pub fn new(i: usize, addr: Addr, spec: &Spec, probe_channel: Vec<u8>) -> Node<A, S> {
        let (t_cmd, t_sub) = tokens(i);
        let resolver = Resolver::new(&addr.0, addr.1);
        Node {
            cmd: Commands::new(
                Link::new("redis", t_cmd, resolver.clone()),
                spec.hello.clone(),
                spec.timeout,
                spec.follow,
            ),
            sub: Subscriber::new(
                Link::new("redis pub/sub", t_sub, resolver),
                probe_channel,
                spec.sharded,
            ),
            addr,
            probe_seq: 0,
            sharded: spec.sharded,
            probe: false,
            fresh: true,
        }
    }

    /// `host:port`, for logs and maps.
    pub fn name(&self) -> String {
        format!("{}:{}", self.addr.0, self.addr.1)
    }

    /// Takes both links down (the node left the topology, or its
    /// subscriber must start over).
    pub fn break_links(&mut self, why: &str, now: Instant) {
        self.cmd.link.fail(now);
        self.cmd.on_broken(why, false);
        self.sub.link.fail(now);
    }

    fn cmd_broken(&mut self, why: String, timed_out: bool, now: Instant, notes: &mut Vec<Note>) {
        self.cmd.link.fail(now);
        self.cmd.on_broken(&why, timed_out);
        notes.push(Note::Down(why));
    }

    /// Periodic work: dial what is down, break what is overdue, probe.
    /// Returns whether a dial started on the command link.
    pub fn tick(&mut self, registry: &Registry, now: Instant, notes: &mut Vec<Note>) -> bool {
        let mut dialled = false;
        if self.cmd.link.connect_overdue(now) {
            let why = format!("connect to {} timed out", self.name());
            self.cmd_broken(why, false, now, notes);
        }
        if self.cmd.overdue(now) {
            let why = format!("no reply within redis_timeout from {}", self.name());
            self.cmd_broken(why, true, now, notes);
        }
        match self.cmd.link.dial_if_due(registry, now) {
            Ok(true) => {
                self.cmd.on_dial();
                self.fresh = false;
                dialled = true;
            }
            Ok(false) => {}
            Err(e) => {
                self.fresh = false;
                notes.push(Note::Down(e));
            }
        }
        if self.sub.wanted() {
            if self.sub.link.connect_overdue(now) {
                self.sub.link.fail(now);
            }
            match self.sub.link.dial_if_due(registry, now) {
                Ok(true) => self.sub.on_dial(),
                Ok(false) => {}
                Err(e) => log::debug!("{e}"),
            }
            match self.sub.check(now) {
                Some(true) => self.probe = true,
                Some(false) => {
                    notes.push(Note::SubDown(format!(
                        "redis pub/sub to {}: a probe did not come back within {:?}; reconnecting and resubscribing",
                        self.name(),
                        pubsub::PROBE_TIMEOUT
                    )));
                    self.sub.link.fail(now);
                    self.sub.health = pubsub::Health::Unverified { probe_sent: None };
                }
                None => {}
            }
        } else if !matches!(self.sub.link.state, LinkState::Down { .. }) {
            self.sub.link.fail(now); // nothing left to listen to here
        }
        if self.probe && self.cmd.link.is_up() {
            self.probe = false;
            self.probe_seq += 1;
            let verb = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
            let mut c = redis::cmd(verb);
            c.arg(self.sub.probe_channel()).arg(self.probe_seq);
            self.cmd.submit(Request::Cmd(c), None, false);
        }
        dialled
    }

    /// A readiness event on the command link.
    pub fn on_cmd_event(&mut self, registry: &Registry, notes: &mut Vec<Note>) {
        let now = Instant::now();
        if matches!(self.cmd.link.state, LinkState::Connecting { .. }) {
            match self.cmd.link.finish_connect() {
                Ok(true) => {
                    notes.push(Note::Up);
                }
                Ok(false) => return,
                Err(e) => {
                    return self.cmd_broken(format!("{e} ({})", self.name()), false, now, notes)
                }
            }
        }
        let cmd = &mut self.cmd;
        let mut replies = Vec::new();
        let outcome = cmd.link.read_replies(|v| replies.push(v));
        for v in replies {
            cmd.on_reply(v);
        }
        if let ReadOutcome::Broken(why) = outcome {
            return self.cmd_broken(why, false, now, notes);
        }
        if let Err(e) = self.cmd.link.flush(registry) {
            self.cmd_broken(e, false, now, notes);
        }
    }

    /// A readiness event on the subscriber link.
    pub fn on_sub_event(&mut self, registry: &Registry, notes: &mut Vec<Note>) {
        let now = Instant::now();
        if matches!(self.sub.link.state, LinkState::Connecting { .. }) {
            match self.sub.link.finish_connect() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::debug!("{e} ({})", self.name());
                    return self.sub.link.fail(now);
                }
            }
        }
        let sub = &mut self.sub;
        let mut replies = Vec::new();
        let outcome = sub.link.read_replies(|v| replies.push(v));
        for v in replies {
            sub.on_reply(v, now);
        }
        if let ReadOutcome::Broken(why) = outcome {
            notes.push(Note::SubDown(format!("{why}; resubscribing")));
            self.sub.link.fail(now);
            return;
        }
        if let Err(e) = self.sub.link.flush(registry) {
            notes.push(Note::SubDown(format!("{e}; resubscribing")));
            self.sub.link.fail(now);
        }
    }

    /// Writes what was queued this iteration (one write per link).
    pub fn flush(&mut self, registry: &Registry, notes: &mut Vec<Note>) {
        if self.cmd.link.pending_out() > 0 {
            if let Err(e) = self.cmd.link.flush(registry) {
                self.cmd_broken(e, false, Instant::now(), notes);
            }
        }
        if self.sub.link.pending_out() > 0 {
            if let Err(e) = self.sub.link.flush(registry) {
                notes.push(Note::SubDown(format!("{e}; resubscribing")));
                self.sub.link.fail(Instant::now());
            }
        }
    }
}
