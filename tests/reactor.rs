//! The reactor over real sockets on 127.0.0.1: reactors run in-process on
//! threads (stopped with a `StopHandle`), clients are tungstenite's blocking
//! client or raw TCP when the test needs to send malformed bytes.
//!
//! Polling, ports and the private Redis come from `tests/common`; the
//! helpers here are the ones only this file needs (an in-process worker,
//! raw frames).

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swocloud::config::Settings;
use swocloud::event::{App, EventBus};
use swocloud::process::ipc::{Dest, Mailboxes, Postbox};
use swocloud::reactor::{Fd, Message, Request, Response, Server, WorkerExit};
use tungstenite::Message as WsMsg;

use common::wait_until;

// ---- helpers -------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(5);

fn settings(f: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings {
        host: "127.0.0.1".into(),
        worker_num: 1,
        ..Settings::default()
    };
    f(&mut s);
    s
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

type Worker = common::inproc::InProc;

fn spawn<A: App, F: FnOnce() -> A + Send + 'static>(
    s: Settings,
    postbox: Postbox,
    task_worker: bool,
    make: F,
) -> Worker {
    let l = (!task_worker).then(|| listener().0);
    common::inproc::InProc::spawn(s, postbox, l, make)
}

fn single<A: App, F: FnOnce() -> A + Send + 'static>(s: Settings, make: F) -> Worker {
    let pb = Mailboxes::create(1, 0)
        .unwrap()
        .postbox(Dest::Worker(0))
        .unwrap();
    spawn(s, pb, false, make)
}

type Ws = tungstenite::WebSocket<TcpStream>;

fn ws(addr: SocketAddr, path: &str) -> Ws {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}{path}"), s).unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// Next data message (pongs skipped unless asked).
fn next(ws: &mut Ws) -> WsMsg {
    loop {
        match ws.read().unwrap() {
            WsMsg::Pong(_) => continue,
            m => return m,
        }
    }
}

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Sends `req` and reads until the server closes.
fn http_once(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = raw(addr);
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP response (head + Content-Length body) from a keep-alive
/// connection.
fn read_response(s: &mut TcpStream) -> (u16, String) {
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
fn raw_ws(addr: SocketAddr) -> TcpStream {
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
fn frame(opcode: u8, fin: bool, payload: &[u8], masked: bool) -> Vec<u8> {
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
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
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
fn expect_close(s: &mut TcpStream, code: u16) {
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
fn assert_serves(addr: SocketAddr) {
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
struct Seen {
    closed: AtomicUsize,
    push_refused: AtomicUsize,
    log: Mutex<Vec<String>>,
}

/// Echo plus a few commands: `panic`, `relay:W:FD:TEXT`, `task:TEXT`,
/// `flood:N`, `snap`.
struct Echo {
    seen: Arc<Seen>,
}

impl Echo {
    fn new() -> (Echo, Arc<Seen>) {
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

fn echo(s: Settings) -> (Worker, Arc<Seen>) {
    let (app, seen) = Echo::new();
    (single(s, move || app), seen)
}

// ---- WebSocket ------------------------------------------------------------

#[test]
fn echoes_text_binary_and_large_messages() {
    let (w, _) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/");
    c.send(WsMsg::text("hello")).unwrap();
    assert_eq!(next(&mut c), WsMsg::text("hello"));
    c.send(WsMsg::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(next(&mut c), WsMsg::binary(vec![1u8, 2, 3]));
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    c.send(WsMsg::binary(big.clone())).unwrap();
    assert_eq!(next(&mut c), WsMsg::binary(big));
    assert!(w.row.messages_in.load(Ordering::Relaxed) >= 3);
}

#[test]
fn reassembles_fragmented_messages_around_a_ping() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, false, b"frag", true)).unwrap();
    s.write_all(&frame(0x9, true, b"p", true)).unwrap();
    s.write_all(&frame(0x0, false, b"men", true)).unwrap();
    s.write_all(&frame(0x0, true, b"ted", true)).unwrap();
    assert_eq!(
        read_frame(&mut s),
        (0xA, b"p".to_vec()),
        "pong first, with the ping's payload"
    );
    assert_eq!(read_frame(&mut s), (0x1, b"fragmented".to_vec()));
}

#[test]
fn ping_gets_pong() {
    let (w, _) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/");
    c.send(WsMsg::Ping(b"abc".to_vec().into())).unwrap();
    match c.read().unwrap() {
        WsMsg::Pong(p) => assert_eq!(&p[..], b"abc"),
        m => panic!("expected a pong, got {m:?}"),
    }
}

#[test]
fn close_handshake_completes_and_on_close_runs() {
    let (w, seen) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/");
    c.close(None).unwrap();
    let mut saw_close = false;
    loop {
        match c.read() {
            Ok(WsMsg::Close(_)) => saw_close = true,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(saw_close, "the server echoed the close frame");
    wait_until(WAIT, "on_close", || seen.closed.load(Ordering::SeqCst) == 1);
    wait_until(WAIT, "connection count 0", || {
        w.row.connections.load(Ordering::Relaxed) == 0
    });
}

#[test]
fn unmasked_client_frame_gets_1002() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, b"plain", false)).unwrap();
    expect_close(&mut s, 1002);
    assert_serves(w.addr());
}

#[test]
fn reserved_opcode_and_bad_utf8_get_1002_and_1007() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x3, true, b"x", true)).unwrap();
    expect_close(&mut s, 1002);
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, &[0xc3, 0x28], true)).unwrap();
    expect_close(&mut s, 1007);
    assert_serves(w.addr());
}

