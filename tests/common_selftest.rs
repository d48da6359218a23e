//! Self-test of the shared integration-test helpers in `tests/common`.
//!
//! Every helper is exercised for real: a private redis-server is started and
//! restarted, tiny std-only HTTP and WebSocket servers run in threads, and
//! real child processes are spawned and killed.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;
use redis::Commands;
use tungstenite::Message;

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("free port must be bindable");
    drop(listener);
    assert_port_free(port);

    let ip = Ipv4Addr::new(127, 0, 0, 3);
    let port = free_port_on(ip);
    TcpListener::bind((ip, port)).expect("free port on 127.0.0.3 must be bindable");
}

#[test]
fn free_ports_are_handed_out_once_and_below_the_ephemeral_range() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
    let (p, q) = {
        let p = free_port_and(10000);
        (p, p + 10000)
    };
    let _both = (
        TcpListener::bind(("127.0.0.1", p)).expect("p bindable"),
        TcpListener::bind(("127.0.0.1", q)).expect("p + 10000 bindable"),
    );
    // Where the kernel's ephemeral range leaves room (it does on Debian's
    // default 32768-60999), nothing handed out is in it.
    if let Some((lo, hi)) = port_pool() {
        for port in ports.iter().chain([&p, &q]) {
            assert!((lo..hi).contains(port), "{port} outside {lo}..{hi}");
        }
        let connected = std::net::TcpStream::connect(("127.0.0.1", q)).unwrap();
        assert!(connected.local_addr().unwrap().port() >= hi);
    }
}

#[test]
#[should_panic(expected = "still in use")]
fn assert_port_free_panics_while_listening() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_port_free(listener.local_addr().unwrap().port());
}

#[test]
fn temp_dir_is_removed_on_drop() {
    let dir = temp_dir();
    let path = dir.path().to_path_buf();
    std::fs::write(path.join("f"), b"x").unwrap();
    drop(dir);
    assert!(!path.exists());
}

#[test]
#[should_panic(expected = "timed out after")]
fn wait_until_panics_on_timeout() {
    wait_until(
        Duration::from_millis(100),
        "a condition that never holds",
        || false,
    );
}

#[test]
fn wait_for_returns_the_value() {
    let mut calls = 0;
    let v = wait_for(Duration::from_secs(2), "third call", || {
        calls += 1;
        (calls == 3).then_some(calls * 10)
    });
    assert_eq!(v, 30);
}

#[test]
#[should_panic(expected = "nothing ever")]
fn wait_for_panics_on_timeout() {
    wait_for::<()>(Duration::from_millis(60), "nothing ever", || None);
}

#[test]
fn redis_restart_loses_data_and_stop_kills_it() {
    let mut redis = RedisServer::start();
    assert!(redis.url().contains(&redis.port().to_string()));
    let mut con = redis.client();
    let _: () = con.set("k", "v").unwrap();
    let v: String = con.get("k").unwrap();
    assert_eq!(v, "v");

    let port = redis.port();
    redis.restart();
    assert_eq!(redis.port(), port, "restart keeps the port");
    let mut con = redis.client();
    let v: Option<String> = con.get("k").unwrap();
    assert_eq!(v, None, "a restarted redis comes back empty");

    redis.stop();
    assert!(!redis.is_up());
    assert!(!port_accepts(port));
}

#[test]
fn http_client_reads_plain_and_chunked_responses() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let replies: [&[u8]; 2] = [
            b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Test: yes\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        ];
        let mut requests = Vec::new();
        for reply in replies {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            // Read the head and a body of "Content-Length: 4" if any.
            while !String::from_utf8_lossy(&buf).contains("\r\n\r\n")
                || (String::from_utf8_lossy(&buf).contains("Content-Length: 4")
                    && !buf.ends_with(b"ping"))
            {
                let n = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            requests.push(String::from_utf8(buf).unwrap());
            s.write_all(reply).unwrap();
        }
        requests
    });

    let (status, headers, body) = http_get(addr, "/a").unwrap();
    assert_eq!(status, 201);
    assert_eq!(body, "hello");
    assert!(headers.iter().any(|(k, v)| k == "X-Test" && v == "yes"));

    let (status, _, body) = http_request(addr, "POST", "/b", &[("X-Req", "1")], b"ping").unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "abcde");

    let requests = server.join().unwrap();
    assert!(requests[0].starts_with("GET /a HTTP/1.1\r\n"));
    assert!(requests[0].contains("Connection: close"));
    assert!(requests[1].starts_with("POST /b HTTP/1.1\r\n"));
    assert!(requests[1].contains("X-Req: 1"));
    assert!(requests[1].ends_with("ping"));
}

#[test]
fn http_client_returns_error_when_nothing_listens() {
    let port = free_port();
    assert!(http_get(("127.0.0.1", port), "/").is_err());
}

