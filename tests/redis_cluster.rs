//! The whole system on a real local Redis Cluster (3 masters, 3 replicas,
//! `tests/common/topology`): two Route nodes and two IM servers given
//! `redis_cluster = [every node]` (sharded pub/sub), and the faults a
//! cluster has:
//!
//! * the user path: the registry through both nodes and in the seed's
//!   `SMEMBERS im_server`, `/route`, user to user across IM servers,
//!   `/api/send` through either node, the inbox (queued, delivered on
//!   connect, resumed with `since`), liveness (an IM server SIGKILLed,
//!   frozen, thawed);
//! * SIGKILL of a master under traffic, twice: the master of a user's
//!   inbox slot, then the master of the registry's slot (`im_server`);
//! * SIGKILL of a whole Route node: its IM servers move to the other node
//!   within 3 s;
//! * a master restarted on a new port (in its own cluster, whose node
//!   timeout is long enough that nothing fails over): re-dialled there.
//!
//! Under traffic (`common/traffic.rs`): detection (kill → a node's
//! `/ready` red), the time until every user is reachable again, until
//! `/ready` is green again, and the ledger of `common/inbox_client.rs`
//! (accepted, delivered, resynced, lost: lost must be 0, a loss must be
//! reported by `resync`); each printed as one `FIGURES …` line.
//!
//! One cluster serves every test of this binary but the last (starting one
//! costs ~2.5 s): the tests take it in turn, each finds it healthy and
//! empty (FLUSHALL, or a new cluster after a test killed a node), and it
//! is stopped when the binary exits.

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

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

use common::nodes::{node_id, Nodes, RedisSetting};
use common::topology::{redis_cli, RedisCluster};
use common::wait_until;
use nix::sys::signal::Signal;
use serde_json::json;
use swocloud::cluster::servers::member;
use traffic::{Outage, Traffic};

/// Users under traffic.
const USERS: usize = 12;
/// Every user must be reachable again within this of a fault.
const DEADLINE: Duration = Duration::from_secs(20);
/// How fast an IM server must be registered with the surviving Route node.
const FAILOVER_BUDGET: Duration = Duration::from_secs(3);
/// How long the cluster may take to replace a killed master.
const REDIS_FAILOVER: Duration = Duration::from_secs(15);

// ---- the binary's cluster ----------------------------------------------------

static SHARED: Mutex<Option<RedisCluster>> = Mutex::new(None);
static AT_EXIT: Once = Once::new();

/// Stops the shared cluster when the binary exits (statics are not
/// dropped), also after a test failed holding it (the lock is poisoned).
/// One `try_lock`: in an `if let … else if let` chain the first guard
/// would live through the `else` and make the second one fail, which
/// once leaked a failed run's nodes.
extern "C" fn stop_shared() {
    let mut g = match SHARED.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    drop(g.take());
}

/// The binary's cluster, for this test alone while the guard lives: every
/// node running, 3 masters with a replica each, no key.
fn shared() -> MutexGuard<'static, Option<RedisCluster>> {
    let mut g = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    let healthy = g.as_ref().is_some_and(|c| {
        c.nodes().iter().all(|n| n.alive && !n.failed())
            && c.masters().len() == 3
            && c.replicas().len() == 3
    });
    if healthy {
        g.as_ref().unwrap().flushall();
    } else {
        drop(g.take());
        let c = RedisCluster::start(3, 1);
        eprintln!("cluster 3+3 started in {:?}", c.started_in());
        AT_EXIT.call_once(|| {
            // SAFETY: registers a plain function with no arguments.
            unsafe { libc::atexit(stop_shared) };
        });
        *g = Some(c);
    }
    g
}

fn on(c: &RedisCluster) -> RedisSetting {
    RedisSetting::cluster(&c.seeds())
}

fn routes(n: &Nodes) -> Vec<String> {
    n.routes.iter().map(|d| d.addr()).collect()
}

