//! Connection handover in the IM cluster (issue 8): users of an IM server
//! keep their connections, bindings and presence across reloads while
//! messaging; a reloaded Route keeps its IM servers' registrations in
//! place (no removal, no re-registration in Redis).

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{wait_until, WsClient};
use serde_json::json;

/// Users in the IM reload test (about 8 s for 1,000 in a debug build on 2
/// shared cores); `HANDOVER_USERS=N` overrides.
fn user_count() -> usize {
    std::env::var("HANDOVER_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[test]
fn im_users_keep_connections_and_messages_across_three_reloads() {
    let n = user_count();
    let c = Cluster::start(1, 1, 2, "");
    let t0 = Instant::now();
    let mut users: Vec<WsClient> = (0..n).map(|i| c.connect_user(&format!("u{i}")).0).collect();
    eprintln!("{n} users connected in {:?}", t0.elapsed());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let (stop2, rounds2) = (stop.clone(), rounds.clone());
    // Every round, user i sends seq r to user i+1, then every user must
    // receive exactly seq r from user i-1: a loss times out, a duplicate
    // shows up as a wrong seq, a closed socket as an error.
    let driver = std::thread::spawn(move || {
        let mut r = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            for (i, u) in users.iter_mut().enumerate() {
                let to = format!("u{}", (i + 1) % n);
                u.send_json(&json!({"to": to, "data": {"seq": r, "from": i}}))
                    .unwrap_or_else(|e| panic!("round {r}: u{i} send: {e}"));
            }
            for (i, u) in users.iter_mut().enumerate() {
                let m = u.recv_text_json();
                let want = (i + n - 1) % n;
                assert_eq!(
                    (m["data"]["seq"].as_u64(), m["data"]["from"].as_u64()),
                    (Some(r), Some(want as u64)),
                    "round {r}: u{i} got {m}"
                );
            }
            r += 1;
            rounds2.store(r, Ordering::Relaxed);
        }
        users
    });
    let im = &c.ims[0];
    for k in 0..3 {
        let before = rounds.load(Ordering::Relaxed);
        im.reload_workers();
        wait_until(
            Duration::from_secs(20),
            "rounds continue after the reload",
            || rounds.load(Ordering::Relaxed) >= before + 2 || driver.is_finished(),
        );
        if driver.is_finished() {
            let log = im.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "IM log, last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        assert!(!driver.is_finished(), "the driver died in reload {k}");
    }
    stop.store(true, Ordering::Relaxed);
    let users = driver.join().expect("no message lost, duplicated or cut");
    eprintln!("{} rounds of {n} messages", rounds.load(Ordering::Relaxed));
    // Presence follows the connections: each user has exactly one record,
    // naming a live connection of the current workers.
    let online = c.online("u7");
    assert_eq!(online["connections"], 1, "{online}");
    let mut redis = c.redis.client();
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("im_user:{u7}")
        .query(&mut redis)
        .unwrap();
    assert_eq!(fields.len(), 1, "{fields:?}");
    let log = im.log();
    assert!(
        log.contains("took over the Route link"),
        "the Route link moved too"
    );
    assert!(!log.contains("going away"), "no user saw 1001");
    drop(users);
}

#[test]
fn a_route_reload_keeps_registrations_in_place() {
    let c = Cluster::start(2, 2, 1, "");
    let mut redis = c.redis.client();
    let details = |r: &mut redis::Connection| -> HashMap<String, serde_json::Value> {
        let m: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("{im_server}:details")
            .query(r)
            .unwrap();
        m.into_iter()
            .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
            .collect()
    };
    let before = details(&mut redis);
    assert_eq!(before.len(), 2);
    let events = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listening = Arc::new(AtomicBool::new(false));
    let (ev2, l2, url) = (events.clone(), listening.clone(), c.redis.url());
    std::thread::spawn(move || {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut ps = conn.as_pubsub();
        ps.subscribe("{im_server}:events").unwrap();
        l2.store(true, Ordering::SeqCst);
        while let Ok(m) = ps.get_message() {
            ev2.lock().unwrap().push(m.get_payload().unwrap());
        }
    });
    wait_until(Duration::from_secs(5), "subscribed", || {
        listening.load(Ordering::SeqCst)
    });
    let (mut alice, _) = c.connect_user("alice");
    c.route.reload_workers();
    // The new Route workers adopt the registrations, renew them (owner
    // changes) and announce the rehome.
    wait_until(
        Duration::from_secs(10),
        "every registration owned by a new Route worker, rehome announced",
        || {
            let after = details(&mut redis);
            let moved = before
                .iter()
                .all(|(m, b)| after.get(m).is_some_and(|a| a["owner"] != b["owner"]));
            moved && events.lock().unwrap().iter().any(|e| e.contains("rehome"))
        },
    );
    let after = details(&mut redis);
    for (member, b) in &before {
        let a = &after[member];
        assert_eq!(a["registered_at_ms"], b["registered_at_ms"], "{member}");
        assert_ne!(a["owner"], b["owner"], "{member}: owned by the new worker");
    }
    let seen = events.lock().unwrap().clone();
    assert!(
        seen.iter().any(|e| e.contains("rehome")),
        "the rehome was announced: {seen:?}"
    );
    for e in &seen {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(
            v["event"], "update",
            "only updates during a Route reload: {seen:?}"
        );
    }
    // Delivery through the adopted registration connection still works.
    let (status, body) = c.api_send("alice", json!("after the reload"));
    assert_eq!(status, 200, "{body}");
    let m = alice.recv_text_json();
    assert_eq!(m["data"], "after the reload", "{m}");
    assert!(!c.ims[0].log().contains("lost the Route connection"));
}
