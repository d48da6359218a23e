//! [`Server<A>`]: the handle every worker hook gets, with Swoole's verbs
//! (`push`, `exist`, `disconnect`, `tick`, `task`, …). It owns the worker's
//! connections, timers, mailboxes and Redis link; the event loop drives it.
//!
//! Verbs act at once where they can: `push` encodes straight into the
//! connection's write buffer, which the loop flushes once per iteration
//! ("before sleep", as Redis's ae does); a large payload with nothing
//! queued ahead of it is written at once with `writev` from the message's
//! own bytes (see `frame.rs`). What cannot happen inside a hook —
//! tearing a connection down, which runs `on_close`, and event-bus triggers
//! from `emit` — is recorded and done by the loop after the hook returns.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use slab::Slab;

use crate::config::Settings;
use crate::event::App;
use crate::process::ipc::{Dest, Envelope, Postbox, SendError};
use crate::process::scoreboard::{Row, Scoreboard};
use crate::reactor::conn::{Conn, ConnKind, ConnSnapshot, ConnectionInfo, Phase};
use crate::reactor::redis_link::RedisLink;
use crate::reactor::timer::{TimerId, TimerWheel};
use crate::reactor::websocket::Message;
use crate::reactor::{Fd, WorkerExit};

use std::sync::atomic::Ordering::Relaxed;

/// A timer callback: gets the application, the server and its own id.
pub type TimerCallback<A> = Box<dyn FnMut(&mut A, &mut Server<A>, TimerId)>;

/// How long a closing connection may take to flush its output and for the
/// peer to answer our close frame before it is cut: long enough for a
/// healthy peer on a slow link, short enough not to hoard sockets.
pub const LINGER: Duration = Duration::from_secs(2);

/// Bits of an [`Fd`] holding the slab key; the rest is a serial number, so
/// fds are never reused.
const KEY_BITS: u32 = 24;

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
    /// Retry the Redis connection.
    RedisRetry,
    /// The graceful stop's deadline.
    StopDeadline,
}

/// The application's view of its worker.
pub struct Server<A: App> {
    pub(crate) registry: mio::Registry, // to register outbound connections
    pub(crate) conns: Slab<Conn>,       // token = key + FIRST_CONN
    pub(crate) serial: u64,             // fd serial counter
    pub(crate) timers: TimerWheel<TimerTask<A>>, // app and reactor timers
    pub(crate) postbox: Postbox,        // worker/task mailboxes
    pub(crate) settings: Arc<Settings>, // this server's settings
    pub(crate) worker_id: usize,        // slot id
    pub(crate) task_worker: bool,       // task worker (no listener)
    pub(crate) row: &'static Row,       // our scoreboard row
    pub(crate) scoreboard: Scoreboard,  // everyone's rows
    pub(crate) redis: RedisLink,        // the worker's Redis
    pub(crate) emits: Vec<(String, Vec<Value>)>, // deferred bus triggers
    pub(crate) dirty: Vec<Fd>,          // connections to flush before sleep
    pub(crate) doomed: Vec<Fd>,         // connections to tear down now
    pub(crate) stop_request: Option<WorkerExit>, // a stop was asked for
    pub(crate) stopping: bool,          // draining
    pub(crate) handing_over: bool,      // draining into the slot's successor
    pub(crate) adopting: bool,          // taking connections from a predecessor
    pub(crate) next_task_id: u64,       // task id counter
    pub(crate) next_task_worker: usize, // round-robin cursor
    pub(crate) per_ip: crate::reactor::limits::IpCounter, // max_conn_per_ip
    pub(crate) codec: crate::reactor::deflate::Codec, // permessage-deflate, shared
}

impl<A: App> std::fmt::Debug for Server<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("worker_id", &self.worker_id)
            .field("task_worker", &self.task_worker)
            .field("connections", &self.conns.len())
            .field("stopping", &self.stopping)
            .finish()
    }
}

impl<A: App> Server<A> {
    pub(crate) fn fd_for(&mut self, key: usize) -> Fd {
        self.serial += 1;
        (self.serial << KEY_BITS) | key as u64
    }

