//! Verifiable delivery end to end (real Route, real IM servers, real
//! Redis): every message is stored in its user's inbox before it is
//! accepted, carries an id and a gap-free seq, is replayed at connect,
//! resumed with `since`, acknowledged, and reported `resync` when Redis
//! lost it.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::{descendants_of, http_request, wait_until, ws_connect, WsClient};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tungstenite::Message;

/// The next JSON text frame, or None after `timeout`.
fn next_frame(ws: &mut WsClient, timeout: Duration) -> Option<Value> {
    ws.next_json(timeout)
}

/// Reads frames until `n` stored messages (frames with a seq) arrived;
/// returns every frame read, in order.
#[track_caller]
fn frames_until_messages(ws: &mut WsClient, n: usize, what: &str) -> Vec<Value> {
    let mut got = Vec::new();
    let mut msgs = 0;
    while msgs < n {
        let f = next_frame(ws, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{what}: {msgs} of {n} messages, then nothing: {got:?}"));
        msgs += usize::from(f.get("seq").is_some() && f.get("from").is_some());
        got.push(f);
    }
    got
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f.get("from").is_some())
        .filter_map(|f| f["seq"].as_u64())
        .collect()
}

/// Sends a sentinel and checks it is the very next message: nothing
/// (a duplicate, a stray replay) came before it.
#[track_caller]
fn next_is_sentinel(c: &Cluster, ws: &mut WsClient, uid: &str) {
    let (status, v) = c.api_send(uid, json!("sentinel"));
    assert_eq!(status, 200, "{v}");
    let f = next_frame(ws, Duration::from_secs(5)).expect("the sentinel");
    assert_eq!(f["data"], "sentinel", "nothing before the sentinel: {f}");
    assert_eq!(f["seq"], v["seq"], "{f} {v}");
}

fn send_ok(c: &Cluster, uid: &str, data: Value) -> Value {
    let (status, v) = c.api_send(uid, data);
    assert_eq!(status, 200, "{v}");
    v
}

#[track_caller]
fn wait_status(c: &Cluster, uid: &str, seq: u64, want: &str) {
    wait_until(
        Duration::from_secs(5),
        &format!("{uid}#{seq} {want}"),
        || c.message_status(uid, seq).1["status"] == want,
    );
}

/// The close code and reason a connection to `url` gets.
fn close_of(url: &str) -> (Vec<Value>, u16, String) {
    let mut ws = ws_connect(url).unwrap();
    let mut frames = Vec::new();
    loop {
        match ws.recv_timeout(Duration::from_secs(5)) {
            Ok(Message::Text(t)) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Message::Close(Some(cf))) => return (frames, cf.code.into(), cf.reason.to_string()),
            Ok(Message::Close(None)) => return (frames, 1005, String::new()),
            Ok(_) => {}
            Err(e) => panic!("{url}: no close frame: {e}"),
        }
    }
}

