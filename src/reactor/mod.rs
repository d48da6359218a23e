//! The worker reactor: one mio event loop per worker process serving HTTP
//! and WebSocket on one port, with a timer wheel, the worker's mailboxes
//! and its Redis link.
//!
//! Layout:
//! - `event_loop` — the loop itself: tokens, read, flush, stop;
//! - `accept` — accepting, admission, the back-off on `EMFILE`;
//! - `input` — reading and decoding a connection's bytes;
//! - `dispatch` — calling hooks (panic-guarded), teardown, timers, IPC;
//! - `server` — [`Server`], the handle hooks get, with Swoole's verbs;
//! - `outbound` — dialled WebSocket connections (`ws_connect`) and pings;
//! - `conn` — a connection: phase, owned buffers, the protocol step;
//! - `table` — the connection table: slab, fds, flush and teardown lists;
//! - `http` — requests, responses, the two-phase parser;
//! - `limits` — connections per IP and messages per second per connection;
//! - `websocket` — handshakes and the frame codec (tungstenite framing);
//! - `frame` — the large-frame path: payloads read straight into the
//!   message buffer, large pushes written with `writev`;
//! - `deflate` — permessage-deflate (RFC 7692): negotiation, (de)compressors;
//! - `timer` — the hashed timer wheel;
//! - `redis` — the worker's non-blocking Redis client (commands with
//!   callbacks, pub/sub with a self-probe), hiredis-style on this loop;
//! - `resolve` — host names resolved off the loop;
//! - `handover` — the wire protocol that moves connections between the
//!   workers of a slot (SCM_RIGHTS + bounded manifests);
//! - `migrate` — the loop's side of a handover: park, send, adopt;
//! - `lifecycle` — the worker's lifecycle state machine (adopting,
//!   serving, draining, handing over, done).
//!
//! Entry points: [`run_worker`] (what a forked worker calls) and
//! [`run_worker_until`] (the same with a [`StopHandle`], for running a
//! reactor on a thread in tests).

mod accept;
pub mod conn;
pub mod deflate;
mod dispatch;
pub mod event_loop;
pub mod frame;
pub mod handover;
pub mod http;
mod input;
mod lifecycle;
pub mod limits;
mod migrate;
mod outbound;
pub mod redis;
pub mod resolve;
pub mod server;
mod table;
pub mod timer;
pub mod websocket;

use std::sync::Arc;

use crate::config::Settings;
use crate::event::App;
use crate::process::ipc::Postbox;
use crate::process::scoreboard::{Row, Scoreboard};

pub use conn::{ConnKind, ConnSnapshot, ConnectionInfo, PhaseName};
pub use http::{Request, Response};
pub use lifecycle::StopHandle;
pub use server::{Server, TimerCallback};
pub use timer::TimerId;
pub use websocket::Message;

/// A connection id, unique within a worker and never reused (a serial
/// number above the slab key bits).
pub type Fd = u64;

/// Everything a worker process hands its reactor.
pub struct WorkerContext {
    /// Slot id.
    pub worker_id: usize,
    /// Task worker (no listener) or event worker.
    pub task_worker: bool,
    /// Settings.
    pub settings: Arc<Settings>,
    /// The slot's listening socket (event workers). The reactor makes it
    /// non-blocking, and on stop deregisters and drops its copy (never
    /// shuts it down: the manager keeps the socket).
    pub listener: Option<std::net::TcpListener>,
    /// The slot's admin listening socket (`admin_listen`), treated like
    /// `listener`; its connections are marked `ConnectionInfo::admin`.
    pub admin_listener: Option<std::net::TcpListener>,
    /// Mailboxes.
    pub postbox: Postbox,
    /// This process's scoreboard row.
    pub row: &'static Row,
    /// The whole scoreboard.
    pub scoreboard: Scoreboard,
    /// Called once when the loop is about to serve.
    pub on_ready: Option<Box<dyn FnOnce()>>,
    /// Watch the process's signal self-pipe (SIGTERM: graceful stop;
    /// SIGUSR1: hand the connections over to the slot's successor).
    pub watch_signals: bool,
    /// The slot's handover link (event workers under a manager); `None`:
    /// stops close connections, `max_request` ends the loop.
    pub handover: Option<Handover>,
}

/// What a worker needs to hand connections over or adopt them.
pub struct Handover {
    /// The slot's socket pair.
    pub link: handover::HandoverLink,
    /// This worker replaces a live one: adopt its connections before
    /// accepting or reading the mailbox.
    pub expect_predecessor: bool,
    /// Asks the manager for a replacement (at `max_request`).
    pub request_replacement: Box<dyn Fn()>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("link", &self.link)
            .field("expect_predecessor", &self.expect_predecessor)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("worker_id", &self.worker_id)
            .field("task_worker", &self.task_worker)
            .field("listener", &self.listener)
            .field("watch_signals", &self.watch_signals)
            .finish_non_exhaustive()
    }
}

/// How the worker's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Asked to stop (signal, `Server::stop`, or a [`StopHandle`]).
    Stopped,
    /// `max_request` reached: the manager replaces this worker.
    MaxRequest,
    /// The connections moved to the slot's replacement.
    HandedOver,
}

/// Runs a worker's loop until it stops: `on_worker_start`, serve, then the
/// graceful stop and `on_worker_stop`.
pub fn run_worker<A: App>(ctx: WorkerContext, app: &mut A) -> std::io::Result<WorkerExit> {
    run_worker_until(ctx, app, StopHandle::new())
}

/// [`run_worker`] that also stops when `stop` is triggered (from any
/// thread).
pub fn run_worker_until<A: App>(
    ctx: WorkerContext,
    app: &mut A,
    stop: StopHandle,
) -> std::io::Result<WorkerExit> {
    let (reactor, on_ready) = event_loop::Reactor::<A>::new(ctx, stop)?;
    reactor.run(app, on_ready)
}