    /// The slab key of a live fd.
    pub(crate) fn key(&self, fd: Fd) -> Option<usize> {
        let key = (fd & ((1 << KEY_BITS) - 1)) as usize;
        self.conns.get(key).filter(|c| c.fd == fd).map(|_| key)
    }

    fn conn_mut(&mut self, fd: Fd) -> Option<&mut Conn> {
        let key = self.key(fd)?;
        self.conns.get_mut(key)
    }

    /// Queues a connection for the before-sleep flush; a connection past
    /// `buffer_output_size` is cut instead (a slow reader).
    pub(crate) fn mark_dirty(&mut self, fd: Fd) {
        let limit = self.settings.buffer_output_size;
        let Some(c) = self.conn_mut(fd) else { return };
        if c.pending_out() > limit {
            log::warn!(
                "fd {fd} ({}): {} bytes of output pending exceed buffer_output_size {limit}; disconnecting the slow reader",
                c.peer,
                c.pending_out()
            );
            c.wbuf = Vec::new();
            c.wpos = 0;
            self.doomed.push(fd);
            return;
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(fd);
        }
    }

    /// Starts a graceful close of `fd`: flush, shut down, linger.
    pub(crate) fn close_gracefully(&mut self, fd: Fd) {
        let Some(c) = self.conn_mut(fd) else { return };
        if !c.is_closing() {
            c.begin_close();
        }
        self.arm_linger(fd);
        self.mark_dirty(fd);
    }

    /// (Re)arms the linger timer of a connection on its way out.
    pub(crate) fn arm_linger(&mut self, fd: Fd) {
        let now = Instant::now();
        let Some(key) = self.key(fd) else { return };
        if let Some(old) = self.conns[key].timer.take() {
            self.timers.cancel(old);
        }
        let id = self.timers.insert(now, LINGER, None, TimerTask::Linger(fd));
        self.conns[key].timer.set(id);
    }

    // ---- Swoole's verbs -------------------------------------------------

    /// Sends a WebSocket message to `fd`. False if `fd` is gone, is not an
    /// open WebSocket, or was just cut for exceeding `buffer_output_size`.
    pub fn push(&mut self, fd: Fd, msg: impl Into<Message>) -> bool {
        let msg = msg.into();
        let Some(key) = self.key(fd) else {
            return false;
        };
        if !self.conns[key].queue_owned(msg, &mut self.codec) {
            return false;
        }
        self.row.messages_out.fetch_add(1, Relaxed);
        self.mark_dirty(fd);
        self.key(fd).is_some() && !self.doomed.contains(&fd)
    }

    /// Whether `fd` is a live connection (not closing).
    pub fn exist(&self, fd: Fd) -> bool {
        self.key(fd)
            .is_some_and(|k| !self.conns[k].is_closing() && !self.doomed.contains(&fd))
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
        self.arm_linger(fd);
        self.mark_dirty(fd);
        true
    }

    /// Closes `fd` (pending output is flushed first; no close frame). False
    /// if it is gone.
    pub fn close(&mut self, fd: Fd) -> bool {
        if self.key(fd).is_none() {
            return false;
        }
        self.close_gracefully(fd);
        true
    }

    /// Facts about a connection.
    pub fn connection_info(&self, fd: Fd) -> Option<ConnectionInfo> {
        self.key(fd).map(|k| self.conns[k].info(self.worker_id))
    }

