//! The whole system on a real local Sentinel set (a master, 2 replicas, 3
//! sentinels, `tests/common/topology`): two Route nodes and two IM servers
//! given `redis_sentinels = [the three]` + `redis_sentinel_master`. The
//! user path first (`/route`, user to user, `/api/send` through either
//! node, the inbox), then the master SIGKILLed under traffic
//! (`common/traffic.rs`): detection (kill → a node's `/ready` red), the
//! time until every user is reachable again and until `/ready` is green
//! again, and the ledger (accepted, delivered, resynced, lost: lost must
//! be 0, a loss must be reported by `resync`), printed as one `FIGURES …`
//! line.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
// Each binary uses its own subset of these (as of `common`).
#[allow(dead_code)]
#[path = "common/inbox_client.rs"]
mod inbox_client;
#[allow(dead_code)]
#[path = "common/traffic.rs"]
mod traffic;

use std::time::{Duration, Instant};

use common::nodes::{node_id, Nodes, RedisSetting};
use common::topology::SentinelSet;
use common::wait_until;
use serde_json::json;
use traffic::{Outage, Traffic};

/// Users under traffic.
const USERS: usize = 12;
/// Every user must be reachable again within this of the kill.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long the sentinels may take to promote a replica.
const SWITCH: Duration = Duration::from_secs(20);

#[test]
fn the_user_path_then_the_master_killed_under_traffic() {
    let mut s = SentinelSet::start("swocloud");
    eprintln!("sentinel set started in {:?}", s.started_in());
    let n = Nodes::start_on(
        RedisSetting::sentinel(&s.sentinel_urls(), s.master_name()),
        2,
        2,
        "",
    );

    // The user path.
    let mut us = n.users("path", 2);
    for node in 0..2 {
        assert_eq!(
            n.held(node, true),
            n.initial(),
            "{} from Redis",
            node_id(node)
        );
        for (uid, (_, server)) in &us {
            let r = n.route_for(node, uid);
            assert_eq!(r["serviceName"], server.as_str(), "{uid}: {r}");
        }
    }
    n.user_to_user(&mut us);
    n.reach_all(0, &mut us, "api");
    n.reach_all(1, &mut us, "api");
    n.inbox_round_trip("offline1");
    drop(us);

    // The master SIGKILLed under traffic.
    let routes: Vec<String> = n.routes.iter().map(|d| d.addr()).collect();
    let t = Traffic::start(routes, USERS);
    t.steady(Duration::from_secs(1));
    let old = s.kill_master();
    let kill = Instant::now();
    eprintln!("sentinel: SIGKILL of the master {old}");
    let s = &s;
    let ((new, switch), reachable) = std::thread::scope(|sc| {
        let h = sc.spawn(|| s.wait_switch(&old, SWITCH));
        let reachable = t.wait_reachable("master", kill, DEADLINE);
        (h.join().unwrap(), reachable)
    });
    eprintln!(
        "sentinel: {new} promoted after {switch:?}; every user reachable after {reachable:?}"
    );
    t.steady(Duration::from_secs(1));
    let outages = [Outage {
        name: "master".into(),
        kill,
        redis: Some(switch),
        reachable,
    }];
    let report = t.finish("sentinel_master_kill", &outages);
    report.assert_nothing_silently_lost(&outages);
    // Both IM servers still registered, read from the new master.
    for node in 0..2 {
        wait_until(Duration::from_secs(5), "both IM servers registered", || {
            n.held(node, true).len() == 2
        });
    }
    let mut us = n.users("after", 1);
    n.reach_all(0, &mut us, "on the new master");
    let (st, v) = n.api_send(1, "offline2", json!("x"));
    assert_eq!((st, &v["seq"]), (200, &json!(1)), "{v}");
}
