//! The minimal application: what a bare swocloud server answers.
//!
//! - `GET /health`: 200 with the serving worker's id and pid (liveness).
//! - A WebSocket text message `task:<data>` hands `<data>` to the task pool;
//!   the task worker answers `done:<data>:<task worker pid>`, which comes
//!   back to the asking connection as a text message.
//! - Any other WebSocket message is echoed.
//! - `on_worker_error` logs the dead worker's id, pid, exit code and signal.
//! - With `HEALTH_CRASH_FLAG=<path>` in the environment, a worker panics at
//!   start while that file exists (the crash-loop tests use it).

use std::collections::HashMap;

use serde_json::json;

use crate::event::{App, ServerInfo, WorkerFailure};
use crate::reactor::{Fd, Message, Request, Response, Server};

/// The minimal application.
#[derive(Debug, Default)]
pub struct HealthApp {
    /// Task id → the connection that asked.
    pending: HashMap<u64, Fd>,
}

impl App for HealthApp {
    fn on_worker_start(&mut self, _srv: &mut Server<Self>) {
        // Fault injection for the crash-loop tests: a worker crashes at
        // start while the file named by HEALTH_CRASH_FLAG exists.
        if let Some(flag) = std::env::var_os("HEALTH_CRASH_FLAG") {
            if std::path::Path::new(&flag).exists() {
                panic!("HEALTH_CRASH_FLAG is set: crashing at start as asked");
            }
        }
    }

    fn on_worker_error(&mut self, _info: &ServerInfo, f: &WorkerFailure) {
        log::warn!(
            "on_worker_error: worker_id={} pid={} exit_code={} signal={}",
            f.worker_id,
            f.pid,
            f.exit_code,
            f.signal
        );
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        match (
            req.method.as_str(),
            req.path.split('?').next().unwrap_or(""),
        ) {
            ("GET", "/health") => Response::json(
                200,
                &json!({"status": "ok", "worker_id": srv.worker_id(), "pid": std::process::id()}),
            ),
            _ => Response::text(404, "not found\n"),
        }
    }

    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        match msg {
            Message::Text(t) => match t.strip_prefix("task:") {
                Some(data) => match srv.task(data.as_bytes().to_vec()) {
                    Ok(id) => {
                        self.pending.insert(id, fd);
                    }
                    Err(e) => {
                        srv.push(fd, Message::Text(format!("error:{e}")));
                    }
                },
                None => {
                    srv.push(fd, Message::Text(t));
                }
            },
            other => {
                srv.push(fd, other);
            }
        }
    }

    fn on_close(&mut self, _srv: &mut Server<Self>, fd: Fd) {
        self.pending.retain(|_, f| *f != fd);
    }

    fn on_task(
        &mut self,
        _srv: &mut Server<Self>,
        _id: u64,
        _from: usize,
        data: Vec<u8>,
    ) -> Vec<u8> {
        format!(
            "done:{}:{}",
            String::from_utf8_lossy(&data),
            std::process::id()
        )
        .into_bytes()
    }

    fn on_finish(&mut self, srv: &mut Server<Self>, id: u64, result: Vec<u8>) {
        if let Some(fd) = self.pending.remove(&id) {
            srv.push(
                fd,
                Message::Text(String::from_utf8_lossy(&result).into_owned()),
            );
        }
    }
}
