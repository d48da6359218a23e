//! The worker's Redis client: non-blocking, pipelined, driven by the
//! worker's own mio loop, in the style of hiredis's async API on Redis's
//! `ae` loop. Nothing on a worker's loop ever waits for Redis.
//!
//! - [`Request`]s (commands, pipelines, transactions, [`Script`] calls)
//!   are packed by the `redis` crate into one output buffer and written
//!   once per loop iteration; replies are framed by [`resp`] and parsed by
//!   the `redis` crate's RESP parser, then matched in order to their
//!   callbacks ([`client`]).
//! - A second connection in subscribe mode serves pub/sub handlers and
//!   proves itself with a self-probe ([`pubsub`]).
//! - Each connection is a [`link::Link`]: non-blocking connect to an
//!   address resolved off the loop, write interest only while output is
//!   pending, reconnect with backoff.
//!
//! Why on the loop and not on an I/O thread: the loop already multiplexes
//! hundreds of sockets; two more cost one `epoll` registration each, no
//! context switch per reply, no lock, and a callback runs with the
//! application's state in hand (`|app, srv, reply|`) exactly like every
//! other hook. A thread would add a mailbox hop to every reply and a
//! second place where ordering could break.
//!
//! Applications use it through [`crate::reactor::Server`]: `redis`,
//! `redis_send`, `redis_durable`, `redis_subscribe`, `redis_ok`,
//! `redis_ready`.

pub mod client;
pub mod link;
pub mod pubsub;
pub mod request;
pub mod resp;
pub mod slot;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::{Registry, Token};
use redis::IntoConnectionInfo;

pub use client::Reply;
pub use request::{Request, Script, ScriptCall};
pub use slot::slot_of;

use crate::process::scoreboard::Row;
use crate::reactor::resolve::Resolver;
use client::Commands;
use link::{Link, LinkState, ReadOutcome};
use pubsub::Subscriber;

/// How often the client checks timeouts, reconnects and probes.
pub const TICK: Duration = Duration::from_millis(100);

/// Default `redis_timeout`: a request unanswered this long breaks the
/// link (every pending callback fires with an error, and it reconnects).
/// Far above a healthy Redis's latency, below any user's patience.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Which of the client's sockets an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The command connection.
    Commands,
    /// The subscriber connection.
    Subscriber,
}

/// A worker's Redis client (none when `redis_url` is unset).
pub struct RedisClient<A, S> {
    worker_id: usize,                 // for logs
    pub(crate) cmd: Commands<A, S>,   // requests and callbacks
    pub(crate) sub: Subscriber<A, S>, // pub/sub handlers and the probe
    sub_wanted: bool,                 // some handler was registered
    outage_logged: bool,              // the current outage was logged
    row: &'static Row,                // where the counters go
    probe_seq: u64,                   // probe payload counter
}

impl<A, S> std::fmt::Debug for RedisClient<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("cmd", &self.cmd)
            .field("sub", &self.sub)
            .finish()
    }
}

impl<A, S> RedisClient<A, S> {
    /// A client for `url` using the two tokens; `None` with an error text
    /// when the URL is not one this client can dial.
    pub fn new(
        url: &str,
        tokens: (Token, Token),
        timeout: Duration,
        worker_id: usize,
        row: &'static Row,
    ) -> Result<RedisClient<A, S>, String> {
        let info = url
            .into_connection_info()
            .map_err(|e| format!("bad redis_url {url:?}: {e}"))?;
        let (host, port) = match info.addr {
            redis::ConnectionAddr::Tcp(h, p) => (h, p),
            other => {
                return Err(format!(
                    "redis_url {url:?}: {other:?} is not supported (tcp only)"
                ))
            }
        };
        let resolver = Resolver::new(&host, port);
        let mut hello = Vec::new();
        if let Some(pw) = &info.redis.password {
            let mut c = redis::cmd("AUTH");
            if let Some(u) = &info.redis.username {
                c.arg(u);
            }
            c.arg(pw);
            hello.push(c);
        }
        if info.redis.db != 0 {
            let mut c = redis::cmd("SELECT");
            c.arg(info.redis.db);
            hello.push(c);
        }
        let probe = format!("swocloud:probe:{}:{worker_id}", std::process::id());
        Ok(RedisClient {
            worker_id,
            cmd: Commands::new(
                Link::new("redis", tokens.0, resolver.clone()),
                hello,
                timeout,
            ),
            sub: Subscriber::new(Link::new("redis pub/sub", tokens.1, resolver), probe),
            sub_wanted: false,
            outage_logged: false,
            row,
            probe_seq: 0,
        })
    }

    /// Whether the client talks to a Redis Cluster (keys of one script or
    /// MULTI must then share a slot, and pub/sub is sharded).
    pub fn is_cluster(&self) -> bool {
        false
    }

    /// The command that publishes to a channel: `SPUBLISH` on a cluster
    /// (sharded pub/sub), `PUBLISH` otherwise. A Lua script that publishes
    /// takes it as an argument, and its channel shares the script's tag.
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Whether the command connection is up.
    pub fn is_up(&self) -> bool {
        self.cmd.link.is_up()
    }

