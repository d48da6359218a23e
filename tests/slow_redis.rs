//! The whole cluster while Redis is slow (issue 11): every Redis reply of
//! the Route and both IM servers comes 300 ms late, through a fault proxy,
//! while users keep messaging. Nothing on a worker's loop may wait for it:
//! the Route's `/health` and idle users' WebSocket pings are answered within
//! 50 ms, no IM server is dropped, and every message sent during the delay
//! arrives after it, exactly once and in order per sender → receiver pair.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic by design

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::proxy::Mode;
use common::{http_get, wait_until, WsClient};
use serde_json::{json, Value};
use tungstenite::Message;

const DELAY: Duration = Duration::from_millis(300);

/// The Route's /health round trip.
fn health_time(c: &Cluster) -> Duration {
    let t = Instant::now();
    let (status, _, _) = http_get(c.route.addr(), "/health").expect("GET /health");
    assert_eq!(status, 200);
    t.elapsed()
}

/// A WebSocket ping round trip on an idle user's connection.
fn ping_time(ws: &mut WsClient) -> Duration {
    let t = Instant::now();
    ws.send(Message::Ping(vec![7u8].into())).expect("ping");
    loop {
        match ws.recv_any() {
            Ok(Message::Pong(_)) => return t.elapsed(),
            Ok(_) => continue,
            Err(e) => panic!("no pong: {e}"),
        }
    }
}

fn registered(c: &Cluster) -> usize {
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("im_server")
        .query(&mut c.redis.client())
        .expect("SMEMBERS im_server");
    members.len()
}

#[test]
fn a_slow_redis_stalls_no_loop_and_loses_no_message() {
    let c = Cluster::start_proxied(1, 2, 2, "");
    // Pairs across the two servers, and idle users beside them.
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut idle = Vec::new();
    for i in 0..8 {
        let (a, _) = c.connect_user(&format!("from{i}"));
        let (b, _) = c.connect_user(&format!("to{i}"));
        let (z, _) = c.connect_user(&format!("idle{i}"));
        senders.push(a);
        receivers.push(b);
        idle.push(z);
    }
    for r in receivers.iter_mut() {
        r.set_timeout(Duration::from_millis(100));
    }
    // Let every presence write land before Redis turns slow.
    wait_until(Duration::from_secs(10), "all users online", || {
        (0..8).all(|i| c.online(&format!("to{i}"))["online"] == true)
    });
    let proxy = c.proxy.as_ref().expect("proxied cluster");
    proxy.set(Mode::Delay(DELAY));
    let t0 = Instant::now();
    let mut sent: HashMap<usize, u64> = HashMap::new();
    let (mut worst_health, mut worst_ping) = (Duration::ZERO, Duration::ZERO);
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(3) {
        for (i, s) in senders.iter_mut().enumerate() {
            s.send_json(&json!({"to": format!("to{i}"), "data": {"n": n}}))
                .expect("send");
            *sent.entry(i).or_default() += 1;
        }
        n += 1;
        worst_health = worst_health.max(health_time(&c));
        let z = (n as usize) % idle.len();
        worst_ping = worst_ping.max(ping_time(&mut idle[z]));
        assert_eq!(
            registered(&c),
            2,
            "an IM server was dropped while Redis was slow"
        );
        std::thread::sleep(Duration::from_millis(50)); // pacing, not a wait
    }
    proxy.set(Mode::Pass);
    eprintln!("while Redis was {DELAY:?} slow: /health worst {worst_health:?}, ping worst {worst_ping:?}, {n} rounds");
    assert!(
        worst_health < Duration::from_millis(50),
        "/health took {worst_health:?}"
    );
    assert!(
        worst_ping < Duration::from_millis(50),
        "a ping took {worst_ping:?}"
    );
    // Every message arrives after the delay, once, in order.
    for (i, r) in receivers.iter_mut().enumerate() {
        let want = sent[&i];
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while (got.len() as u64) < want && Instant::now() < deadline {
            if let Ok(Message::Text(t)) = r.recv_timeout(Duration::from_millis(200)) {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                if let Some(k) = v["data"]["n"].as_u64() {
                    assert_eq!(v["from"], format!("from{i}"));
                    got.push(k);
                }
            }
        }
        let expected: Vec<u64> = (0..want).collect();
        assert_eq!(got, expected, "pair {i}: every message once, in order");
    }
    assert_eq!(registered(&c), 2);
}

#[test]
fn a_silent_redis_gets_senders_an_error_never_a_hang() {
    let c = Cluster::start_proxied(1, 2, 1, "redis_timeout = 1.0");
    let (mut a, _) = c.connect_user("alice");
    let (_b, _) = c.connect_user("bob");
    wait_until(Duration::from_secs(10), "bob online", || {
        c.online("bob")["online"] == true
    });
    let proxy = c.proxy.as_ref().expect("proxied cluster");
    proxy.set(Mode::BlackHole);
    // Nobody has asked where carol is: the Route must ask Redis, which
    // never answers. The sender hears about it within redis_timeout.
    let t = Instant::now();
    a.send_json(&json!({"to": "carol", "data": 1}))
        .expect("send");
    a.set_timeout(Duration::from_secs(5));
    let v = a.recv_text_json();
    assert_eq!(v["error"]["code"], "storage_unavailable", "{v}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let (status, body) = c.api_send("dave", json!("x"));
    assert_eq!(status, 503, "{body}");
    proxy.set(Mode::Pass);
    wait_until(Duration::from_secs(15), "delivery again", || {
        c.api_send("bob", json!("back")).0 == 200
    });
}
