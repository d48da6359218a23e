//! The command side of a worker's Redis client, hiredis-style: every
//! request carries its callback; requests are packed into one output
//! buffer that goes out once per loop iteration (pipelining is the
//! default); replies are matched in order from a FIFO of callbacks.
//!
//! Nothing hangs and nothing is forgotten:
//! - a request made while Redis is down completes with an error at once
//!   (after the calling hook returns);
//! - when the link breaks, or the oldest request waits longer than
//!   `redis_timeout`, every pending callback fires with an error;
//! - *durable* requests (removals, renewals: work that must reach Redis)
//!   are instead kept in a bounded queue and sent again, first, once the
//!   link is back; an overflow is counted, never silent.
//!
//! Behind a Sentinel or on a Cluster ([`Follow`]) the FIFO also hands
//! back what the topology must handle: a request answered `MOVED`, `ASK`,
//! `TRYAGAIN`, `CLUSTERDOWN` or (behind a Sentinel) `READONLY` becomes a
//! [`Redirect`] carrying its own copy, and the answers of the client's
//! own `CLUSTER SLOTS` and `ROLE` come back as [`Control`] replies.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use redis::{ErrorKind, RedisError, Value};

use super::link::{Link, LinkState};
use super::request::{Request, ScriptCall};

/// A finished request's reply.
pub type Reply = redis::RedisResult<Value>;

/// A callback that gets the reply.
pub type Callback<A, S> = Box<dyn FnOnce(&mut A, &mut S, Reply)>;

/// A queue emptied after a burst keeps at most this capacity.
const SHRINK_ABOVE: usize = 1024;

/// How many durable requests wait for Redis at most; older ones are kept,
/// the newest is dropped and counted past this.
pub const DURABLE_MAX: usize = 100_000;

/// What a pending entry does with its replies.
enum Shape {
    One,              // a command or a script: its reply
    Pipe,             // an array of the replies
    Atomic,           // MULTI … EXEC: EXEC's reply
    Internal,         // AUTH, SELECT, SCRIPT LOAD, ASKING: an error is logged
    Control(Control), // the topology's own question: to `control`
}

/// The client's own questions about the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `CLUSTER SLOTS`: the slot map.
    Slots,
    /// `ROLE`: is the node behind the Sentinel's answer really a master.
    Role,
}

/// Which server-side redirections a connection's requests follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// One server: errors are errors.
    Single,
    /// A Sentinel's master: `READONLY` means it was demoted.
    Sentinel,
    /// A cluster node: `MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`.
    Cluster,
}

/// A request the server sent elsewhere (or asked to retry), with its copy.
pub struct Redirect<A, S> {
    /// The request, to send again.
    pub req: Request,
    /// Who gets its reply.
    pub cb: Option<Callback<A, S>>,
    /// Whether it must reach Redis (kept across outages).
    pub durable: bool,
    /// Redirections so far (a loop is cut after a few).
    pub hops: u8,
    /// The server's answer (`MOVED 3999 127.0.0.1:7001`, …).
    pub err: RedisError,
}

/// A request on the wire, waiting for its replies.
struct Pending<A, S> {
    want: usize,                // replies expected
    got: Vec<Value>,            // replies so far
    shape: Shape,               // how to combine them
    cb: Option<Callback<A, S>>, // who gets the result
    keep: Option<Request>,      // a copy: durable, or redirectable
    durable: bool,              // resend `keep` if the link breaks
    hops: u8,                   // redirections it has followed
    script: Option<ScriptCall>, // a script: EVAL it on NOSCRIPT
    sent: Instant,              // for the timeout
    resent: bool,               // a durable request sent again after an outage
}

/// Counters the client keeps (copied into the scoreboard by its owner).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Commands that failed (server error, link error, timeout).
    pub errors: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Durable requests that reached Redis after waiting out an outage.
    pub retried: u64,
    /// Durable requests dropped because the queue was full.
    pub dropped: u64,
}

