//! The worker's Redis client: non-blocking, pipelined, driven by the
//! worker's own mio loop, in the style of hiredis's async API on Redis's
//! `ae` loop. Nothing on a worker's loop ever waits for Redis.
//!
//! - [`Request`]s (commands, pipelines, transactions, [`Script`] calls)
//!   are packed by the `redis` crate into one output buffer per node and
//!   written once per loop iteration; replies are framed by [`resp`] and
//!   parsed by the `redis` crate's RESP parser, then matched in order to
//!   their callbacks ([`client`]).
//! - Each server is a [`node::Node`]: a command connection and a
//!   subscriber connection (pub/sub handlers, a self-probe, [`pubsub`]),
//!   each a [`link::Link`] (non-blocking connect, write interest only
//!   while output is pending, reconnect with backoff).
//! - Three ways to reach Redis ([`target`]), the same code paths above:
//!   one server; the master behind Sentinels ([`sentinel`]: discovered,
//!   followed on `+switch-master`, checked with `ROLE`); a Redis Cluster
//!   ([`cluster`]: a slot map, `MOVED`/`ASK`/`TRYAGAIN` followed, one
//!   connection per node, sharded pub/sub, pipelines split by slot).
//!   The routing lives in [`route`].
//!
//! Why on the loop and not on an I/O thread: the loop already multiplexes
//! hundreds of sockets; a few more cost one `epoll` registration each, no
//! context switch per reply, no lock, and a callback runs with the
//! application's state in hand (`|app, srv, reply|`) exactly like every
//! other hook. A thread would add a mailbox hop to every reply and a
//! second place where ordering could break.
//!
//! Applications use it through [`crate::reactor::Server`]: `redis`,
//! `redis_send`, `redis_durable`, `redis_subscribe`, `redis_ok`,
//! `redis_ready`, `redis_cluster`.

pub mod client;
pub mod cluster;
pub mod link;
pub mod node;
pub mod pubsub;
pub mod request;
pub mod resp;
mod route;
pub mod sentinel;
pub mod slot;
pub mod target;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::Registry;

pub use client::Reply;
pub use request::{Request, Script, ScriptCall};
pub use slot::slot_of;

use crate::process::scoreboard::Row;
use client::{Callback, Counts, Follow};
use cluster::SlotMap;
use node::{Node, Note, Spec};
use sentinel::SentinelLink;
use target::{Plan, Target};

/// How often the client checks timeouts, reconnects and probes.
pub const TICK: Duration = Duration::from_millis(100);

/// Default `redis_timeout`: a request unanswered this long breaks the
/// link (every pending callback fires with an error, and it reconnects).
/// Far above a healthy Redis's latency, below any user's patience.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Callbacks with their replies, and pub/sub messages `(channel, payload)`.
pub type Completions<A, S> = (Vec<(Callback<A, S>, Reply)>, Vec<(Vec<u8>, Vec<u8>)>);

/// How the client finds its nodes.
#[derive(Debug)]
enum Topo {
    /// One server: node 0.
    Single,
    /// The master the Sentinels name (none while unknown).
    Sentinel {
        link: Box<SentinelLink>,
        master: Option<usize>,
    },
    /// A cluster's masters, by slot.
    Cluster(SlotMap),
}

/// How long after a `TRYAGAIN` (or `CLUSTERDOWN`, `MASTERDOWN`,
/// `READONLY`) answer the client reports itself not ready.
pub const SETTLING: Duration = Duration::from_millis(500);

/// A request that no node can take yet (no master known, its slot being
/// failed over, a `TRYAGAIN`).
struct Waiting<A, S> {
    req: Request,
    cb: Option<Callback<A, S>>,
    durable: bool,
    hops: u8,
    since: Instant,      // a non-durable one fails after redis_timeout
    not_before: Instant, // a retry is not sent before this
}

