//! [`Server<A>`]: the handle every worker hook gets, with Swoole's verbs
//! (`push`, `exist`, `disconnect`, `tick`, `task`, …). It owns the worker's
//! connection table (`table.rs`), timers, mailboxes, Redis link and
//! lifecycle (`lifecycle.rs`); the event loop drives it.
//!
//! Verbs act at once where they can: `push` encodes straight into the
//! connection's write buffer, which the loop flushes once per iteration
//! ("before sleep", as Redis's ae does); a large payload with nothing
//! queued ahead of it is written at once with `writev` from the message's
//! own bytes (see `frame.rs`). What cannot happen inside a hook —
//! tearing a connection down, which runs `on_close`, and event-bus triggers
//! from `emit` — is recorded and done by the loop after the hook returns.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::Settings;
use crate::event::App;
use crate::process::ipc::{Dest, Envelope, Postbox, SendError};
use crate::process::scoreboard::{Row, Scoreboard};
use crate::reactor::conn::{Conn, ConnSnapshot, ConnectionInfo, Phase};
use crate::reactor::lifecycle::Lifecycle;
use crate::reactor::redis::{client::Callback, RedisClient, Reply, Request};
use crate::reactor::table::ConnTable;
use crate::reactor::timer::{TimerId, TimerWheel};
use crate::reactor::websocket::Message;
use crate::reactor::{Fd, WorkerContext, WorkerExit};

use std::sync::atomic::Ordering::Relaxed;

/// A timer callback: gets the application, the server and its own id.
pub type TimerCallback<A> = Box<dyn FnMut(&mut A, &mut Server<A>, TimerId)>;

/// How long a closing connection may take to flush its output and for the
/// peer to answer our close frame before it is cut: long enough for a
/// healthy peer on a slow link, short enough not to hoard sockets.
pub const LINGER: Duration = Duration::from_secs(2);

/// What a timer does when it fires.
pub(crate) enum TimerTask<A: App> {
    /// An application callback (`tick` / `after`).
    User(TimerCallback<A>),
    /// Close the connection if it has not finished its handshake.
    Handshake(Fd),
    /// Cut a closing connection that lingered too long.
    Linger(Fd),
    /// Close idle connections (heartbeat).
    Heartbeat,
    /// Refresh `rss_kib` in the scoreboard row.
    Rss,
    /// The Redis client's periodic check (reconnect, timeouts, probes).
    RedisTick,
    /// The graceful stop's deadline.
    StopDeadline,
    /// Accept again after a back-off (`accept.rs`).
    AcceptRetry,
}

/// The application's view of its worker.
pub struct Server<A: App> {
    pub(crate) conns: ConnTable, // connections, flush and teardown lists
    pub(crate) timers: TimerWheel<TimerTask<A>>, // app and reactor timers
    pub(crate) postbox: Postbox, // worker/task mailboxes
    pub(crate) settings: Arc<Settings>, // this server's settings
    pub(crate) worker_id: usize, // slot id
    pub(crate) row: &'static Row, // our scoreboard row
    pub(crate) redis: Option<RedisClient<A, Server<A>>>, // the worker's Redis (none: no redis_url)
    pub(crate) redis_late: Vec<(Callback<A, Server<A>>, Reply)>, // completions with no client
    pub(crate) resume: Vec<Fd>,  // HTTP connections answered late: decode what waited
    pub(crate) in_request: Option<Fd>, // the connection whose on_request runs now
    pub(crate) early: Option<crate::reactor::Response>, // its answer, given before it returned later()
    pub(crate) emits: Vec<(String, Vec<Value>)>,        // deferred bus triggers
    pub(crate) lifecycle: Lifecycle, // adopting, serving, draining, handing over, done
    task_worker: bool,               // task worker (no listener)
    scoreboard: Scoreboard,          // everyone's rows
    next_task_id: u64,               // task id counter
    next_task_worker: usize,         // round-robin cursor
    pub(crate) codec: crate::reactor::deflate::Codec, // permessage-deflate, shared
}

impl<A: App> std::fmt::Debug for Server<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("worker_id", &self.worker_id)
            .field("task_worker", &self.task_worker)
            .field("connections", &self.conns.len())
            .field("lifecycle", &self.lifecycle.name())
            .finish()
    }
}

