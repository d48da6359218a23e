//! Self-test of `tests/common/topology.rs`: a real local Redis Cluster (3
//! masters, 3 replicas) and a real Sentinel set (a master, 2 replicas, 3
//! sentinels), with the faults later tests rely on: SIGKILL a master and see
//! its replica take over; restart a node on a new port and see the others
//! follow it. The two topologies run in parallel (one test each).

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::topology::{RedisCluster, SentinelSet, SLOTS};

#[test]
fn cluster_of_three_masters_and_three_replicas() {
    let mut c = RedisCluster::start(3, 1);
    eprintln!("cluster 3+3 started in {:?}", c.started_in());

    // Topology: 3 masters splitting every slot, one replica each.
    let masters = c.masters();
    let replicas = c.replicas();
    assert_eq!(masters.len(), 3, "{masters:?}");
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let served: u32 = masters
        .iter()
        .flat_map(|m| &m.slots)
        .map(|&(a, b)| u32::from(b - a) + 1)
        .sum();
    assert_eq!(served, u32::from(SLOTS));
    for m in &masters {
        assert_eq!(c.replicas_of(m).len(), 1, "replicas of {m:?}");
        assert!(m.owns(m.slots[0].0) && c.master_for_slot(m.slots[0].1).id == m.id);
    }
    let seeds = c.seeds();
    assert_eq!(seeds.len(), 6);
    assert!(seeds.iter().all(|s| s.starts_with("redis://127.0.0.1:")));
    assert_eq!(c.nodes().len(), 6);

    // Keys land on the master of their slot; the others redirect.
    let mut used = BTreeSet::new();
    for i in 0..20 {
        let key = format!("key:{i}");
        let m = c.master_for_key(&key);
        assert!(m.owns(c.keyslot(&key)));
        assert_eq!(c.cli(&m, &["SET", &key, "v"]), "OK", "{key} on {m:?}");
        assert_eq!(c.cli(&m, &["GET", &key]), "v");
        let other = masters.iter().find(|o| o.id != m.id).unwrap();
        let moved = c.cli(other, &["GET", &key]);
        assert!(moved.contains("MOVED"), "{key} on {other:?}: {moved}");
        assert!(moved.ends_with(&m.addr()), "{moved} vs {}", m.addr());
        used.insert(m.id);
    }
    assert_eq!(used.len(), 3, "20 keys on fewer than 3 masters");
    assert_eq!(
        c.master_for_key("{user:1}:a").id,
        c.master_for_key("{user:1}:b").id
    );
    // `-c` follows the redirection from any node.
    assert_eq!(c.cli(&replicas[0], &["-c", "GET", "key:0"]), "v");
    c.flushall();
    for m in c.masters() {
        assert_eq!(c.cli(&m, &["DBSIZE"]), "0");
    }

    // SIGKILL a master: its replica takes over its slots.
    let victim = c.master_for_key("key:0");
    let heir = c.replicas_of(&victim).remove(0);
    c.kill(&victim);
    let (new, took) = c.wait_failover(&victim.addr(), Duration::from_secs(15));
    eprintln!(
        "failover: {} replaced {} after {took:?} (node timeout {:?})",
        new,
        victim.addr(),
        c.node_timeout()
    );
    assert_eq!(new, heir.addr());
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    let after = c.masters();
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(c.master_for_key("key:0").addr(), new);
    let promoted = after.iter().find(|m| m.addr() == new).unwrap();
    assert_eq!(promoted.slots, victim.slots);
    assert_eq!(c.seeds().len(), 5);
    assert_eq!(c.cli(promoted, &["SET", "key:0", "w"]), "OK");

    // Restart another master on a new port: everyone follows it.
    let moved = after.iter().find(|m| m.addr() != new).unwrap().clone();
    let t = std::time::Instant::now();
    let addr = c.restart_on_new_port(&moved);
    eprintln!(
        "restart: {} came back as {addr}, seen by all in {:?}",
        moved.addr(),
        t.elapsed()
    );
    assert_ne!(addr, moved.addr());
    for n in c.nodes().iter().filter(|n| n.alive) {
        let view = c.cli(n, &["CLUSTER", "NODES"]);
        let line = view.lines().find(|l| l.starts_with(&moved.id)).unwrap();
        assert!(line.contains(&format!("{addr}@")), "{n:?} sees {line}");
    }
    let back = c.nodes().into_iter().find(|n| n.id == moved.id).unwrap();
    assert_eq!(back.addr(), addr);
    assert!(back.master, "failed over while restarting: {back:?}");
    assert_eq!(back.slots, moved.slots);
    assert!(c.seeds().contains(&format!("redis://{addr}")));
    let key = (0..)
        .map(|i| format!("after:{i}"))
        .find(|k| moved.owns(c.keyslot(k)))
        .unwrap();
    assert_eq!(c.cli(&back, &["SET", &key, "x"]), "OK");
}

#[test]
fn sentinel_set_promotes_a_replica() {
    let mut s = SentinelSet::start("topo-test");
    eprintln!("sentinel set started in {:?}", s.started_in());
    assert_eq!(s.master_name(), "topo-test");
    let urls = s.sentinel_urls();
    assert_eq!(urls.len(), 3);
    assert!(urls.iter().all(|u| u.starts_with("redis://127.0.0.1:")));

    let old = s.master_addr();
    assert!(s.cli(&old, &["ROLE"]).starts_with("master"));
    assert_eq!(s.cli(&old, &["SET", "k", "v"]), "OK");
    let replicas: Vec<String> = s.data_addrs().into_iter().filter(|a| *a != old).collect();
    assert_eq!(replicas.len(), 2);
    for r in &replicas {
        assert!(s.cli(r, &["ROLE"]).starts_with("slave"), "{r}");
    }
    for sent in s.sentinel_addrs() {
        let named = s.cli(
            &sent,
            &["SENTINEL", "get-master-addr-by-name", s.master_name()],
        );
        assert_eq!(named.replace('\n', ":"), old, "{sent}");
    }

    let killed = s.kill_master();
    assert_eq!(killed, old);
    let (new, took) = s.wait_switch(&old, Duration::from_secs(20));
    eprintln!("sentinel failover: {new} replaced {old} after {took:?}");
    assert_ne!(new, old);
    assert!(replicas.contains(&new), "{new} is not one of {replicas:?}");
    assert!(took < Duration::from_secs(15), "switch took {took:?}");
    assert_eq!(s.master_addr(), new);
    assert!(s.cli(&new, &["ROLE"]).starts_with("master"));
    assert_eq!(s.cli(&new, &["SET", "k2", "v"]), "OK");
}