    /// `Ok` when commands flow and, if anything is subscribed, the
    /// subscriber is verified by its probe; otherwise the reason.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.is_up() {
            return Err("redis unavailable");
        }
        if self.sub_wanted && !self.sub.verified() {
            return Err("redis pub/sub not verified");
        }
        Ok(())
    }

    /// Registers a pub/sub handler for `channel`.
    pub fn subscribe(&mut self, channel: Vec<u8>, h: pubsub::Handler<A, S>, registry: &Registry) {
        self.sub_wanted = true;
        self.sub.subscribe(channel, h);
        self.tick(registry, Instant::now());
    }

    /// Periodic work: dial what is down, break what is overdue, probe.
    pub fn tick(&mut self, registry: &Registry, now: Instant) {
        if self.cmd.link.connect_overdue(now) {
            self.cmd_broken("connect timed out", false, now);
        }
        if self.cmd.overdue(now) {
            let why = format!(
                "no reply within redis_timeout from {}",
                self.cmd.link.target()
            );
            self.cmd_broken(&why, true, now);
        }
        match self.cmd.link.dial_if_due(registry, now) {
            Ok(true) => self.cmd.on_dial(),
            Ok(false) => {}
            Err(e) => self.log_outage(&e),
        }
        if self.sub_wanted {
            if self.sub.link.connect_overdue(now) {
                self.sub.link.fail(now);
            }
            match self.sub.link.dial_if_due(registry, now) {
                Ok(true) => self.sub.on_dial(),
                Ok(false) => {}
                Err(e) => log::debug!("worker {}: {e}", self.worker_id),
            }
            match self.sub.check(now) {
                Some(true) if self.is_up() => {
                    self.probe_seq += 1;
                    let mut c = redis::cmd("PUBLISH");
                    c.arg(self.sub.probe_channel()).arg(self.probe_seq);
                    self.cmd.submit(Request::Cmd(c), None, false);
                }
                Some(true) => {}
                Some(false) => {
                    log::warn!(
                        "worker {}: redis pub/sub to {}: a probe did not come back within {:?}; reconnecting and resubscribing",
                        self.worker_id,
                        self.sub.link.target(),
                        pubsub::PROBE_TIMEOUT
                    );
                    self.sub.link.fail(now);
                    self.sub.health = pubsub::Health::Unverified { probe_sent: None };
                }
                None => {}
            }
        }
        self.publish_counts();
    }

    fn log_outage(&mut self, e: &str) {
        self.row.redis_up.store(0, Relaxed);
        if !self.outage_logged {
            log::warn!(
                "worker {}: redis unavailable ({e}); serving without it, retrying with backoff",
                self.worker_id
            );
            self.outage_logged = true;
        }
    }

    fn cmd_broken(&mut self, why: &str, timed_out: bool, now: Instant) {
        self.row.redis_errors.fetch_add(1, Relaxed);
        self.log_outage(why);
        self.cmd.link.fail(now);
        self.cmd.on_broken(why, timed_out);
    }

    /// A readiness event on one of the client's sockets.
    pub fn on_event(&mut self, which: Which, registry: &Registry) {
        let now = Instant::now();
        match which {
            Which::Commands => {
                if matches!(self.cmd.link.state, LinkState::Connecting { .. }) {
                    match self.cmd.link.finish_connect() {
                        Ok(true) => {
                            if self.outage_logged {
                                log::info!("worker {}: redis is back", self.worker_id);
                                self.row.redis_reconnects.fetch_add(1, Relaxed);
                                self.outage_logged = false;
                            }
                            self.row.redis_up.store(1, Relaxed);
                        }
                        Ok(false) => return,
                        Err(e) => return self.cmd_broken(&e, false, now),
                    }
                }
                let cmd = &mut self.cmd;
                let mut replies = Vec::new();
                let outcome = cmd.link.read_replies(|v| replies.push(v));
                for v in replies {
                    cmd.on_reply(v);
                }
                if let ReadOutcome::Broken(why) = outcome {
                    return self.cmd_broken(&why, false, now);
                }
                if let Err(e) = self.cmd.link.flush(registry) {
                    self.cmd_broken(&e, false, now);
                }
            }
            Which::Subscriber => {
                if matches!(self.sub.link.state, LinkState::Connecting { .. }) {
                    match self.sub.link.finish_connect() {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            log::debug!("worker {}: {e}", self.worker_id);
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
                    log::warn!("worker {}: {why}; resubscribing", self.worker_id);
                    self.sub.link.fail(now);
                    return;
                }
                if let Err(e) = self.sub.link.flush(registry) {
                    log::warn!("worker {}: {e}; resubscribing", self.worker_id);
                    self.sub.link.fail(now);
                }
            }
        }
    }

    /// Writes what was queued this iteration (one write per link).
    pub fn flush(&mut self, registry: &Registry) {
        if self.cmd.link.pending_out() > 0 {
            if let Err(e) = self.cmd.link.flush(registry) {
                self.cmd_broken(&e, false, Instant::now());
            }
        }
        if self.sub.link.pending_out() > 0 {
            if let Err(e) = self.sub.link.flush(registry) {
                log::warn!("worker {}: {e}; resubscribing", self.worker_id);
                self.sub.link.fail(Instant::now());
            }
        }
    }

    /// Copies the client's figures into the scoreboard row.
    pub fn publish_counts(&self) {
        let c = self.cmd.counts;
        let r = self.row;
        r.redis_pending.store(self.cmd.in_flight() as u64, Relaxed);
        r.redis_queued.store(self.cmd.queued() as u64, Relaxed);
        r.redis_cmd_errors.store(c.errors, Relaxed);
        r.redis_timeouts.store(c.timeouts, Relaxed);
        r.redis_retried.store(c.retried, Relaxed);
        r.redis_dropped.store(c.dropped, Relaxed);
        r.redis_probe_failures
            .store(self.sub.probes_failed, Relaxed);
        r.redis_sub_verified
            .store(u64::from(!self.sub_wanted || self.sub.verified()), Relaxed);
    }
}
