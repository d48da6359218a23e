//! Every Lua script and MULTI of the crate against a real Redis in cluster
//! mode (one node holding all 16384 slots: Redis still refuses a script or
//! a MULTI whose keys are in different slots), with the publish command a
//! cluster uses (`SPUBLISH`), and the seed's `SMEMBERS im_server` still
//! answering. Scripts run here with a `#!lua` shebang, under which Redis
//! also refuses a key the script reaches outside its declared slot (a
//! script without one may do so on a node that holds both slots, and
//! fails only on a real multi-node cluster).

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::Value;
use swocloud::cluster::groups::{GroupLimits, Groups};
use swocloud::cluster::inbox::{Inbox, Limits};
use swocloud::cluster::keys::Keys;
use swocloud::cluster::link::Registration;
use swocloud::cluster::presence::{self, Presence};
use swocloud::cluster::servers::ServerEntry;
use swocloud::reactor::redis::Request;
use swocloud::route::registry::{Registry, Renew};

/// A `redis-server --cluster-enabled yes` owning every slot; killed on drop.
struct ClusterNode {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl ClusterNode {
    fn start() -> ClusterNode {
        let dir = common::temp_dir();
        // A cluster node also listens on its bus port, port + 10000.
        let port = common::free_port_and(10000);
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(dir.path().join("nodes.conf"))
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup.sh installs it)");
        let node = ClusterNode {
            port,
            child,
            _dir: dir,
        };
        common::wait_until(Duration::from_secs(10), "redis up", || {
            node.try_client().is_some()
        });
        let mut c = node.client();
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query(&mut c)
            .unwrap();
        common::wait_until(Duration::from_secs(10), "cluster_state:ok", || {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap();
            info.contains("cluster_state:ok")
        });
        node
    }

    fn try_client(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }

    fn client(&self) -> redis::Connection {
        let c = self.try_client().expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `req`; a script with the `#!lua` shebang (see the module doc).
fn run_strict<T: redis::FromRedisValue>(
    c: &mut redis::Connection,
    req: Request,
) -> redis::RedisResult<T> {
    let Request::Script(call) = req else {
        return common::redis_run(c, req);
    };
    let mut args: Vec<Vec<u8>> = call
        .eval_cmd()
        .args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => b.to_vec(),
            redis::Arg::Cursor => Vec::new(),
        })
        .collect();
    args[1].splice(0..0, b"#!lua\n".iter().copied());
    let mut cmd = redis::cmd("EVAL");
    for a in &args[1..] {
        cmd.arg(a.as_slice());
    }
    cmd.query(c)
}