#[test]
fn frame_over_package_max_length_gets_1009() {
    let (w, _) = echo(settings(|s| s.package_max_length = 4096));
    let mut s = raw_ws(w.addr());
    // Only the header is needed: the size is refused before the payload.
    let f = frame(0x2, true, &vec![0u8; 10_000], true);
    s.write_all(&f[..14]).unwrap();
    expect_close(&mut s, 1009);
    assert_serves(w.addr());
}

#[test]
fn panic_in_on_message_closes_only_that_connection() {
    let (w, _) = echo(settings(|_| {}));
    let mut other = ws(w.addr(), "/");
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, b"panic", true)).unwrap();
    expect_close(&mut s, 1011);
    other.send(WsMsg::text("alive")).unwrap();
    assert_eq!(next(&mut other), WsMsg::text("alive"));
    assert_serves(w.addr());
}

#[test]
fn oversize_output_to_a_non_reading_client_disconnects_it() {
    let (w, seen) = echo(settings(|s| s.buffer_output_size = 256 * 1024));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, b"flood:64", true)).unwrap();
    wait_until(WAIT, "the slow reader to be cut", || {
        seen.closed.load(Ordering::SeqCst) == 1
    });
    assert_eq!(
        seen.push_refused.load(Ordering::SeqCst),
        1,
        "push reported the cut"
    );
    assert_serves(w.addr());
}

// ---- HTTP -----------------------------------------------------------------

#[test]
fn http_keep_alive_serves_several_requests_on_one_connection() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw(w.addr());
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s), (200, "hello".into()));
    }
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        .unwrap();
    assert_eq!(read_response(&mut s), (200, "body".into()));
    assert_eq!(w.row.accepted.load(Ordering::Relaxed), 1);
    assert_eq!(w.row.requests.load(Ordering::Relaxed), 4);
}

