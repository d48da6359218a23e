//! Groups end to end (real Route, real IM servers, real Redis): fan-out
//! only to the IM servers holding members (counted from their metrics),
//! every member's every connection once, joins and leaves while messages
//! flow, resume by gseq after an IM server's SIGKILL, a message sent while
//! the members' server was out of the registry, kick, limits, bad names,
//! and a non-member's send.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::{descendants_of, http_request, metric, wait_until, WsClient};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tungstenite::Message;

fn post(c: &Cluster, path: &str, body: Value) -> (u16, Value) {
    let (st, _, b) = http_request(
        c.route.addr(),
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .unwrap();
    (st, serde_json::from_str(&b).unwrap_or(Value::Null))
}

fn join(c: &Cluster, g: &str, uid: &str) -> Value {
    let (st, v) = post(c, "/api/groups/join", json!({"group": g, "uid": uid}));
    assert_eq!(st, 200, "join {g} {uid}: {v}");
    v
}

fn gsend(c: &Cluster, g: &str, data: Value) -> Value {
    let (st, v) = post(c, "/api/groups/send", json!({"group": g, "data": data}));
    assert_eq!(st, 200, "send to {g}: {v}");
    v
}

/// The next JSON text frame, or None after `timeout`.
fn next_frame(ws: &mut WsClient, timeout: Duration) -> Option<Value> {
    ws.next_json(timeout)
}

/// The next group message of `g` (skipping heads and other frames).
#[track_caller]
fn next_group_msg(ws: &mut WsClient, g: &str, what: &str) -> Value {
    loop {
        let f = next_frame(ws, Duration::from_secs(5)).unwrap_or_else(|| panic!("{what}: nothing"));
        if f["group"] == g && f.get("gseq").is_some() && f.get("from").is_some() {
            return f;
        }
    }
}

fn group_in(c: &Cluster, i: usize) -> f64 {
    metric(c.ims[i].addr(), "swocloud_im_group_messages_received_total").unwrap_or(0.0)
}

/// Connects users until one lands on each wanted server; returns
/// uid → (socket, server).
fn users_on(c: &Cluster, prefix: &str, want: &[&str]) -> Vec<(String, WsClient, String)> {
    let mut out = Vec::new();
    for i in 0..40 {
        let uid = format!("{prefix}{i}");
        let (ws, r) = c.connect_user(&uid);
        let s = r["serviceName"].as_str().unwrap().to_string();
        if want.contains(&s.as_str())
            && !out
                .iter()
                .any(|(_, _, x): &(String, WsClient, String)| *x == s)
        {
            out.push((uid, ws, s));
        }
        if out.len() == want.len() {
            return out;
        }
    }
    panic!("could not place users on {want:?}");
}

#[test]
fn a_group_message_goes_once_to_each_server_with_members_and_to_every_connection() {
    let c = Cluster::start(2, 3, 2, "balancer = \"round_robin\"");
    let mut users = users_on(&c, "m", &["IM_0", "IM_1"]);
    let uid0 = users[0].0.clone();
    for (uid, _, _) in &users {
        let v = join(&c, "room", uid);
        assert!(v["members"].as_u64().unwrap() >= 1, "{v}");
    }
    // Members join while online: their servers count them, then a send.
    wait_until(Duration::from_secs(5), "both servers counted", || {
        let (st, _, v) =
            common::http_get(c.route.addr(), "/api/groups/members?group=room").unwrap();
        st == 200 && serde_json::from_str::<Value>(&v).unwrap()["online"] == 2
    });
    let before: Vec<f64> = (0..3).map(|i| group_in(&c, i)).collect();
    let v = gsend(&c, "room", json!({"hello": 1}));
    assert_eq!(v["servers"], 2, "exactly the two servers with members: {v}");
    for (uid, ws, _) in users.iter_mut() {
        let f = next_group_msg(ws, "room", uid);
        assert_eq!(
            (&f["data"], &f["gseq"], &f["id"]),
            (&json!({"hello": 1}), &v["gseq"], &v["id"]),
            "{uid}: {f}"
        );
    }
    wait_until(Duration::from_secs(5), "the servers' metrics", || {
        let after: Vec<f64> = (0..3).map(|i| group_in(&c, i)).collect();
        let d: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let holders: Vec<usize> = ["IM_0", "IM_1"]
            .iter()
            .map(|s| s[3..].parse().unwrap())
            .collect();
        d[holders[0]] == 1.0 && d[holders[1]] == 1.0 && d[2] == 0.0
    });
    // Every connection of a member: a second device gets it too, once.
    let (mut dev2, _) = c.connect_user(&uid0);
    let head = loop {
        let f = next_frame(&mut dev2, Duration::from_secs(5)).expect("the group head");
        if f["method"] == "group" {
            break f;
        }
    };
    assert_eq!(
        (&head["group"], &head["gseq"]),
        (&json!("room"), &v["gseq"]),
        "{head}"
    );
    let v2 = gsend(&c, "room", json!(2));
    for (uid, ws, _) in users.iter_mut() {
        assert_eq!(next_group_msg(ws, "room", uid)["gseq"], v2["gseq"]);
    }
    // The second device: what it had not acked (the first message), then the new one.
    let a = next_group_msg(&mut dev2, "room", "device 2");
    let b = next_group_msg(&mut dev2, "room", "device 2");
    assert_eq!((&a["gseq"], &b["gseq"]), (&v["gseq"], &v2["gseq"]));
    // Nothing twice: the next message on every socket is a user sentinel.
    for (uid, ws, _) in users.iter_mut() {
        c.api_send(uid, json!("sentinel"));
        let f = next_frame(ws, Duration::from_secs(5)).unwrap();
        assert_eq!(
            f["data"], "sentinel",
            "{uid}: nothing before the sentinel: {f}"
        );
    }
}

#[test]
fn members_who_join_get_what_follows_and_leavers_get_nothing_after_leaving() {
    let c = Cluster::start(2, 2, 2, "");
    let mut users = users_on(&c, "j", &["IM_0", "IM_1"]);
    join(&c, "chat", &users[0].0);
    // Messages flow while the second user joins and the first leaves.
    for i in 0..20 {
        if i == 5 {
            join(&c, "chat", &users[1].0);
        }
        if i == 15 {
            let (st, v) = post(
                &c,
                "/api/groups/leave",
                json!({"group": "chat", "uid": users[0].0}),
            );
            assert_eq!(st, 200, "{v}");
        }
        gsend(&c, "chat", json!(i));
    }
    // The joiner: exactly the messages sent after its join (5..20), in order.
    let mut got = Vec::new();
    while got.len() < 15 {
        got.push(
            next_group_msg(&mut users[1].1, "chat", "joiner")["data"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(got, (5..20).collect::<Vec<_>>());
    // The leaver: 0..15, and nothing after (the sentinel is a user message).
    let mut got = Vec::new();
    while got.len() < 15 {
        got.push(
            next_group_msg(&mut users[0].1, "chat", "leaver")["data"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(got, (0..15).collect::<Vec<_>>());
    let (st, _) = c.api_send(&users[0].0, json!("sentinel"));
    assert_eq!(st, 200);
    loop {
        let f = next_frame(&mut users[0].1, Duration::from_secs(5)).expect("the sentinel");
        assert!(f.get("gseq").is_none(), "a message after the leave: {f}");
        if f["data"] == "sentinel" {
            break;
        }
    }
}

#[test]
fn sigkill_of_an_im_server_members_resume_by_gseq_and_miss_nothing() {
    let c = Cluster::start(2, 2, 2, "");
    let mut users = users_on(&c, "k", &["IM_0", "IM_1"]);
    let (uid, mut ws, _) = users.remove(0);
    let victim_server = &users_on_server(&uid, &c);
    join(&c, "ops", &uid);
    for i in 0..3 {
        gsend(&c, "ops", json!(i));
    }
    let mut last = 0;
    let mut epoch = String::new();
    for _ in 0..3 {
        let f = next_group_msg(&mut ws, "ops", "before");
        last = f["gseq"].as_u64().unwrap();
    }
    // The epoch of the group, from a head frame of a new device.
    let (mut probe, _) = c.connect_user(&uid);
    while epoch.is_empty() {
        let f = next_frame(&mut probe, Duration::from_secs(5)).unwrap();
        if f["method"] == "group" {
            epoch = f["epoch"].as_str().unwrap().to_string();
        }
    }
    drop(probe);
    let i: usize = victim_server[3..].parse().unwrap();
    signal_im(&c, i, Signal::SIGKILL);
    for i in 3..10 {
        gsend(&c, "ops", json!(i));
    }
    c.wait_registered(1);
    let (mut ws, _, _) = c.connect_resume(&uid, &format!("&gsince=ops~{epoch}~{last}"));
    let mut got = Vec::new();
    while got.len() < 7 {
        got.push(
            next_group_msg(&mut ws, "ops", "after")["data"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(got, (3..10).collect::<Vec<_>>(), "the rest, once, in order");
}

/// Sends `sig` to IM server `i`'s master and all its descendants.
fn signal_im(c: &Cluster, i: usize, sig: Signal) {
    let master = c.ims[i].master_pid().unwrap();
    for p in std::iter::once(master)
        .chain(descendants_of(master))
        .collect::<Vec<_>>()
    {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

#[test]
fn a_message_sent_while_the_members_server_was_out_of_the_registry_still_reaches_them() {
    let c = Cluster::start(1, 1, 1, "");
    let (mut ws, _) = c.connect_user("away1");
    join(&c, "away", "away1");
    gsend(&c, "away", json!("before"));
    next_group_msg(&mut ws, "away", "before");
    // Frozen past heartbeat_idle_time: the Route takes it out of the
    // registry, and the next message is fanned out to no server at all.
    signal_im(&c, 0, Signal::SIGSTOP);
    wait_until(Duration::from_secs(10), "IM_0 out of the cache", || {
        c.servers()["servers"].as_array().is_some_and(Vec::is_empty)
    });
    let v = gsend(&c, "away", json!("while away"));
    assert_eq!(v["servers"], 0, "stored, fanned out nowhere: {v}");
    signal_im(&c, 0, Signal::SIGCONT);
    // Back, its group feeds are checked against the group's head.
    let f = next_group_msg(&mut ws, "away", "the message sent while away");
    assert_eq!(f["data"], "while away", "{f}");
    assert_eq!(f["gseq"], v["gseq"], "{f}");
}

fn users_on_server(uid: &str, c: &Cluster) -> String {
    c.online(uid)["servers"][0].as_str().unwrap().to_string()
}

#[test]
fn kick_limits_bad_names_and_non_members() {
    let c = Cluster::start_with(
        1,
        1,
        1,
        "group_max_per_user = 2\ngroup_max_members = 3\n",
        "",
    );
    let (mut ws, _) = c.connect_user("kim");
    let (mut ws2, _) = c.connect_user("kim");
    let (st, v) = post(&c, "/api/kick", json!({"uid": "kim", "reason": "bye now"}));
    assert_eq!((st, &v["servers"]), (200, &json!(1)), "{v}");
    for w in [&mut ws, &mut ws2] {
        let code = loop {
            match w.recv_timeout(Duration::from_secs(5)) {
                Ok(Message::Close(Some(cf))) => break (u16::from(cf.code), cf.reason.to_string()),
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        assert_eq!(code, (4000, "bye now".to_string()));
    }
    // Limits.
    join(&c, "a", "u1");
    join(&c, "b", "u1");
    let (st, v) = post(&c, "/api/groups/join", json!({"group": "c", "uid": "u1"}));
    assert_eq!(
        (st, &v["error"]),
        (403, &json!("limit")),
        "groups per user: {v}"
    );
    join(&c, "a", "u2");
    join(&c, "a", "u3");
    let (st, v) = post(&c, "/api/groups/join", json!({"group": "a", "uid": "u4"}));
    assert_eq!(
        (st, &v["error"]),
        (403, &json!("limit")),
        "members per group: {v}"
    );
    let (st, v) = common::http_get(c.route.addr(), "/api/groups/members?group=a")
        .map(|(s, _, b)| (s, serde_json::from_str::<Value>(&b).unwrap()))
        .unwrap();
    assert_eq!(
        (st, &v["count"]),
        (200, &json!(3)),
        "the refused join changed nothing: {v}"
    );
    // Bad names.
    for g in ["", "a b", "x{y}", &"g".repeat(65)] {
        let (st, v) = post(&c, "/api/groups/join", json!({"group": g, "uid": "u1"}));
        assert_eq!(st, 400, "{g:?}: {v}");
        let (st, _) = post(&c, "/api/groups/send", json!({"group": g, "data": 1}));
        assert_eq!(st, 400);
    }
    let (st, v) = post(&c, "/api/groups/send", json!({"group": "empty", "data": 1}));
    assert_eq!((st, &v["error"]), (404, &json!("no_such_group")));
    // A non-member user sending: refused with its ref; a member's is confirmed.
    let (mut out, _) = c.connect_user("outsider");
    out.send_json(&json!({"group": "a", "data": 1, "ref": "o1"}))
        .unwrap();
    let e = next_frame(&mut out, Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "no answer; Route log: {}\nIM log: {}",
            c.route.log(),
            c.ims[0].log()
        )
    });
    assert_eq!(
        (&e["error"]["code"], &e["ref"]),
        (&json!("not_member"), &json!("o1")),
        "{e}"
    );
    let (mut m, _) = c.connect_user("u2");
    m.send_json(&json!({"group": "a", "data": "from u2", "ref": "m1"}))
        .unwrap();
    let s = loop {
        let f = next_frame(&mut m, Duration::from_secs(5)).unwrap();
        if f.get("sent").is_some() {
            break f;
        }
    };
    assert_eq!(
        (&s["sent"], &s["group"]),
        (&json!("m1"), &json!("a")),
        "{s}"
    );
    let f = next_group_msg(&mut m, "a", "u2's own message");
    assert_eq!((&f["from"], &f["gseq"]), (&json!("u2"), &s["gseq"]));
}

#[test]
fn presence_events_go_to_small_groups_only_and_user_sends_can_be_off() {
    let c = Cluster::start(
        1,
        1,
        1,
        "group_presence_events = true\ngroup_presence_max = 2\nuser_group_send = false\n",
    );
    let (mut a, _) = c.connect_user("pa");
    join(&c, "duo", "pa");
    // Events go to the servers that counted a member: wait for pa's.
    wait_until(Duration::from_secs(5), "pa counted online", || {
        let (_, _, b) = common::http_get(c.route.addr(), "/api/groups/members?group=duo").unwrap();
        serde_json::from_str::<Value>(&b).unwrap()["online"] == 1
    });
    join(&c, "duo", "pb");
    let f = loop {
        let f = next_frame(&mut a, Duration::from_secs(5)).expect("a join event");
        if f["method"] == "join" {
            break f;
        }
    };
    assert_eq!(
        (&f["group"], &f["uid"]),
        (&json!("duo"), &json!("pb")),
        "{f}"
    );
    // Past group_presence_max members: no events.
    join(&c, "duo", "pc");
    post(
        &c,
        "/api/groups/leave",
        json!({"group": "duo", "uid": "pc"}),
    );
    let (st, _) = c.api_send("pa", json!("sentinel"));
    assert_eq!(st, 200);
    loop {
        let f = next_frame(&mut a, Duration::from_secs(5)).expect("the sentinel");
        if f["data"] == "sentinel" {
            break;
        }
        assert!(
            f["method"] != "join" || f["uid"] != "pc",
            "an event for a group over the cap: {f}"
        );
    }
    // A leave while small again: an event.
    post(
        &c,
        "/api/groups/leave",
        json!({"group": "duo", "uid": "pb"}),
    );
    let f = loop {
        let f = next_frame(&mut a, Duration::from_secs(5)).expect("a leave event");
        if f["method"] == "leave" && f["uid"] == "pb" {
            break f;
        }
    };
    assert_eq!(f["group"], "duo");
    // user_group_send = false: a member's send is refused with its ref.
    a.send_json(&json!({"group": "duo", "data": 1, "ref": "x"}))
        .unwrap();
    let e = loop {
        let f = next_frame(&mut a, Duration::from_secs(5)).expect("the refusal");
        if f.get("error").is_some() {
            break f;
        }
    };
    assert_eq!(
        (&e["error"]["code"], &e["ref"]),
        (&json!("unauthorized"), &json!("x")),
        "{e}"
    );
}
