//! The registry's Lua scripts against a real (private) Redis: the seed's
//! encoding, atomic replace on re-registration, owner-only removal, lease
//! renewal and reaping.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use swocloud::cluster::link::Registration;
use swocloud::cluster::servers::ServerEntry;
use swocloud::route::registry::{Registry, Renew, Renewal};

fn reg(name: &str, ip: &str, port: u16) -> Registration {
    Registration {
        service_name: name.into(),
        ip: ip.into(),
        port,
        token: None,
        load: Some(3),
        epoch: Some("e1".into()),
    }
}

fn members(c: &mut redis::Connection, key: &str) -> Vec<String> {
    let mut v: Vec<String> = redis::cmd("SMEMBERS").arg(key).query(c).unwrap();
    v.sort();
    v
}

// The registry's requests, run on a plain connection.
type Res<T> = redis::RedisResult<T>;

fn register(c: &mut redis::Connection, r: &Registry, e: &ServerEntry, until: u64) -> Res<()> {
    common::redis_run::<i64>(c, r.register(e, until, "PUBLISH")).map(drop)
}

fn remove(c: &mut redis::Connection, r: &Registry, m: &str, owner: &str, cause: &str) -> Res<bool> {
    common::redis_run::<i64>(c, r.remove(m, owner, cause, "PUBLISH")).map(|n| n == 1)
}

fn renew(
    c: &mut redis::Connection,
    r: &Registry,
    m: &str,
    owner: &str,
    rn: &Renew,
) -> Res<Renewal> {
    common::redis_run::<i64>(c, r.renew(m, owner, rn, "PUBLISH")).map(Renewal::from_code)
}

fn reap(c: &mut redis::Connection, r: &Registry, now: u64) -> Res<Vec<String>> {
    common::redis_run(c, r.reap(now, "PUBLISH"))
}

fn list(c: &mut redis::Connection, r: &Registry) -> Res<Vec<ServerEntry>> {
    common::redis_run(c, r.list()).map(swocloud::cluster::servers::parse_list)
}

#[test]
fn registry_scripts_keep_the_seed_set_and_their_invariants() {
    let redis = common::RedisServer::start();
    let mut c = redis.client();
    let r = Registry::new("");
    let a = ServerEntry::new(
        &reg("IM_1", "192.168.100.153", 9000),
        "node",
        0,
        "node/1/1",
        1_000,
    );
    register(&mut c, &r, &a, 10_000).unwrap();
    assert_eq!(
        members(&mut c, "im_server"),
        vec![r#"{"ip":"192.168.100.153","port":9000}"#]
    );
    assert_eq!(list(&mut c, &r).unwrap(), vec![a.clone()]);

    // Same serviceName from a new address (restart elsewhere): replaced atomically.
    let a2 = ServerEntry::new(
        &reg("IM_1", "127.0.0.2", 9001),
        "node",
        1,
        "node/2/7",
        2_000,
    );
    register(&mut c, &r, &a2, 10_000).unwrap();
    assert_eq!(
        members(&mut c, "im_server"),
        vec![r#"{"ip":"127.0.0.2","port":9001}"#]
    );

    // The old owner's late close removes nothing.
    assert!(!remove(&mut c, &r, a2.member(), "node/1/1", "closed").unwrap());
    assert_eq!(
        renew(
            &mut c,
            &r,
            a2.member(),
            "node/1/1",
            &Renew {
                lease_until_ms: 20_000,
                load: Some(9),
                draining: None,
                now_ms: 3_000
            }
        )
        .unwrap(),
        Renewal::Superseded
    );
    assert_eq!(
        renew(
            &mut c,
            &r,
            a2.member(),
            "node/2/7",
            &Renew {
                lease_until_ms: 20_000,
                load: Some(9),
                draining: Some(true),
                now_ms: 3_000
            }
        )
        .unwrap(),
        Renewal::Renewed
    );
    let listed = list(&mut c, &r).unwrap();
    assert_eq!(
        (listed[0].load, listed[0].draining, listed[0].last_seen_ms),
        (9, true, 3_000)
    );

    // A second server, then leases: only the expired one is reaped.
    let b = ServerEntry::new(
        &reg("IM_2", "127.0.0.3", 9000),
        "node",
        0,
        "node/1/2",
        1_000,
    );
    register(&mut c, &r, &b, 5_000).unwrap();
    assert_eq!(reap(&mut c, &r, 6_000).unwrap(), vec![b.member()]);
    assert_eq!(members(&mut c, "im_server"), vec![a2.member()]);
    assert_eq!(
        renew(
            &mut c,
            &r,
            b.member(),
            "node/1/2",
            &Renew {
                lease_until_ms: 9_000,
                load: None,
                draining: None,
                now_ms: 6_000
            }
        )
        .unwrap(),
        Renewal::Missing
    );

    // The owner's close removes it and every trace of it.
    assert!(remove(&mut c, &r, a2.member(), "node/2/7", "closed").unwrap());
    assert!(members(&mut c, "im_server").is_empty());
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, 0, "no key left behind");
}

#[test]
fn a_prefix_moves_every_key() {
    let redis = common::RedisServer::start();
    let mut c = redis.client();
    let r = Registry::new("app1:");
    let a = ServerEntry::new(&reg("IM_1", "127.0.0.2", 9000), "n", 0, "o", 1);
    register(&mut c, &r, &a, 10).unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    keys.sort_by(|a, b| a.trim_start_matches('{').cmp(b.trim_start_matches('{')));
    assert_eq!(
        keys,
        vec![
            "app1:im_server",
            "{app1:im_server}:by_name",
            "{app1:im_server}:details",
            "{app1:im_server}:lease"
        ]
    );
}