#[track_caller]
fn run<T: redis::FromRedisValue>(c: &mut redis::Connection, req: impl Into<Request>) -> T {
    let req = req.into();
    let what = format!("{req:?}");
    run_strict(c, req).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn is_cross_slot(e: &redis::RedisError) -> bool {
    let t = e.to_string();
    t.contains("CROSSSLOT") || t.contains("same slot")
}

#[test]
fn the_node_refuses_what_spans_slots() {
    let node = ClusterNode::start();
    let mut c = node.client();
    // A script touching a key outside its declared slot.
    let e = redis::cmd("EVAL")
        .arg("#!lua\nredis.call('SET', KEYS[1], 1); return redis.call('SET', 'elsewhere', 1)")
        .arg(1)
        .arg("k")
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(is_cross_slot(&e), "{e}");
    // Yesterday's presence MULTI, PUBLISH translated to SPUBLISH: EXEC is
    // refused.
    let k = Keys::new("");
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let q: String = redis::cmd("HSET")
        .arg(k.user("u1"))
        .arg("f")
        .arg("e")
        .query(&mut c)
        .unwrap();
    assert_eq!(q, "QUEUED");
    let q: String = redis::cmd("SPUBLISH")
        .arg("im_user:events")
        .arg("u1")
        .query(&mut c)
        .unwrap();
    assert_eq!(q, "QUEUED");
    let e = redis::cmd("EXEC").query::<Value>(&mut c).unwrap_err();
    assert!(is_cross_slot(&e), "{e}");
}

#[test]
fn registry_scripts_run_and_publish_on_a_cluster() {
    let node = ClusterNode::start();
    let mut c = node.client();
    for prefix in ["", "p:"] {
        let r = Registry::new(prefix);
        let keys = r.keys().clone();
        // The registry's events, as a Route worker receives them there.
        let mut sub = node.client();
        let _: Value = redis::cmd("SSUBSCRIBE")
            .arg(&keys.channel)
            .query(&mut sub)
            .unwrap();
        let reg = Registration {
            service_name: "IM_1".into(),
            ip: "127.0.0.2".into(),
            port: 9000,
            token: None,
            load: Some(1),
            epoch: Some("e".into()),
        };
        let e = ServerEntry::new(&reg, "n", 0, "n/1/1", 1_000);
        let _: i64 = run(&mut c, r.register(&e, 10_000, "SPUBLISH"));
        let members: Vec<String> = redis::cmd("SMEMBERS").arg(&keys.set).query(&mut c).unwrap();
        assert_eq!(members, vec![r#"{"ip":"127.0.0.2","port":9000}"#]);
        let event = sub.recv_response().unwrap();
        let text = format!("{event:?}");
        assert!(
            text.contains("smessage") || text.contains("register"),
            "{text}"
        );
        let rn = Renew {
            lease_until_ms: 20_000,
            load: Some(5),
            draining: Some(true),
            now_ms: 2_000,
        };
        let n: i64 = run(&mut c, r.renew(e.member(), "n/1/1", &rn, "SPUBLISH"));
        assert_eq!(n, 1);
        let n: i64 = run(
            &mut c,
            r.rehome(e.member(), "n/1/1", "n/2/2", 1, 3_000, "SPUBLISH"),
        );
        assert_eq!(n, 1);
        let n: i64 = run(&mut c, r.remove(e.member(), "n/2/2", "closed", "SPUBLISH"));
        assert_eq!(n, 1);
        let _: i64 = run(&mut c, r.register(&e, 5_000, "SPUBLISH"));
        let dead: Vec<String> = run(&mut c, r.reap(6_000, "SPUBLISH"));
        assert_eq!(dead, vec![e.member().to_string()]);
        let listed: Value = run(&mut c, r.list());
        assert_eq!(listed, Value::Array(vec![]));
    }
}

#[test]
fn inbox_group_and_presence_requests_run_on_a_cluster() {
    let node = ClusterNode::start();
    let mut c = node.client();
    let limits = Limits {
        max_len: 100,
        ttl: 60,
    };
    let inbox = Inbox::new("", limits);
    let data = serde_json::json!({"text": "hi"});
    let _: Value = run(&mut c, inbox.store("u1", "id1", "u2", &data, Some("r1")));
    let (epoch, seq, _): (String, u64, u64) = run(&mut c, inbox.hello("u1"));
    assert_eq!(seq, 1);
    let _: Value = run(&mut c, inbox.range("u1", 1, None, 10));
    // A flush's marks: many users, split per slot on a cluster...
    let uids: Vec<String> = (0..300).map(|n| format!("user{n}")).collect();
    for u in &uids {
        let _: Value = run(&mut c, inbox.hello(u));
    }
    let marks = || {
        uids.iter()
            .map(|u| (u.as_str(), epoch.as_str(), 1, 0))
            .chain([("u1", epoch.as_str(), 1, 1)])
    };
    for call in inbox.mark_calls(marks(), true) {
        let _: i64 = run(&mut c, call);
    }
    let (_, _, dlv, acked): (String, u64, u64, u64) = run(&mut c, inbox.meta("u1"));
    assert_eq!((dlv, acked), (1, 1));
    // ... which a single server's batching would not survive.
    let batch = inbox.mark_calls(marks(), false).remove(0);
    let e = run_strict::<Value>(&mut c, batch.into()).unwrap_err();
    assert!(is_cross_slot(&e), "{e}");

    let g = Groups::new("", GroupLimits::default());
    let n: i64 = run(&mut c, g.user_join("room", "u1"));
    assert_eq!(n, 1);
    let joined: (u64, u64, u64, String, i64) = run(&mut c, g.join("room", "u1"));
    assert_eq!(joined.4, 1);
    let _: i64 = run(&mut c, g.count("room", "m|e", 1));
    let sent: Vec<Value> = run(&mut c, g.send("room", "gid", "u1", &data, Some("u1")));
    assert!(sent.len() >= 4, "{sent:?}");
    let _: Vec<Value> = run(&mut c, g.head("room", "u1"));
    let _: i64 = run(&mut c, g.ack("room", "u1", 1));
    let _: Value = run(&mut c, g.members_page("room", "0", 10));
    let left: (u64, u64, u64, i64) = run(&mut c, g.leave("room", "u1"));
    assert_eq!(left.3, 1);
    let _: i64 = run(&mut c, g.user_leave("room", "u1"));

    let keys = Keys::new("");
    let p = |fd| Presence {
        member: r#"{"ip":"127.0.0.2","port":9000}"#.into(),
        worker: 0,
        fd,
        epoch: "e".into(),
    };
    for a in [
        presence::add(&keys, "u1", &p(1), 60),
        presence::rekey(&keys, "u1", &p(1), &p(2), 60),
        presence::remove(&keys, "u1", &p(2)),
    ] {
        let (write, event) = a.split();
        let _: Value = run(&mut c, write);
        // The client sends PUBLISH as SPUBLISH on a cluster.
        let Request::Cmd(ev) = event else {
            panic!("one command")
        };
        let args: Vec<Vec<u8>> = ev
            .args_iter()
            .skip(1)
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                redis::Arg::Cursor => Vec::new(),
            })
            .collect();
        let _: i64 = redis::cmd("SPUBLISH").arg(args).query(&mut c).unwrap();
    }
    let left: std::collections::HashMap<String, String> = run(&mut c, presence::all(&keys, "u1"));
    assert!(left.is_empty(), "{left:?}");
    let many = presence::add_many(&keys, &[("a".into(), p(1)), ("b".into(), p(2))], 60);
    let _: Value = run(&mut c, many);
}

/// The audit of an accepted message ([`swocloud::cluster::audit`]), on a
/// cluster node: kept, moved on, lost (past the last seq given, or its seq
/// holding another message: what a master that died before its replica
/// had the write leaves), trimmed. A loss starts a new epoch carrying what
/// the user had not acknowledged, renumbered from 1.
#[test]
fn the_audit_tells_kept_from_lost_messages() {
    use swocloud::cluster::audit::{audit_call, Verdict, AUDIT};
    use swocloud::cluster::inbox::Stamp;
    use swocloud::reactor::redis::Script;

    let node = ClusterNode::start();
    let mut c = node.client();
    let inbox = Inbox::new(
        "",
        Limits {
            max_len: 3,
            ttl: 60,
        },
    );
    let script = Script::new(AUDIT);
    let data = serde_json::json!({"n": 1});
    let store = |c: &mut redis::Connection, to: &str, id: &str| -> Stamp {
        let v: (String, u64, String, u8) = run(c, inbox.store(to, id, "s", &data, None));
        swocloud::cluster::inbox::parse_stored(v).0
    };
    let audit = |c: &mut redis::Connection, uid: &str, s: &Stamp| -> Verdict {
        Verdict::from_reply(run(c, audit_call(&script, &inbox, uid, s)))
    };
    let ids = |c: &mut redis::Connection, uid: &str| -> Vec<(u64, String)> {
        let v: Value = run(c, inbox.range(uid, 1, None, 100));
        swocloud::cluster::inbox::parse_entries(v)
            .into_iter()
            .map(|e| (e.seq, e.id))
            .collect()
    };
    let meta = |c: &mut redis::Connection, uid: &str| -> (String, u64) {
        let (e, s, _, _): (String, u64, u64, u64) = run(c, inbox.meta(uid));
        (e, s)
    };

    let s: Vec<Stamp> = ["m1", "m2", "m3"]
        .iter()
        .map(|id| store(&mut c, "u9", id))
        .collect();
    assert_eq!(audit(&mut c, "u9", &s[1]), Verdict::Kept);
    let elsewhere = Stamp {
        epoch: "another".into(),
        ..s[1].clone()
    };
    assert_eq!(audit(&mut c, "u9", &elsewhere), Verdict::Moved);

    // Accepted as seq 4, which this node never had: lost. Nothing was
    // acknowledged, so all three move to the new epoch.
    let past = Stamp {
        seq: 4,
        id: "m4".into(),
        ..s[0].clone()
    };
    assert_eq!(audit(&mut c, "u9", &past), Verdict::Lost);
    let (e2, seq) = meta(&mut c, "u9");
    assert_ne!(e2, s[0].epoch);
    assert_eq!(seq, 3);
    let want: Vec<(u64, String)> = vec![(1, "m1".into()), (2, "m2".into()), (3, "m3".into())];
    assert_eq!(ids(&mut c, "u9"), want);
    // The old epoch's stamps are now "moved on".
    assert_eq!(audit(&mut c, "u9", &s[2]), Verdict::Moved);

    // Seq 3 holds another message than the one accepted as seq 3 (the
    // node lost it, and the next store took its seq): lost. The user had
    // acknowledged seq 1; seqs 2 and 3 are carried over as 1 and 2.
    let _: i64 = run(&mut c, inbox.mark([("u9", e2.as_str(), 1, 1)]));
    let other = Stamp {
        epoch: e2.clone(),
        seq: 3,
        id: "not-m3".into(),
    };
    assert_eq!(audit(&mut c, "u9", &other), Verdict::Lost);
    let (e3, seq) = meta(&mut c, "u9");
    assert!(e3 != e2 && seq == 2, "{e3} {seq}");
    assert_eq!(ids(&mut c, "u9"), vec![(1, "m2".into()), (2, "m3".into())]);
    let next = store(&mut c, "u9", "m5");
    assert_eq!((next.epoch.as_str(), next.seq), (e3.as_str(), 3));

    // Trimmed by inbox_max_len (3) since it was accepted: kept.
    let t: Vec<Stamp> = (1..=5)
        .map(|n| store(&mut c, "u8", &format!("t{n}")))
        .collect();
    assert_eq!(audit(&mut c, "u8", &t[0]), Verdict::Kept);
    assert_eq!(audit(&mut c, "u8", &t[4]), Verdict::Kept);
}

/// The audit of an accepted group message: kept, or lost (the group then
/// starts a new epoch from gseq 0, its join points and acks reset).
#[test]
fn the_group_audit_tells_kept_from_lost_messages() {
    use swocloud::cluster::audit::{group_audit_call, Verdict, GROUP_AUDIT};
    use swocloud::cluster::groups::{parse_sent, Sent};
    use swocloud::reactor::redis::Script;

    let node = ClusterNode::start();
    let mut c = node.client();
    let g = Groups::new("", GroupLimits::default());
    let script = Script::new(GROUP_AUDIT);
    let data = serde_json::json!({"n": 1});
    let _: i64 = run(&mut c, g.user_join("room", "u1"));
    let _: Value = run(&mut c, g.join("room", "u1"));
    let sent = |c: &mut redis::Connection, id: &str| {
        let v: Vec<Value> = run(c, g.send("room", id, "api", &data, None));
        match parse_sent(Ok(v)).unwrap() {
            Sent::Stored { stamp, .. } => stamp,
            other => panic!("{other:?}"),
        }
    };
    let s1 = sent(&mut c, "g1");
    let s2 = sent(&mut c, "g2");
    let _: i64 = run(&mut c, g.ack("room", "u1", 1));
    let audit = |c: &mut redis::Connection, s: &swocloud::cluster::inbox::Stamp| {
        Verdict::from_reply(run(c, group_audit_call(&script, &g, "room", s)))
    };
    assert_eq!(audit(&mut c, &s2), Verdict::Kept);
    let past = swocloud::cluster::inbox::Stamp {
        seq: 3,
        id: "g3".into(),
        ..s1.clone()
    };
    assert_eq!(audit(&mut c, &past), Verdict::Lost);
    assert_eq!(
        audit(&mut c, &s1),
        Verdict::Moved,
        "the group left that epoch"
    );
    let (epoch, gseq, from): (String, u64, u64) = run(&mut c, g.head("room", "u1"));
    assert!(
        epoch != s1.epoch && gseq == 0 && from == 0,
        "{epoch} {gseq} {from}"
    );
    let s3 = sent(&mut c, "g3");
    assert_eq!((s3.epoch, s3.seq), (epoch, 1));
}
