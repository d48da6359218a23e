//! Several Route nodes behaving as one (issue 13): two Route daemons with
//! their own `node_id`s on one private Redis, two IM servers whose
//! `route_urls` list both nodes in different orders (so each node holds
//! one), users on both. Any node's API reaches every user and shows the
//! whole registry; a node SIGKILLed or frozen is left by its IM servers
//! for the other node within 3 s, and nothing of it stays in the registry.
//! Every worker's registry cache follows a registration made while its
//! change subscription was reconnecting.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::cluster::SECRET;
use common::nodes::{node_id, recv_data, Nodes};
use common::{metric, wait_until, ws_connect};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// How fast an IM server must be registered with the surviving node.
const FAILOVER_BUDGET: Duration = Duration::from_secs(3);

/// The registry in Redis: set members, lease members, details (member →
/// entry) and names, read directly.
fn registry(
    n: &Nodes,
) -> (
    BTreeSet<String>,
    BTreeSet<String>,
    HashMap<String, Value>,
    usize,
) {
    let mut c = n.redis().client();
    let set: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg("im_server")
        .query(&mut c)
        .unwrap();
    let lease: Vec<String> = redis::cmd("ZRANGE")
        .arg("{im_server}:lease")
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap();
    let details: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("{im_server}:details")
        .query(&mut c)
        .unwrap();
    let names: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("{im_server}:by_name")
        .query(&mut c)
        .unwrap();
    let details = details
        .into_iter()
        .map(|(m, j)| (m, serde_json::from_str(&j).unwrap()))
        .collect();
    (set, lease.into_iter().collect(), details, names.len())
}

/// The registry holds exactly the IM servers' two members, all held by
/// `node`: nothing stale in the seed's set or its companions.
#[track_caller]
fn registry_is_exactly(n: &Nodes, node: &str) {
    let want: BTreeSet<String> = n
        .ims
        .iter()
        .map(|im| swocloud::cluster::servers::member(&im.host, im.port))
        .collect();
    let (set, lease, details, names) = registry(n);
    assert_eq!(set, want, "SMEMBERS im_server");
    assert_eq!(lease, want, "the lease ZSET");
    assert_eq!(names, want.len(), "by_name");
    for (m, e) in &details {
        assert!(want.contains(m), "stale details {m}: {e}");
        assert_eq!(e["node"], node, "{m}: {e}");
        let owner = e["owner"].as_str().unwrap();
        assert!(owner.starts_with(&format!("{node}/")), "{m}: owner {owner}");
    }
    assert_eq!(details.len(), want.len());
}

fn expect_held(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(s, n)| (s.to_string(), n.to_string()))
        .collect()
}

