//! The PHP client (`clients/php/`, php-cli, no Composer) against a real
//! cluster: every verb of `tests/php/verbs.php`, step by step, checked in
//! its answers and in what the users' sockets actually got — the messages
//! of `sendToUid` and `sendToGroup` on every device of every member (and
//! nothing to those who left), `closeUid`'s close 4000 with its reason —
//! plus token minting for `/route`, typed exceptions with the Route's
//! status and code, a Route with `api_key` refusing a client without it
//! (401), and network failures.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, ROUTE_BIN, SECRET};
use common::daemon::Daemon;
use common::{free_port, http_get, wait_until, WsClient};
use serde_json::{json, Value};
use tungstenite::Message;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/php/verbs.php");
const API_KEY: &str = "php-k3y";

/// Runs one step of `verbs.php` against the Route at `addr`; its lines by
/// verb.
#[track_caller]
fn php(addr: &str, step: &str, args: &[&str]) -> HashMap<String, Value> {
    let out = Command::new("php")
        .arg(SCRIPT)
        .arg(format!("http://{addr}"))
        .arg(SECRET)
        .arg(step)
        .args(args)
        .output()
        .expect("php-cli is installed by scripts/setup.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("php {step}:\n{stdout}{stderr}");
    assert!(out.status.success(), "php {step} failed: {stderr}");
    assert!(stderr.trim().is_empty(), "php {step} warned: {stderr}");
    let mut lines = HashMap::new();
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["step"], step, "{v}");
        lines.insert(v["verb"].as_str().unwrap().to_string(), v);
    }
    lines
}

/// The answer of `verb`, which must have succeeded.
#[track_caller]
fn ok<'a>(lines: &'a HashMap<String, Value>, verb: &str) -> &'a Value {
    let v = lines
        .get(verb)
        .unwrap_or_else(|| panic!("no line for {verb}"));
    assert!(v.get("error").is_none(), "{verb} failed: {v}");
    &v["ok"]
}

/// The exception of `verb`, which must have failed with an ApiException
/// (or NetworkException, for status 0) of `status` and `code`.
#[track_caller]
fn err<'a>(lines: &'a HashMap<String, Value>, verb: &str, status: u16, code: &str) -> &'a Value {
    let v = lines
        .get(verb)
        .unwrap_or_else(|| panic!("no line for {verb}"));
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("{verb} should have thrown: {v}"));
    let class = if status == 0 {
        "Swocloud\\NetworkException"
    } else {
        "Swocloud\\ApiException"
    };
    assert_eq!(
        (&e["class"], &e["status"], &e["code"]),
        (&json!(class), &json!(status), &json!(code)),
        "{verb}: {v}"
    );
    e
}

/// The next message frame (one with `from`: a user's or a group's
/// message), skipping group heads and other notices.
#[track_caller]
fn next_msg(ws: &mut WsClient, what: &str) -> Value {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        match ws.recv_timeout(Duration::from_millis(200)) {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v.get("from").is_some() {
                    return v;
                }
            }
            Ok(Message::Close(c)) => panic!("{what}: closed {c:?}"),
            Ok(_) => {}
            Err(e) if common::is_timeout(&e) => {}
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: nothing within 5 s");
}

/// Every message frame until 500 ms of quiet or the close, and the close
/// frame's (code, reason) if one came.
fn drain(ws: &mut WsClient) -> (Vec<Value>, Option<(u16, String)>) {
    let mut got = Vec::new();
    loop {
        match ws.recv_timeout(Duration::from_millis(500)) {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v.get("from").is_some() {
                    got.push(v);
                }
            }
            Ok(Message::Close(c)) => {
                return (got, c.map(|f| (u16::from(f.code), f.reason.to_string())))
            }
            Ok(_) => {}
            Err(_) => return (got, None),
        }
    }
}

