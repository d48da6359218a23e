//! The reactor tests' own kit (`reactor.rs`, `reactor_workers.rs`
//! include it with `#[path]`): an in-process worker on a thread, raw
//! WebSocket frames and HTTP over TCP, and the test application (`Echo`)
//! whose hooks record what they saw.

// Each including file uses its own subset of the kit and of what it
// re-exports.
#![allow(dead_code, unused_imports)]

pub use std::io::{Read, Write};
pub use std::net::{SocketAddr, TcpListener, TcpStream};
pub use std::sync::atomic::{AtomicUsize, Ordering};
pub use std::sync::{Arc, Mutex};
pub use std::time::{Duration, Instant};

pub use swocloud::config::Settings;
pub use swocloud::event::{App, EventBus};
pub use swocloud::process::ipc::{Dest, Mailboxes, Postbox};
pub use swocloud::reactor::{Fd, Message, Request, Response, Server, WorkerExit};
pub use tungstenite::Message as WsMsg;

pub use crate::common::wait_until;

// ---- helpers -------------------------------------------------------------

pub const WAIT: Duration = Duration::from_secs(5);

pub fn settings(f: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings {
        host: "127.0.0.1".into(),
        worker_num: 1,
        ..Settings::default()
    };
    f(&mut s);
    s
}

pub fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

pub type Worker = crate::common::inproc::InProc;

pub fn spawn<A: App, F: FnOnce() -> A + Send + 'static>(
    s: Settings,
    postbox: Postbox,
    task_worker: bool,
    make: F,
) -> Worker {
    let l = (!task_worker).then(|| listener().0);
    crate::common::inproc::InProc::spawn(s, postbox, l, make)
}

pub fn single<A: App, F: FnOnce() -> A + Send + 'static>(s: Settings, make: F) -> Worker {
    let pb = Mailboxes::create(1, 0)
        .unwrap()
        .postbox(Dest::Worker(0))
        .unwrap();
    spawn(s, pb, false, make)
}

pub type Ws = tungstenite::WebSocket<TcpStream>;

pub fn ws(addr: SocketAddr, path: &str) -> Ws {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}{path}"), s).unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// Next data message (pongs skipped unless asked).
pub fn next(ws: &mut Ws) -> WsMsg {
    loop {
        match ws.read().unwrap() {
            WsMsg::Pong(_) => continue,
            m => return m,
        }
    }
}

pub fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Sends `req` and reads until the server closes.
pub fn http_once(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = raw(addr);
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP response (head + Content-Length body) from a keep-alive
/// connection.
pub fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed mid-head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// A raw WebSocket connection after a successful upgrade.
pub fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = raw(addr);
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        buf.push(b[0]);
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    s
}

/// A client frame (masked unless `masked` is false).
pub fn frame(opcode: u8, fin: bool, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x11, 0x22, 0x33, 0x44];
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads one server frame: (opcode, payload).
pub fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0; len];
    s.read_exact(&mut p).unwrap();
    (h[0] & 0x0f, p)
}

#[track_caller]
pub fn expect_close(s: &mut TcpStream, code: u16) {
    let (op, p) = read_frame(s);
    assert_eq!(op, 0x8, "expected a close frame");
    assert_eq!(
        u16::from_be_bytes([p[0], p[1]]),
        code,
        "close reason: {}",
        String::from_utf8_lossy(&p[2..])
    );
    let _ = s.write_all(&frame(0x8, true, &p[..2], true)); // answer it, as a client should
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest); // the server then closes TCP
}

#[track_caller]
pub fn assert_serves(addr: SocketAddr) {
    let mut c = ws(addr, "/");
    c.send(WsMsg::text("still here")).unwrap();
    assert_eq!(next(&mut c), WsMsg::text("still here"));
    let resp = http_once(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

// ---- the test application -------------------------------------------------

#[derive(Default)]
pub struct Seen {
    pub closed: AtomicUsize,
    pub push_refused: AtomicUsize,
    pub log: Mutex<Vec<String>>,
}

/// Echo plus a few commands: `panic`, `relay:W:FD:TEXT`, `task:TEXT`,
/// `flood:N`, `snap`.
pub struct Echo {
    seen: Arc<Seen>,
}

impl Echo {
    pub fn new() -> (Echo, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        (Echo { seen: seen.clone() }, seen)
    }
}

impl App for Echo {
    fn listeners(&mut self, bus: &mut EventBus<Server<Self>>) {
        let seen = self.seen.clone();
        bus.register("workerStop", move |_, _| {
            seen.log.lock().unwrap().push("workerStop".into())
        });
        bus.register("Custom", |srv, args| {
            srv.push(args[0].as_u64().unwrap(), "emitted");
        });
    }
    fn on_worker_stop(&mut self, _srv: &mut Server<Self>) {
        self.seen.log.lock().unwrap().push("on_worker_stop".into());
    }
    fn on_open(&mut self, srv: &mut Server<Self>, fd: Fd, req: &Request) {
        srv.set_attr(fd, "path", serde_json::Value::from(req.path.clone()));
        if req.path == "/whoami" {
            srv.push(fd, format!("fd:{fd}"));
        }
    }
    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        let text = msg.as_text().unwrap_or("").to_string();
        if text == "panic" {
            panic!("asked to panic");
        } else if let Some(rest) = text.strip_prefix("relay:") {
            let (w, rest) = rest.split_once(':').unwrap();
            srv.send_message(w.parse().unwrap(), rest.as_bytes().to_vec())
                .unwrap();
        } else if let Some(rest) = text.strip_prefix("task:") {
            srv.task(format!("{fd}:{rest}").into_bytes()).unwrap();
        } else if let Some(n) = text.strip_prefix("flood:") {
            for _ in 0..n.parse::<usize>().unwrap() {
                if !srv.push(fd, vec![0u8; 64 * 1024]) {
                    self.seen.push_refused.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        } else if text == "emit" {
            srv.emit("custom", vec![serde_json::Value::from(fd)]);
            srv.push(fd, "hook done");
        } else if text == "snap" {
            let snap = srv.snapshot(fd).unwrap();
            srv.push(fd, serde_json::to_string(&snap).unwrap());
        } else {
            srv.push(fd, msg);
        }
    }
    fn on_close(&mut self, _srv: &mut Server<Self>, _fd: Fd) {
        self.seen.closed.fetch_add(1, Ordering::SeqCst);
    }
    fn on_request(&mut self, _srv: &mut Server<Self>, req: &Request) -> Response {
        match (req.method.as_str(), req.path_only()) {
            ("GET", "/") => Response::text(200, "hello"),
            ("POST", "/echo") => Response::new(200, req.body.clone()),
            _ => Response::text(404, "nope"),
        }
    }
    fn on_pipe_message(&mut self, srv: &mut Server<Self>, _from: usize, data: Vec<u8>) {
        let s = String::from_utf8(data).unwrap();
        let (fd, text) = s.split_once(':').unwrap();
        srv.push(fd.parse().unwrap(), text);
    }
    fn on_task(
        &mut self,
        _srv: &mut Server<Self>,
        _id: u64,
        _from: usize,
        data: Vec<u8>,
    ) -> Vec<u8> {
        data.to_ascii_uppercase()
    }
    fn on_finish(&mut self, srv: &mut Server<Self>, _id: u64, result: Vec<u8>) {
        let s = String::from_utf8(result).unwrap();
        let (fd, text) = s.split_once(':').unwrap();
        srv.push(fd.parse().unwrap(), text);
    }
}

pub fn echo(s: Settings) -> (Worker, Arc<Seen>) {
    let (app, seen) = Echo::new();
    (single(s, move || app), seen)
}