fn kill_tree(master: i32) {
    let tree: Vec<i32> = std::iter::once(master)
        .chain(descendants_of(master))
        .collect();
    for p in &tree {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
}

#[test]
fn queued_messages_arrive_after_welcome_then_ack_and_status() {
    let c = Cluster::start(2, 1, 2, "");
    for i in 1..=5u64 {
        let v = send_ok(&c, "newbie", json!({"n": i}));
        assert_eq!(
            (v["status"].as_str(), v["seq"].as_u64()),
            (Some("queued"), Some(i)),
            "{v}"
        );
        assert_eq!(v["id"].as_str().map(str::len), Some(32), "{v}");
        assert_eq!(c.message_status("newbie", i).1["status"], "queued");
    }
    let (mut ws, _, welcome) = c.connect_resume("newbie", "");
    assert_eq!(welcome["seq"], 5, "{welcome}");
    assert!(welcome["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    let got = frames_until_messages(&mut ws, 5, "the queued messages");
    assert_eq!(
        seqs(&got),
        vec![1, 2, 3, 4, 5],
        "in order, nothing else: {got:?}"
    );
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f["data"], json!({"n": i + 1}));
        assert_eq!(f["from"], "api");
        let (_, st) = c.message_status("newbie", i as u64 + 1);
        assert_eq!(f["id"], st["id"], "the frame's id is the stored one");
    }
    wait_status(&c, "newbie", 5, "delivered");
    // An ack of another epoch (sent before a `resync` the client had not
    // read yet) is stale: ignored, so 4 and 5 stay unacknowledged.
    ws.send_json(&json!({"ack": 5, "epoch": "not-this-one"}))
        .unwrap();
    ws.send_json(&json!({"ack": 3, "epoch": welcome["epoch"]}))
        .unwrap();
    wait_status(&c, "newbie", 3, "acked");
    assert_eq!(
        c.message_status("newbie", 1).1["status"],
        "acked",
        "cumulative"
    );
    assert_eq!(c.message_status("newbie", 4).1["status"], "delivered");
    let v = send_ok(&c, "newbie", json!("live"));
    assert_eq!(v["status"], "delivered", "{v}");
    let f = next_frame(&mut ws, Duration::from_secs(5)).unwrap();
    assert_eq!((f["seq"].as_u64(), &f["data"]), (Some(6), &json!("live")));
    // A second connection without since: every unacknowledged one first.
    let (mut ws2, _, _) = c.connect_resume("newbie", "");
    let got = frames_until_messages(&mut ws2, 3, "the unacked messages");
    assert_eq!(seqs(&got), vec![4, 5, 6]);
    next_is_sentinel(&c, &mut ws2, "newbie");
    assert_eq!(c.message_status("newbie", 99).0, 404);
}

#[test]
fn a_reconnect_with_since_gets_only_the_new_messages() {
    let c = Cluster::start(2, 2, 2, "");
    let (mut ws, _, welcome) = c.connect_resume("rita", "");
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    for i in 0..3 {
        send_ok(&c, "rita", json!(i));
    }
    assert_eq!(
        seqs(&frames_until_messages(&mut ws, 3, "live")),
        vec![1, 2, 3]
    );
    ws.close().unwrap();
    wait_until(Duration::from_secs(5), "rita offline", || {
        c.online("rita")["online"] == false
    });
    for i in 3..6 {
        assert_eq!(send_ok(&c, "rita", json!(i))["status"], "queued");
    }
    let (mut ws, _, w) = c.connect_resume("rita", &format!("&since=3&epoch={epoch}"));
    assert_eq!(
        (w["seq"].as_u64(), w["epoch"].as_str()),
        (Some(6), Some(epoch.as_str()))
    );
    let got = frames_until_messages(&mut ws, 3, "the new ones");
    assert_eq!(seqs(&got), vec![4, 5, 6], "only the new messages: {got:?}");
    next_is_sentinel(&c, &mut ws, "rita");
}

#[test]
fn user_to_user_messages_are_stored_confirmed_and_queued_for_the_offline() {
    let c = Cluster::start(2, 2, 2, "");
    let mut on = std::collections::HashMap::new();
    let mut users = Vec::new();
    for i in 0..8 {
        let (ws, r) = c.connect_user(&format!("p{i}"));
        on.insert(r["serviceName"].as_str().unwrap().to_string(), i);
        users.push(ws);
    }
    let (a, b) = (on["IM_0"], on["IM_1"]);
    let (from, to) = (format!("p{a}"), format!("p{b}"));
    users[a]
        .send_json(&json!({"to": to, "data": "hi", "ref": "r1"}))
        .unwrap();
    let sent = next_frame(&mut users[a], Duration::from_secs(5)).unwrap();
    assert_eq!(sent["sent"], "r1", "{sent}");
    let got = next_frame(&mut users[b], Duration::from_secs(5)).unwrap();
    assert_eq!(got["from"], from.as_str());
    assert_eq!(
        (&got["seq"], &got["id"]),
        (&sent["seq"], &sent["id"]),
        "{got} {sent}"
    );
    // To a user who never connected: stored, confirmed, no `offline`.
    users[a]
        .send_json(&json!({"to": "ghost", "data": 1, "ref": "r2"}))
        .unwrap();
    let sent = next_frame(&mut users[a], Duration::from_secs(5)).unwrap();
    assert_eq!(
        (&sent["sent"], &sent["seq"]),
        (&json!("r2"), &json!(1)),
        "{sent}"
    );
    let (mut ghost, _, w) = c.connect_resume("ghost", "");
    assert_eq!(w["seq"], 1);
    let f = next_frame(&mut ghost, Duration::from_secs(5)).unwrap();
    assert_eq!((&f["from"], &f["data"]), (&json!(from), &json!(1)));
    // A retried send (same ref) is stored once: the same seq and id, and
    // the recipient gets it once.
    for _ in 0..2 {
        users[a]
            .send_json(&json!({"to": to, "data": "again", "ref": "r1b"}))
            .unwrap();
    }
    let s1 = next_frame(&mut users[a], Duration::from_secs(5)).unwrap();
    let s2 = next_frame(&mut users[a], Duration::from_secs(5)).unwrap();
    assert_eq!(
        (&s1["seq"], &s1["id"]),
        (&s2["seq"], &s2["id"]),
        "{s1} {s2}"
    );
    let got = next_frame(&mut users[b], Duration::from_secs(5)).unwrap();
    assert_eq!((&got["data"], &got["seq"]), (&json!("again"), &s1["seq"]));
    let body = json!({"uid": to, "data": "api-once", "ref": "k1"}).to_string();
    let post = || {
        let (st, _, b) = http_request(
            c.route.addr(),
            "POST",
            "/api/send",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(st, 200, "{b}");
        serde_json::from_str::<Value>(&b).unwrap()
    };
    let (v1, v2) = (post(), post());
    assert_eq!(
        (&v1["seq"], &v1["id"]),
        (&v2["seq"], &v2["id"]),
        "{v1} {v2}"
    );
    let got = next_frame(&mut users[b], Duration::from_secs(5)).unwrap();
    assert_eq!(
        (&got["data"], &got["seq"]),
        (&json!("api-once"), &v1["seq"])
    );
    next_is_sentinel(&c, &mut users[b], &to);
    // A refused frame echoes its ref.
    users[a]
        .send_json(&json!({"to": "a b", "data": 1, "ref": "r3"}))
        .unwrap();
    let e = next_frame(&mut users[a], Duration::from_secs(5)).unwrap();
    assert_eq!(
        (&e["error"]["code"], &e["ref"]),
        (&json!("bad_request"), &json!("r3"))
    );
}

#[test]
fn sigkill_of_the_users_im_server_during_50_sends_loses_nothing() {
    let c = Cluster::start(2, 2, 2, "");
    let mut victim = None;
    let mut others = Vec::new();
    for i in 0..20 {
        let uid = format!("v{i}");
        let (ws, r, w) = c.connect_resume(&uid, "");
        if r["serviceName"] == "IM_0" && victim.is_none() {
            victim = Some((uid, ws, w["epoch"].as_str().unwrap().to_string()));
        } else {
            others.push(ws);
        }
    }
    let (uid, mut ws, epoch) = victim.expect("a user on IM_0");
    let addr = c.route.addr();
    let (tx, rx) = std::sync::mpsc::channel();
    let sender = {
        let uid = uid.clone();
        std::thread::spawn(move || {
            (0..50)
                .map(|i| {
                    if i == 10 {
                        let _ = tx.send(()); // kill now; the sends go on
                    }
                    let body = json!({"uid": uid, "data": i}).to_string();
                    let (st, _, b) = http_request(
                        &addr,
                        "POST",
                        "/api/send",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    )
                    .unwrap();
                    (st, b)
                })
                .collect::<Vec<_>>()
        })
    };
    // Kill the whole server after 10 sends, while the other 40 go on.
    let mut first = frames_until_messages(&mut ws, 5, "before the kill");
    rx.recv().unwrap();
    kill_tree(c.ims[0].master_pid().unwrap());
    while let Some(f) = next_frame(&mut ws, Duration::from_millis(500)) {
        first.push(f); // what was in flight, until the socket dies
    }
    let answers = sender.join().unwrap();
    for (st, b) in &answers {
        assert_eq!(*st, 200, "every message is accepted: {b}");
    }
    let held = seqs(&first);
    let last = *held.last().unwrap();
    assert_eq!(
        held,
        (1..=last).collect::<Vec<_>>(),
        "gap-free before the kill"
    );
    c.wait_registered(1);
    let (mut ws, r, w) = c.connect_resume(&uid, &format!("&since={last}&epoch={epoch}"));
    assert_eq!(r["serviceName"], "IM_1");
    assert_eq!(w["seq"], 50, "{w}");
    eprintln!("{last} messages reached the user before the kill, the rest after the move");
    assert!(last < 50, "some messages were sent after the kill");
    let rest = frames_until_messages(&mut ws, 50 - last as usize, "after the move");
    let mut all = held.clone();
    all.extend(seqs(&rest));
    assert_eq!(all, (1..=50).collect::<Vec<_>>(), "all 50, once, in order");
    next_is_sentinel(&c, &mut ws, &uid);
}

#[test]
fn redis_restarted_empty_means_resync() {
    let mut c = Cluster::start(1, 1, 1, "");
    let (mut ws, _, w) = c.connect_resume("ruth", "");
    let old = w["epoch"].as_str().unwrap().to_string();
    send_ok(&c, "ruth", json!(1));
    send_ok(&c, "ruth", json!(2));
    assert_eq!(
        seqs(&frames_until_messages(&mut ws, 2, "before")),
        vec![1, 2]
    );
    c.redis.restart();
    // The Route answers again once it reconnected; the message is the
    // first of a new epoch, and the connected client is told so.
    let v = common::wait_for(
        Duration::from_secs(10),
        "/api/send after the restart",
        || {
            let (st, v) = c.api_send("ruth", json!("new"));
            (st == 200).then_some(v)
        },
    );
    assert_eq!(v["seq"], 1, "{v}");
    let f = next_frame(&mut ws, Duration::from_secs(5)).unwrap();
    assert_eq!(
        (&f["method"], &f["reason"]),
        (&json!("resync"), &json!("epoch")),
        "{f}"
    );
    let new = f["epoch"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    let f = next_frame(&mut ws, Duration::from_secs(5)).unwrap();
    assert_eq!((&f["seq"], &f["data"]), (&json!(1), &json!("new")), "{f}");
    // A reconnect with the old epoch: welcome, then resync, then what the
    // new epoch holds.
    let (mut ws2, _, w) = c.connect_resume("ruth", &format!("&since=2&epoch={old}"));
    assert_eq!(w["epoch"], new.as_str());
    let f = next_frame(&mut ws2, Duration::from_secs(5)).unwrap();
    assert_eq!(
        (&f["method"], &f["epoch"]),
        (&json!("resync"), &json!(new)),
        "{f}"
    );
    let f = next_frame(&mut ws2, Duration::from_secs(5)).unwrap();
    assert_eq!(f["seq"], 1, "the new epoch's unacked message: {f}");
}

#[test]
fn inbox_bounds_hold_and_trimmed_messages_are_404() {
    let bounds = "inbox_max_len = 3\ninbox_ttl = 2\n";
    let c = Cluster::start_with(1, 1, 1, bounds, bounds);
    for i in 1..=5 {
        send_ok(&c, "tim", json!(i));
    }
    for seq in 1..=2 {
        let (st, v) = c.message_status("tim", seq);
        assert_eq!(st, 404, "seq {seq} was trimmed: {v}");
    }
    assert_eq!(c.message_status("tim", 3).1["status"], "queued");
    let (mut ws, _, w) = c.connect_resume("tim", "");
    assert_eq!(w["seq"], 5);
    let epoch = w["epoch"].as_str().unwrap().to_string();
    let f = next_frame(&mut ws, Duration::from_secs(5)).unwrap();
    assert_eq!(
        (&f["method"], &f["reason"]),
        (&json!("resync"), &json!("trimmed")),
        "{f}"
    );
    assert_eq!(
        seqs(&frames_until_messages(&mut ws, 3, "what is kept")),
        vec![3, 4, 5]
    );
    ws.send_json(&json!({"ack": 5})).unwrap();
    ws.close().unwrap();
    // inbox_ttl: the stream is gone 2 s after the last message.
    wait_until(Duration::from_secs(6), "the inbox expired", || {
        c.message_status("tim", 5).0 == 404
    });
    // It had acked everything: nothing to report. A client that had not
    // is told its messages are gone.
    let (mut ws, _, w) = c.connect_resume("tim", &format!("&since=5&epoch={epoch}"));
    assert_eq!(
        w["epoch"],
        epoch.as_str(),
        "the epoch outlives the messages"
    );
    next_is_sentinel(&c, &mut ws, "tim");
    wait_until(Duration::from_secs(6), "the inbox expired again", || {
        c.message_status("tim", 6).0 == 404
    });
    let (mut ws, _, _) = c.connect_resume("tim", &format!("&since=2&epoch={epoch}"));
    let f = next_frame(&mut ws, Duration::from_secs(5)).unwrap();
    assert_eq!(f["reason"], "trimmed", "{f}");
}

#[test]
fn bad_since_epoch_and_ack_get_clear_errors_and_change_nothing() {
    let c = Cluster::start(1, 1, 1, "");
    send_ok(&c, "bea", json!(1));
    send_ok(&c, "bea", json!(2));
    let base = c.route_for("bea")["url"].as_str().unwrap().to_string();
    for (q, why) in [
        ("&since=abc", "since"),
        ("&since=-1", "since"),
        ("&since=1&epoch=a;b", "epoch"),
        ("&epoch=abc", "since"),
    ] {
        let (frames, code, reason) = close_of(&format!("{base}{q}"));
        assert_eq!(code, 4003, "{q}: {frames:?}");
        assert!(reason.contains(why), "{q}: {reason}");
        assert!(
            frames.iter().all(|f| f.get("seq").is_none()),
            "{q}: {frames:?}"
        );
    }
    let (ws, _, w) = c.connect_resume("bea", "");
    let epoch = w["epoch"].as_str().unwrap().to_string();
    drop(ws);
    let (frames, code, _) = close_of(&format!("{base}&since=9&epoch={epoch}"));
    assert_eq!(code, 4003);
    assert_eq!(frames[0]["method"], "welcome");
    let msg = frames[1]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("since=9"), "{msg}");
    // Acks past what the connection got, or not numbers: refused.
    let (mut ws, _, w) = c.connect_resume("bea", "");
    assert_eq!(w["seq"], 2, "nothing changed");
    assert_eq!(
        seqs(&frames_until_messages(&mut ws, 2, "replay")),
        vec![1, 2]
    );
    for bad in [json!({"ack": 99}), json!({"ack": -1}), json!({"ack": "2"})] {
        ws.send_json(&bad).unwrap();
        let e = next_frame(&mut ws, Duration::from_secs(5)).unwrap();
        assert_eq!(e["error"]["code"], "bad_request", "{bad}: {e}");
    }
    wait_status(&c, "bea", 2, "delivered");
    assert_eq!(
        c.message_status("bea", 1).1["status"],
        "delivered",
        "no ack took effect"
    );
    for q in [
        "/api/message?uid=bea",
        "/api/message?uid=bea&seq=x",
        "/api/message?seq=1",
    ] {
        assert_eq!(common::http_get(c.route.addr(), q).unwrap().0, 400, "{q}");
    }
}

#[test]
fn redis_down_means_503_and_an_error_with_the_ref() {
    let mut c = Cluster::start(1, 1, 1, "");
    let (mut ws, _) = c.connect_user("dora");
    c.redis.stop();
    let (st, v) = c.api_send("dora", json!(1));
    assert_eq!(st, 503, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not stored")
            || v["message"]
                .as_str()
                .unwrap()
                .contains("could not be stored"),
        "{v}"
    );
    ws.send_json(&json!({"to": "dora", "data": 1, "ref": "x1"}))
        .unwrap();
    let e = next_frame(&mut ws, Duration::from_secs(10)).unwrap();
    assert_eq!(
        (&e["error"]["code"], &e["ref"]),
        (&json!("storage_unavailable"), &json!("x1")),
        "{e}"
    );
    c.redis.restart();
}

#[test]
fn with_the_inbox_off_messages_are_fire_and_forget_as_before() {
    let off = "inbox = false\n";
    let c = Cluster::start_with(1, 1, 1, off, off);
    let url = c.route_for("olga")["url"].as_str().unwrap().to_string();
    let mut ws = ws_connect(&url).unwrap();
    wait_until(Duration::from_secs(5), "olga online", || {
        c.online("olga")["online"] == true
    });
    let (st, v) = c.api_send("olga", json!("x"));
    assert_eq!((st, &v["delivered"]), (200, &json!(1)), "{v}");
    let f = next_frame(&mut ws, Duration::from_secs(5)).unwrap();
    assert_eq!(f, json!({"from": "api", "data": "x"}), "no welcome, no seq");
    let (st, v) = c.api_send("nobody", json!(1));
    assert_eq!((st, &v["error"]), (404, &json!("offline")), "{v}");
    assert_eq!(c.message_status("olga", 1).0, 404);
}

#[test]
fn sends_pending_during_a_reload_are_confirmed_by_the_replacement() {
    // Redis answers 40 ms late, so sends are still waiting for their store
    // when the worker hands its connections over.
    let c = Cluster::start_proxied(1, 1, 1, "");
    let (mut alice, _) = c.connect_user("pal");
    let (mut bob, _) = c.connect_user("pbo");
    c.proxy
        .as_ref()
        .unwrap()
        .set(common::proxy::Mode::Delay(Duration::from_millis(40)));
    for i in 0..8 {
        alice
            .send_json(&json!({"to": "pbo", "data": i, "ref": format!("r{i}")}))
            .unwrap();
    }
    c.ims[0].reload_workers();
    let mut sent = std::collections::BTreeMap::new();
    while sent.len() < 8 {
        let f = next_frame(&mut alice, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("only {} of 8 confirmed: {sent:?}", sent.len()));
        if let Some(r) = f["sent"].as_str() {
            sent.insert(r.to_string(), f["seq"].as_u64().unwrap());
        }
    }
    let mut stored: Vec<u64> = sent.values().copied().collect();
    stored.sort_unstable();
    assert_eq!(
        stored,
        (1..=8).collect::<Vec<_>>(),
        "each stored once: {sent:?}"
    );
    c.proxy.as_ref().unwrap().set(common::proxy::Mode::Pass);
    let got = frames_until_messages(&mut bob, 8, "bob");
    assert_eq!(seqs(&got), (1..=8).collect::<Vec<_>>());
    next_is_sentinel(&c, &mut bob, "pbo");
}
