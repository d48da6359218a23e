//! Where each request and channel of a [`RedisClient`] goes, and how the
//! set of nodes follows the topology: the Sentinels' answers, the slot
//! map, the servers' redirections.
//!
//! - A request goes to the one node (one server, the Sentinels' master)
//!   or to the node serving its slot; a pipeline on a cluster is split
//!   by slot and its replies put back together in order ([`Gather`]).
//! - A request with no node yet (master unknown, slot failing over,
//!   `TRYAGAIN`) waits; a durable one until a node takes it, any other
//!   for at most `redis_timeout`, then it fails with an error that says
//!   why. Nothing waits forever and nothing is dropped unannounced.
//! - A node that leaves the topology (a failed-over master, a node on a
//!   new address) hands its durable requests to whichever node now serves
//!   them; its in-flight ones fail with an error.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use redis::{ErrorKind, RedisError, Value};

use super::client::{Callback, Control, Redirect};
use super::cluster::{self, REFRESH_FAST, REFRESH_IDLE};
use super::node::{Node, MAX_NODES};
use super::request::Request;
use super::slot::slot_of;
use super::target::Addr;
use super::{RedisClient, Topo, Waiting};

/// A request followed this many redirections: it fails instead.
const MAX_HOPS: u8 = 8;
/// A `TRYAGAIN` / `CLUSTERDOWN` / `READONLY` is retried after this.
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Requests that wait for a node at most (then the newest fail).
const WAITING_MAX: usize = 100_000;

/// A split pipeline's replies, collected in order.
struct Gather<A, S> {
    vals: Vec<Value>,
    err: Option<RedisError>,
    left: usize,
    cb: Option<Callback<A, S>>,
}

fn error(what: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::IoError, what, detail))
}