/// The command connection and its FIFO.
pub struct Commands<A, S> {
    pub(crate) link: Link,                                // the socket
    pending: VecDeque<Pending<A, S>>,                     // on the wire, in order
    durable: VecDeque<(Request, Option<Callback<A, S>>)>, // waiting for the link
    loaded: HashSet<String>,                              // script hashes this connection knows
    hello: Vec<redis::Cmd>, // AUTH / SELECT, sent first on every connect
    pub(crate) ready: Vec<(Callback<A, S>, Reply)>, // completions to run
    pub(crate) redirects: Vec<Redirect<A, S>>, // for the topology to resend
    pub(crate) control: Vec<(Control, Reply)>, // answers to the topology
    follow: Follow,         // which redirections apply
    timeout: Duration,      // redis_timeout
    pub(crate) counts: Counts, // see Counts
}

fn err(kind: ErrorKind, what: &'static str, detail: String) -> RedisError {
    RedisError::from((kind, what, detail))
}

impl<A, S> Commands<A, S> {
    /// A client over `link`, sending `hello` on every connect.
    pub fn new(
        link: Link,
        hello: Vec<redis::Cmd>,
        timeout: Duration,
        follow: Follow,
    ) -> Commands<A, S> {
        Commands {
            link,
            pending: VecDeque::new(),
            durable: VecDeque::new(),
            loaded: HashSet::new(),
            hello,
            ready: Vec::new(),
            redirects: Vec::new(),
            control: Vec::new(),
            follow,
            timeout,
            counts: Counts::default(),
        }
    }

    /// Whether the link accepts requests now.
    pub fn is_accepting(&self) -> bool {
        self.accepting()
    }

    /// Takes the durable requests waiting for this link (its node left
    /// the topology: they go to the node that took its place).
    pub fn take_durable(&mut self) -> Vec<(Request, Option<Callback<A, S>>)> {
        std::mem::take(&mut self.durable).into_iter().collect()
    }

    /// Sends one of the client's own questions (answered in `control`).
    pub fn ask(&mut self, c: redis::Cmd, what: Control) {
        c.write_packed_command(self.link.queue());
        self.pending.push_back(Pending {
            want: 1,
            got: Vec::new(),
            shape: Shape::Control(what),
            cb: None,
            keep: None,
            durable: false,
            hops: 0,
            script: None,
            sent: Instant::now(),
            resent: false,
        });
    }

    /// Sends `req` after `ASKING` (a slot being migrated, `ASK` redirect).
    pub fn submit_asking(
        &mut self,
        req: Request,
        cb: Option<Callback<A, S>>,
        durable: bool,
        hops: u8,
    ) {
        if !self.accepting() {
            return self.submit(req, cb, durable);
        }
        self.internal(redis::cmd("ASKING"), Instant::now());
        self.put(req, cb, durable);
        if let Some(p) = self.pending.back_mut() {
            p.hops = hops;
        }
    }

    /// [`Commands::submit`] of a request that has followed `hops`
    /// redirections already.
    pub fn resubmit(&mut self, req: Request, cb: Option<Callback<A, S>>, durable: bool, hops: u8) {
        let accepting = self.accepting();
        self.submit(req, cb, durable);
        if accepting {
            if let Some(p) = self.pending.back_mut() {
                p.hops = hops;
            }
        }
    }

    /// Requests on the wire.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Durable requests waiting for the link.
    pub fn queued(&self) -> usize {
        self.durable.len()
    }

    /// Whether requests can be sent now (connected, or connecting: what is
    /// queued while connecting goes out once connected).
    fn accepting(&self) -> bool {
        !matches!(self.link.state, LinkState::Down { .. })
    }

