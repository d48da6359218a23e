//! The control socket: a Unix socket beside the pid file on which the master
//! answers `status` with one JSON object built from the scoreboard.
//!
//! Protocol: the client sends one line (`status`), the master answers one
//! JSON line and closes. Unknown requests get `{"error":…}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::scoreboard::{Role, Scoreboard};

/// Binds the control socket, replacing a stale socket file.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind control socket {}: {e}", path.display()),
        )
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The `status` document.
pub fn status(sb: &Scoreboard, listen: &str, phase: &str) -> Value {
    let rows = sb.snapshot();
    let one = |role: Role| {
        rows.iter()
            .find(|r| r.role == role)
            .map(|r| json!({"pid": r.pid, "uptime_s": r.uptime_s, "rss_kib": r.rss_kib}))
    };
    let mut workers: Vec<_> = rows.iter().filter(|r| r.role == Role::Worker).collect();
    workers.sort_by_key(|r| (r.id, r.pid));
    let mut tasks: Vec<_> = rows.iter().filter(|r| r.role == Role::TaskWorker).collect();
    tasks.sort_by_key(|r| (r.id, r.pid));
    let t = sb.totals();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "listen": listen,
        "phase": phase,
        "master": one(Role::Master),
        "manager": one(Role::Manager),
        "workers": workers,
        "task_workers": tasks,
        "totals": {
            "worker_restarts": ld(&t.worker_restarts),
            "worker_replacements": ld(&t.worker_replacements),
            "reloads": ld(&t.reloads),
        }
    })
}

/// Serves every pending client on a non-blocking listener (master loop).
pub fn serve_pending(l: &UnixListener, answer: &dyn Fn(&str) -> Value) {
    while let Ok((stream, _)) = l.accept() {
        let _ = serve_one(stream, answer);
    }
}

fn serve_one(stream: UnixStream, answer: &dyn Fn(&str) -> Value) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(&stream).take(4096).read_line(&mut line)?;
    let reply = answer(line.trim());
    let mut w = &stream;
    writeln!(w, "{reply}")
}

use std::io::Read as _;

/// Client side: asks the master at `path` and returns its JSON answer.
pub fn request(path: &Path, what: &str) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot reach the master on {}: {e}", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    writeln!(s, "{what}")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    serde_json::from_str(text.trim())
        .map_err(|e| std::io::Error::other(format!("bad answer from {}: {e}", path.display())))
}