#[test]
fn any_node_answers_for_the_whole_cluster() {
    let n = Nodes::start(2, 2, "");
    let (a, b) = (node_id(0), node_id(1));
    let mut us = n.users("any", 3);
    for node in 0..2 {
        // /api/servers: both IM servers, the node holding each, both nodes.
        let doc = n.servers(node, false);
        assert_eq!(doc["count"], 2, "{doc}");
        assert_eq!(doc["node"], node_id(node), "{doc}");
        assert_eq!(
            doc["nodes"],
            json!([{"node": a, "servers": ["IM_0"]}, {"node": b, "servers": ["IM_1"]}]),
            "{doc}"
        );
        assert_eq!(n.held(node, true), n.held(node, false), "cache = Redis");
        // /metrics: the whole registry, whichever node is scraped.
        let addr = n.routes[node].addr();
        assert_eq!(metric(&addr, "swocloud_route_im_servers"), Some(2.0));
        assert_eq!(metric(&addr, "swocloud_route_nodes"), Some(2.0));
        // status: every node of the registry, this one marked.
        let st = n.routes[node].status();
        assert_eq!(st["route_node"], node_id(node), "{st}");
        assert_eq!(st["route_nodes"], doc["nodes"], "{st}");
        let out = n.routes[node].run("status", &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Route nodes: 2"), "{text}");
        assert!(text.contains(&a) && text.contains(&b), "{text}");
        // /api/send through this node reaches users on both IM servers.
        n.reach_all(node, &mut us, "api");
    }
    // User to user across IM servers held by different nodes: IM_0 →
    // route-a → (Redis pub/sub) → route-b → IM_1, and back.
    let on = |s: &str| us.iter().find(|(_, (_, x))| x == s).unwrap().0.clone();
    let (u0, u1) = (on("IM_0"), on("IM_1"));
    for (from, to) in [(&u0, &u1), (&u1, &u0)] {
        let data = json!(format!("{from} to {to}"));
        let ws = &mut us.get_mut(from.as_str()).unwrap().0;
        ws.send_json(&json!({"to": to, "data": data})).unwrap();
        let got = recv_data(
            &mut us.get_mut(to.as_str()).unwrap().0,
            Duration::from_secs(3),
            to,
            &data,
        );
        assert_eq!(&got["from"], from, "{got}");
    }
}

#[test]
fn a_killed_node_is_replaced_within_3_s_and_leaves_nothing_behind() {
    let n = Nodes::start(2, 2, "");
    let (a, b) = (node_id(0), node_id(1));
    let mut us = n.users("kill", 3);
    // A registration that will not come back (a raw client on route-a,
    // like an IM server dying with it): only its lease expiring removes it.
    let mut ghost = ws_connect(&format!("ws://{}/", n.routes[0].addr())).unwrap();
    let token = swocloud::auth::mint(SECRET.as_bytes(), "IM_ghost", "register", 600);
    ghost
        .send_json(&json!({"method": "register", "serviceName": "IM_ghost", "ip": "127.0.0.9", "port": 9, "token": token}))
        .unwrap();
    assert_eq!(ghost.recv_text_json()["method"], "registered");
    let ghost_member = swocloud::cluster::servers::member("127.0.0.9", 9);
    wait_until(Duration::from_secs(5), "route-b sees the ghost", || {
        n.held(1, false).contains_key("IM_ghost")
    });

    n.signal_node(0, Signal::SIGKILL);
    let t0 = Instant::now();
    let all_on_b = expect_held(&[("IM_0", &b), ("IM_1", &b)]);
    wait_until(
        FAILOVER_BUDGET,
        "IM_0 registered with route-b (Redis)",
        || {
            let mut h = n.held(1, true);
            h.remove("IM_ghost");
            h == all_on_b
        },
    );
    let failover = t0.elapsed();
    eprintln!(
        "route-a SIGKILLed: IM_0 registered with route-b {} ms later",
        failover.as_millis()
    );
    assert!(failover < FAILOVER_BUDGET, "{failover:?}");
    drop(ghost);
    // route-b's sweep reaps the dead node's lease that nobody renews.
    wait_until(
        Duration::from_secs(8),
        "the ghost's lease reaped by route-b",
        || !registry(&n).0.contains(&ghost_member),
    );
    eprintln!(
        "route-a SIGKILLed: its orphaned entry reaped by route-b {} ms later",
        t0.elapsed().as_millis()
    );
    n.wait_held(1, &all_on_b, Duration::from_secs(5), false);
    registry_is_exactly(&n, &b);
    assert!(
        n.routes[1]
            .log()
            .contains(&format!("reaped {ghost_member}")),
        "route-b logged the reap"
    );
    assert_ne!(a, b);
    // Every user, still connected to its IM server, through route-b.
    n.reach_all(1, &mut us, "after the kill");
    let doc = n.servers(1, false);
    assert_eq!(
        doc["nodes"],
        json!([{"node": b, "servers": ["IM_0", "IM_1"]}]),
        "{doc}"
    );
    assert_eq!(
        metric(n.routes[1].addr(), "swocloud_route_nodes"),
        Some(1.0)
    );
    assert_eq!(
        metric(n.ims[0].addr(), "swocloud_im_route_failovers_total"),
        Some(1.0)
    );
}

#[test]
fn a_frozen_node_is_left_after_route_timeout_and_takes_nothing_back() {
    let n = Nodes::start(2, 2, "route_timeout = 1.5");
    let a = node_id(0);
    let mut us = n.users("frozen", 3);
    n.signal_node(1, Signal::SIGSTOP);
    let t0 = Instant::now();
    let all_on_a = expect_held(&[("IM_0", &a), ("IM_1", &a)]);
    wait_until(
        FAILOVER_BUDGET,
        "IM_1 registered with route-a (Redis)",
        || n.held(0, true) == all_on_a,
    );
    let failover = t0.elapsed();
    eprintln!(
        "route-b SIGSTOPped: IM_1 registered with route-a {} ms later (route_timeout 1.5 s)",
        failover.as_millis()
    );
    assert!(failover < FAILOVER_BUDGET, "{failover:?}");
    n.wait_held(0, &all_on_a, Duration::from_secs(5), false);
    n.reach_all(0, &mut us, "while route-b is frozen");
    // Thawed, route-b finds its link closed and takes nothing back.
    n.signal_node(1, Signal::SIGCONT);
    n.wait_held(1, &all_on_a, Duration::from_secs(10), false);
    wait_until(Duration::from_secs(5), "route-b ready again", || {
        common::http_get(n.routes[1].addr(), "/ready").is_ok_and(|r| r.0 == 200)
    });
    registry_is_exactly(&n, &a);
    n.reach_all(1, &mut us, "through the thawed route-b");
    let log = n.ims[1].log();
    assert!(log.contains("not even a pong"), "IM_1 says why it left");
}

#[test]
fn a_node_that_comes_back_gets_work_only_at_the_next_failover() {
    let n = Nodes::start(2, 2, "");
    let (a, b) = (node_id(0), node_id(1));
    let mut us = n.users("back", 2);
    n.signal_node(0, Signal::SIGKILL);
    let all_on_b = expect_held(&[("IM_0", &b), ("IM_1", &b)]);
    wait_until(FAILOVER_BUDGET, "both on route-b", || {
        n.held(1, true) == all_on_b
    });
    // route-a is back: IM_0 (route_urls = [a, b]) stays on route-b. Seen
    // over three of route-b's renewals (1.5 s: five IM heartbeats).
    n.routes[0].start();
    n.wait_held(0, &all_on_b, Duration::from_secs(10), false);
    let seen = |name: &str| -> u64 {
        let doc = n.servers(1, true);
        let e = doc["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["serviceName"] == name)
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(e["node"], b.as_str(), "{name} stays on route-b: {doc}");
        e["last_seen_ms"].as_u64().unwrap()
    };
    let since = seen("IM_0");
    wait_until(Duration::from_secs(5), "three renewals by route-b", || {
        seen("IM_0") >= since + 1500
    });
    // A rolling reload of IM_0 moves its Route link to the new worker 0:
    // no redial, no failover, still route-b.
    n.ims[0].reload_workers();
    assert_eq!(n.held(1, true), all_on_b);
    assert_eq!(
        metric(n.ims[0].addr(), "swocloud_im_route_failovers_total"),
        Some(1.0)
    );
    // route-b dies: both go to route-a, the next node of each list.
    n.signal_node(1, Signal::SIGKILL);
    let t0 = Instant::now();
    let all_on_a = expect_held(&[("IM_0", &a), ("IM_1", &a)]);
    wait_until(FAILOVER_BUDGET, "both on route-a", || {
        n.held(0, true) == all_on_a
    });
    eprintln!(
        "route-b SIGKILLed: both IM servers registered with route-a {} ms later",
        t0.elapsed().as_millis()
    );
    assert_eq!(
        metric(n.ims[0].addr(), "swocloud_im_route_failovers_total"),
        Some(2.0)
    );
    n.wait_held(0, &all_on_a, Duration::from_secs(5), false);
    registry_is_exactly(&n, &a);
    n.reach_all(0, &mut us, "back on route-a");
}

/// Every Route worker answers from the same registry: a registration made
/// while a worker's change subscription is down (its subscriber connection
/// killed, reconnecting after its 100 ms backoff) reaches that worker's
/// cache within 1 s, though `cache_refresh` is 30 s. Before the cache
/// re-read on a new subscriber connection, the worker served the old list
/// until its next refresh: in CI, two workers of one node answered two
/// servers for one uid.
#[test]
fn a_registration_missed_while_the_subscriber_reconnects_reaches_the_cache() {
    let redis = common::RedisServer::start();
    let d = common::daemon::Daemon::new(
        env!("CARGO_BIN_EXE_swocloud"),
        &format!(
            "worker_num = 1\nredis_url = \"{}\"\ncache_refresh = 30.0\n",
            redis.url()
        ),
    );
    d.start();
    let cached = || -> BTreeSet<String> {
        let (status, _, body) = common::http_get(d.addr(), "/api/servers").unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["serviceName"].as_str().unwrap().to_string())
            .collect()
    };
    let register = |ws: &mut common::WsClient, name: &str, ip: &str| {
        ws.send_text(format!(
            r#"{{"method":"register","serviceName":"{name}","ip":"{ip}","port":9000}}"#
        ))
        .unwrap();
        assert_eq!(ws.recv_text_json()["method"], "registered", "{name}");
    };
    let url = format!("ws://{}/", d.addr());
    let mut a = ws_connect(&url).unwrap();
    register(&mut a, "IM_A", "127.0.0.2");
    // Read through the event: the subscription is up and trusted.
    wait_until(Duration::from_secs(5), "IM_A in the cache", || {
        cached().contains("IM_A")
    });
    let mut b = ws_connect(&url).unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis.client())
        .unwrap();
    assert!(killed >= 1, "no subscriber connection to kill");
    register(&mut b, "IM_B", "127.0.0.3");
    let t = Instant::now();
    wait_until(Duration::from_secs(1), "IM_B in the cache", || {
        cached().contains("IM_B")
    });
    eprintln!("IM_B cached {:?} after its registration", t.elapsed());
    drop((a, b));
    d.stop();
}