    /// Sends `req`; `cb` gets its reply, or an error.
    pub fn submit(&mut self, req: Request, cb: Option<Callback<A, S>>, durable: bool) {
        if req.is_empty() {
            if let Some(cb) = cb {
                self.ready.push((cb, Ok(Value::Array(Vec::new()))));
            }
            return;
        }
        if !self.accepting() {
            if durable {
                self.keep(req, cb);
            } else if let Some(cb) = cb {
                self.counts.errors += 1;
                let e = err(
                    ErrorKind::IoError,
                    "redis unavailable",
                    format!("no connection to {}", self.link.target()),
                );
                self.ready.push((cb, Err(e)));
            }
            return;
        }
        self.put(req, cb, durable);
    }

    fn keep(&mut self, req: Request, cb: Option<Callback<A, S>>) {
        if self.durable.len() >= DURABLE_MAX {
            self.counts.dropped += 1;
            log::error!("redis: the durable queue is full ({DURABLE_MAX}); dropping a request");
            if let Some(cb) = cb {
                let e = err(
                    ErrorKind::IoError,
                    "redis durable queue full",
                    String::new(),
                );
                self.ready.push((cb, Err(e)));
            }
            return;
        }
        self.durable.push_back((req, cb));
    }

    /// Packs `req` and records its callback.
    fn put(&mut self, req: Request, cb: Option<Callback<A, S>>, durable: bool) {
        let now = Instant::now();
        let mut script = None;
        if let Request::Script(call) = &req {
            if self.loaded.insert(call.script.hash().to_string()) {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(call.script.code());
                self.internal(load, now);
            }
            script = Some(call.clone());
        }
        req.pack(self.link.queue());
        let shape = match req {
            Request::Cmd(_) | Request::Script(_) => Shape::One,
            Request::Pipe(_) => Shape::Pipe,
            Request::Atomic(_) => Shape::Atomic,
        };
        let copy = durable || self.follow == Follow::Cluster;
        self.pending.push_back(Pending {
            want: req.replies(),
            got: Vec::new(),
            shape,
            cb,
            keep: copy.then_some(req),
            durable,
            hops: 0,
            script,
            sent: now,
            resent: false,
        });
    }

    fn internal(&mut self, c: redis::Cmd, now: Instant) {
        c.write_packed_command(self.link.queue());
        self.pending.push_back(Pending {
            want: 1,
            got: Vec::new(),
            shape: Shape::Internal,
            cb: None,
            keep: None,
            durable: false,
            hops: 0,
            script: None,
            sent: now,
            resent: false,
        });
    }

    /// A connect has just started: the greeting and the durable queue go
    /// first, before anything submitted from now on.
    pub fn on_dial(&mut self) {
        let now = Instant::now();
        self.loaded.clear();
        for c in self.hello.clone() {
            self.internal(c, now);
        }
        for (req, cb) in std::mem::take(&mut self.durable) {
            self.put(req, cb, true);
            if let Some(p) = self.pending.back_mut() {
                p.resent = true;
            }
        }
    }

