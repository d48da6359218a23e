//! The reactor over real sockets on 127.0.0.1, part two (timers and
//! heartbeats, workers, tasks, stop, the outbound client; WebSocket and
//! HTTP are in `reactor.rs`): reactors run in-process on threads, clients
//! are tungstenite's blocking client or raw TCP.
//!
//! Polling, ports and the private Redis come from `tests/common`; the
//! in-process worker, raw frames and the test application are the
//! reactor tests' own kit, `tests/common/reactor_kit.rs`.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "common/reactor_kit.rs"]
mod kit;

use kit::*;

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
