//! A group's messages through a Redis Cluster failover that lost writes
//! (its own 3+3 cluster, a Route, two IM servers): the replica of the
//! group's master is frozen and cut off, the master acknowledges group
//! messages alone and is SIGKILLed, the replica takes over without them.
//! Without an audit the next message would take a lost one's gseq in the
//! same epoch and every member would drop it as a duplicate; with it
//! (`swocloud::cluster::audit`), the group starts a new epoch and every
//! member is told `resync` for the group before the next message. The
//! registry lives on another master: its leases are renewed throughout.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::nodes::{Nodes, RedisSetting};
use common::topology::RedisCluster;
use common::{wait_for, WsClient};
use serde_json::{json, Value};

/// Sends `data` to group `g`, retried until the Route stores it (it
/// answers 503 while the group's slot has no master); its gseq.
fn gsend(n: &Nodes, g: &str, data: &str) -> u64 {
    wait_for(Duration::from_secs(20), "a group send stored", || {
        let (st, v) = n.post(0, "/api/groups/send", &json!({"group": g, "data": data}));
        (st == 200).then(|| v["gseq"].as_u64().unwrap())
    })
}

/// The frames of `ws` up to the group message whose data is `data`.
#[track_caller]
fn frames_until(ws: &mut WsClient, data: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(f) = ws.next_json(Duration::from_millis(200)) {
            let done = f["data"] == data && f.get("gseq").is_some();
            seen.push(f);
            if done {
                return seen;
            }
        }
    }
    panic!("no group message {data:?}; got {seen:?}");
}

#[test]
fn a_group_that_lost_messages_in_a_failover_is_resynced() {
    let mut c = RedisCluster::start(3, 1);
    let n = Nodes::start_on(RedisSetting::cluster(&c.seeds()), 1, 2, "");
    // A group on a master that does not hold the registry.
    let registry = c.master_for_key("im_server").id;
    let g = (0..100)
        .map(|i| format!("team{i}"))
        .find(|g| c.master_for_key(&format!("group:{{{g}}}")).id != registry)
        .unwrap();
    let victim = c.master_for_key(&format!("group:{{{g}}}"));
    let heir = c.replicas_of(&victim).remove(0);
    let mut members: Vec<WsClient> = ["m1", "m2"]
        .iter()
        .map(|uid| {
            let (st, v) = n.post(0, "/api/groups/join", &json!({"group": g, "uid": uid}));
            assert_eq!(st, 200, "{v}");
            n.connect_user(0, uid).0
        })
        .collect();
    assert_eq!(gsend(&n, &g, "before"), 1);
    for ws in &mut members {
        frames_until(ws, "before");
    }

    // Acknowledged by the master alone, received live by both members.
    c.freeze(&heir, true);
    let cut = c.cli(&victim, &["CLIENT", "KILL", "TYPE", "replica"]);
    assert_eq!(cut.trim(), "1", "the replica's link cut");
    assert_eq!(gsend(&n, &g, "alone-1"), 2);
    assert_eq!(gsend(&n, &g, "alone-2"), 3);
    for ws in &mut members {
        frames_until(ws, "alone-2");
    }
    c.kill(&victim);
    c.freeze(&heir, false);
    let (new, took) = c.wait_failover(&victim.addr(), Duration::from_secs(15));
    assert_eq!(new, heir.addr(), "the frozen replica took over");
    // The Route audited its group sends and found the loss.
    let lost = wait_for(Duration::from_secs(10), "the audit's loss", || {
        common::metric(n.routes[0].addr(), "swocloud_route_audit_lost_total").filter(|&v| v >= 1.0)
    });
    eprintln!(
        "FIGURES cluster_group_lost_writes failover_ms={} audit_lost={lost}",
        took.as_millis()
    );

    // The next message is the new epoch's first, after a resync.
    assert_eq!(gsend(&n, &g, "after"), 1, "a new group epoch");
    for (i, ws) in members.iter_mut().enumerate() {
        let seen = frames_until(ws, "after");
        let resync = seen
            .iter()
            .position(|f| f["method"] == "resync" && f["group"] == g.as_str());
        assert!(
            resync.is_some_and(|r| r + 1 < seen.len()),
            "member {i}: a group resync before the message: {seen:?}"
        );
    }
    // The registry's master never stopped: every lease was renewed
    // through the other master's failover, none reaped.
    let reaped = common::metric(
        n.routes[0].addr(),
        "swocloud_route_removals_total{cause=\"lease\"}",
    );
    assert_eq!(reaped, Some(0.0), "{}", n.routes[0].log());
}