    /// Every live (not closing) connection of this worker. O(n).
    pub fn connections(&self) -> Vec<Fd> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.is_closing())
            .map(|(_, c)| c.fd)
            .collect()
    }

    /// The connection as data (phase, buffers, attributes).
    pub fn snapshot(&self, fd: Fd) -> Option<ConnSnapshot> {
        self.key(fd).map(|k| self.conns[k].snapshot(self.worker_id))
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
        let k = self.key(fd)?;
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

    /// The worker's Redis connection, when configured and up.
    pub fn redis(&mut self) -> Option<&mut redis::Connection> {
        self.redis.conn()
    }

    /// Whether the Redis link is up.
    pub fn redis_ok(&self) -> bool {
        self.redis.is_up()
    }

    /// A thread-safe sender into this worker's own inbox: a thread the
    /// application started (a Redis subscriber, say) hands messages to the
    /// loop this way, and they arrive in `on_pipe_message` with `from` set to
    /// this worker's id.
    pub fn self_sender(&self) -> io::Result<crate::process::ipc::PipeSender> {
        self.postbox.sender(self.postbox.me())
    }

    /// Marks the Redis link down after a failed command (the loop
    /// reconnects with backoff).
    pub fn redis_failed(&mut self) {
        self.redis.down(self.worker_id, "a command failed");
        self.arm_redis_retry();
    }

    /// Runs `f` on the Redis connection. `None` when Redis is down or the
    /// command failed; an I/O failure also marks the link down.
    pub fn redis_cmd<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let conn = self.redis.conn()?;
        match f(conn) {
            Ok(v) => Some(v),
            Err(e) if RedisLink::is_link_error(&e) => {
                self.redis.down(self.worker_id, &e.to_string());
                self.arm_redis_retry();
                None
            }
            Err(e) => {
                log::warn!("worker {}: redis command failed: {e}", self.worker_id);
                self.redis.count_error();
                None
            }
        }
    }

    pub(crate) fn arm_redis_retry(&mut self) {
        if self.redis.configured() && !self.redis.is_up() && !self.redis.retry_armed {
            self.redis.retry_armed = true;
            self.timers.insert(
                Instant::now(),
                self.redis.backoff(),
                None,
                TimerTask::RedisRetry,
            );
        }
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
        self.stop_request.get_or_insert(WorkerExit::Stopped);
    }

    /// Whether the worker is draining.
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Whether this worker is stopping by handing its connections to its
    /// replacement (a rolling reload or a `max_request` replacement): they
    /// stay open, so there is no goodbye to say.
    pub fn is_handing_over(&self) -> bool {
        self.handing_over
    }

    /// Whether this worker is still taking connections from the worker it
    /// replaces (`on_adopt` runs for each); it accepts nothing and reads no
    /// mailbox message until that is done.
    pub fn is_adopting(&self) -> bool {
        self.adopting
    }

    /// Opens an outbound WebSocket connection to `addr`, sending `host` and
    /// `path` in the upgrade. The connect and handshake run in the loop;
    /// `on_connect(fd)` follows on success, `on_close(fd)` on failure or
    /// when it later closes. Messages and `push` work as for accepted
    /// connections.
    pub fn ws_connect(&mut self, addr: SocketAddr, host: &str, path: &str) -> io::Result<Fd> {
        let stream = mio::net::TcpStream::connect(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("ws_connect to {addr}: {e}")))?;
        // As for accepted connections: small frames (an IM server's forwards
        // to the Route) must not wait for the peer's delayed ACK (Nagle).
        let _ = stream.set_nodelay(true);
        let key = self.conns.vacant_key();
        let fd = self.fd_for(key);
        let phase = Phase::Connecting { host: host.into() };
        let mut conn = Conn::new(fd, stream, addr, ConnKind::Client, phase);
        conn.set_path(path);
        conn.opened = true; // on_close is due even if the dial fails
        self.registry
            .register(
                &mut conn.stream,
                crate::reactor::event_loop::token_of(key),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            )
            .map_err(|e| {
                io::Error::new(e.kind(), format!("ws_connect to {addr}: register: {e}"))
            })?;
        self.conns.insert(conn);
        self.row.connections.store(self.conns.len() as u64, Relaxed);
        self.arm_handshake_timer(fd);
        Ok(fd)
    }

    pub(crate) fn arm_handshake_timer(&mut self, fd: Fd) {
        let secs = self.settings.handshake_timeout;
        if secs <= 0.0 {
            return;
        }
        let id = self.timers.insert(
            Instant::now(),
            Duration::from_secs_f64(secs),
            None,
            TimerTask::Handshake(fd),
        );
        if let Some(c) = self.conn_mut(fd) {
            c.timer.set(id);
        }
    }
}