/// The seed's set as `redis-cli -c` reads it from the node at `addr`.
fn smembers(addr: &str) -> BTreeSet<String> {
    redis_cli(addr, &["-c", "SMEMBERS", "im_server"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// The registry members of IM servers `which`.
fn members(n: &Nodes, which: &[usize]) -> BTreeSet<String> {
    which
        .iter()
        .map(|&i| member(&n.ims[i].host, n.ims[i].port))
        .collect()
}

/// Whether both nodes read `IM_<i>` from Redis (`fresh`).
fn listed(n: &Nodes, i: usize) -> [bool; 2] {
    let name = format!("IM_{i}");
    [0, 1].map(|node| n.held(node, true).contains_key(&name))
}

/// SIGKILLs `victim` (a master) while traffic runs; measures the
/// cluster's failover (in a thread) and the time until every user is
/// reachable again.
fn kill_master(c: &mut RedisCluster, t: &Traffic, name: &str, key: &str) -> Outage {
    let victim = c.master_for_key(key);
    let heir = c.replicas_of(&victim);
    eprintln!(
        "{name}: SIGKILL of {} (master of {key}, slots {:?}; replica {:?})",
        victim.addr(),
        victim.slots,
        heir.iter().map(|r| r.addr()).collect::<Vec<_>>()
    );
    c.kill(&victim);
    let kill = Instant::now();
    let c: &RedisCluster = c;
    let (failover, reachable) = std::thread::scope(|s| {
        let h = s.spawn(|| c.wait_failover(&victim.addr(), REDIS_FAILOVER));
        let reachable = t.wait_reachable(name, kill, DEADLINE);
        (h.join().unwrap(), reachable)
    });
    eprintln!(
        "{name}: {} took over after {:?}; every user reachable {reachable:?} after the kill",
        failover.0, failover.1
    );
    Outage {
        name: name.into(),
        kill,
        redis: Some(failover.1),
        reachable,
    }
}

// ---- the tests ---------------------------------------------------------------

#[test]
fn the_user_path_on_the_cluster() {
    let guard = shared();
    let c = guard.as_ref().unwrap();
    let n = Nodes::start_on(on(c), 2, 2, "");
    let (a, b) = (node_id(0), node_id(1));
    let mut us = n.users("path", 2);

    // The registry, through both nodes (cached and read from Redis), and
    // the seed's set read from any node (a replica follows the MOVED).
    for node in 0..2 {
        let doc = n.servers(node, false);
        assert_eq!(doc["count"], 2, "{doc}");
        assert_eq!(
            doc["nodes"],
            json!([{"node": a, "servers": ["IM_0"]}, {"node": b, "servers": ["IM_1"]}]),
            "{doc}"
        );
        assert_eq!(
            n.held(node, true),
            n.initial(),
            "{} from Redis",
            node_id(node)
        );
    }
    let registry_master = c.master_for_key("im_server");
    let other = c
        .replicas()
        .into_iter()
        .find(|r| r.master_id.as_deref() != Some(&registry_master.id));
    for node in [Some(registry_master.clone()), other].into_iter().flatten() {
        assert_eq!(
            smembers(&node.addr()),
            members(&n, &[0, 1]),
            "via {}",
            node.addr()
        );
    }

    // /route through both nodes agrees (consistent hashing) with where
    // each user is connected.
    for (uid, (_, server)) in &us {
        for node in 0..2 {
            let r = n.route_for(node, uid);
            assert_eq!(
                r["serviceName"],
                server.as_str(),
                "{uid} via {}: {r}",
                node_id(node)
            );
        }
    }

    // User to user across the IM servers (held by different nodes).
    n.user_to_user(&mut us);
    // /api/send through either node reaches every user.
    n.reach_all(0, &mut us, "api");
    n.reach_all(1, &mut us, "api");
    // The inbox: queued while offline, delivered at connect, resumed.
    n.inbox_round_trip("offline1");

    // Liveness: a SIGKILLed IM server leaves the registry at once (its
    // link closes), everywhere.
    drop(us);
    n.signal_im(1, Signal::SIGKILL);
    let t0 = Instant::now();
    let seed = c.seeds()[0].clone();
    let seed = seed.trim_start_matches("redis://");
    wait_until(Duration::from_secs(5), "IM_1 out of the registry", || {
        listed(&n, 1) == [false, false] && smembers(seed) == members(&n, &[0])
    });
    eprintln!(
        "cluster: SIGKILLed IM_1 out of the registry {} ms later",
        t0.elapsed().as_millis()
    );
    // Started again, it registers again.
    n.ims[1].start();
    for node in 0..2 {
        n.wait_held(node, &n.initial(), Duration::from_secs(10), true);
    }
    // Frozen, it is removed once its lease expires (2.5 s), not at once.
    n.signal_im(1, Signal::SIGSTOP);
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "frozen IM_1 out of the registry",
        || listed(&n, 1) == [false, false] && smembers(seed) == members(&n, &[0]),
    );
    let frozen = t0.elapsed();
    eprintln!(
        "cluster: SIGSTOPped IM_1 out of the registry {} ms later",
        frozen.as_millis()
    );
    assert!(
        frozen > Duration::from_secs(1),
        "removed before its lease expired: {frozen:?}"
    );
    assert_eq!(listed(&n, 0), [true, true], "IM_0 stays");
    // Thawed, it registers again and serves users.
    n.signal_im(1, Signal::SIGCONT);
    wait_until(
        Duration::from_secs(10),
        "thawed IM_1 registered again",
        || listed(&n, 1) == [true, true] && smembers(seed) == members(&n, &[0, 1]),
    );
    let mut again = n.users("thawed", 1);
    n.reach_all(0, &mut again, "after the thaw");
    n.reach_all(1, &mut again, "after the thaw");
    drop(guard);
}

#[test]
fn under_traffic_two_masters_are_killed() {
    let mut guard = shared();
    let c = guard.as_mut().unwrap();
    let n = Nodes::start_on(on(c), 2, 2, "");
    let t = Traffic::start(routes(&n), USERS);
    t.steady(Duration::from_secs(1));
    // First the master of a user's inbox (one that does not also hold the
    // registry), then the registry's own.
    let registry = c.master_for_key("im_server").id;
    let uid = t
        .uids()
        .into_iter()
        .find(|u| c.master_for_key(&format!("inbox:{{{u}}}")).id != registry)
        .unwrap();
    let o1 = kill_master(c, &t, "inbox", &format!("inbox:{{{uid}}}"));
    t.steady(Duration::from_secs(2));
    let o2 = kill_master(c, &t, "registry", "im_server");
    t.steady(Duration::from_secs(1));
    let outages = [o1, o2];
    let report = t.finish("cluster_master_kill", &outages);
    report.assert_nothing_silently_lost(&outages);
    // The registry came through its master's death whole.
    for node in 0..2 {
        wait_until(Duration::from_secs(5), "both IM servers registered", || {
            n.held(node, true).len() == 2
        });
    }
    drop(guard);
}

/// What asynchronous replication loses: the replica of a user's inbox
/// master is frozen and cut off (`CLIENT KILL TYPE replica`), so what the
/// master acknowledges from then on is on the master alone; the master is
/// SIGKILLed and the replica, thawed, takes over without those writes.
/// Every user whose inbox lost writes must be told `resync` (by the audit
/// of whoever accepted them), and nothing accepted may be lost silently.
#[test]
fn messages_a_failover_lost_are_reported_by_resync() {
    let mut guard = shared();
    let c = guard.as_mut().unwrap();
    let n = Nodes::start_on(on(c), 2, 2, "");
    let t = Traffic::start(routes(&n), USERS);
    t.steady(Duration::from_secs(1));
    let registry = c.master_for_key("im_server").id;
    let inbox_of = |u: &str| format!("inbox:{{{u}}}");
    let victim = t
        .uids()
        .into_iter()
        .map(|u| c.master_for_key(&inbox_of(&u)))
        .find(|m| m.id != registry)
        .unwrap();
    let on_it: BTreeSet<String> = (t.uids().into_iter())
        .filter(|u| c.master_for_key(&inbox_of(u)).id == victim.id)
        .collect();
    let heir = c.replicas_of(&victim).remove(0);
    eprintln!(
        "lost writes: freezing {} (replica of {}, inboxes of {on_it:?})",
        heir.addr(),
        victim.addr()
    );
    c.freeze(&heir, true);
    let cut = c.cli(&victim, &["CLIENT", "KILL", "TYPE", "replica"]);
    assert_eq!(cut.trim(), "1", "the replica's link cut");
    let alone = Instant::now();
    t.steady(Duration::from_millis(1500));
    c.kill(&victim);
    let kill = Instant::now();
    c.freeze(&heir, false);
    let c: &RedisCluster = c;
    let (failover, reachable) = std::thread::scope(|s| {
        let h = s.spawn(|| c.wait_failover(&victim.addr(), REDIS_FAILOVER));
        let reachable = t.wait_reachable("lost writes", kill, DEADLINE);
        (h.join().unwrap(), reachable)
    });
    assert_eq!(failover.0, heir.addr(), "the frozen replica took over");
    t.steady(Duration::from_secs(8)); // past the IM servers' rechecks (2 s, 6 s)
    let outages = [Outage {
        name: "lost_writes".into(),
        kill,
        redis: Some(failover.1),
        reachable,
    }];
    let report = t.finish("cluster_lost_writes", &outages);
    report.assert_nothing_silently_lost(&outages);
    // Who was sent messages the master alone acknowledged: each must
    // have been told that its epoch is gone (the messages may have
    // reached it live, but its inbox lost them); nobody else was.
    let alone_only: Vec<_> = (report.fates.iter())
        .filter(|(a, _)| on_it.contains(&a.to) && a.at >= alone && a.at < kill)
        .map(|(a, _)| (a.to.clone(), a.epoch.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    eprintln!(
        "FIGURES cluster_lost_writes users_with_lost_writes={} resyncs={}",
        alone_only.len(),
        report.resyncs.len()
    );
    assert!(!alone_only.is_empty(), "traffic reached the master alone");
    let told = alone_only.iter().map(|(u, e)| (u.as_str(), e.as_str()));
    report.assert_resynced(told, &on_it, "lost writes in the failover");
    // The audits said so in /metrics (Route: /api/send, IM: user to user).
    let audit =
        |d: &common::daemon::Daemon, name: &str| common::metric(d.addr(), name).unwrap_or(0.0);
    let lost: f64 = (n
        .routes
        .iter()
        .map(|d| audit(d, "swocloud_route_audit_lost_total")))
    .chain(
        n.ims
            .iter()
            .map(|d| audit(d, "swocloud_im_audit_lost_total")),
    )
    .sum();
    let audited: f64 = (n
        .routes
        .iter()
        .map(|d| audit(d, "swocloud_route_audited_total")))
    .chain(n.ims.iter().map(|d| audit(d, "swocloud_im_audited_total")))
    .sum();
    eprintln!("FIGURES cluster_lost_writes audited={audited} audit_lost={lost}");
    assert!(lost >= 1.0, "no audit found a loss ({audited} audited)");
    drop(guard);
}

#[test]
fn a_killed_route_node_is_replaced_within_3_s_on_the_cluster() {
    let guard = shared();
    let c = guard.as_ref().unwrap();
    let n = Nodes::start_on(on(c), 2, 2, "");
    let b = node_id(1);
    let mut us = n.users("rk", 3);
    n.signal_node(0, Signal::SIGKILL);
    let t0 = Instant::now();
    let all_on_b: std::collections::BTreeMap<String, String> = [
        ("IM_0".to_string(), b.clone()),
        ("IM_1".to_string(), b.clone()),
    ]
    .into();
    wait_until(
        FAILOVER_BUDGET,
        "IM_0 registered with route-b (Redis)",
        || n.held(1, true) == all_on_b,
    );
    let failover = t0.elapsed();
    eprintln!(
        "FIGURES cluster_route_kill failover_ms={}",
        failover.as_millis()
    );
    n.wait_held(1, &all_on_b, Duration::from_secs(5), false);
    let seed = c.seeds()[0].clone();
    assert_eq!(
        smembers(seed.trim_start_matches("redis://")),
        members(&n, &[0, 1])
    );
    // Every user, still connected to its IM server, through route-b.
    n.reach_all(1, &mut us, "after the kill");
    let doc = n.servers(1, false);
    assert_eq!(
        doc["nodes"],
        json!([{"node": b, "servers": ["IM_0", "IM_1"]}]),
        "{doc}"
    );
    drop(guard);
}

#[test]
fn a_master_restarted_on_a_new_port_is_redialled() {
    // Its own cluster: the node timeout is long enough that the restarted
    // master is still master when it is back (no failover meanwhile).
    let mut c = RedisCluster::builder(3, 1)
        .node_timeout(Duration::from_secs(10))
        .start();
    let n = Nodes::start_on(on(&c), 1, 2, "");
    let t = Traffic::start(routes(&n), USERS);
    t.steady(Duration::from_secs(1));
    let registry = c.master_for_key("im_server").id;
    let uid = t
        .uids()
        .into_iter()
        .find(|u| c.master_for_key(&format!("inbox:{{{u}}}")).id != registry)
        .unwrap();
    let victim = c.master_for_key(&format!("inbox:{{{uid}}}"));
    // Its users' inboxes (and presence) are gone with it: Redis keeps
    // nothing (no persistence) and the replica resynchronises to the
    // empty master.
    let on_it: BTreeSet<String> = t
        .uids()
        .into_iter()
        .filter(|u| c.master_for_key(&format!("inbox:{{{u}}}")).id == victim.id)
        .collect();
    let before = t.sh.epochs.lock().unwrap().clone();
    eprintln!(
        "new port: restarting {} (inboxes of {on_it:?})",
        victim.addr()
    );
    let kill = Instant::now();
    let addr = c.restart_on_new_port(&victim);
    let restarted = kill.elapsed();
    assert_ne!(addr, victim.addr());
    let reachable = t.wait_reachable("new port", kill, DEADLINE);
    eprintln!(
        "new port: back at {addr} after {restarted:?}; every user reachable after {reachable:?}"
    );
    let back = c.nodes().into_iter().find(|x| x.id == victim.id).unwrap();
    assert!(
        back.master && back.addr() == addr,
        "no failover meanwhile: {back:?}"
    );
    // Every worker (the Route's 2, each IM server's 2) dialled it there:
    // a command connection each, besides its replica and this query.
    let clients = c.cli(&back, &["CLIENT", "LIST"]);
    let ours = clients
        .lines()
        .filter(|l| !l.contains("flags=S") && !l.contains("cmd=client|list"))
        .count();
    assert!(ours >= 6, "the daemons' connections on {addr}: {clients}");
    // What the Route's log says about the old and the new address.
    let ports = [victim.port.to_string(), back.port.to_string()];
    let log = n.routes[0].log();
    let about = log
        .lines()
        .filter(|l| ports.iter().any(|p| l.contains(p.as_str())));
    for l in about.take(12) {
        eprintln!("new port: route-a log: {l}");
    }
    t.steady(Duration::from_secs(1));
    let outages = [Outage {
        name: "restart".into(),
        kill,
        redis: Some(restarted),
        reachable,
    }];
    let report = t.finish("cluster_new_port", &outages);
    report.assert_nothing_silently_lost(&outages);
    // Every user whose inbox was on it was told its epoch is gone (the
    // probes made a new one); nobody else was.
    let told = (on_it.iter()).map(|u| (u.as_str(), before[u].as_str()));
    report.assert_resynced(told, &on_it, "was on the restarted master");
}