#[test]
fn garbage_gets_400_and_close() {
    let (w, _) = echo(settings(|_| {}));
    let resp = http_once(w.addr(), b"\x16\x03\x01 garbage garbage\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_serves(w.addr());
}

#[test]
fn oversize_body_and_headers_are_refused() {
    let (w, _) = echo(settings(|s| s.package_max_length = 2048));
    let resp = http_once(
        w.addr(),
        b"POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let many: String = (0..80).map(|i| format!("X-{i}: v\r\n")).collect();
    let resp = http_once(w.addr(), format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_serves(w.addr());
}

#[test]
fn bad_upgrades_get_400() {
    let (w, _) = echo(settings(|_| {}));
    let bad_key = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n";
    let resp = http_once(w.addr(), bad_key);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let no_version = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let resp = http_once(w.addr(), no_version);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_serves(w.addr());
}

#[test]
fn unfinished_handshake_is_closed_after_handshake_timeout() {
    let (w, _) = echo(settings(|s| s.handshake_timeout = 0.3));
    let mut s = raw(w.addr());
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out); // EOF or reset once the server gives up
    let took = t0.elapsed();
    assert!(out.is_empty());
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert_serves(w.addr());
}

#[test]
fn past_max_conn_new_connections_get_503() {
    let (w, _) = echo(settings(|s| s.max_conn = 2));
    let a = ws(w.addr(), "/");
    let mut b = ws(w.addr(), "/");
    let resp = http_once(w.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    drop(a);
    b.send(WsMsg::text("b")).unwrap();
    assert_eq!(next(&mut b), WsMsg::text("b"));
    drop(b);
    wait_until(WAIT, "both closed", || {
        w.row.connections.load(Ordering::Relaxed) == 0
    });
    assert_serves(w.addr());
}

// ---- timers and heartbeat ---------------------------------------------------

#[test]
fn idle_connections_are_closed_while_active_ones_stay() {
    let (w, seen) = echo(settings(|s| {
        s.heartbeat_check_interval = 0.1;
        s.heartbeat_idle_time = 0.4;
    }));
    let mut idle = ws(w.addr(), "/");
    let mut active = ws(w.addr(), "/");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        active.send(WsMsg::Ping(Vec::new().into())).unwrap();
        assert!(matches!(active.read().unwrap(), WsMsg::Pong(_)));
        // Paces the pings: the active connection must stay busy across
        // several heartbeat checks (idle time 0.4 s) for 1.2 s.
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen.closed.load(Ordering::SeqCst),
        1,
        "only the idle one was closed"
    );
    assert!(idle.read().is_err(), "the idle connection is gone");
    active.send(WsMsg::text("x")).unwrap();
    assert_eq!(next(&mut active), WsMsg::text("x"));
}

struct Timers {
    ticks: Arc<Mutex<Vec<Instant>>>,
    afters: Arc<AtomicUsize>,
}

impl App for Timers {
    fn on_worker_start(&mut self, srv: &mut Server<Self>) {
        let ticks = self.ticks.clone();
        srv.tick(30, move |_, srv, id| {
            let mut t = ticks.lock().unwrap();
            t.push(Instant::now());
            if t.len() == 5 {
                assert!(srv.clear_timer(id), "a tick may clear itself");
                assert!(!srv.clear_timer(id));
            }
        });
        let afters = self.afters.clone();
        srv.after(20, move |_, _, _| {
            afters.fetch_add(1, Ordering::SeqCst);
        });
        let never = srv.after(50, |_, _, _| panic!("cleared timers never fire"));
        assert!(srv.clear_timer(never));
    }
}

#[test]
fn tick_fires_on_schedule_until_cleared_and_after_fires_once() {
    let ticks = Arc::new(Mutex::new(Vec::new()));
    let afters = Arc::new(AtomicUsize::new(0));
    let (t, a) = (ticks.clone(), afters.clone());
    let t0 = Instant::now();
    let _w = single(settings(|_| {}), move || Timers {
        ticks: t,
        afters: a,
    });
    wait_until(WAIT, "five ticks", || ticks.lock().unwrap().len() == 5);
    let v = ticks.lock().unwrap().clone();
    for pair in v.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(20) && gap < Duration::from_millis(500),
            "tick gap {gap:?}"
        );
    }
    assert!(v[4] - t0 >= Duration::from_millis(140));
    // Deliberately waits out five tick periods: nothing may fire, so there
    // is no event to wait on.
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(ticks.lock().unwrap().len(), 5, "no tick after clear_timer");
    assert_eq!(afters.load(Ordering::SeqCst), 1);
}

// ---- workers, tasks, stop ---------------------------------------------------

#[test]
fn pipe_message_reaches_the_other_worker_and_pushes_to_its_connection() {
    let mb = Mailboxes::create(2, 0).unwrap();
    let (a0, _) = Echo::new();
    let (a1, _) = Echo::new();
    let w0 = spawn(
        settings(|_| {}),
        mb.postbox(Dest::Worker(0)).unwrap(),
        false,
        move || a0,
    );
    let w1 = spawn(
        settings(|_| {}),
        mb.postbox(Dest::Worker(1)).unwrap(),
        false,
        move || a1,
    );
    let mut held = ws(w1.addr(), "/whoami");
    let WsMsg::Text(who) = next(&mut held) else {
        panic!()
    };
    let fd = who.strip_prefix("fd:").unwrap().to_string();
    let mut sender = ws(w0.addr(), "/");
    sender
        .send(WsMsg::text(format!("relay:1:{fd}:over the pipe")))
        .unwrap();
    assert_eq!(next(&mut held), WsMsg::text("over the pipe"));
}

#[test]
fn task_round_trip_through_a_task_worker() {
    let mb = Mailboxes::create(1, 1).unwrap();
    let (a0, _) = Echo::new();
    let (t0, _) = Echo::new();
    let w = spawn(
        settings(|_| {}),
        mb.postbox(Dest::Worker(0)).unwrap(),
        false,
        move || a0,
    );
    let tw = spawn(
        settings(|_| {}),
        mb.postbox(Dest::TaskWorker(0)).unwrap(),
        true,
        move || t0,
    );
    let mut c = ws(w.addr(), "/");
    c.send(WsMsg::text("task:shout")).unwrap();
    assert_eq!(next(&mut c), WsMsg::text("SHOUT"));
    assert_eq!(w.row.tasks.load(Ordering::Relaxed), 1);
    assert_eq!(tw.row.tasks.load(Ordering::Relaxed), 1);
}

