//! A rogue IM server without the secret: it cannot register, cannot
//! receive users' messages, and cannot make the Route deliver to it.
//!
//! A cluster with `auth_secret` (a Route, one real IM server, a private
//! Redis) and a rogue WebSocket client that tries every frame of the
//! protocol — register without a token, with forged tokens (wrong secret,
//! `alg: none`, a user's own valid token, a real server's name), then
//! `forward`, `heartbeat`, `draining` and fake `deliver`/`broadcast`
//! frames — and also dials the IM server as a user with forged tokens.
//! Asserted: Redis holds only the real server, no user message reaches a
//! rogue socket, and `/api/send` reaches only the real user.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, SECRET};
use common::{ws_connect, WsClient};
use serde_json::{json, Value};
use tungstenite::Message;

/// Every text frame until the peer closes or `quiet` passes with nothing;
/// and the close code, if any.
fn drain(ws: &mut WsClient, quiet: Duration) -> (Vec<String>, Option<u16>) {
    let mut texts = Vec::new();
    loop {
        match ws.recv_timeout(quiet) {
            Ok(Message::Text(t)) => texts.push(t.to_string()),
            Ok(Message::Close(f)) => return (texts, f.map(|f| u16::from(f.code))),
            Ok(_) => {}
            Err(_) => return (texts, None),
        }
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn register_frame(name: &str, token: Option<&str>) -> Value {
    let mut v = json!({"method":"register","serviceName":name,"ip":"127.0.0.66","port":9666});
    if let Some(t) = token {
        v["token"] = json!(t);
    }
    v
}

#[test]
fn a_rogue_without_the_secret_registers_nothing_and_receives_nothing() {
    let c = Cluster::start(1, 1, 1, "max_bad_frames = 50");
    let route_url = format!("ws://{}/", c.route.addr());
    let real_member = c.servers()["servers"][0]["ip"].clone();
    let exp = swocloud::auth::unix_now() + 3600;
    let forged = [
        None,
        Some(swocloud::auth::mint(
            b"not-the-secret",
            "IM_0",
            "register",
            600,
        )),
        Some(format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"sub":"IM_0","aud":"register","exp":{exp}}}"#))
        )),
        // A user's genuine token (users are handed these) used to register.
        Some(swocloud::auth::mint(SECRET.as_bytes(), "IM_0", "user", 600)),
        Some("a.b.c".to_string()),
    ];
    let mut seen: Vec<String> = Vec::new();
    for (i, token) in forged.iter().enumerate() {
        for name in ["IM_0", "IM_rogue"] {
            let mut rogue = ws_connect(&route_url).unwrap();
            rogue
                .send_json(&register_frame(name, token.as_deref()))
                .unwrap();
            let (texts, code) = drain(&mut rogue, Duration::from_secs(2));
            assert!(
                texts.iter().any(|t| t.contains("unauthorized")),
                "forgery {i} as {name}: {texts:?}"
            );
            assert_eq!(code, Some(1008), "forgery {i} as {name}");
            seen.extend(texts);
        }
    }
    // Unregistered frames of every kind on one rogue connection.
    let mut rogue = ws_connect(&route_url).unwrap();
    for f in [
        json!({"method":"forward","to":"u1","from":"rogue","data":"x"}),
        json!({"method":"heartbeat","load":0}),
        json!({"method":"draining"}),
        json!({"method":"deliver","to":"u1","from":"rogue","data":"x"}),
        json!({"method":"broadcast","from":"rogue","data":"x"}),
        json!({"method":"registered","serviceName":"IM_rogue"}),
    ] {
        rogue.send_json(&f).unwrap();
    }
    // A rogue "user" on the IM server itself with forged tokens.
    let im = c.ims[0].addr();
    let mut fake_users = Vec::new();
    for token in [
        String::new(),
        swocloud::auth::mint(b"not-the-secret", "u1", "user", 600),
        swocloud::auth::mint(SECRET.as_bytes(), "u1", "register", 600),
    ] {
        match ws_connect(&format!("ws://{im}/?uid=u1&token={token}")) {
            Ok(mut ws) => {
                let (texts, code) = drain(&mut ws, Duration::from_secs(2));
                assert_eq!(code, Some(4001), "forged user token {token:?}: {texts:?}");
                seen.extend(texts);
                fake_users.push(ws);
            }
            Err(e) => panic!("the IM server should answer the upgrade, then close: {e}"),
        }
    }

    // The real user, and messages for it.
    let (mut user, r) = c.connect_user("u1");
    assert_eq!(r["serviceName"], "IM_0");
    let mut got = Vec::new();
    for k in 0..5 {
        let (status, body) = c.api_send("u1", json!({"id": k}));
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("delivered")),
            "{body}"
        );
    }
    let t0 = Instant::now();
    while got.len() < 5 && t0.elapsed() < Duration::from_secs(5) {
        if let Ok(Message::Text(t)) = user.recv_timeout(Duration::from_millis(500)) {
            got.push(t.to_string());
        }
    }
    assert_eq!(got.len(), 5, "the real user got every message: {got:?}");

    let (texts, _) = drain(&mut rogue, Duration::from_secs(1));
    seen.extend(texts);
    for t in &seen {
        let v: Value = serde_json::from_str(t).unwrap_or(Value::Null);
        assert!(
            v.get("error").is_some(),
            "a rogue socket got something other than an error: {t}"
        );
        assert!(!t.contains("\"id\""), "a user message leaked: {t}");
    }

    // Redis: exactly the real server, under its own name.
    let mut con = c.redis.client();
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("im_server")
        .query(&mut con)
        .unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert!(!members[0].contains("127.0.0.66"), "{members:?}");
    assert!(members[0].contains(real_member.as_str().unwrap()));
    let details: Vec<String> = redis::cmd("HKEYS")
        .arg("{im_server}:details")
        .query(&mut con)
        .unwrap();
    assert_eq!(details, members);
    let by_name: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("{im_server}:by_name")
        .query(&mut con)
        .unwrap();
    assert_eq!(by_name.len(), 1, "{by_name:?}");
    assert_eq!(by_name.get("IM_0"), Some(&members[0]));
    assert!(c.route.log().contains("unauthorized register"));
}
