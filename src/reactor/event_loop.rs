//! The worker's mio loop: fixed tokens for the listener, the signal pipe,
//! the IPC inbox and the waker; then one token per connection (slab key +
//! [`FIRST_CONN`]). One iteration is: poll (sleeping until the earliest
//! timer), handle the readiness events, run expired timers, then the
//! before-sleep step — tear down doomed connections (running `on_close`),
//! flush every connection with pending output, flush the IPC queue, run
//! deferred event-bus triggers.
//!
//! Readiness is edge-triggered: accept and drain until `WouldBlock` (a read
//! that returns less than the buffer also ends a drain: the queue was empty);
//! spurious events are harmless. The graceful stop's steps live here too;
//! which step is due is the lifecycle's (`lifecycle.rs`) to say. Accepting
//! is in `accept.rs`; hook calls, teardown and timers in `dispatch.rs`.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::event::{App, EventBus};
use crate::process::scoreboard;
use crate::process::signals::{self, Control};
use crate::reactor::accept::AcceptPause;
use crate::reactor::conn::Phase;
pub use crate::reactor::lifecycle::StopHandle;
use crate::reactor::migrate::Migrate;
use crate::reactor::redis::{target::Plan, RedisClient};
use crate::reactor::server::{Server, TimerTask};
use crate::reactor::table::ConnTable;
use crate::reactor::{WorkerContext, WorkerExit};

use std::sync::atomic::Ordering::Relaxed;

pub(crate) const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const INBOX: Token = Token(2);
const WAKER: Token = Token(3);
/// The slot's handover socket, successor side (see `migrate.rs`).
pub(crate) const HANDOVER_RX: Token = Token(4);
/// The slot's handover socket, predecessor side (ACKs).
pub(crate) const HANDOVER_TX: Token = Token(5);
/// The admin listener (`admin_listen`): far above any connection token.
const ADMIN_LISTENER: Token = Token(usize::MAX - 1);
/// The worker's Redis connections: a range far above any connection
/// token and below the admin listener (see `redis::node::tokens`).
const REDIS_FIRST: usize = crate::reactor::redis::node::FIRST_TOKEN;
/// The last token of the Redis range.
const REDIS_LAST: usize = REDIS_FIRST + 2 * crate::reactor::redis::node::MAX_NODES;
/// The readiness callback of a [`WorkerContext`].
pub(crate) type OnReady = Option<Box<dyn FnOnce()>>;
/// First connection token.
pub(crate) const FIRST_CONN: usize = 6;
/// Size of the per-worker read scratch buffer.
const SCRATCH: usize = 64 * 1024;
/// How often `rss_kib` is refreshed: cheap (/proc read), but not free.
const RSS_EVERY: Duration = Duration::from_secs(3);
/// Poll timeout while IPC messages wait for a full mailbox to drain.
const IPC_RETRY: Duration = Duration::from_millis(10);

/// The token of a connection's slab key.
pub(crate) fn token_of(key: usize) -> Token {
    Token(key + FIRST_CONN)
}

/// One worker's loop state.
pub(crate) struct Reactor<A: App> {
    pub(crate) poll: Poll,                                    // the epoll instance
    pub(crate) listener: Option<mio::net::TcpListener>,       // None: task worker or stopping
    pub(crate) admin_listener: Option<mio::net::TcpListener>, // admin_listen, like listener
    pub(crate) srv: Server<A>,                                // what hooks see
    pub(crate) bus: EventBus<Server<A>>,                      // the application's listeners
    pub(crate) scratch: Vec<u8>,                              // shared read buffer
    pub(crate) stop: StopHandle,                              // external stop trigger
    pub(crate) requests: u64,                                 // requests served (max_request)
    pub(crate) migrate: Migrate,                              // handover link and reassembly
    pub(crate) accept_pause: AcceptPause,                     // accept back-off (EMFILE, …)
}

