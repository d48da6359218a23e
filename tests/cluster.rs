//! The user's path end to end: a Route with 2 workers, IM servers with 2
//! workers each on their own 127.0.0.x, a private Redis, real users over
//! WebSocket — routing, exactly-once delivery across servers and workers,
//! the HTTP forwarding API (curl and PHP), balancing, failures and bad input.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, SECRET};
use common::{descendants_of, http_get, wait_until, ws_connect, WsClient};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tungstenite::Message;

/// Reads JSON text frames until `pred` matches one (skipping others), or
/// panics after `timeout`.
#[track_caller]
fn recv_until(
    ws: &mut WsClient,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        match ws.recv_timeout(Duration::from_millis(200)) {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if pred(&v) {
                    return v;
                }
            }
            Ok(_) => {}
            Err(e) if common::is_timeout(&e) => {}
            Err(e) => panic!("{what}: connection error {e}"),
        }
    }
    panic!("{what}: nothing within {timeout:?}");
}

#[test]
fn two_hundred_users_exchange_messages_exactly_once() {
    let c = Cluster::start(2, 2, 2, "");
    let n = 200;
    let mut users: Vec<WsClient> = Vec::new();
    let mut server_of = HashMap::new();
    for i in 0..n {
        let (ws, r) = c.connect_user(&format!("u{i}"));
        server_of.insert(i, r["serviceName"].as_str().unwrap().to_string());
        users.push(ws);
    }
    let per_server: HashSet<&String> = server_of.values().collect();
    assert_eq!(per_server.len(), 2, "users landed on both IM servers");
    // Each user sends 10 messages to pseudo-random other users.
    let mut expected: HashMap<usize, Vec<String>> = HashMap::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for (i, ws) in users.iter_mut().enumerate() {
        for k in 0..10 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut to = (seed % n as u64) as usize;
            if to == i {
                to = (to + 1) % n;
            }
            let id = format!("u{i}-{k}");
            ws.send_json(&json!({"to": format!("u{to}"), "data": {"id": id}}))
                .unwrap();
            expected.entry(to).or_default().push(id);
        }
    }
    let mut total = 0;
    for (i, ws) in users.iter_mut().enumerate() {
        let want = expected.remove(&i).unwrap_or_default();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let v = recv_until(
                ws,
                Duration::from_secs(10),
                &format!("u{i} waiting for {} messages", want.len()),
                |v| v.get("from").is_some(),
            );
            let id = v["data"]["id"].as_str().unwrap().to_string();
            assert_eq!(
                v["from"],
                id.split('-').next().unwrap(),
                "the frame says who sent it"
            );
            got.push(id);
        }
        let mut a = got.clone();
        a.sort();
        let mut b = want.clone();
        b.sort();
        assert_eq!(a, b, "u{i} got exactly its messages");
        total += got.len();
    }
    assert_eq!(total, n * 10);
    // Nothing arrives twice: every socket stays quiet now. The sleep
    // deliberately gives a duplicate time to arrive; there is no event.
    std::thread::sleep(Duration::from_millis(300));
    for (i, ws) in users.iter_mut().enumerate() {
        if let Ok(Message::Text(t)) = ws.recv_timeout(Duration::from_millis(5)) {
            panic!("u{i} got a duplicate or stray frame: {t}");
        }
    }
}