/// A one-connection tungstenite echo server; returns its port and a handle
/// yielding the peer address it saw.
fn ws_echo_once() -> (u16, thread::JoinHandle<std::net::SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (stream, peer) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(stream).unwrap();
        loop {
            match ws.read() {
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => ws.send(m).unwrap(),
                Ok(Message::Close(_)) => {
                    // Let tungstenite answer the Close, then finish.
                    let _ = ws.flush();
                }
                Ok(_) => {}
                Err(_) => return peer,
            }
        }
    });
    (port, handle)
}

#[test]
fn ws_client_round_trips_text_binary_and_json() {
    let (port, server) = ws_echo_once();
    let mut ws = ws_connect(&format!("ws://127.0.0.1:{port}/chat")).unwrap();
    assert_eq!(ws.response().status(), 101);

    ws.send_text("hi").unwrap();
    assert_eq!(ws.recv().unwrap(), Message::text("hi"));
    ws.send_binary(vec![1u8, 2, 3]).unwrap();
    assert_eq!(ws.recv().unwrap(), Message::binary(vec![1u8, 2, 3]));
    ws.send_json(&serde_json::json!({"cmd": "x", "n": 1}))
        .unwrap();
    assert_eq!(ws.recv_text_json()["n"], 1);

    // Nothing more arrives: recv times out with an error instead of hanging.
    assert!(ws.recv_timeout(Duration::from_millis(100)).is_err());

    ws.close().unwrap();
    server.join().unwrap();
}

#[test]
fn ws_connect_from_uses_the_chosen_source_address() {
    let (port, server) = ws_echo_once();
    let src = Ipv4Addr::new(127, 0, 0, 7);
    let mut ws = ws_connect_from(src, &format!("ws://127.0.0.1:{port}/")).unwrap();
    assert_eq!(ws.local_addr().ip(), src);
    ws.send_text("x").unwrap();
    assert_eq!(ws.recv().unwrap(), Message::text("x"));
    ws.close().unwrap();
    assert_eq!(server.join().unwrap().ip(), src);
}

#[test]
fn ws_connect_fails_cleanly_when_nothing_listens() {
    let port = free_port();
    assert!(ws_connect(&format!("ws://127.0.0.1:{port}/")).is_err());
}

#[test]
fn proc_guard_kills_the_whole_tree() {
    let mut proc = Proc::spawn(Command::new("sh").args(["-c", "sleep 30 & sleep 31 & wait"]));
    let pid = proc.pid();
    assert!(pid_alive(pid));
    // Between fork and exec a child still shows its parent's command line,
    // so poll rather than assert at once.
    wait_until(Duration::from_secs(5), "sh command line", || {
        proc_cmdline(pid).is_some_and(|c| c.contains("sleep 30 &"))
    });
    let kids = wait_for(Duration::from_secs(5), "two sleep children", || {
        let kids = children_of(pid);
        let execed = kids
            .iter()
            .all(|&k| proc_cmdline(k).is_some_and(|c| c.starts_with("sleep 3")));
        (kids.len() == 2 && execed).then_some(kids)
    });
    assert_eq!(descendants_of(pid), kids);
    assert!(proc.try_wait().is_none());

    drop(proc);
    assert!(!pid_alive(pid));
    // The orphaned children were killed too (they may linger as zombies for
    // a moment until init reaps them; pid_alive treats zombies as dead).
    wait_until(Duration::from_secs(5), "children killed", || {
        kids.iter().all(|&k| !pid_alive(k))
    });
}

#[test]
fn pid_alive_is_false_for_zombies_and_gone_processes() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    // Not reaped yet: it becomes a zombie, which does not count as alive.
    wait_until(Duration::from_secs(5), "child exits", || !pid_alive(pid));
    child.wait().unwrap();
    assert!(!pid_alive(pid));
    assert_eq!(proc_cmdline(pid), None);
}

/// A Route or IM daemon never falls back on the shared Redis at
/// 127.0.0.1:6379 (their default): without a `redis_url` it gets a dead one.
#[test]
fn daemons_never_default_to_the_shared_redis() {
    for bin in [common::cluster::ROUTE_BIN, common::cluster::IM_BIN] {
        let d = common::daemon::Daemon::new(bin, "worker_num = 1");
        let text = std::fs::read_to_string(&d.config).unwrap();
        assert!(
            text.contains("redis_url = \"redis://127.0.0.1:") && !text.contains(":6379"),
            "{bin}: {text}"
        );
        let redis = RedisServer::start();
        let d = common::daemon::Daemon::new(bin, &format!("redis_url = \"{}\"", redis.url()));
        let text = std::fs::read_to_string(&d.config).unwrap();
        assert_eq!(text.matches("redis_url").count(), 1, "{text}");
    }
    let d = common::daemon::Daemon::new(&health_daemon_bin(), "worker_num = 1");
    let text = std::fs::read_to_string(&d.config).unwrap();
    assert!(!text.contains("redis_url"), "{text}");
}
