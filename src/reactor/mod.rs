//! The worker reactor (API stub: the implementation lands with the reactor
//! work). One mio event loop per worker process.

use std::sync::Arc;

use crate::config::Settings;
use crate::event::App;
use crate::process::ipc::Postbox;
use crate::process::scoreboard::{Row, Scoreboard};

/// A connection id, unique within a worker and never reused.
pub type Fd = u64;

/// A WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Text.
    Text(String),
    /// Binary.
    Binary(Vec<u8>),
}

/// An HTTP request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path with query.
    pub path: String,
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A text response.
    pub fn text(status: u16, body: &str) -> Response {
        Response { status, body: body.as_bytes().to_vec() }
    }
}

/// The handle applications get.
pub struct Server<A: App> {
    _a: std::marker::PhantomData<A>,
}

/// Everything a worker process hands its reactor.
pub struct WorkerContext {
    /// Slot id.
    pub worker_id: usize,
    /// Task worker (no listener) or event worker.
    pub task_worker: bool,
    /// Settings.
    pub settings: Arc<Settings>,
    /// The slot's listening socket (event workers).
    pub listener: Option<std::net::TcpListener>,
    /// Mailboxes.
    pub postbox: Postbox,
    /// This process's scoreboard row.
    pub row: &'static Row,
    /// The whole scoreboard.
    pub scoreboard: Scoreboard,
    /// Called once when the loop is about to serve.
    pub on_ready: Option<Box<dyn FnOnce()>>,
    /// Watch the process's signal self-pipe.
    pub watch_signals: bool,
}

/// How the worker's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Asked to stop.
    Stopped,
    /// max_request reached.
    MaxRequest,
}

/// Runs a worker's loop until it stops.
pub fn run_worker<A: App>(_ctx: WorkerContext, _app: &mut A) -> std::io::Result<WorkerExit> {
    Ok(WorkerExit::Stopped)
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        Response { status, body: v.to_string().into_bytes() }
    }
}

impl<A: App> Server<A> {
    /// Worker id.
    pub fn worker_id(&self) -> usize {
        0
    }
    /// Hand a job to the task pool.
    pub fn task(&mut self, _data: Vec<u8>) -> Result<u64, String> {
        Err("stub".into())
    }
    /// Push to a connection.
    pub fn push(&mut self, _fd: Fd, _m: Message) -> bool {
        false
    }
}