#[test]
fn the_http_api_reaches_users_from_curl_and_php_and_queues_for_the_offline() {
    let c = Cluster::start(2, 2, 2, "");
    let (mut alice, _) = c.connect_user("alice");
    let (mut bob, _) = c.connect_user("bob");
    let (mut bob2, _) = c.connect_user("bob"); // a second device
    let (status, v) = c.api_send("alice", json!({"hello": 1}));
    assert_eq!((status, &v["status"]), (200, &json!("delivered")), "{v}");
    let got = recv_until(&mut alice, Duration::from_secs(3), "alice via API", |v| {
        v.get("from").is_some()
    });
    assert_eq!(
        got,
        json!({"from": "api", "data": {"hello": 1}, "seq": 1, "id": v["id"]})
    );
    let (status, v) = c.api_send("bob", json!("two devices"));
    assert_eq!((status, &v["status"]), (200, &json!("delivered")));
    for ws in [&mut bob, &mut bob2] {
        assert_eq!(
            recv_until(ws, Duration::from_secs(3), "bob's devices", |v| v
                .get("from")
                .is_some())["data"],
            "two devices"
        );
    }
    let (status, v) = c.api_send("nobody", json!(1));
    assert_eq!((status, v["status"].as_str()), (200, Some("queued")), "{v}");
    assert_eq!(c.online("bob")["connections"], 2);
    assert_eq!(c.online("nobody")["online"], false);

    // curl, as any program would.
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"uid":"alice","data":"from curl"}"#,
        ])
        .arg(format!("http://{}/api/send", c.route.addr()))
        .output()
        .expect("curl is installed by scripts/setup.sh");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["status"], &v["seq"]),
        (&json!("delivered"), &json!(2)),
        "{v}"
    );
    assert_eq!(
        recv_until(&mut alice, Duration::from_secs(3), "alice via curl", |v| v
            .get("from")
            .is_some())["data"],
        "from curl"
    );

    // The PHP example, unmodified.
    let php = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/clients/send.php");
    let out = Command::new("php")
        .arg(php)
        .arg(format!("http://{}", c.route.addr()))
        .arg("alice")
        .arg("from php")
        .output()
        .expect("php-cli is installed by scripts/setup.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(r#""status":"delivered""#),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        recv_until(&mut alice, Duration::from_secs(3), "alice via PHP", |v| v
            .get("from")
            .is_some())["data"],
        "from php"
    );
    let out = Command::new("php")
        .arg(php)
        .arg(format!("http://{}", c.route.addr()))
        .arg("nobody")
        .arg("x")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(r#""status":"queued""#),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn least_loaded_spreads_evenly_and_consistent_hashing_is_sticky() {
    let c = Cluster::start(2, 2, 2, "");
    let mut held = Vec::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    for i in 0..100 {
        let (ws, r) = c.connect_user(&format!("lb{i}"));
        *count
            .entry(r["serviceName"].as_str().unwrap().to_string())
            .or_default() += 1;
        held.push(ws);
    }
    let counts: Vec<usize> = count.values().copied().collect();
    assert_eq!(counts.len(), 2);
    assert!(
        counts.iter().all(|&n| (45..=55).contains(&n)),
        "within 10% of 50 each: {count:?}"
    );

    let c2 = Cluster::start(2, 3, 1, "balancer = \"consistent_hash\"");
    for i in 0..20 {
        let uid = format!("sticky{i}");
        let first = c2.route_for(&uid)["serviceName"].clone();
        for _ in 0..5 {
            assert_eq!(
                c2.route_for(&uid)["serviceName"],
                first,
                "{uid} always maps to the same server"
            );
        }
    }
}

#[test]
fn an_im_server_killed_loses_its_users_at_once_and_they_move() {
    let c = Cluster::start(2, 2, 2, "");
    // Find a user on IM_0 and a sender on IM_1.
    let mut victim = None;
    let mut other = None;
    for i in 0..20 {
        let (ws, r) = c.connect_user(&format!("k{i}"));
        match r["serviceName"].as_str().unwrap() {
            "IM_0" if victim.is_none() => victim = Some((format!("k{i}"), ws)),
            "IM_1" if other.is_none() => other = Some((format!("k{i}"), ws)),
            _ => {}
        }
    }
    let (victim_uid, _victim_ws) = victim.expect("a user on IM_0");
    let (other_uid, mut other_ws) = other.expect("a user on IM_1");
    assert_eq!(c.online(&victim_uid)["online"], true);
    let master = c.ims[0].master_pid().unwrap();
    let tree: Vec<i32> = std::iter::once(master)
        .chain(descendants_of(master))
        .collect();
    for p in &tree {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(1),
        "the killed server's users offline within 1 s",
        || c.online(&victim_uid)["online"] == false,
    );
    eprintln!(
        "users offline {} ms after the IM server's SIGKILL",
        t0.elapsed().as_millis()
    );
    c.wait_registered(1);
    let (mut moved, r) = c.connect_user(&victim_uid);
    assert_eq!(
        r["serviceName"], "IM_1",
        "only the live server is handed out"
    );
    other_ws
        .send_json(&json!({"to": victim_uid, "data": "after the move"}))
        .unwrap();
    let got = recv_until(
        &mut moved,
        Duration::from_secs(3),
        "message after reconnect",
        |v| v.get("from").is_some(),
    );
    assert_eq!(
        (&got["from"], &got["data"]),
        (&json!(other_uid), &json!("after the move"))
    );
}