    /// Matches one reply to the oldest pending request.
    pub fn on_reply(&mut self, v: Value) {
        let Some(head) = self.pending.front_mut() else {
            log::warn!("redis: a reply nobody asked for; ignoring it");
            return;
        };
        head.got.push(v);
        if head.got.len() < head.want {
            return;
        }
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        if self.pending.is_empty() && self.pending.capacity() > SHRINK_ABOVE {
            // A burst (every user's presence at start) is over: give its
            // memory back rather than keep it per idle connection.
            self.pending = VecDeque::new();
        }
        if p.resent {
            self.counts.retried += 1;
        }
        if let Some(err) = self.redirection(&p) {
            if let Some(req) = p.keep {
                self.redirects.push(Redirect {
                    req,
                    cb: p.cb,
                    durable: p.durable,
                    hops: p.hops,
                    err,
                });
                return;
            }
        }
        let result = match p.shape {
            Shape::One => p
                .got
                .into_iter()
                .next()
                .unwrap_or(Value::Nil)
                .extract_error(),
            Shape::Pipe => {
                let mut out = Vec::with_capacity(p.got.len());
                let mut first_err = None;
                for v in p.got {
                    match v.extract_error() {
                        Ok(v) => out.push(v),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                first_err.map_or(Ok(Value::Array(out)), Err)
            }
            Shape::Atomic => p
                .got
                .into_iter()
                .last()
                .unwrap_or(Value::Nil)
                .extract_error(),
            Shape::Control(what) => {
                let v = p.got.into_iter().next().unwrap_or(Value::Nil);
                self.control.push((what, v.extract_error()));
                return;
            }
            Shape::Internal => {
                if let Err(e) = p
                    .got
                    .into_iter()
                    .next()
                    .unwrap_or(Value::Nil)
                    .extract_error()
                {
                    self.counts.errors += 1;
                    log::warn!(
                        "redis {}: connection set-up command failed: {e}",
                        self.link.target()
                    );
                }
                return;
            }
        };
        match result {
            Err(e) if e.kind() == ErrorKind::NoScriptError && p.script.is_some() => {
                // The server forgot the script (SCRIPT FLUSH): run it by
                // source this time, and load it again on next use.
                if let Some(call) = p.script {
                    self.loaded.remove(call.script.hash());
                    call.command(true).write_packed_command(self.link.queue());
                    self.pending.push_back(Pending {
                        want: 1,
                        got: Vec::new(),
                        shape: Shape::One,
                        cb: p.cb,
                        keep: p.keep,
                        durable: p.durable,
                        hops: p.hops,
                        script: None,
                        sent: Instant::now(),
                        resent: false,
                    });
                }
            }
            Err(e) => {
                self.counts.errors += 1;
                if let Some(cb) = p.cb {
                    self.ready.push((cb, Err(e)));
                } else {
                    log::warn!("redis {}: command failed: {e}", self.link.target());
                }
            }
            Ok(v) => {
                if let Some(cb) = p.cb {
                    self.ready.push((cb, Ok(v)));
                }
            }
        }
    }

    /// The server's redirection in `p`'s replies, if it is one this
    /// connection follows (for MULTI, the queued commands' answers).
    fn redirection(&self, p: &Pending<A, S>) -> Option<RedisError> {
        let codes: &[&str] = match self.follow {
            Follow::Single => return None,
            Follow::Sentinel => &["READONLY"],
            Follow::Cluster => &["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"],
        };
        p.got.iter().find_map(|v| match v {
            Value::ServerError(se) if codes.contains(&se.code()) => {
                Some(RedisError::from(se.clone()))
            }
            _ => None,
        })
    }

    /// Whether the oldest request has waited past `redis_timeout`.
    pub fn overdue(&self, now: Instant) -> bool {
        self.pending
            .front()
            .is_some_and(|p| now.duration_since(p.sent) > self.timeout)
    }

    /// The link broke: every pending callback gets an error; durable
    /// requests go back to the queue, in their order, ahead of later ones.
    pub fn on_broken(&mut self, why: &str, timed_out: bool) {
        let mut requeue = Vec::new();
        for p in self.pending.drain(..) {
            if let (true, Some(req)) = (p.durable, p.keep) {
                requeue.push((req, p.cb));
                continue;
            }
            let Some(cb) = p.cb else { continue };
            self.counts.errors += 1;
            let e = if timed_out {
                self.counts.timeouts += 1;
                err(ErrorKind::IoError, "redis timeout", why.to_string())
            } else {
                err(ErrorKind::IoError, "redis connection lost", why.to_string())
            };
            self.ready.push((cb, Err(e)));
        }
        for req in requeue.into_iter().rev() {
            self.durable.push_front(req);
        }
        while self.durable.len() > DURABLE_MAX {
            if let Some((_, Some(cb))) = self.durable.pop_back() {
                let e = err(
                    ErrorKind::IoError,
                    "redis durable queue full",
                    String::new(),
                );
                self.ready.push((cb, Err(e)));
            }
            self.counts.dropped += 1;
        }
    }
}

impl<A, S> std::fmt::Debug for Commands<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("link", &self.link)
            .field("in_flight", &self.pending.len())
            .field("durable", &self.durable.len())
            .finish()
    }
}
