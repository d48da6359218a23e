//! Every input limit, crossed by one client while another keeps being
//! served: connections per IP, handshake timeout, header size, body size,
//! frame size, messages per second, pending output, registrations per IP,
//! and the admin address. Each test runs a real Route daemon (one worker,
//! so per-worker limits are exact) with a private Redis, on loopback; the
//! "other client" comes from another 127.0.0.x address where that matters.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::cluster::ROUTE_BIN;
use common::daemon::Daemon;
use common::{free_port, http_get, ws_connect, ws_connect_from, RedisServer, WsClient};
use serde_json::{json, Value};
use tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);

/// A one-worker Route with a private Redis and `extra` settings lines.
fn route(extra: &str) -> (RedisServer, Daemon) {
    let redis = RedisServer::start();
    let d = Daemon::new(
        ROUTE_BIN,
        &format!(
            "worker_num = 1\nredis_url = \"{}\"\nheartbeat_check_interval = 1.0\nheartbeat_idle_time = 30.0\n{extra}",
            redis.url()
        ),
    );
    d.start();
    (redis, d)
}

fn addr(d: &Daemon) -> SocketAddr {
    d.addr().parse().unwrap()
}

/// A TCP connection from `src` (any 127.0.0.x) with a 5 s timeout.
fn tcp_from(src: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    s.connect_timeout(&to.into(), WAIT).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Sends `req` and reads until EOF (or timeout); the status code of the
/// first response, 0 if none.
fn status_of(mut s: TcpStream, req: &[u8]) -> u16 {
    let _ = s.write_all(req);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").into_bytes()
}

/// `swocloud_connections_open` from `/metrics`, asked from [`OTHER`] (so
/// the ask is not refused by a cap on 127.0.0.1); 0 if unreadable.
fn connections_open(d: &Daemon) -> u64 {
    let mut s = tcp_from(OTHER, addr(d));
    let _ = s.write_all(&get("/metrics"));
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .find_map(|l| l.strip_prefix("swocloud_connections_open "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `/health` from another address answers 200: the server still serves.
#[track_caller]
fn still_serving(d: &Daemon) {
    assert_eq!(
        status_of(tcp_from(OTHER, addr(d)), &get("/health")),
        200,
        "another client is served"
    );
}

/// The close code the server sends next (skipping data frames).
fn close_code(ws: &mut WsClient) -> Option<u16> {
    ws.set_timeout(WAIT);
    loop {
        match ws.recv() {
            Ok(Message::Close(Some(f))) => return Some(u16::from(f.code)),
            Ok(Message::Close(None)) => return None,
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

fn url(d: &Daemon) -> String {
    format!("ws://{}/", d.addr())
}

fn register(ws: &mut WsClient, name: &str, port: u16) -> Value {
    ws.send_json(&json!({"method":"register","serviceName":name,"ip":"10.0.0.1","port":port}))
        .unwrap();
    ws.recv_text_json()
}

#[test]
fn connections_per_ip_are_capped_at_accept_with_503() {
    let (_r, d) = route("max_conn_per_ip = 3\nhandshake_timeout = 30.0");
    let a = addr(&d);
    let lo = Ipv4Addr::LOCALHOST;
    let held: Vec<TcpStream> = (0..3).map(|_| tcp_from(lo, a)).collect();
    // The worker has accepted all three: open now are those and the
    // scrape's own connection.
    common::wait_until(WAIT, "three connections accepted", || {
        connections_open(&d) >= 4
    });
    assert_eq!(status_of(tcp_from(lo, a), &get("/health")), 503);
    still_serving(&d);
    // One of the three leaves: its address may connect again.
    drop(held);
    common::wait_until(WAIT, "a slot freed for 127.0.0.1", || {
        status_of(tcp_from(lo, a), &get("/health")) == 200
    });
    assert!(d.log().contains("max_conn_per_ip 3 reached"), "{}", d.log());
}

#[test]
fn a_slow_handshake_is_cut_at_handshake_timeout() {
    let (_r, d) = route("handshake_timeout = 1.0");
    let mut slow = tcp_from(Ipv4Addr::LOCALHOST, addr(&d));
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let t0 = Instant::now();
    still_serving(&d);
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[test]
fn an_oversize_head_gets_431_and_an_oversize_body_413() {
    let (_r, d) = route("package_max_length = 4096");
    let big_header = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let s = tcp_from(Ipv4Addr::LOCALHOST, addr(&d));
    assert_eq!(status_of(s, big_header.as_bytes()), 431);
    still_serving(&d);
    let body = "x".repeat(8192);
    let req = format!(
        "POST /api/send HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(
        status_of(tcp_from(Ipv4Addr::LOCALHOST, addr(&d)), req.as_bytes()),
        413
    );
    still_serving(&d);
}

#[test]
fn an_oversize_frame_is_closed_with_1009() {
    let (_r, d) = route("package_max_length = 4096");
    let mut other = ws_connect_from(OTHER, &url(&d)).unwrap();
    let mut big = ws_connect(&url(&d)).unwrap();
    big.send_text("x".repeat(8192)).unwrap();
    assert_eq!(close_code(&mut big), Some(1009));
    // The other peer is still answered (an unknown method gets its error).
    other.send_json(&json!({"method":"nope"})).unwrap();
    assert_eq!(other.recv_text_json()["error"]["code"], "unknown_method");
}

#[test]
fn messages_per_second_past_the_budget_close_with_1008() {
    let (_r, d) = route("max_messages_per_second = 20\nmax_bad_frames = 100000");
    let mut other = ws_connect_from(OTHER, &url(&d)).unwrap();
    assert_eq!(register(&mut other, "IM_ok", 9001)["method"], "registered");
    let mut flood = ws_connect(&url(&d)).unwrap();
    assert_eq!(
        register(&mut flood, "IM_flood", 9002)["method"],
        "registered"
    );
    for _ in 0..200 {
        if flood
            .send_json(&json!({"method":"heartbeat","load":1}))
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut flood), Some(1008));
    // A peer within its budget keeps working: ~5 messages a second.
    for _ in 0..10 {
        other
            .send_json(&json!({"method":"heartbeat","load":2}))
            .unwrap();
        // Paces the peer at ~5 messages a second, within its budget.
        std::thread::sleep(Duration::from_millis(200));
    }
    other.send_json(&json!({"method":"nope"})).unwrap();
    assert_eq!(other.recv_text_json()["error"]["code"], "unknown_method");
    assert!(
        d.log().contains("over max_messages_per_second 20"),
        "{}",
        d.log()
    );
}

/// With auth on, a registered IM server's link carries all its users'
/// messages: the per-connection budget must not cut it (it would lose
/// every forward past the limit); a connection that has not registered
/// is still held to it.
#[test]
fn an_authenticated_im_link_is_not_held_to_the_message_budget() {
    let secret = "limits-secret";
    let (_r, d) = route(&format!(
        "max_messages_per_second = 20\nauth_secret = \"{secret}\""
    ));
    let token = swocloud::auth::mint(secret.as_bytes(), "IM_busy", "register", 600);
    let mut im = ws_connect(&url(&d)).unwrap();
    im.send_json(&json!({"method":"register","serviceName":"IM_busy","ip":"10.0.0.1","port":9003,"token":token}))
        .unwrap();
    assert_eq!(im.recv_text_json()["method"], "registered");
    for _ in 0..200 {
        im.send_json(&json!({"method":"heartbeat","load":1}))
            .unwrap();
    }
    // Still open and served: a bad frame gets its answer.
    im.send_json(&json!({"method":"nope"})).unwrap();
    assert_eq!(im.recv_text_json()["error"]["code"], "unknown_method");
    let mut stranger = ws_connect_from(OTHER, &url(&d)).unwrap();
    for _ in 0..200 {
        if stranger.send_json(&json!({"method":"heartbeat"})).is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut stranger), Some(1008));
}

#[test]
fn a_reader_that_falls_behind_buffer_output_size_is_cut() {
    let (_r, d) = route("buffer_output_size = 65536");
    // Pipeline many /dashboard requests (12 KiB each) and never read.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&addr(&d).into(), WAIT).unwrap();
    let mut s: TcpStream = s.into();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let one = b"GET /dashboard HTTP/1.1\r\nHost: t\r\n\r\n";
    let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 200).collect();
    for _ in 0..50 {
        if s.write_all(&burst).is_err() {
            break;
        }
        if d.log().contains("exceed buffer_output_size") {
            break;
        }
    }
    common::wait_until(WAIT, "the slow reader cut", || {
        d.log().contains("exceed buffer_output_size 65536")
    });
    still_serving(&d);
}

#[test]
fn registrations_per_ip_past_the_limit_get_rate_limited_and_1008() {
    let (redis, d) = route("max_registrations_per_ip = 2");
    let mut a = ws_connect(&url(&d)).unwrap();
    let mut b = ws_connect(&url(&d)).unwrap();
    let mut c = ws_connect(&url(&d)).unwrap();
    assert_eq!(register(&mut a, "IM_a", 9001)["method"], "registered");
    assert_eq!(register(&mut b, "IM_b", 9002)["method"], "registered");
    assert_eq!(
        register(&mut c, "IM_c", 9003)["error"]["code"],
        "rate_limited"
    );
    assert_eq!(close_code(&mut c), Some(1008));
    // Re-registering on a connection that holds one is not a new one.
    assert_eq!(register(&mut a, "IM_a", 9001)["method"], "registered");
    // Another address is served.
    let mut other = ws_connect_from(OTHER, &url(&d)).unwrap();
    assert_eq!(register(&mut other, "IM_o", 9004)["method"], "registered");
    let mut con = redis.client();
    let mut members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("im_server")
        .query(&mut con)
        .unwrap();
    members.sort();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(!members.iter().any(|m| m.contains("9003")), "{members:?}");
}

#[test]
fn admin_endpoints_answer_only_on_the_admin_address() {
    let admin_port = free_port();
    let (_r, d) = route(&format!("admin_listen = \"127.0.0.1:{admin_port}\""));
    let admin = format!("127.0.0.1:{admin_port}");
    for path in ["/api/servers", "/metrics", "/dashboard"] {
        let (pub_status, _, _) = http_get(d.addr(), path).unwrap();
        assert_eq!(pub_status, 404, "{path} on the public address");
        let (adm_status, _, _) = http_get(&admin, path).unwrap();
        assert_eq!(adm_status, 200, "{path} on the admin address");
    }
    for path in ["/health", "/ready"] {
        assert!(http_get(d.addr(), path).unwrap().0 != 404, "{path}");
    }
    // A bad admin_listen stops start with the key named.
    let bad = Daemon::new(ROUTE_BIN, "admin_listen = \"nowhere\"");
    let out = bad.run("start", &["-d"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin_listen"));
}