#[test]
fn a_route_restart_heals_by_itself() {
    let c = Cluster::start(1, 2, 1, "");
    let (mut u, _) = c.connect_user("r1");
    c.route.stop();
    let out = c.route.run("start", &["-d"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    c.wait_registered(2);
    eprintln!(
        "IM servers re-registered {} ms after the Route came back",
        t0.elapsed().as_millis()
    );
    wait_until(Duration::from_secs(5), "delivery resumes", || {
        c.api_send("r1", json!("back")).0 == 200
    });
    assert_eq!(
        recv_until(
            &mut u,
            Duration::from_secs(3),
            "after the Route restart",
            |v| v.get("from").is_some()
        )["data"],
        "back"
    );
}

#[test]
fn a_draining_im_server_sends_its_users_elsewhere() {
    let c = Cluster::start(2, 2, 1, "");
    let mut on_a = None;
    for i in 0..20 {
        let (ws, r) = c.connect_user(&format!("d{i}"));
        if r["serviceName"] == "IM_0" {
            on_a = Some(ws);
            break;
        }
    }
    let mut ws = on_a.expect("a user on IM_0");
    let out = c.ims[0].run("stop", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hint = recv_until(&mut ws, Duration::from_secs(5), "reconnect hint", |v| {
        v["method"] == "reconnect"
    });
    assert_eq!(hint["port"], c.ims[1].port, "{hint}");
    assert!(ws.wait_closed(Duration::from_secs(5)), "then a close frame");
    for i in 0..10 {
        assert_eq!(
            c.route_for(&format!("after{i}"))["serviceName"],
            "IM_1",
            "/route no longer hands out the stopped server"
        );
    }
    let moved = ws_connect(hint["url"].as_str().unwrap());
    assert!(moved.is_ok(), "the hinted URL works as it is");
}

#[test]
fn bad_tokens_unknown_targets_and_malformed_frames_get_their_answers() {
    let c = Cluster::start(1, 1, 1, "");
    let im = format!("ws://{}/", c.ims[0].addr());
    let close_code = |url: &str| -> (u16, String) {
        let mut ws = ws_connect(url).expect("the upgrade itself succeeds");
        loop {
            match ws.recv() {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(_) => continue,
                Err(e) => panic!("expected close 4001, got {e}"),
            }
        }
    };
    let other = swocloud::auth::mint(SECRET.as_bytes(), "mallory", "user", 60);
    let forged = swocloud::auth::mint(b"not-the-secret", "eve", "user", 60);
    let expired = {
        // A token that expired long ago, signed with the right secret.
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let (h, p) = (
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(br#"{"sub":"eve","aud":"user","exp":1000}"#),
        );
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        m.update(format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", b64(&m.finalize().into_bytes()))
    };
    for (url, why) in [
        (format!("{im}?uid=eve"), "token"),
        (format!("{im}?uid=eve&token={other}"), "someone else"),
        (format!("{im}?uid=eve&token={forged}"), "signature"),
        (format!("{im}?uid=eve&token={expired}"), "expired"),
        (format!("{im}?token={other}"), "uid"),
    ] {
        let (code, reason) = close_code(&url);
        assert_eq!(code, 4001, "{url}");
        assert!(
            reason.contains(why),
            "{url}: reason {reason:?} should mention {why:?}"
        );
    }
    // Unauthenticated /route is refused too.
    assert_eq!(http_get(c.route.addr(), "/route?uid=eve").unwrap().0, 401);

    let (mut eve, _) = c.connect_user("eve");
    // An offline user's message is stored for it: confirmed, not refused.
    eve.send_json(&json!({"to": "ghost", "data": 1, "ref": "g"}))
        .unwrap();
    assert_eq!(eve.recv_text_json()["sent"], "g");
    eve.send_text("{not json").unwrap();
    assert_eq!(eve.recv_text_json()["error"]["code"], "bad_json");
    eve.send_json(&json!({"data": 1})).unwrap();
    assert_eq!(eve.recv_text_json()["error"]["code"], "bad_request");
    eve.send_binary(vec![0u8, 1, 2]).unwrap();
    assert_eq!(eve.recv_text_json()["error"]["code"], "bad_frame");
    // Still fine: a message to herself through the whole path.
    eve.send_json(&json!({"to": "eve", "data": "still here"}))
        .unwrap();
    assert_eq!(
        recv_until(&mut eve, Duration::from_secs(3), "eve still served", |v| v
            .get("from")
            .is_some())["data"],
        "still here"
    );
}

#[test]
fn percent_encoded_query_values_are_decoded() {
    // What URLSearchParams and encodeURIComponent send for a uid with @
    // and : (both allowed in a uid).
    let c = Cluster::start(1, 1, 1, "");
    let uid = "ann@example.com:phone";
    let token = swocloud::auth::mint(SECRET.as_bytes(), uid, "user", 600);
    let (st, _, body) = http_get(
        c.route.addr(),
        &format!("/route?uid=ann%40example.com%3Aphone&token={token}"),
    )
    .unwrap();
    assert_eq!(st, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    let im = format!("ws://{}:{}/", r["ip"].as_str().unwrap(), r["port"]);
    let mut ws = ws_connect(&format!(
        "{im}?uid=ann%40example.com%3Aphone&token={}",
        r["token"].as_str().unwrap()
    ))
    .unwrap();
    let welcome = ws.recv_text_json();
    assert_eq!(
        (&welcome["method"], &welcome["uid"]),
        (&json!("welcome"), &json!(uid)),
        "{welcome}"
    );
    let (st, v) = c.api_send(uid, json!("hi"));
    assert_eq!((st, &v["status"]), (200, &json!("delivered")), "{v}");
    assert_eq!(ws.recv_text_json()["data"], "hi");
    let (st, _, body) =
        http_get(c.route.addr(), "/api/online?uid=ann%40example.com%3Aphone").unwrap();
    assert_eq!(st, 200);
    assert!(body.contains(r#""online":true"#), "{body}");
}