impl<A: App> Server<A> {
    /// The handle of a worker about to start: `ctx`'s mailboxes, settings
    /// and scoreboard (its listeners, handover link and readiness callback
    /// were taken by the loop), the connection table, the lifecycle and
    /// the Redis link.
    pub(crate) fn new(
        ctx: WorkerContext,
        conns: ConnTable,
        lifecycle: Lifecycle,
        redis: Option<RedisClient<A, Server<A>>>,
    ) -> Server<A> {
        Server {
            conns,
            timers: TimerWheel::new(),
            postbox: ctx.postbox,
            redis,
            redis_late: Vec::new(),
            resume: Vec::new(),
            in_request: None,
            early: None,
            codec: crate::reactor::deflate::Codec::new(ctx.settings.deflate_config()),
            settings: ctx.settings,
            worker_id: ctx.worker_id,
            task_worker: ctx.task_worker,
            row: ctx.row,
            scoreboard: ctx.scoreboard,
            emits: Vec::new(),
            lifecycle,
            next_task_id: 0,
            next_task_worker: ctx.worker_id,
        }
    }

    fn conn_mut(&mut self, fd: Fd) -> Option<&mut Conn> {
        self.conns.conn_mut(fd)
    }

    /// Queues a connection for the before-sleep flush (see
    /// [`ConnTable::mark_dirty`]).
    pub(crate) fn mark_dirty(&mut self, fd: Fd) {
        self.conns.mark_dirty(fd);
    }

    /// Starts a graceful close of `fd`: flush, shut down, linger.
    pub(crate) fn close_gracefully(&mut self, fd: Fd) {
        self.conns.close_gracefully(fd, &mut self.timers);
    }

    // ---- Swoole's verbs -------------------------------------------------

    /// Sends a WebSocket message to `fd`. False if `fd` is gone, is not an
    /// open WebSocket, or was just cut for exceeding `buffer_output_size`.
    pub fn push(&mut self, fd: Fd, msg: impl Into<Message>) -> bool {
        let msg = msg.into();
        let Some(key) = self.conns.key(fd) else {
            return false;
        };
        if !self.conns[key].queue_owned(msg, &mut self.codec) {
            return false;
        }
        self.row.messages_out.fetch_add(1, Relaxed);
        self.mark_dirty(fd);
        self.conns.key(fd).is_some() && !self.conns.is_doomed(fd)
    }

    /// Answers the request `on_request` deferred with
    /// [`Response::later`](crate::reactor::Response::later) on `fd`.
    /// Requests the client pipelined meanwhile are then decoded, in order.
    /// False if `fd` is gone or has no answer pending.
    pub fn respond(&mut self, fd: Fd, resp: crate::reactor::Response) -> bool {
        let inside = self.in_request == Some(fd);
        let Some(c) = self.conn_mut(fd) else {
            return false;
        };
        let Phase::HttpAnswering { keep } = c.phase else {
            // Answered from inside the `on_request` that is deferring it
            // (the data was at hand after all): the loop uses this answer.
            if inside && matches!(c.phase, Phase::Http) {
                self.early = Some(resp);
                return true;
            }
            return false;
        };
        c.phase = Phase::Http;
        if self.answer(fd, &resp, keep) {
            self.resume.push(fd);
        }
        true
    }

    /// Encodes an HTTP answer on `fd`; false when the connection closes
    /// after it.
    pub(crate) fn answer(&mut self, fd: Fd, resp: &crate::reactor::Response, keep: bool) -> bool {
        let Some(c) = self.conn_mut(fd) else {
            return false;
        };
        resp.encode_into(keep, &mut c.wbuf);
        let class = usize::from(resp.status / 100).clamp(1, 5) - 1;
        self.row.http_status[class].fetch_add(1, Relaxed);
        if keep {
            self.mark_dirty(fd);
            true
        } else {
            self.close_gracefully(fd);
            false
        }
    }

    /// Exempts `fd` from `max_messages_per_second` from now on (a peer the
    /// application trusts and that carries many users' messages, such as
    /// an authenticated IM server's link). False if `fd` is gone.
    pub fn exempt_from_rate_limit(&mut self, fd: Fd) -> bool {
        let Some(c) = self.conn_mut(fd) else {
            return false;
        };
        c.limits.unlimited = true;
        c.limits.bucket = None;
        true
    }