impl<A: App> Reactor<A> {
    /// Builds the loop: registers the listener, signal pipe and inbox.
    pub(crate) fn new(
        mut ctx: WorkerContext,
        stop: StopHandle,
    ) -> io::Result<(Reactor<A>, OnReady)> {
        let ctxerr = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("worker {}: {what}: {e}", ctx.worker_id))
        };
        let poll = Poll::new().map_err(|e| ctxerr("creating the poll", e))?;
        let registry = poll.registry();
        let waker =
            Arc::new(Waker::new(registry, WAKER).map_err(|e| ctxerr("creating the waker", e))?);
        stop.bind(waker);
        let (migrate, lifecycle) = Migrate::new(ctx.handover.take(), ctx.settings.max_wait_time);
        let on_ready = ctx.on_ready.take();
        let listener = match ctx.listener.take() {
            Some(l) => {
                l.set_nonblocking(true)
                    .map_err(|e| ctxerr("listener nonblocking", e))?;
                let mut l = mio::net::TcpListener::from_std(l);
                if lifecycle.accepts() {
                    registry
                        .register(&mut l, LISTENER, Interest::READABLE)
                        .map_err(|e| ctxerr("registering the listener", e))?;
                }
                Some(l)
            }
            None => None,
        };
        if let Some(fd) = migrate.rx_fd() {
            registry
                .register(&mut SourceFd(&fd), HANDOVER_RX, Interest::READABLE)
                .map_err(|e| ctxerr("registering the handover socket", e))?;
        }
        let admin_listener = match ctx.admin_listener.take() {
            Some(l) => {
                l.set_nonblocking(true)
                    .map_err(|e| ctxerr("admin listener nonblocking", e))?;
                let mut l = mio::net::TcpListener::from_std(l);
                registry
                    .register(&mut l, ADMIN_LISTENER, Interest::READABLE)
                    .map_err(|e| ctxerr("registering the admin listener", e))?;
                Some(l)
            }
            None => None,
        };
        if ctx.watch_signals {
            let fd: RawFd = signals::wake_fd();
            if fd >= 0 {
                registry
                    .register(&mut SourceFd(&fd), SIGNALS, Interest::READABLE)
                    .map_err(|e| ctxerr("registering the signal pipe", e))?;
            } else {
                log::warn!(
                    "worker {}: watch_signals set but no signal pipe exists",
                    ctx.worker_id
                );
            }
        }
        let inbox = ctx.postbox.inbox_fd();
        registry
            .register(&mut SourceFd(&inbox), INBOX, Interest::READABLE)
            .map_err(|e| ctxerr("registering the inbox", e))?;
        let conn_registry = registry
            .try_clone()
            .map_err(|e| ctxerr("cloning the registry", e))?;
        let conns = ConnTable::new(conn_registry, ctx.settings.buffer_output_size, ctx.row);
        let redis = match Plan::of(&ctx.settings) {
            Ok(None) => None,
            Ok(Some(plan)) => Some(RedisClient::new(
                plan,
                Duration::from_secs_f64(ctx.settings.redis_timeout.max(0.05)),
                ctx.worker_id,
                ctx.row,
            )),
            Err((key, e)) => {
                log::error!(
                    "worker {}: {key}: {e}; running without Redis",
                    ctx.worker_id
                );
                None
            }
        };
        let srv = Server::new(ctx, conns, lifecycle, redis);
        let r = Reactor {
            poll,
            listener,
            admin_listener,
            srv,
            bus: EventBus::new(),
            scratch: vec![0; SCRATCH],
            stop,
            requests: 0,
            migrate,
            accept_pause: AcceptPause::default(),
        };
        Ok((r, on_ready))
    }

    /// Runs start-up, the loop, and shutdown; returns why it ended.
    pub(crate) fn run(mut self, app: &mut A, on_ready: OnReady) -> io::Result<WorkerExit> {
        self.start(app)?;
        if let Some(f) = on_ready {
            f();
        }
        log::debug!("worker {}: serving", self.srv.worker_id);
        let mut events = Events::with_capacity(1024);
        loop {
            if self.stop.is_stopped() {
                self.srv.lifecycle.ask(WorkerExit::Stopped);
            }
            // A worker still adopting hands over only once it has all.
            if let Some(exit) = self.srv.lifecycle.due() {
                if exit == WorkerExit::HandedOver {
                    self.begin_handover(app);
                } else {
                    self.begin_stop(app, exit);
                }
                self.before_sleep(app); // the 1001 frames go out now
            }
            if self.srv.lifecycle.can_end() && self.srv.conns.is_empty() {
                if let Err(e) = self.srv.lifecycle.end() {
                    log::error!("worker {}: {e}", self.srv.worker_id); // unreachable: can_end held
                }
                break;
            }
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("worker {}: poll: {e}", self.srv.worker_id),
                ));
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    ADMIN_LISTENER => self.accept_from(true),
                    SIGNALS => self.on_signals(),
                    INBOX if self.srv.lifecycle.reads_mailbox() => self.drain_inbox(app),
                    INBOX | WAKER => {}
                    HANDOVER_RX => self.on_handover_rx(app),
                    HANDOVER_TX => self.on_handover_tx(),
                    Token(t) if (REDIS_FIRST..=REDIS_LAST).contains(&t) => {
                        self.redis_event(t - REDIS_FIRST)
                    }
                    Token(t) => self.conn_event(
                        app,
                        t - FIRST_CONN,
                        ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                        ev.is_writable(),
                    ),
                }
            }
            self.run_timers(app);
            self.handover_step(app);
            self.before_sleep(app);
        }
        self.finish(app);
        Ok(self.srv.lifecycle.exit())
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut t = self
            .srv
            .timers
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        if self.srv.postbox.has_queued() {
            t = Some(t.map_or(IPC_RETRY, |t| t.min(IPC_RETRY)));
        }
        if let Some(m) = self.srv.lifecycle.timeout(now) {
            t = Some(t.map_or(m, |t| t.min(m)));
        }
        t
    }

    /// Start-up: Redis, listeners, `on_worker_start`, "workerStart", the
    /// reactor's own periodic timers. Fails when `on_worker_start` panicked.
    fn start(&mut self, app: &mut A) -> io::Result<()> {
        let now = Instant::now();
        if let Some(r) = self.srv.redis.as_mut() {
            r.tick(self.srv.conns.registry(), now);
            let every = crate::reactor::redis::TICK;
            self.srv
                .timers
                .insert(now, every, Some(every), TimerTask::RedisTick);
        }
        app.listeners(&mut self.bus);
        let srv = &mut self.srv;
        if Self::guarded(srv.worker_id, "on_worker_start", None, || {
            app.on_worker_start(srv)
        })
        .is_none()
        {
            // A worker whose initialisation failed is broken: exit, and let
            // the manager respawn it (with backoff if it keeps failing).
            return Err(io::Error::other("on_worker_start panicked"));
        }
        self.trigger(
            app,
            "workerStart",
            vec![serde_json::Value::from(self.srv.worker_id)],
        );
        let s = &self.srv.settings;
        if s.heartbeat_check_interval > 0.0 && s.heartbeat_idle_time > 0.0 {
            let every = Duration::from_secs_f64(s.heartbeat_check_interval);
            self.srv
                .timers
                .insert(now, every, Some(every), TimerTask::Heartbeat);
        }
        self.srv
            .row
            .rss_kib
            .store(scoreboard::self_rss_kib(), Relaxed);
        self.srv
            .timers
            .insert(now, RSS_EVERY, Some(RSS_EVERY), TimerTask::Rss);
        self.before_sleep(app);
        Ok(())
    }

    fn on_signals(&mut self) {
        for c in signals::take_pending() {
            match c {
                Control::Terminate => {
                    self.srv.lifecycle.ask(WorkerExit::Stopped);
                }
                Control::Reload => self.request_handover(),
                other => log::debug!("worker {}: ignoring {other:?}", self.srv.worker_id),
            }
        }
    }

    fn conn_event(&mut self, app: &mut A, key: usize, readable: bool, writable: bool) {
        let Some(c) = self.srv.conns.get_mut(key) else {
            return;
        };
        let (fd, parked) = (c.fd, c.parked);
        if matches!(c.phase, Phase::Connecting { .. }) {
            self.finish_connect(key);
        }
        if readable && !parked {
            self.read(app, key, fd);
        }
        if writable {
            if let Some(c) = self.srv.conns.get(key) {
                if c.pending_out() > 0 || (c.is_closing() && !c.write_shut) {
                    self.srv.mark_dirty(fd);
                }
            }
        }
    }

    /// Tears down doomed connections, flushes dirty ones, flushes IPC and
    /// runs deferred triggers, until nothing is left to do.
    pub(crate) fn before_sleep(&mut self, app: &mut A) {
        loop {
            self.run_redis_completions(app);
            for fd in std::mem::take(&mut self.srv.resume) {
                self.resume(app, fd);
            }
            while let Some(fd) = self.srv.conns.pop_doomed() {
                self.teardown(app, fd);
            }
            for fd in self.srv.conns.take_dirty() {
                self.flush_one(fd);
            }
            let emits = std::mem::take(&mut self.srv.emits);
            for (event, args) in &emits {
                self.trigger(app, event, args.clone());
            }
            if self.srv.conns.settled()
                && self.srv.emits.is_empty()
                && !self.redis_completions_due()
                && self.srv.resume.is_empty()
            {
                break;
            }
        }
        if let Some(r) = self.srv.redis.as_mut() {
            r.flush(self.srv.conns.registry());
        }
        self.srv.postbox.flush();
        self.srv
            .row
            .connections
            .store(self.srv.conns.len() as u64, Relaxed);
    }

    fn flush_one(&mut self, fd: crate::reactor::Fd) {
        let Some(key) = self.srv.conns.key(fd) else {
            return;
        };
        let c = &mut self.srv.conns[key];
        c.dirty = false;
        match c.flush() {
            Ok(true) if c.is_closing() && !c.linger => self.srv.conns.doom(fd),
            Ok(true) if c.is_closing() && !c.write_shut => {
                c.write_shut = true;
                if c.stream.shutdown(std::net::Shutdown::Write).is_err() {
                    self.srv.conns.doom(fd);
                }
            }
            Ok(_) => {}
            Err(e) => {
                log::debug!(
                    "worker {}: fd {fd} ({}): write: {e}",
                    self.srv.worker_id,
                    c.peer
                );
                self.srv.conns.doom(fd);
            }
        }
    }

    /// Graceful stop, step one: take what is queued on the listener, stop
    /// listening, close idle connections, say 1001 to WebSocket peers, arm
    /// the `max_wait_time` deadline.
    pub(crate) fn begin_stop(&mut self, app: &mut A, exit: WorkerExit) {
        if let Err(e) = self.srv.lifecycle.begin_drain(exit) {
            log::warn!("worker {}: {e}", self.srv.worker_id);
            return;
        }
        self.srv.row.stopping.store(1, Relaxed);
        log::info!(
            "worker {}: stopping ({exit:?}), {} connections to finish",
            self.srv.worker_id,
            self.srv.conns.len()
        );
        {
            let srv = &mut self.srv;
            Self::guarded(srv.worker_id, "on_worker_exit", None, || {
                app.on_worker_exit(srv)
            });
        }
        self.accept_all();
        if let Some(mut l) = self.listener.take() {
            // Deregister and drop our copy only: the manager keeps the socket.
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(mut l) = self.admin_listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let fds = self.srv.conns.fds();
        for fd in fds {
            let Some(key) = self.srv.conns.key(fd) else {
                continue;
            };
            let c = &mut self.srv.conns[key];
            match &c.phase {
                // Idle between keep-alive requests: close. A fresh connection
                // (its handshake timer still armed) has not sent its first
                // request yet: it is served (with `Connection: close`).
                Phase::Http if c.rbuf.is_empty() && c.timer.is_none() => {
                    self.srv.close_gracefully(fd)
                }
                Phase::Http | Phase::HttpAnswering { .. } | Phase::Closing => {}
                Phase::WebSocket(_) => {
                    self.srv.disconnect(
                        fd,
                        crate::reactor::websocket::close::GOING_AWAY,
                        "going away",
                    );
                }
                Phase::Connecting { .. } | Phase::ClientHandshake { .. } => self.srv.conns.doom(fd),
            }
        }
        let wait = Duration::from_secs_f64(self.srv.settings.max_wait_time.max(0.0));
        self.srv
            .timers
            .insert(Instant::now(), wait, None, TimerTask::StopDeadline);
    }

    /// Graceful stop, last step: "workerStop", `on_worker_stop`, final flush.
    fn finish(&mut self, app: &mut A) {
        self.trigger(
            app,
            "workerStop",
            vec![serde_json::Value::from(self.srv.worker_id)],
        );
        let srv = &mut self.srv;
        Self::guarded(srv.worker_id, "on_worker_stop", None, || {
            app.on_worker_stop(srv)
        });
        self.before_sleep(app);
        let until = Instant::now() + Duration::from_millis(200);
        while self.srv.postbox.flush() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        log::info!(
            "worker {}: stopped ({:?})",
            self.srv.worker_id,
            self.srv.lifecycle.exit()
        );
    }
}