impl<A: 'static, S: 'static> RedisClient<A, S> {
    /// The node at `addr`, created if new.
    pub(super) fn node_for(&mut self, addr: &Addr) -> Option<usize> {
        if let Some(i) = self
            .nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|n| &n.addr == addr))
        {
            return Some(i);
        }
        let i = match self.nodes.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.nodes.len() < MAX_NODES => {
                self.nodes.push(None);
                self.nodes.len() - 1
            }
            None => {
                log::error!("redis: more than {MAX_NODES} nodes; ignoring {addr:?}");
                return None;
            }
        };
        let probe = format!("{}:{{n{i}}}", self.probe_base).into_bytes();
        self.nodes[i] = Some(Node::new(i, addr.clone(), &self.spec, probe));
        Some(i)
    }

    /// Node `i` leaves: its durable requests go where they belong now.
    fn retire(&mut self, i: usize, now: Instant) {
        let Some(mut n) = self.nodes.get_mut(i).and_then(Option::take) else {
            return;
        };
        log::info!(
            "worker {}: redis node {} left the topology",
            self.worker_id,
            n.name()
        );
        n.break_links("its node left the topology", now);
        self.disruptions += 1;
        self.ready.append(&mut n.cmd.ready);
        self.messages.append(&mut n.sub.ready);
        let c = n.cmd.counts;
        self.retired.errors += c.errors;
        self.retired.timeouts += c.timeouts;
        self.retired.retried += c.retried;
        self.retired.dropped += c.dropped;
        self.retired_probes += n.sub.probes_failed;
        self.generation_base += n.sub.generation;
        for r in std::mem::take(&mut n.cmd.redirects) {
            self.route(r.req, r.cb, r.durable, r.hops);
        }
        for (req, cb) in n.cmd.take_durable() {
            self.route(req, cb, true, 0);
        }
    }

    /// Sends `req`; `cb` gets its reply, or an error.
    pub fn submit(&mut self, req: Request, cb: Option<Callback<A, S>>, durable: bool) {
        self.route(req, cb, durable, 0);
    }

    fn route(&mut self, req: Request, cb: Option<Callback<A, S>>, durable: bool, hops: u8) {
        let target = match &self.topo {
            Topo::Single => Some(0),
            Topo::Sentinel { master, .. } => *master,
            Topo::Cluster(m) => {
                let sharded = m.sharded;
                let req = match req {
                    Request::Pipe(p) => return self.split(p, cb, durable, hops),
                    Request::Cmd(c) if sharded => Request::Cmd(cluster::shard_publish(c)),
                    other => other,
                };
                let node = match cluster::request_slot(&req) {
                    Some(s) => self.owner(s),
                    None => self.any_up(),
                };
                return match node.filter(|&i| self.node(i).is_some()) {
                    Some(i) => self.send_to(i, req, cb, durable, hops),
                    None => self.wait(req, cb, durable, hops, Instant::now()),
                };
            }
        };
        match target.filter(|&i| self.node(i).is_some()) {
            Some(i) => self.send_to(i, req, cb, durable, hops),
            None => self.wait(req, cb, durable, hops, Instant::now()),
        }
    }

    fn owner(&self, slot: u16) -> Option<usize> {
        match &self.topo {
            Topo::Cluster(m) => m.owner(slot),
            _ => None,
        }
    }

    fn send_to(&mut self, i: usize, req: Request, cb: Option<Callback<A, S>>, d: bool, hops: u8) {
        match self.nodes[i].as_mut() {
            Some(n) if n.fresh => self.wait(req, cb, d, hops, Instant::now()),
            Some(n) => n.cmd.resubmit(req, cb, d, hops),
            None => {}
        }
    }

    /// Whether a node has not been dialled yet (the next tick dials it).
    pub(super) fn any_fresh(&self) -> bool {
        self.nodes.iter().flatten().any(|n| n.fresh)
    }

    /// A connected node for a command without a key (the first of the map).
    fn any_up(&self) -> Option<usize> {
        let Topo::Cluster(m) = &self.topo else {
            return None;
        };
        let mut order = m.nodes();
        order.extend(0..self.nodes.len());
        order.into_iter().find(|&i| self.node_up(i))
    }

    /// A cluster pipeline, one request per command, replies in order.
    fn split(&mut self, p: redis::Pipeline, cb: Option<Callback<A, S>>, d: bool, hops: u8) {
        let parts = cluster::split(&p);
        if parts.is_empty() {
            if let Some(cb) = cb {
                self.ready.push((cb, Ok(Value::Array(Vec::new()))));
            }
            return;
        }
        let g = Rc::new(RefCell::new(Gather {
            vals: vec![Value::Nil; parts.len()],
            err: None,
            left: parts.len(),
            cb,
        }));
        for (k, c) in parts.into_iter().enumerate() {
            let g = g.clone();
            let part: Callback<A, S> = Box::new(move |app, srv, r| {
                let mut st = g.borrow_mut();
                match r {
                    Ok(v) => st.vals[k] = v,
                    Err(e) => {
                        st.err.get_or_insert(e);
                    }
                }
                st.left -= 1;
                if st.left > 0 {
                    return;
                }
                let cb = st.cb.take();
                let out = match st.err.take() {
                    Some(e) => Err(e),
                    None => Ok(Value::Array(std::mem::take(&mut st.vals))),
                };
                drop(st);
                if let Some(cb) = cb {
                    cb(app, srv, out);
                }
            });
            self.route(Request::Cmd(c), Some(part), d, hops);
        }
    }

    fn wait(&mut self, req: Request, cb: Option<Callback<A, S>>, d: bool, hops: u8, at: Instant) {
        if self.waiting.len() >= WAITING_MAX {
            self.retired.dropped += 1;
            if let Some(cb) = cb {
                self.ready.push((
                    cb,
                    Err(error(
                        "redis: too many requests wait for a node",
                        String::new(),
                    )),
                ));
            }
            return;
        }
        let now = Instant::now();
        self.waiting.push_back(Waiting {
            req,
            cb,
            durable: d,
            hops,
            since: now,
            not_before: at,
        });
    }

    /// Sends what can be sent; fails non-durable requests that waited
    /// past `redis_timeout`.
    pub(super) fn drain_waiting(&mut self, now: Instant) {
        if self.waiting.is_empty() {
            return;
        }
        for w in std::mem::take(&mut self.waiting) {
            if w.not_before > now {
                self.waiting.push_back(w);
            } else if !w.durable && now.duration_since(w.since) > self.spec.timeout {
                self.retired.errors += 1;
                if let Some(cb) = w.cb {
                    let why = match &self.topo {
                        Topo::Sentinel { .. } => "no master known (sentinels)",
                        _ => "no node serves its slot (failover under way?)",
                    };
                    self.ready
                        .push((cb, Err(error("redis unavailable", why.into()))));
                }
            } else {
                let since = w.since;
                let before = self.waiting.len();
                self.route(w.req, w.cb, w.durable, w.hops);
                if let Some(back) = self.waiting.get_mut(before) {
                    back.since = since; // still waiting: keep its age
                }
            }
        }
        if !self.waiting.is_empty() {
            if let Topo::Cluster(m) = &mut self.topo {
                m.soon(REFRESH_FAST);
            }
        }
    }

    /// What the nodes' FIFOs handed back: redirections, the topology's
    /// answers, channels the server dropped.
    pub(super) fn outputs(&mut self, now: Instant) {
        for i in 0..self.nodes.len() {
            let Some(n) = self.nodes[i].as_mut() else {
                continue;
            };
            let redirects = std::mem::take(&mut n.cmd.redirects);
            let control = std::mem::take(&mut n.cmd.control);
            let lost = std::mem::take(&mut n.sub.lost);
            for ch in &lost {
                n.sub.forget(ch);
            }
            for r in redirects {
                self.redirected(r, now);
            }
            for (what, reply) in control {
                self.answered(i, what, reply, now);
            }
            if !lost.is_empty() {
                if let Topo::Cluster(m) = &mut self.topo {
                    m.soon(Duration::ZERO);
                }
            }
        }
    }

    fn redirected(&mut self, r: Redirect<A, S>, now: Instant) {
        let Redirect {
            req,
            cb,
            durable,
            hops,
            err,
        } = r;
        if hops >= MAX_HOPS {
            self.retired.errors += 1;
            if let Some(cb) = cb {
                self.ready.push((cb, Err(err)));
            }
            return;
        }
        let to = err
            .redirect_node()
            .and_then(|(a, s)| Some((cluster::parse_addr(a)?, s)));
        match (err.kind(), to) {
            (ErrorKind::Moved, Some((addr, slot))) => {
                if let Some(i) = self.node_for(&addr) {
                    if let Topo::Cluster(m) = &mut self.topo {
                        if m.set(slot, i) {
                            self.disruptions += 1;
                        }
                        m.soon(Duration::ZERO);
                    }
                    self.send_to(i, req, cb, durable, hops + 1);
                }
            }
            (ErrorKind::Ask, Some((addr, _))) => {
                if let Some(i) = self.node_for(&addr) {
                    if let Some(n) = self.nodes[i].as_mut() {
                        n.cmd.submit_asking(req, cb, durable, hops + 1);
                    }
                }
            }
            _ => {
                // TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY: the
                // topology is changing; ask it again and retry shortly,
                // and say so in /ready meanwhile.
                self.settling_until = Some(now + super::SETTLING);
                match &mut self.topo {
                    Topo::Cluster(m) => m.soon(Duration::ZERO),
                    Topo::Sentinel { link, .. } => link.rediscover(now),
                    Topo::Single => {}
                }
                self.wait(req, cb, durable, hops + 1, now + RETRY_AFTER);
            }
        }
    }

    fn answered(&mut self, i: usize, what: Control, reply: super::Reply, now: Instant) {
        match what {
            Control::Role => {
                let master = matches!(&reply, Ok(Value::Array(a))
                    if matches!(a.first(), Some(Value::BulkString(b)) if b == b"master"));
                if !master {
                    log::warn!(
                        "worker {}: redis {} is not a master ({reply:?}); asking the sentinels again",
                        self.worker_id,
                        self.node(i).map(|n| n.name()).unwrap_or_default()
                    );
                    if let Some(n) = self.nodes[i].as_mut() {
                        n.break_links("not a master", now);
                    }
                    if let Topo::Sentinel { link, .. } = &mut self.topo {
                        link.rediscover(now);
                    }
                }
            }
            Control::Slots => {
                let addr = self.node(i).map(|n| n.addr.clone());
                if let Topo::Cluster(m) = &mut self.topo {
                    m.asked = None;
                }
                match (reply, addr) {
                    (Ok(v), Some(addr)) => match cluster::parse_slots(&v, &addr) {
                        Ok(ranges) if !ranges.is_empty() => self.apply_slots(ranges, now),
                        Ok(_) => log::warn!("redis {addr:?}: CLUSTER SLOTS is empty"),
                        Err(e) => log::warn!("redis {addr:?}: {e}"),
                    },
                    (Err(e), _) => log::warn!("worker {}: CLUSTER SLOTS: {e}", self.worker_id),
                    (Ok(_), None) => {}
                }
            }
        }
    }

    fn apply_slots(&mut self, ranges: Vec<(u16, u16, Addr)>, now: Instant) {
        let mut map = Vec::with_capacity(ranges.len());
        for (a, b, addr) in ranges {
            if let Some(i) = self.node_for(&addr) {
                map.push((a, b, i));
            }
        }
        let Topo::Cluster(m) = &mut self.topo else {
            return;
        };
        if m.replace(&map) {
            self.disruptions += 1;
        }
        let keep = m.nodes();
        let tags: Vec<(usize, Option<String>)> = keep.iter().map(|&i| (i, m.tag_for(i))).collect();
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_some() && !keep.contains(&i) {
                self.retire(i, now);
            }
        }
        for (i, tag) in tags {
            if let (Some(n), Some(tag)) = (self.nodes[i].as_mut(), tag) {
                let ch = format!("{}:{{{tag}}}", self.probe_base).into_bytes();
                n.sub.set_probe_channel(ch, now);
            }
        }
        self.place_all();
        let all_up = keep.iter().all(|&i| self.node_up(i));
        if let Topo::Cluster(m) = &mut self.topo {
            let next = if m.complete() && all_up {
                REFRESH_IDLE
            } else {
                REFRESH_FAST
            };
            m.refresh_at = now + next;
        }
        self.drain_waiting(now);
    }

    /// The node that should hold `channel`'s subscription.
    fn home_of(&self, channel: &[u8]) -> Option<usize> {
        match &self.topo {
            Topo::Single => Some(0),
            Topo::Sentinel { master, .. } => *master,
            Topo::Cluster(m) if m.sharded => m.owner(slot_of(channel)),
            Topo::Cluster(m) => m.owner(0), // classic: one node hears every PUBLISH
        }
    }

    /// Subscribes `channel` on its node, and nowhere else.
    pub(super) fn place(&mut self, channel: &[u8]) {
        let home = self.home_of(channel);
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(n) = n {
                if Some(i) == home {
                    n.sub.subscribe(channel.to_vec());
                } else if n.sub.has(channel) {
                    n.sub.unsubscribe(channel);
                }
            }
        }
    }

    fn place_all(&mut self) {
        let channels: Vec<Vec<u8>> = self.handlers.keys().cloned().collect();
        for ch in channels {
            self.place(&ch);
        }
    }

    /// The Sentinel link's and the slot map's periodic work.
    pub(super) fn topology_tick(&mut self, registry: &mio::Registry, now: Instant) {
        match &mut self.topo {
            Topo::Single => {}
            Topo::Sentinel { link, .. } => {
                link.tick(registry, now);
                self.apply_sentinel(now);
            }
            Topo::Cluster(_) => self.ask_slots(now, false),
        }
    }

    /// Asks a connected node for the slot map when it is due (or now,
    /// with `force`, unless a question is already out).
    pub(super) fn ask_slots(&mut self, now: Instant, force: bool) {
        let timeout = self.spec.timeout;
        let Topo::Cluster(m) = &mut self.topo else {
            return;
        };
        if m.asked
            .is_some_and(|(_, since)| now.duration_since(since) > timeout)
        {
            m.asked = None;
        }
        if m.asked.is_some() || (!force && now < m.refresh_at) {
            return;
        }
        let seeds = m.seeds.clone();
        let Some(i) = self.any_up() else {
            // Nothing is connected: make sure the seeds are dialled.
            for s in &seeds {
                self.node_for(s);
            }
            return;
        };
        if let (Some(n), Topo::Cluster(m)) = (self.nodes[i].as_mut(), &mut self.topo) {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SLOTS");
            n.cmd.ask(c, Control::Slots);
            m.asked = Some((i, now));
            m.refresh_at = now + REFRESH_FAST;
        }
    }

    /// Follows what the Sentinels said: a new master address gets a node,
    /// the old one leaves.
    pub(super) fn apply_sentinel(&mut self, now: Instant) {
        let Topo::Sentinel { link, master } = &mut self.topo else {
            return;
        };
        let found = std::mem::take(&mut link.found);
        let current = *master;
        for addr in found {
            if current
                .and_then(|i| self.node(i))
                .is_some_and(|n| n.addr == addr)
            {
                continue;
            }
            let Some(i) = self.node_for(&addr) else {
                continue;
            };
            log::info!(
                "worker {}: redis master is {}:{} (sentinels)",
                self.worker_id,
                addr.0,
                addr.1
            );
            let old = match &mut self.topo {
                Topo::Sentinel { master, .. } => master.replace(i),
                _ => None,
            };
            if let Some(o) = old.filter(|&o| o != i) {
                self.retire(o, now);
            }
            self.place_all();
            self.drain_waiting(now);
        }
    }
}