#[test]
fn graceful_stop_says_going_away_and_runs_stop_hooks() {
    let (w, seen) = echo(settings(|_| {}));
    let mut s = raw_ws(w.addr());
    w.stop();
    expect_close(&mut s, 1001);
    let seen2 = seen.clone();
    assert_eq!(w.join(), WorkerExit::Stopped);
    assert_eq!(
        *seen2.log.lock().unwrap(),
        vec!["workerStop".to_string(), "on_worker_stop".to_string()]
    );
}

#[test]
fn max_request_ends_the_worker() {
    let (w, _) = echo(settings(|s| s.max_request = 3));
    let addr = w.addr();
    for _ in 0..3 {
        let resp = http_once(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!(w.join(), WorkerExit::MaxRequest);
}

#[test]
fn attributes_and_snapshot_describe_the_connection() {
    let (w, _) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/room?x=1");
    c.send(WsMsg::text("snap")).unwrap();
    let WsMsg::Text(json) = next(&mut c) else {
        panic!()
    };
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["phase"], "WebSocket");
    assert_eq!(v["info"]["kind"], "WebSocket");
    assert_eq!(v["info"]["path"], "/room?x=1");
    assert_eq!(v["attrs"]["path"], "/room?x=1");
}

// ---- outbound client ----------------------------------------------------------

struct Dialer {
    target: SocketAddr,
    got: Arc<Mutex<Vec<String>>>,
}

impl App for Dialer {
    fn on_worker_start(&mut self, srv: &mut Server<Self>) {
        srv.ws_connect(self.target, "route.local", "/register")
            .unwrap();
    }
    fn on_connect(&mut self, srv: &mut Server<Self>, fd: Fd) {
        assert_eq!(
            srv.connection_info(fd).unwrap().kind,
            swocloud::reactor::ConnKind::Client
        );
        assert!(srv.push(fd, "hello route"));
    }
    fn on_message(&mut self, _srv: &mut Server<Self>, _fd: Fd, msg: Message) {
        self.got
            .lock()
            .unwrap()
            .push(msg.as_text().unwrap().to_string());
    }
    fn on_close(&mut self, _srv: &mut Server<Self>, _fd: Fd) {
        self.got.lock().unwrap().push("closed".into());
    }
}

#[test]
fn ws_connect_dials_out_and_exchanges_messages() {
    let (route, _) = echo(settings(|_| {}));
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let target = route.addr();
    let _im = single(settings(|_| {}), move || Dialer { target, got: g });
    wait_until(WAIT, "the echo back", || {
        got.lock().unwrap().first().map(String::as_str) == Some("hello route")
    });
    drop(route); // the route stops: 1001, then on_close on our side
    wait_until(WAIT, "on_close", || {
        got.lock().unwrap().last().map(String::as_str) == Some("closed")
    });
}

/// The dialled socket has TCP_NODELAY, like accepted ones: without it an IM
/// server's small forwards to the Route waited for delayed ACKs (tens of ms
/// per user-to-user message under light load, seen in scripts/bench_cluster.sh).
#[test]
fn ws_connect_sets_tcp_nodelay() {
    use std::os::fd::BorrowedFd;
    let (route, _) = echo(settings(|_| {}));
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let target = route.addr();
    let _im = single(settings(|_| {}), move || Dialer { target, got: g });
    wait_until(WAIT, "the echo back", || {
        got.lock().unwrap().first().map(String::as_str) == Some("hello route")
    });
    // The dialer runs in this process: find its socket (peer = the target).
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the fd stays open while borrowed (the worker holds it
        // until `_im` drops at the end of the test).
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&bfd);
        if sock.peer_addr().ok().and_then(|a| a.as_socket()) == Some(target) {
            found.push(sock.tcp_nodelay().unwrap());
        }
    }
    assert_eq!(found, [true], "the dialled socket's TCP_NODELAY");
}

#[test]
fn ws_connect_to_a_closed_port_reports_on_close() {
    let (l, target) = listener();
    drop(l);
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let _w = single(settings(|_| {}), move || Dialer { target, got: g });
    wait_until(WAIT, "on_close", || {
        got.lock().unwrap().as_slice() == ["closed"]
    });
}

// The worker's Redis client: tests/redis_client.rs.

#[test]
fn emit_triggers_the_bus_after_the_hook_returns() {
    let (w, _) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/");
    c.send(WsMsg::text("emit")).unwrap();
    assert_eq!(next(&mut c), WsMsg::text("hook done"));
    assert_eq!(next(&mut c), WsMsg::text("emitted"));
}