    /// Whether `fd` is a live connection (not closing).
    pub fn exist(&self, fd: Fd) -> bool {
        self.conns
            .key(fd)
            .is_some_and(|k| !self.conns[k].is_closing() && !self.conns.is_doomed(fd))
    }

    /// Sends a close frame with `code` and `reason`, then closes once the
    /// peer answers (or after [`LINGER`]). False if not an open WebSocket.
    pub fn disconnect(&mut self, fd: Fd, code: u16, reason: &str) -> bool {
        let Some(c) = self.conn_mut(fd) else {
            return false;
        };
        if !c.queue_close(code, reason) {
            return false;
        }
        self.conns.arm_linger(fd, &mut self.timers);
        self.mark_dirty(fd);
        true
    }

    /// Closes `fd` (pending output is flushed first; no close frame). False
    /// if it is gone.
    pub fn close(&mut self, fd: Fd) -> bool {
        if self.conns.key(fd).is_none() {
            return false;
        }
        self.close_gracefully(fd);
        true
    }

    /// Facts about a connection.
    pub fn connection_info(&self, fd: Fd) -> Option<ConnectionInfo> {
        self.conns
            .key(fd)
            .map(|k| self.conns[k].info(self.worker_id))
    }

    /// Every live (not closing) connection of this worker. O(n).
    pub fn connections(&self) -> Vec<Fd> {
        self.conns
            .iter()
            .filter(|c| !c.is_closing())
            .map(|c| c.fd)
            .collect()
    }

    /// The connection as data (phase, buffers, attributes).
    pub fn snapshot(&self, fd: Fd) -> Option<ConnSnapshot> {
        self.conns
            .key(fd)
            .map(|k| self.conns[k].snapshot(self.worker_id))
    }

    /// Gives `fd` its own idle limit in place of `heartbeat_idle_time`
    /// (`None`: back to the setting; at most about 49 days). False if it
    /// is gone.
    pub fn set_idle_limit(&mut self, fd: Fd, limit: Option<Duration>) -> bool {
        let Some(c) = self.conn_mut(fd) else {
            return false;
        };
        c.limits.idle_limit_ms =
            limit.map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        true
    }

    /// Sets an application attribute on a connection; false if it is gone.
    pub fn set_attr(&mut self, fd: Fd, key: &str, value: Value) -> bool {
        let Some(c) = self.conn_mut(fd) else {
            return false;
        };
        c.attrs
            .get_or_insert_with(Default::default)
            .insert(key.to_string(), value);
        true
    }

    /// An application attribute of a connection.
    pub fn attr(&self, fd: Fd, key: &str) -> Option<&Value> {
        let k = self.conns.key(fd)?;
        self.conns[k].attrs.as_ref()?.get(key)
    }

    /// Removes an attribute and returns it.
    pub fn remove_attr(&mut self, fd: Fd, key: &str) -> Option<Value> {
        self.conn_mut(fd)?.attrs.as_mut()?.remove(key)
    }

    /// Calls `cb` every `ms` milliseconds until [`Server::clear_timer`].
    pub fn tick(
        &mut self,
        ms: u64,
        cb: impl FnMut(&mut A, &mut Server<A>, TimerId) + 'static,
    ) -> TimerId {
        let every = Duration::from_millis(ms.max(1));
        self.timers.insert(
            Instant::now(),
            every,
            Some(every),
            TimerTask::User(Box::new(cb)),
        )
    }

    /// Calls `cb` once, `ms` milliseconds from now.
    pub fn after(
        &mut self,
        ms: u64,
        cb: impl FnMut(&mut A, &mut Server<A>, TimerId) + 'static,
    ) -> TimerId {
        self.timers.insert(
            Instant::now(),
            Duration::from_millis(ms),
            None,
            TimerTask::User(Box::new(cb)),
        )
    }

    /// Cancels a timer (safe from inside its own callback). False if it does
    /// not exist or already ended.
    pub fn clear_timer(&mut self, id: TimerId) -> bool {
        self.timers.cancel(id)
    }

    /// This worker's slot id.
    pub fn worker_id(&self) -> usize {
        self.worker_id
    }

    /// Number of event workers.
    pub fn worker_count(&self) -> usize {
        self.postbox.worker_count()
    }

    /// Number of task workers.
    pub fn task_worker_count(&self) -> usize {
        self.postbox.task_count()
    }