/// A worker's Redis client (none when no Redis is configured).
pub struct RedisClient<A, S> {
    worker_id: usize,                                  // for logs
    row: &'static Row,                                 // where the counters go
    spec: Spec,                                        // how nodes are built
    probe_base: String,                                // probe channel prefix, ours alone
    nodes: Vec<Option<Node<A, S>>>,                    // by index (tokens follow it)
    topo: Topo,                                        // see Topo
    handlers: HashMap<Vec<u8>, pubsub::Handler<A, S>>, // channel → handler
    waiting: VecDeque<Waiting<A, S>>,                  // not routable yet
    ready: Vec<(Callback<A, S>, Reply)>,               // completions to run
    messages: Vec<(Vec<u8>, Vec<u8>)>,                 // (channel, payload) to run
    outage_logged: bool,                               // the current outage was logged
    retired: Counts,                                   // counters of nodes that left
    retired_probes: u64,                               // their failed probes
    generation_base: u64,                              // their subscriber connections
    disruptions: u64,                                  // see disruptions()
    settling_until: Option<Instant>,                   // see ready(): a TRYAGAIN & co. lately
}

impl<A, S> std::fmt::Debug for RedisClient<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("topo", &self.topo)
            .field("nodes", &self.nodes)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl<A: 'static, S: 'static> RedisClient<A, S> {
    /// A client for `plan`.
    pub fn new(
        plan: Plan,
        timeout: Duration,
        worker_id: usize,
        row: &'static Row,
    ) -> RedisClient<A, S> {
        let (follow, sharded) = match &plan.target {
            Target::Single(_) => (Follow::Single, false),
            Target::Sentinel { .. } => (Follow::Sentinel, false),
            Target::Cluster { sharded, .. } => (Follow::Cluster, *sharded),
        };
        let spec = Spec {
            hello: plan.hello,
            timeout,
            follow,
            sharded,
        };
        let mut c = RedisClient {
            worker_id,
            row,
            spec,
            probe_base: format!("swocloud:probe:{}:{worker_id}", std::process::id()),
            nodes: Vec::new(),
            topo: Topo::Single,
            handlers: HashMap::new(),
            waiting: VecDeque::new(),
            ready: Vec::new(),
            messages: Vec::new(),
            outage_logged: false,
            retired: Counts::default(),
            retired_probes: 0,
            generation_base: 0,
            disruptions: 0,
            settling_until: None,
        };
        match plan.target {
            Target::Single(addr) => {
                c.node_for(&addr);
            }
            Target::Sentinel { sentinels, master } => {
                let link = Box::new(SentinelLink::new(
                    mio::Token(node::FIRST_TOKEN),
                    sentinels,
                    master,
                ));
                c.topo = Topo::Sentinel { link, master: None };
            }
            Target::Cluster { seeds, sharded } => {
                for s in &seeds {
                    c.node_for(s);
                }
                c.topo = Topo::Cluster(SlotMap::new(seeds, sharded));
            }
        }
        c
    }

    /// Whether the client talks to a Redis Cluster (keys of one script or
    /// MULTI must then share a slot, and pub/sub is sharded).
    pub fn is_cluster(&self) -> bool {
        matches!(self.topo, Topo::Cluster(_))
    }

    /// The command that publishes to a channel: `SPUBLISH` on a cluster
    /// with sharded pub/sub, `PUBLISH` otherwise. A Lua script that
    /// publishes takes it as an argument, and its channel shares the
    /// script's tag.
    pub fn publish_command(&self) -> &'static str {
        match &self.topo {
            Topo::Cluster(m) if m.sharded => "SPUBLISH",
            _ => "PUBLISH",
        }
    }

    fn node(&self, i: usize) -> Option<&Node<A, S>> {
        self.nodes.get(i).and_then(Option::as_ref)
    }

    fn node_up(&self, i: usize) -> bool {
        self.node(i).is_some_and(|n| n.cmd.link.is_up())
    }

    /// Whether requests flow: the server, the Sentinels' master, or every
    /// master of a complete slot map is connected.
    pub fn is_up(&self) -> bool {
        match &self.topo {
            Topo::Single => self.node_up(0),
            Topo::Sentinel { master, .. } => master.is_some_and(|i| self.node_up(i)),
            Topo::Cluster(m) => m.complete() && m.nodes().iter().all(|&i| self.node_up(i)),
        }
    }

    /// Whether requests for `key` flow: as [`Self::is_up`], except that on
    /// a cluster only the master of `key`'s slot counts (a failover
    /// elsewhere does not stop this key's requests).
    pub fn is_up_for(&self, key: &[u8]) -> bool {
        match &self.topo {
            Topo::Cluster(m) => m.owner(slot_of(key)).is_some_and(|i| self.node_up(i)),
            _ => self.is_up(),
        }
    }

    /// `Ok` when commands flow and every subscriber is verified by its
    /// probe; otherwise the reason (for `/ready`). A node that answered
    /// `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN` or `READONLY` within the
    /// last [`SETTLING`] counts as not ready: its link is up, yet
    /// requests fail (a master just restarted, a slot migrating, a
    /// demoted master).
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.is_up() {
            return Err(match &self.topo {
                Topo::Single => "redis unavailable",
                Topo::Sentinel { master: None, .. } => "redis master unknown (sentinels)",
                Topo::Sentinel { .. } => "redis master unreachable (failing over?)",
                Topo::Cluster(m) if !m.complete() => "redis cluster: slots without a master",
                Topo::Cluster(_) => "redis cluster: a master is unreachable (failing over?)",
            });
        }
        let unverified = self
            .nodes
            .iter()
            .flatten()
            .any(|n| n.sub.wanted() && !n.sub.verified());
        if unverified || (!self.handlers.is_empty() && self.placed() < self.handlers.len()) {
            return Err("redis pub/sub not verified");
        }
        if self.settling_until.is_some_and(|t| Instant::now() < t) {
            return Err(match &self.topo {
                Topo::Cluster(_) => "redis cluster: a node answers TRYAGAIN/CLUSTERDOWN (settling)",
                _ => "redis master answers READONLY/MASTERDOWN (failing over?)",
            });
        }
        Ok(())
    }

    /// Subscribed channels that have a node.
    fn placed(&self) -> usize {
        self.handlers
            .keys()
            .filter(|ch| self.nodes.iter().flatten().any(|n| n.sub.has(ch)))
            .count()
    }

    /// Registers a pub/sub handler for `channel`.
    pub fn subscribe(&mut self, channel: Vec<u8>, h: pubsub::Handler<A, S>, registry: &Registry) {
        self.handlers.insert(channel.clone(), h);
        self.place(&channel);
        self.tick(registry, Instant::now());
    }

    /// Takes a channel's handler out (to call it), or `None`.
    pub fn take_handler(&mut self, channel: &[u8]) -> Option<pubsub::Handler<A, S>> {
        self.handlers.remove(channel)
    }

    /// Puts a handler back after its call, unless it was replaced meanwhile.
    pub fn put_handler(&mut self, channel: Vec<u8>, h: pubsub::Handler<A, S>) {
        self.handlers.entry(channel).or_insert(h);
    }

    /// Subscriber connections made so far (messages may have been missed
    /// between two).
    pub fn sub_generation(&self) -> u64 {
        self.generation_base
            + self
                .nodes
                .iter()
                .flatten()
                .map(|n| n.sub.generation)
                .sum::<u64>()
    }

    /// Counts the events after which Redis may have lost acknowledged
    /// writes: a command link broke (a crash, a restart, a failover), a
    /// node left the topology, a slot moved to another master, Sentinel
    /// named a new master. Replication is asynchronous: what a master
    /// acknowledged just before such an event may be missing on whoever
    /// serves its keys now, so callers verify their recent writes when the
    /// count changes ([`crate::cluster::audit`]).
    pub fn disruptions(&self) -> u64 {
        self.disruptions
    }

    /// Requests on the wire, and requests waiting (durable or unroutable).
    pub fn backlog(&self) -> (usize, usize) {
        let (mut on_wire, mut queued) = (0, self.waiting.len());
        for n in self.nodes.iter().flatten() {
            on_wire += n.cmd.in_flight();
            queued += n.cmd.queued();
        }
        (on_wire, queued)
    }

    /// Whether callbacks or messages wait to run.
    pub fn completions_due(&self) -> bool {
        !self.ready.is_empty()
            || !self.messages.is_empty()
            || self
                .nodes
                .iter()
                .flatten()
                .any(|n| !n.cmd.ready.is_empty() || !n.sub.ready.is_empty())
    }

    /// Takes the callbacks and messages that wait to run.
    pub fn take_completions(&mut self) -> Completions<A, S> {
        let mut done = std::mem::take(&mut self.ready);
        let mut msgs = std::mem::take(&mut self.messages);
        for n in self.nodes.iter_mut().flatten() {
            done.append(&mut n.cmd.ready);
            msgs.append(&mut n.sub.ready);
        }
        (done, msgs)
    }

    /// Periodic work: the topology, then every node (dial what is down,
    /// break what is overdue, probe), then what waits for a node.
    pub fn tick(&mut self, registry: &Registry, now: Instant) {
        self.topology_tick(registry, now);
        let mut notes = Vec::new();
        for i in 0..self.nodes.len() {
            if let Some(n) = self.nodes[i].as_mut() {
                n.tick(registry, now, &mut notes);
            }
            self.on_notes(i, std::mem::take(&mut notes), now);
        }
        self.outputs(now);
        self.drain_waiting(now);
        self.publish_counts();
    }

    /// A readiness event on the Redis socket with index `index` (its
    /// token minus [`node::FIRST_TOKEN`]).
    pub fn on_event(&mut self, index: usize, registry: &Registry) {
        let now = Instant::now();
        if index == 0 {
            if let Topo::Sentinel { link, .. } = &mut self.topo {
                link.on_event(registry);
            }
            self.apply_sentinel(now);
            return;
        }
        let (i, sub) = ((index - 1) / 2, (index - 1) % 2 == 1);
        let mut notes = Vec::new();
        if let Some(n) = self.nodes.get_mut(i).and_then(Option::as_mut) {
            if sub {
                n.on_sub_event(registry, &mut notes);
            } else {
                n.on_cmd_event(registry, &mut notes);
            }
        }
        self.on_notes(i, notes, now);
        self.outputs(now);
        if self.any_fresh() {
            self.tick(registry, now); // dial new nodes now, not at the next tick
        }
    }

    /// Writes what was queued this iteration (one write per link).
    pub fn flush(&mut self, registry: &Registry) {
        let now = Instant::now();
        if let Topo::Sentinel { link, .. } = &mut self.topo {
            link.flush(registry, now);
        }
        let mut notes = Vec::new();
        for i in 0..self.nodes.len() {
            if let Some(n) = self.nodes[i].as_mut() {
                n.flush(registry, &mut notes);
            }
            if !notes.is_empty() {
                self.on_notes(i, std::mem::take(&mut notes), now);
            }
        }
    }

    fn on_notes(&mut self, i: usize, notes: Vec<Note>, now: Instant) {
        for note in notes {
            match note {
                Note::Up => {
                    if self.outage_logged && self.is_up() {
                        log::info!("worker {}: redis is back", self.worker_id);
                        self.row.redis_reconnects.fetch_add(1, Relaxed);
                        self.outage_logged = false;
                    }
                    if let Topo::Sentinel {
                        master: Some(m), ..
                    } = self.topo
                    {
                        if m == i {
                            if let Some(n) = self.nodes[i].as_mut() {
                                n.cmd.ask(redis::cmd("ROLE"), client::Control::Role);
                            }
                        }
                    }
                }
                Note::Down(why) => {
                    self.disruptions += 1;
                    self.row.redis_errors.fetch_add(1, Relaxed);
                    if !self.outage_logged {
                        log::warn!(
                            "worker {}: redis unavailable ({why}); serving without it, retrying with backoff",
                            self.worker_id
                        );
                        self.outage_logged = true;
                    }
                    match &mut self.topo {
                        Topo::Sentinel { link, .. } => link.rediscover(now),
                        Topo::Cluster(m) => m.soon(Duration::ZERO),
                        Topo::Single => {}
                    }
                }
                Note::SubDown(why) => log::warn!("worker {}: {why}", self.worker_id),
            }
        }
        self.row.redis_up.store(u64::from(self.is_up()), Relaxed);
    }

    /// Copies the client's figures into the scoreboard row.
    pub fn publish_counts(&self) {
        let mut c = self.retired;
        let mut probes = self.retired_probes;
        for n in self.nodes.iter().flatten() {
            c.errors += n.cmd.counts.errors;
            c.timeouts += n.cmd.counts.timeouts;
            c.retried += n.cmd.counts.retried;
            c.dropped += n.cmd.counts.dropped;
            probes += n.sub.probes_failed;
        }
        let (on_wire, queued) = self.backlog();
        let r = self.row;
        r.redis_pending.store(on_wire as u64, Relaxed);
        r.redis_queued.store(queued as u64, Relaxed);
        r.redis_cmd_errors.store(c.errors, Relaxed);
        r.redis_timeouts.store(c.timeouts, Relaxed);
        r.redis_retried.store(c.retried, Relaxed);
        r.redis_dropped.store(c.dropped, Relaxed);
        r.redis_probe_failures.store(probes, Relaxed);
        r.redis_sub_verified.store(
            u64::from(self.ready() != Err("redis pub/sub not verified")),
            Relaxed,
        );
    }
}
