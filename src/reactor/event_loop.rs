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
//! spurious events are harmless. The graceful stop lives here too. Hook
//! calls, teardown and timers are in `dispatch.rs`.

use std::io::{self, Read};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::event::{App, EventBus};
use crate::process::scoreboard;
use crate::process::signals::{self, Control};
use crate::reactor::conn::{Conn, ConnKind, Phase};
use crate::reactor::migrate::Migrate;
use crate::reactor::redis_link::RedisLink;
use crate::reactor::server::{Server, TimerTask};
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

/// Stops a reactor from another thread (tests, or an application thread):
/// sets a flag and wakes the loop.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    flag: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Arc<Waker>>>>,
}

impl StopHandle {
    /// A handle not yet bound to a loop (bound by `run_worker_until`).
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// Asks the loop to stop gracefully; works before the loop starts, too.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = w.wake();
        }
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn bind(&self, waker: Arc<Waker>) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }
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
    pub(crate) exit: WorkerExit,                              // why we stop
    pub(crate) requests: u64,                                 // requests served (max_request)
    pub(crate) migrate: Migrate,                              // handover state
}

impl<A: App> Reactor<A> {
    /// Builds the loop: registers the listener, signal pipe and inbox.
    pub(crate) fn new(ctx: WorkerContext, stop: StopHandle) -> io::Result<(Reactor<A>, OnReady)> {
        let ctxerr = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("worker {}: {what}: {e}", ctx.worker_id))
        };
        let poll = Poll::new().map_err(|e| ctxerr("creating the poll", e))?;
        let registry = poll.registry();
        let waker =
            Arc::new(Waker::new(registry, WAKER).map_err(|e| ctxerr("creating the waker", e))?);
        stop.bind(waker);
        let migrate = Migrate::new(ctx.handover, ctx.settings.max_wait_time);
        let listener = match ctx.listener {
            Some(l) => {
                l.set_nonblocking(true)
                    .map_err(|e| ctxerr("listener nonblocking", e))?;
                let mut l = mio::net::TcpListener::from_std(l);
                if !migrate.listener_pending() {
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
        let admin_listener = match ctx.admin_listener {
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
        let deflate = ctx.settings.deflate_config();
        let srv = Server {
            registry: registry
                .try_clone()
                .map_err(|e| ctxerr("cloning the registry", e))?,
            conns: slab::Slab::new(),
            serial: 0,
            timers: crate::reactor::timer::TimerWheel::new(),
            postbox: ctx.postbox,
            redis: RedisLink::new(ctx.settings.redis_url.as_deref()).with_row(ctx.row),
            settings: ctx.settings,
            worker_id: ctx.worker_id,
            task_worker: ctx.task_worker,
            row: ctx.row,
            scoreboard: ctx.scoreboard,
            emits: Vec::new(),
            dirty: Vec::new(),
            doomed: Vec::new(),
            stop_request: None,
            stopping: false,
            handing_over: false,
            adopting: migrate.busy(),
            next_task_id: 0,
            next_task_worker: ctx.worker_id,
            per_ip: Default::default(),
            codec: crate::reactor::deflate::Codec::new(deflate),
        };
        let r = Reactor {
            poll,
            listener,
            admin_listener,
            srv,
            bus: EventBus::new(),
            scratch: vec![0; SCRATCH],
            stop,
            exit: WorkerExit::Stopped,
            requests: 0,
            migrate,
        };
        Ok((r, ctx.on_ready))
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
            if self.srv.stop_request.is_none() && self.stop.is_stopped() {
                self.srv.stop_request = Some(WorkerExit::Stopped);
            }
            if let Some(exit) = self.srv.stop_request {
                // A worker still adopting hands over only once it has all.
                let wait = exit == WorkerExit::HandedOver && self.srv.adopting;
                if !self.srv.stopping && !wait {
                    if exit == WorkerExit::HandedOver {
                        self.begin_handover(app);
                    } else {
                        self.begin_stop(app, exit);
                    }
                    self.before_sleep(app); // the 1001 frames go out now
                }
            }
            if self.srv.stopping && self.srv.conns.is_empty() && !self.migrate.busy() {
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
                    INBOX if !self.srv.adopting => self.drain_inbox(app),
                    INBOX | WAKER => {}
                    HANDOVER_RX => self.on_handover_rx(app),
                    HANDOVER_TX => self.on_handover_tx(),
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
        Ok(self.exit)
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
        if let Some(m) = self.migrate.timeout() {
            t = Some(t.map_or(m, |t| t.min(m)));
        }
        t
    }

    /// Start-up: Redis, listeners, `on_worker_start`, "workerStart", the
    /// reactor's own periodic timers. Fails when `on_worker_start` panicked.
    fn start(&mut self, app: &mut A) -> io::Result<()> {
        let now = Instant::now();
        if self.srv.redis.configured() && !self.srv.redis.connect(self.srv.worker_id) {
            self.srv.arm_redis_retry();
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

    /// Accepts until `WouldBlock` on both listeners.
    pub(crate) fn accept_all(&mut self) {
        self.accept_from(false);
        self.accept_from(true);
    }

    /// Accepts until `WouldBlock` on the main or the admin listener. Past
    /// `max_conn`, or past `max_conn_per_ip` for the peer's address, a
    /// connection is answered 503 and closed at once — also when it meant to
    /// upgrade: the answer goes out before its request is read.
    pub(crate) fn accept_from(&mut self, admin: bool) {
        loop {
            let l = if admin {
                &self.admin_listener
            } else {
                &self.listener
            };
            let Some(l) = l else { return };
            let (mut stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("worker {}: accept failed: {e}", self.srv.worker_id);
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let over = self.srv.conns.len() >= self.srv.settings.max_conn;
            let key = self.srv.conns.vacant_key();
            if let Err(e) = self.srv.registry.register(
                &mut stream,
                token_of(key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!(
                    "worker {}: registering connection from {peer}: {e}",
                    self.srv.worker_id
                );
                continue;
            }
            let fd = self.srv.fd_for(key);
            let ip_ok = over
                || self
                    .srv
                    .per_ip
                    .admit(peer.ip(), self.srv.settings.max_conn_per_ip);
            let mut conn = Conn::new(fd, stream, peer, ConnKind::Http, Phase::Http);
            conn.limits.admin = admin;
            conn.limits.ip_counted = !over && ip_ok;
            self.srv.conns.insert(conn);
            self.srv.row.accepted.fetch_add(1, Relaxed);
            self.srv
                .row
                .connections
                .store(self.srv.conns.len() as u64, Relaxed);
            if over {
                log::warn!(
                    "worker {}: fd {fd} ({peer}): max_conn {} reached, answering 503",
                    self.srv.worker_id,
                    self.srv.settings.max_conn
                );
                self.srv.conns[key].reject(503, "too many connections");
                self.srv.close_gracefully(fd);
            } else if !ip_ok {
                log::warn!(
                    "worker {}: fd {fd} ({peer}): max_conn_per_ip {} reached, answering 503",
                    self.srv.worker_id,
                    self.srv.settings.max_conn_per_ip
                );
                self.srv.conns[key].reject(503, "too many connections from your address");
                self.srv.close_gracefully(fd);
            } else {
                self.srv.arm_handshake_timer(fd);
            }
        }
    }

    fn on_signals(&mut self) {
        for c in signals::take_pending() {
            match c {
                Control::Terminate => {
                    self.srv.stop_request.get_or_insert(WorkerExit::Stopped);
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

    /// An outbound connect progressed: on success queue the upgrade request.
    fn finish_connect(&mut self, key: usize) {
        let c = &mut self.srv.conns[key];
        let fd = c.fd;
        let failed = match c.stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match c.stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // still in progress
                Err(e) => Some(e),
            },
        };
        if let Some(e) = failed {
            log::warn!(
                "worker {}: fd {fd}: connect to {} failed: {e}",
                self.srv.worker_id,
                c.peer
            );
            self.srv.doomed.push(fd);
            return;
        }
        if let Phase::Connecting { host } = &c.phase {
            let path = c.path().unwrap_or("/");
            let (req, ws_key) = crate::reactor::websocket::client_request(host, path);
            c.wbuf.extend_from_slice(&req);
            c.phase = Phase::ClientHandshake { key: ws_key };
            self.srv.mark_dirty(fd);
        }
    }

    /// Reads until `WouldBlock`, processing each chunk straight from the
    /// scratch buffer when nothing was left over; only leftovers (a partial
    /// frame or request) are copied into the connection.
    fn read(&mut self, app: &mut A, key: usize, fd: crate::reactor::Fd) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(c) = self.srv.conns.get_mut(key).filter(|c| c.fd == fd) {
            if matches!(c.phase, Phase::Connecting { .. }) || self.srv.doomed.contains(&fd) {
                break;
            }
            // A frame whose payload is still arriving is read into its own
            // buffer (frame.rs); everything else through the scratch buffer.
            let body = c.body_need() > 0;
            let res = if body {
                c.read_body()
            } else {
                c.stream.read(&mut scratch).map(|n| (n, scratch.len()))
            };
            let (n, asked) = match res {
                Ok((0, _)) => {
                    self.peer_closed(fd);
                    break;
                }
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!(
                        "worker {}: fd {fd} ({}): read: {e}",
                        self.srv.worker_id,
                        c.peer
                    );
                    self.srv.doomed.push(fd);
                    break;
                }
            };
            c.last_active = Instant::now();
            // A short read emptied the socket's receive queue: anything that
            // arrives later raises a new edge, so the read that would only
            // return WouldBlock is skipped (one syscall less per message).
            let drained = n < asked;
            if c.is_closing() {
                if drained {
                    break;
                }
                continue; // lingering: discard input until EOF
            }
            if body {
                self.process(app, key, fd, &mut []); // completes the frame?
            } else if c.rbuf.is_empty() {
                let used = self.process(app, key, fd, &mut scratch[..n]);
                if let Some(c) = self.live(key, fd) {
                    c.rbuf.extend_from_slice(&scratch[used..n]);
                }
            } else {
                let mut buf = std::mem::take(&mut c.rbuf);
                buf.extend_from_slice(&scratch[..n]);
                let used = self.process(app, key, fd, &mut buf);
                if let Some(c) = self.live(key, fd) {
                    buf.drain(..used);
                    if !buf.is_empty() {
                        c.rbuf = buf;
                    }
                }
            }
            if drained {
                break;
            }
        }
        self.scratch = scratch;
        if let Some(c) = self.srv.conns.get(key).filter(|c| c.fd == fd) {
            if c.pending_out() > 0 || c.is_closing() {
                self.srv.mark_dirty(fd);
            }
        }
    }

    /// The connection if it is still there and not closing.
    fn live(&mut self, key: usize, fd: crate::reactor::Fd) -> Option<&mut Conn> {
        self.srv
            .conns
            .get_mut(key)
            .filter(|c| c.fd == fd && !c.is_closing())
    }

    /// Decodes and dispatches every complete unit of `input`; returns the
    /// bytes used (all of them once the connection closes).
    fn process(
        &mut self,
        app: &mut A,
        key: usize,
        fd: crate::reactor::Fd,
        input: &mut [u8],
    ) -> usize {
        let max = self.srv.settings.package_max_length;
        let mut pos = 0;
        while pos <= input.len() {
            // A worker handing over still takes upgrades: they move too.
            let stopping = self.srv.stopping && !self.srv.handing_over;
            if self.srv.doomed.contains(&fd) {
                return input.len();
            }
            let srv = &mut self.srv;
            let Some(c) = srv
                .conns
                .get_mut(key)
                .filter(|c| c.fd == fd && !c.is_closing())
            else {
                return input.len();
            };
            let (inbound, used) = c.decode_next(&mut input[pos..], max, stopping, &mut srv.codec);
            pos += used;
            if !self.dispatch(app, fd, inbound) {
                return pos;
            }
        }
        pos
    }

    /// The peer closed its side.
    fn peer_closed(&mut self, fd: crate::reactor::Fd) {
        let Some(key) = self.srv.key(fd) else { return };
        let c = &self.srv.conns[key];
        if c.is_closing() || c.pending_out() == 0 {
            self.srv.doomed.push(fd);
        } else {
            self.srv.close_gracefully(fd); // flush what it asked for, then go
        }
    }

    /// Tears down doomed connections, flushes dirty ones, flushes IPC and
    /// runs deferred triggers, until nothing is left to do.
    pub(crate) fn before_sleep(&mut self, app: &mut A) {
        loop {
            while let Some(fd) = self.srv.doomed.pop() {
                self.teardown(app, fd);
            }
            for fd in std::mem::take(&mut self.srv.dirty) {
                self.flush_one(fd);
            }
            let emits = std::mem::take(&mut self.srv.emits);
            for (event, args) in &emits {
                self.trigger(app, event, args.clone());
            }
            if self.srv.doomed.is_empty() && self.srv.dirty.is_empty() && self.srv.emits.is_empty()
            {
                break;
            }
        }
        self.srv.postbox.flush();
        self.srv
            .row
            .connections
            .store(self.srv.conns.len() as u64, Relaxed);
    }

    fn flush_one(&mut self, fd: crate::reactor::Fd) {
        let Some(key) = self.srv.key(fd) else { return };
        let c = &mut self.srv.conns[key];
        c.dirty = false;
        match c.flush() {
            Ok(true) if c.is_closing() && !c.linger => self.srv.doomed.push(fd),
            Ok(true) if c.is_closing() && !c.write_shut => {
                c.write_shut = true;
                if c.stream.shutdown(std::net::Shutdown::Write).is_err() {
                    self.srv.doomed.push(fd);
                }
            }
            Ok(_) => {}
            Err(e) => {
                log::debug!(
                    "worker {}: fd {fd} ({}): write: {e}",
                    self.srv.worker_id,
                    c.peer
                );
                self.srv.doomed.push(fd);
            }
        }
    }

    /// Graceful stop, step one: take what is queued on the listener, stop
    /// listening, close idle connections, say 1001 to WebSocket peers, arm
    /// the `max_wait_time` deadline.
    pub(crate) fn begin_stop(&mut self, app: &mut A, exit: WorkerExit) {
        self.srv.stopping = true;
        self.exit = exit;
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
            let _ = self.srv.registry.deregister(&mut l);
        }
        if let Some(mut l) = self.admin_listener.take() {
            let _ = self.srv.registry.deregister(&mut l);
        }
        let fds: Vec<_> = self.srv.conns.iter().map(|(_, c)| c.fd).collect();
        for fd in fds {
            let Some(key) = self.srv.key(fd) else {
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
                Phase::Http | Phase::Closing => {}
                Phase::WebSocket(_) => {
                    self.srv.disconnect(
                        fd,
                        crate::reactor::websocket::close::GOING_AWAY,
                        "going away",
                    );
                }
                Phase::Connecting { .. } | Phase::ClientHandshake { .. } => {
                    self.srv.doomed.push(fd)
                }
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
        log::info!("worker {}: stopped ({:?})", self.srv.worker_id, self.exit);
    }
}