    /// Whether this is a task worker.
    pub fn is_task_worker(&self) -> bool {
        self.task_worker
    }

    /// The server's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Sends bytes to another worker's `on_pipe_message`.
    pub fn send_message(&mut self, worker_id: usize, data: Vec<u8>) -> Result<(), SendError> {
        let from = self.worker_id as u32;
        self.postbox
            .send(Dest::Worker(worker_id), &Envelope::Pipe { from, data })
    }

    /// Hands a job to a task worker (round-robin); its `on_task` result
    /// comes back to this worker's `on_finish` with the returned id.
    pub fn task(&mut self, data: Vec<u8>) -> Result<u64, SendError> {
        let n = self.postbox.task_count();
        if n == 0 {
            return Err(SendError::NoSuchDestination(Dest::TaskWorker(0)));
        }
        let to = Dest::TaskWorker(self.next_task_worker % n);
        self.next_task_worker = self.next_task_worker.wrapping_add(1);
        self.next_task_id += 1;
        let id = self.next_task_id;
        self.postbox.send(
            to,
            &Envelope::Task {
                id,
                from: self.worker_id as u32,
                data,
            },
        )?;
        self.row.tasks.fetch_add(1, Relaxed);
        Ok(id)
    }

    /// A thread-safe sender into this worker's own inbox: a thread the
    /// application started (a Redis subscriber, say) hands messages to the
    /// loop this way, and they arrive in `on_pipe_message` with `from` set to
    /// this worker's id.
    pub fn self_sender(&self) -> io::Result<crate::process::ipc::PipeSender> {
        self.postbox.sender(self.postbox.me())
    }

    // ---- Redis (non-blocking; see crate::reactor::redis) --------------

