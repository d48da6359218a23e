//! Calling into the application: every hook runs inside a panic guard
//! (a panic is logged with the fd and closes that connection only), then
//! the results become output. Also here: connection teardown (which runs
//! `on_close`), the timers, the IPC inbox and event-bus triggers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use serde_json::Value;

use crate::event::App;
use crate::process::ipc::{Dest, Envelope};
use crate::process::scoreboard;
use crate::reactor::conn::Inbound;
use crate::reactor::event_loop::Reactor;
use crate::reactor::http::Response;
use crate::reactor::server::TimerTask;
use crate::reactor::websocket::close;
use crate::reactor::{Fd, WorkerExit};

use std::sync::atomic::Ordering::Relaxed;

impl<A: App> Reactor<A> {
    /// Runs `f`, catching a panic; `None` if it panicked (logged with the
    /// hook name and fd).
    pub(crate) fn guarded<R>(
        worker: usize,
        hook: &str,
        fd: Option<Fd>,
        f: impl FnOnce() -> R,
    ) -> Option<R> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => Some(r),
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                match fd {
                    Some(fd) => log::error!("worker {worker}: {hook} panicked on fd {fd}: {msg}; closing the connection"),
                    None => log::error!("worker {worker}: {hook} panicked: {msg}"),
                }
                None
            }
        }
    }

    /// Acts on one decoded unit. Returns whether decoding may continue.
    pub(crate) fn dispatch(&mut self, app: &mut A, fd: Fd, inbound: Inbound) -> bool {
        let w = self.srv.worker_id;
        match inbound {
            Inbound::NeedMore => return false,
            Inbound::Consumed => {}
            Inbound::Closing => {
                self.srv.close_gracefully(fd);
                return false;
            }
            Inbound::Request(req) => {
                self.handshake_done(fd);
                self.count_request();
                let keep = req.keep_alive() && !self.srv.lifecycle.draining();
                let srv = &mut self.srv;
                srv.in_request = Some(fd);
                let (mut resp, keep) =
                    match Self::guarded(w, "on_request", Some(fd), || app.on_request(srv, &req)) {
                        Some(r) => (r, keep),
                        None => (Response::text(500, "internal server error\n"), false),
                    };
                srv.in_request = None;
                if let Some(early) = srv.early.take() {
                    if resp.is_later() {
                        resp = early;
                    }
                }
                let Some(key) = self.srv.conns.key(fd) else {
                    return false;
                };
                let c = &mut self.srv.conns[key];
                if c.is_closing() {
                    return false;
                }
                if resp.is_later() {
                    c.phase = crate::reactor::conn::Phase::HttpAnswering { keep };
                    return false;
                }
                if !self.srv.answer(fd, &resp, keep) {
                    return false;
                }
            }
            Inbound::Open(req) => {
                self.handshake_done(fd);
                self.srv.mark_dirty(fd); // the 101 goes out first
                let srv = &mut self.srv;
                if Self::guarded(w, "on_open", Some(fd), || app.on_open(srv, fd, &req)).is_none() {
                    self.close_after_panic(fd);
                }
            }
            Inbound::Connected => {
                self.handshake_done(fd);
                let srv = &mut self.srv;
                if Self::guarded(w, "on_connect", Some(fd), || app.on_connect(srv, fd)).is_none() {
                    self.close_after_panic(fd);
                }
            }
            Inbound::Message(msg) => {
                self.srv.row.messages_in.fetch_add(1, Relaxed);
                if !self.within_rate(fd) {
                    return false;
                }
                self.count_request();
                let srv = &mut self.srv;
                if Self::guarded(w, "on_message", Some(fd), || app.on_message(srv, fd, msg))
                    .is_none()
                {
                    self.close_after_panic(fd);
                }
            }
        }
        self.srv.exist(fd)
    }

    /// Spends one token of an accepted WebSocket's `max_messages_per_second`
    /// budget; when none is left, closes it with 1008 "rate limit" and
    /// returns false (the message is dropped).
    fn within_rate(&mut self, fd: Fd) -> bool {
        let rate = self.srv.settings.max_messages_per_second;
        let Some(key) = self.srv.conns.key(fd) else {
            return false;
        };
        let c = &mut self.srv.conns[key];
        if rate == 0 || c.limits.unlimited || c.kind != crate::reactor::ConnKind::WebSocket {
            return true;
        }
        let now = Instant::now();
        let bucket = c
            .limits
            .bucket
            .get_or_insert_with(|| Box::new(crate::reactor::limits::TokenBucket::new(rate, now)));
        if bucket.take(rate, now) {
            return true;
        }
        log::warn!(
            "worker {}: fd {fd} ({}): over max_messages_per_second {rate}; closing with 1008",
            self.srv.worker_id,
            c.peer
        );
        self.srv.disconnect(fd, close::POLICY, "rate limit");
        self.srv.close_gracefully(fd);
        false
    }

    pub(crate) fn close_after_panic(&mut self, fd: Fd) {
        self.srv.disconnect(fd, close::INTERNAL, "internal error");
        self.srv.close_gracefully(fd);
    }

    /// The connection finished its request head / handshake: drop the
    /// slowloris timer.
    fn handshake_done(&mut self, fd: Fd) {
        let Some(key) = self.srv.conns.key(fd) else {
            return;
        };
        if let Some(t) = self.srv.conns[key].timer.take() {
            self.srv.timers.cancel(t);
        }
    }

    /// Counts a request; at `max_request` asks for a stop.
    fn count_request(&mut self) {
        self.srv.row.requests.fetch_add(1, Relaxed);
        self.requests += 1;
        let max = self.srv.settings.max_request;
        if max > 0 && self.requests >= max && !self.srv.lifecycle.stop_asked() {
            if self.requests == max {
                log::info!("worker {}: max_request {max} reached", self.srv.worker_id);
            }
            if !self.replace_me() {
                self.srv.lifecycle.ask(WorkerExit::MaxRequest);
            }
        }
    }

    /// Removes a connection and runs `on_close` if it had opened.
    pub(crate) fn teardown(&mut self, app: &mut A, fd: Fd) {
        let Some(mut c) = self.srv.conns.remove(fd) else {
            return;
        };
        if let Some(t) = c.timer.take() {
            self.srv.timers.cancel(t);
        }
        self.srv.row.closed.fetch_add(1, Relaxed);
        let opened = c.opened;
        log::trace!("worker {}: fd {fd} ({}) closed", self.srv.worker_id, c.peer);
        drop(c);
        if opened {
            let srv = &mut self.srv;
            Self::guarded(srv.worker_id, "on_close", Some(fd), || {
                app.on_close(srv, fd)
            });
        }
    }

    /// Runs every due timer: application callbacks (lent out of the wheel
    /// while they run, so they may use or cancel timers) and the reactor's
    /// own deadlines.
    pub(crate) fn run_timers(&mut self, app: &mut A) {
        let now = Instant::now();
        for id in self.srv.timers.expired(now) {
            let Some(task) = self.srv.timers.take(id) else {
                continue;
            };
            let task = match task {
                TimerTask::User(mut cb) => {
                    let srv = &mut self.srv;
                    Self::guarded(srv.worker_id, "timer callback", None, || cb(app, srv, id));
                    TimerTask::User(cb)
                }
                other => {
                    self.internal_timer(id, &other);
                    other
                }
            };
            self.srv.timers.finish(id, Instant::now(), task);
        }
    }

    fn internal_timer(&mut self, id: u64, task: &TimerTask<A>) {
        let w = self.srv.worker_id;
        match task {
            TimerTask::User(_) => {}
            TimerTask::Handshake(fd) | TimerTask::Linger(fd) => {
                let Some(key) = self.srv.conns.key(*fd) else {
                    return;
                };
                let c = &self.srv.conns[key];
                if c.timer == Some(id) {
                    if matches!(task, TimerTask::Handshake(_)) {
                        log::info!("worker {w}: fd {fd} ({}): no complete request within handshake_timeout; closing", c.peer);
                    }
                    self.srv.conns.doom(*fd);
                }
            }
            TimerTask::Heartbeat => {
                let idle =
                    std::time::Duration::from_secs_f64(self.srv.settings.heartbeat_idle_time);
                self.srv.conns.doom_where(|c| {
                    let limit = match c.limits.idle_limit_ms {
                        0 => idle,
                        ms => std::time::Duration::from_millis(u64::from(ms)),
                    };
                    let idle = c.last_active.elapsed() > limit;
                    if idle {
                        log::debug!(
                            "worker {w}: fd {} ({}): idle past heartbeat_idle_time; closing",
                            c.fd,
                            c.peer
                        );
                    }
                    idle
                });
            }
            TimerTask::Rss => self
                .srv
                .row
                .rss_kib
                .store(scoreboard::self_rss_kib(), Relaxed),
            TimerTask::RedisTick => {
                if let Some(r) = self.srv.redis.as_mut() {
                    r.tick(self.srv.conns.registry(), Instant::now());
                }
            }
            TimerTask::AcceptRetry => self.accept_retry(),
            TimerTask::StopDeadline => {
                if !self.srv.conns.is_empty() {
                    log::warn!(
                        "worker {w}: max_wait_time passed; cutting {} connections",
                        self.srv.conns.len()
                    );
                }
                self.srv.conns.doom_where(|_| true);
            }
        }
    }

    /// A readiness event on one of the Redis client's sockets.
    pub(crate) fn redis_event(&mut self, index: usize) {
        if let Some(r) = self.srv.redis.as_mut() {
            r.on_event(index, self.srv.conns.registry());
        }
    }

    /// Whether Redis replies or pub/sub messages wait for their callbacks.
    pub(crate) fn redis_completions_due(&self) -> bool {
        !self.srv.redis_late.is_empty()
            || self.srv.redis.as_ref().is_some_and(|r| r.completions_due())
    }

    /// Runs the callbacks of finished Redis requests and the handlers of
    /// pub/sub messages (each under the panic guard), until none are left:
    /// a callback may send more requests, which complete later, or fail at
    /// once and complete in this same pass.
    pub(crate) fn run_redis_completions(&mut self, app: &mut A) {
        let w = self.srv.worker_id;
        while self.redis_completions_due() {
            let mut done = std::mem::take(&mut self.srv.redis_late);
            let mut msgs = Vec::new();
            if let Some(r) = self.srv.redis.as_mut() {
                let (mut d, m) = r.take_completions();
                done.append(&mut d);
                msgs = m;
            }
            for (cb, reply) in done {
                let srv = &mut self.srv;
                Self::guarded(w, "redis callback", None, || cb(app, srv, reply));
            }
            for (channel, payload) in msgs {
                let Some(mut h) = self
                    .srv
                    .redis
                    .as_mut()
                    .and_then(|r| r.take_handler(&channel))
                else {
                    continue;
                };
                let srv = &mut self.srv;
                Self::guarded(w, "redis subscription handler", None, || {
                    h(app, srv, &payload)
                });
                if let Some(r) = self.srv.redis.as_mut() {
                    r.put_handler(channel, h);
                }
            }
        }
    }

    /// Handles every message waiting in the IPC inbox.
    pub(crate) fn drain_inbox(&mut self, app: &mut A) {
        let w = self.srv.worker_id;
        loop {
            let env = match self.srv.postbox.recv() {
                Ok(Some(env)) => env,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("worker {w}: {e}");
                    return;
                }
            };
            let srv = &mut self.srv;
            match env {
                Envelope::Pipe { from, data } => {
                    Self::guarded(w, "on_pipe_message", None, || {
                        app.on_pipe_message(srv, from as usize, data)
                    });
                }
                Envelope::Task { id, from, data } => {
                    let result = Self::guarded(w, "on_task", None, || {
                        app.on_task(srv, id, from as usize, data)
                    })
                    .unwrap_or_default();
                    srv.row.tasks.fetch_add(1, Relaxed);
                    let back = Envelope::Finish {
                        id,
                        from: w as u32,
                        data: result,
                    };
                    if let Err(e) = srv.postbox.send(Dest::Worker(from as usize), &back) {
                        log::warn!("worker {w}: task {id} result to worker {from}: {e}");
                    }
                    self.count_request();
                }
                Envelope::Finish { id, data, .. } => {
                    Self::guarded(w, "on_finish", None, || app.on_finish(srv, id, data));
                }
                Envelope::Unknown(kind) => {
                    log::warn!("worker {w}: ignoring an IPC message of unknown kind {kind}")
                }
            }
        }
    }

    /// Triggers `event` on the bus (listeners run inside a panic guard).
    pub(crate) fn trigger(&mut self, _app: &mut A, event: &str, args: Vec<Value>) {
        let (bus, srv) = (&mut self.bus, &mut self.srv);
        Self::guarded(srv.worker_id, event, None, || {
            bus.trigger(srv, event, &args)
        });
    }
}