#[test]
fn every_php_verb_against_a_real_cluster() {
    let c = Cluster::start(
        1,
        2,
        1,
        "balancer = \"round_robin\"\ngroup_max_per_user = 3\ngroup_max_members = 260\n",
    );
    let route = c.route.addr();
    // alice on two devices, bob and carol on one: round robin puts them on
    // both IM servers (one worker each, so a server is a worker).
    let mut users: Vec<(&str, WsClient, String)> = ["alice", "alice", "bob", "carol"]
        .into_iter()
        .map(|uid| {
            let (ws, r) = c.connect_user(uid);
            (uid, ws, r["serviceName"].as_str().unwrap().to_string())
        })
        .collect();
    let servers_of = |uid: &str, users: &[(&str, WsClient, String)]| -> BTreeSet<String> {
        users
            .iter()
            .filter(|(u, _, _)| *u == uid)
            .map(|(_, _, s)| s.clone())
            .collect()
    };
    let alice_servers = servers_of("alice", &users);
    let bob_servers = servers_of("bob", &users);

    // Token::mint: a token the Rust side verifies, and /route takes.
    let t = php(&route, "token", &[]);
    let token = ok(&t, "Token::mint").as_str().unwrap();
    let claims = swocloud::auth::verify(SECRET.as_bytes(), token, "user", Some("alice"))
        .expect("the PHP token verifies");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((now + 590..=now + 610).contains(&claims.exp), "{claims:?}");
    let r = ok(&t, "routeFor");
    assert!(
        r["url"].as_str().unwrap().starts_with("ws://127.0.0."),
        "{r}"
    );
    assert!(r["serviceName"].as_str().unwrap().starts_with("IM_"), "{r}");
    for verb in [
        "routeFor.foreign",
        "routeFor.wrong_secret",
        "routeFor.expired",
    ] {
        err(&t, verb, 401, "unauthorized");
    }

    // sendToUid, isUidOnline.
    let s = php(&route, "send", &[]);
    let first = ok(&s, "sendToUid");
    assert_eq!(
        (&first["uid"], &first["status"], &first["seq"]),
        (&json!("alice"), &json!("delivered"), &json!(1)),
        "{first}"
    );
    let retry = ok(&s, "sendToUid.retry");
    assert_eq!(
        (&retry["id"], &retry["seq"]),
        (&first["id"], &first["seq"]),
        "a retry with the same ref is stored once: {retry}"
    );
    let many = ok(&s, "sendToUid.many");
    for uid in ["bob", "carol"] {
        assert_eq!(
            (&many[uid]["uid"], &many[uid]["status"]),
            (&json!(uid), &json!("delivered")),
            "{many}"
        );
    }
    assert_eq!(ok(&s, "sendToUid.offline")["status"], "queued");
    err(&s, "sendToUid.bad_uid", 400, "bad_request");
    assert_eq!(ok(&s, "isUidOnline"), &json!(true));
    assert_eq!(ok(&s, "isUidOnline.offline"), &json!(false));
    assert_eq!(ok(&s, "getOnline")["connections"], 2);
    let data = json!({"n": 1, "text": "héllo/“php”", "list": [1, 2.5, null, true], "empty": {}});
    for (uid, ws, _) in users.iter_mut() {
        let m = next_msg(ws, &format!("{uid}: sendToUid"));
        if *uid == "alice" {
            assert_eq!(
                m,
                json!({"from": "php", "data": data, "seq": 1, "id": first["id"]})
            );
        } else {
            assert_eq!(
                m,
                json!({"from": "api", "data": "to both", "seq": 1, "id": many[*uid]["id"]})
            );
        }
    }

    // joinGroup and its refusals: bad names, both limits.
    let j = php(&route, "join", &[]);
    for (uid, n) in [("alice", 1), ("bob", 2), ("dave", 3)] {
        assert_eq!(
            ok(&j, &format!("joinGroup.{uid}")),
            &json!({"group": "room:1", "uid": uid, "members": n})
        );
    }
    assert_eq!(ok(&j, "joinGroup.again")["members"], 3);
    err(&j, "joinGroup.bad_name", 400, "bad_request");
    err(&j, "joinGroup.long_name", 400, "bad_request");
    assert_eq!(ok(&j, "joinGroup.longest_name")["members"], 1);
    for g in ["g1", "g2", "g3"] {
        ok(&j, &format!("joinGroup.greedy.{g}"));
    }
    let e = err(&j, "joinGroup.greedy.g4", 403, "limit");
    assert!(
        e["server_message"]
            .as_str()
            .unwrap()
            .contains("group_max_per_user"),
        "{e}"
    );
    assert_eq!(ok(&j, "joinGroup.bulk")["members"], 260);
    let e = err(&j, "joinGroup.full", 403, "limit");
    assert!(
        e["server_message"]
            .as_str()
            .unwrap()
            .contains("group_max_members"),
        "{e}"
    );

    // Member counts are written by the IM servers as the news of the joins
    // reaches them: wait for them, then ask from PHP.
    let online = (alice_servers.len() + bob_servers.len()) as u64;
    wait_until(
        Duration::from_secs(5),
        "room:1's online count settled",
        || {
            let (_, _, b) = http_get(&route, "/api/groups/members?group=room:1").unwrap();
            serde_json::from_str::<Value>(&b).unwrap()["online"] == online
        },
    );
    let q = php(&route, "query", &[]);
    assert_eq!(ok(&q, "getClientCountByGroup"), &json!(online));
    let mut list: Vec<String> =
        serde_json::from_value(ok(&q, "getUidListByGroup").clone()).unwrap();
    list.sort();
    assert_eq!(list, ["alice", "bob", "dave"]);
    let big: Vec<String> = serde_json::from_value(ok(&q, "getUidListByGroup.big").clone()).unwrap();
    let want: BTreeSet<String> = (0..260).map(|i| format!("p{i}")).collect();
    assert_eq!(big.len(), 260, "each member once");
    assert_eq!(big.into_iter().collect::<BTreeSet<_>>(), want);
    let page = ok(&q, "getGroupMembers.big");
    assert_eq!(page["count"], 260, "{page}");
    assert!(
        page["cursor"].is_string() && page["members"].as_array().unwrap().len() < 260,
        "260 members take more than one page, so the list above followed the cursor: {page}"
    );
    assert_eq!(ok(&q, "getClientCountByGroup.none"), &json!(0));
    assert_eq!(ok(&q, "getUidListByGroup.none"), &json!([]));
    err(&q, "getUidListByGroup.bad_name", 400, "bad_request");

    // sendToGroup: once to each server with members, to every device.
    let g = php(&route, "gsend", &[]);
    let sent = ok(&g, "sendToGroup");
    let member_servers: BTreeSet<String> = alice_servers.union(&bob_servers).cloned().collect();
    assert_eq!(
        (&sent["group"], &sent["gseq"], &sent["servers"]),
        (&json!("room:1"), &json!(1), &json!(member_servers.len())),
        "{sent}"
    );
    err(&g, "sendToGroup.empty", 404, "no_such_group");
    err(&g, "sendToGroup.bad_name", 400, "bad_request");
    for (uid, ws, _) in users.iter_mut().filter(|(u, _, _)| *u != "carol") {
        let m = next_msg(ws, &format!("{uid}: sendToGroup"));
        assert_eq!(
            m,
            json!({"group": "room:1", "from": "php", "data": {"g": 1}, "gseq": 1, "id": sent["id"]}),
            "{uid}"
        );
    }

    // leaveGroup: bob gets nothing sent after it.
    let l = php(&route, "leave", &[]);
    assert_eq!(
        ok(&l, "leaveGroup"),
        &json!({"group": "room:1", "uid": "bob", "members": 2})
    );
    assert_eq!(ok(&l, "leaveGroup.again")["members"], 2);
    let after = ok(&l, "sendToGroup.after_leave");
    assert_eq!(after["gseq"], 2, "{after}");
    for (uid, ws, _) in users.iter_mut().filter(|(u, _, _)| *u == "alice") {
        let m = next_msg(ws, &format!("{uid}: after bob left"));
        assert_eq!((&m["data"], &m["gseq"]), (&json!({"g": 2}), &json!(2)));
    }

    // closeUid: every connection closed with 4000 and the reason; nothing
    // reached bob after his leave, nor carol from the group.
    let k = php(&route, "kick", &[]);
    assert_eq!(ok(&k, "closeUid"), &json!({"uid": "bob", "servers": 1}));
    assert_eq!(ok(&k, "closeUid.default")["servers"], 1);
    for (uid, ws, _) in users.iter_mut().filter(|(u, _, _)| *u != "alice") {
        let (got, close) = drain(ws);
        assert_eq!(got, Vec::<Value>::new(), "{uid}: nothing more");
        let reason = if *uid == "bob" {
            "bye from php"
        } else {
            "kicked"
        };
        assert_eq!(close, Some((4000, reason.to_string())), "{uid}");
    }
    wait_until(Duration::from_secs(5), "bob offline", || {
        c.online("bob")["online"] == false
    });

    // A Route with api_key (a second node on the same Redis): refused
    // without the key, served with it (GatewayClient's static style).
    let keyed = Daemon::new(
        ROUTE_BIN,
        &format!(
            "worker_num = 1\nnode_id = \"route-keyed\"\nredis_url = \"{}\"\nauth_secret = \"{SECRET}\"\napi_key = \"{API_KEY}\"\n",
            c.redis_url()
        ),
    );
    keyed.start();
    wait_until(Duration::from_secs(10), "the keyed Route ready", || {
        http_get(keyed.addr(), "/ready").is_ok_and(|(s, _, _)| s == 200)
    });
    let keyed_url = format!("http://{}", keyed.addr());
    let a = php(&route, "auth", &[&keyed_url, API_KEY]);
    for verb in [
        "isUidOnline.no_key",
        "sendToUid.no_key",
        "isUidOnline.wrong_key",
        "Gateway::isUidOnline.no_key",
    ] {
        err(&a, verb, 401, "unauthorized");
    }
    assert_eq!(ok(&a, "Gateway::isUidOnline"), &json!(true));
    let mut list: Vec<String> =
        serde_json::from_value(ok(&a, "Gateway::getUidListByGroup").clone()).unwrap();
    list.sort();
    assert_eq!(list, ["alice", "dave"]);

    // Network failures: a NetworkException with status 0.
    let dead = format!("http://127.0.0.1:{}", free_port());
    // Connections to it complete (the kernel's backlog) and get no answer.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!("http://{}", silent.local_addr().unwrap());
    let n = php(&route, "network", &[&dead, &silent]);
    let e = err(&n, "isUidOnline.dead", 0, "network");
    assert!(e["message"].as_str().unwrap().contains("refused"), "{e}");
    err(&n, "sendToUid.dead", 0, "network");
    let e = err(&n, "isUidOnline.silent", 0, "network");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("no answer within 0.5 s"),
        "{e}"
    );
    let waited = ok(&n, "silent.seconds").as_f64().unwrap();
    assert!(
        (0.4..3.0).contains(&waited),
        "the 0.5 s timeout held: {waited}"
    );
    assert_eq!(
        n["new Client.bad_url"]["error"]["class"],
        "InvalidArgumentException"
    );

    // Nothing else reached alice's devices: no second copy of the retried
    // send, nothing sent without the key.
    for (_, ws, _) in users.iter_mut().filter(|(u, _, _)| *u == "alice") {
        let (got, close) = drain(ws);
        assert_eq!((got, close), (Vec::new(), None));
    }
}