    /// Sends `req` to Redis; `cb` gets the reply converted to `T`, or an
    /// error (Redis down, link lost, `redis_timeout`, a server error, a
    /// reply of another type). It always fires, once, after the calling
    /// hook has returned, never inside it. Requests are pipelined: all
    /// made in one loop iteration go out in one write.
    pub fn redis<T: redis::FromRedisValue + 'static>(
        &mut self,
        req: impl Into<Request>,
        cb: impl FnOnce(&mut A, &mut Server<A>, redis::RedisResult<T>) + 'static,
    ) {
        self.submit_with(req.into(), cb, false);
    }

    /// Boxes `cb` (converting the reply to `T`) and submits `req`.
    fn submit_with<T: redis::FromRedisValue + 'static>(
        &mut self,
        req: Request,
        cb: impl FnOnce(&mut A, &mut Server<A>, redis::RedisResult<T>) + 'static,
        durable: bool,
    ) {
        let cb: Callback<A, Server<A>> =
            Box::new(move |app, srv, r: Reply| cb(app, srv, r.and_then(T::from_owned_redis_value)));
        match self.redis.as_mut() {
            Some(c) => c.submit(req, Some(cb), durable),
            None => self.redis_late.push((cb, Err(not_configured()))),
        }
    }

    /// Sends `req` and forgets it; a failure is counted and logged.
    pub fn redis_send(&mut self, req: impl Into<Request>) {
        if let Some(c) = self.redis.as_mut() {
            c.submit(req.into(), None, false);
        }
    }

    /// Sends `req`, which must reach Redis (a removal, a renewal): while
    /// Redis is away it waits in a bounded queue and goes out first when
    /// the link is back. Counted in `/metrics`
    /// (`swocloud_redis_queued`, `_retried_total`, `_dropped_total`).
    pub fn redis_durable(&mut self, req: impl Into<Request>) {
        if let Some(c) = self.redis.as_mut() {
            c.submit(req.into(), None, true);
        }
    }

    /// [`Server::redis_durable`] whose reply also reaches `cb` (once it got
    /// through; an error only if it could not be kept).
    pub fn redis_durable_then<T: redis::FromRedisValue + 'static>(
        &mut self,
        req: impl Into<Request>,
        cb: impl FnOnce(&mut A, &mut Server<A>, redis::RedisResult<T>) + 'static,
    ) {
        self.submit_with(req.into(), cb, true);
    }

    /// Calls `handler` with the payload of every message published on
    /// `channel`, on this worker's subscriber connection (resubscribed
    /// after every reconnect, verified by a self-probe).
    pub fn redis_subscribe(
        &mut self,
        channel: impl Into<Vec<u8>>,
        handler: impl FnMut(&mut A, &mut Server<A>, &[u8]) + 'static,
    ) {
        if let Some(c) = self.redis.as_mut() {
            c.subscribe(channel.into(), Box::new(handler), self.conns.registry());
        }
    }

    /// Counts the subscriber connection's (re)connects: when it changes,
    /// messages published in between may have been missed, so what they
    /// would have invalidated must be dropped.
    pub fn redis_sub_generation(&self) -> u64 {
        self.redis.as_ref().map_or(0, |c| c.sub_generation())
    }

    /// Whether a Redis URL is configured.
    pub fn redis_configured(&self) -> bool {
        self.redis.is_some()
    }

    /// Whether the Redis command link is up.
    pub fn redis_ok(&self) -> bool {
        self.redis.as_ref().is_some_and(|c| c.is_up())
    }

    /// Whether requests for `key` flow (on a cluster: its slot's master
    /// is connected, whatever the other masters do).
    pub fn redis_ok_for(&self, key: &str) -> bool {
        self.redis
            .as_ref()
            .is_some_and(|c| c.is_up_for(key.as_bytes()))
    }

    /// `Ok` while commands flow and every subscription is verified by its
    /// probe; otherwise why not (for `/ready`).
    pub fn redis_ready(&self) -> Result<(), &'static str> {
        match &self.redis {
            Some(c) => c.ready(),
            None => Err("redis not configured"),
        }
    }

    /// Whether the worker's Redis is a Redis Cluster: everything one Lua
    /// script or MULTI touches must then share a hash tag
    /// ([`crate::reactor::redis::slot_of`] tells a key's slot).
    pub fn redis_cluster(&self) -> bool {
        self.redis.as_ref().is_some_and(|c| c.is_cluster())
    }

    /// `SPUBLISH` on a cluster, `PUBLISH` otherwise (for Lua scripts that
    /// publish; plain `PUBLISH` requests are translated by the client).
    pub fn redis_publish_command(&self) -> &'static str {
        self.redis
            .as_ref()
            .map_or("PUBLISH", |c| c.publish_command())
    }

    /// Counts the Redis events after which acknowledged writes may be
    /// missing (a link broke, a failover, a slot moved): see
    /// [`crate::reactor::redis::RedisClient::disruptions`].
    pub fn redis_disruptions(&self) -> u64 {
        self.redis.as_ref().map_or(0, |c| c.disruptions())
    }

    /// Requests on the wire plus durable ones waiting (for stats).
    pub fn redis_backlog(&self) -> (usize, usize) {
        self.redis.as_ref().map_or((0, 0), |c| c.backlog())
    }

    /// This worker's scoreboard row.
    pub fn row(&self) -> &'static Row {
        self.row
    }

    /// This worker's counters: its scoreboard row, copied.
    pub fn stats(&self) -> Option<crate::process::scoreboard::RowSnapshot> {
        let me = std::process::id() as i32;
        self.scoreboard.snapshot().into_iter().find(|r| r.pid == me)
    }

    /// The whole server's scoreboard.
    pub fn scoreboard(&self) -> Scoreboard {
        self.scoreboard
    }

    /// Triggers `event` on the worker's event bus after the current hook
    /// returns.
    pub fn emit(&mut self, event: &str, args: Vec<Value>) {
        self.emits.push((event.to_string(), args));
    }

    /// Stops this worker gracefully (as on SIGTERM).
    pub fn stop(&mut self) {
        self.lifecycle.ask(WorkerExit::Stopped);
    }

    /// Whether the worker is draining.
    pub fn is_stopping(&self) -> bool {
        self.lifecycle.is_stopping()
    }

    /// Whether this worker is stopping by handing its connections to its
    /// replacement (a rolling reload or a `max_request` replacement): they
    /// stay open, so there is no goodbye to say.
    pub fn is_handing_over(&self) -> bool {
        self.lifecycle.is_handing_over()
    }

    /// Whether this worker is still taking connections from the worker it
    /// replaces (`on_adopt` runs for each); it accepts nothing and reads no
    /// mailbox message until that is done.
    pub fn is_adopting(&self) -> bool {
        self.lifecycle.is_adopting()
    }
}

fn not_configured() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::ClientError,
        "redis not configured",
        String::new(),
    ))
}
