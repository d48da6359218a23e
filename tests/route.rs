//! The Route registry end to end: the real `swocloud` daemon, a private
//! Redis, and IM servers played by the seed's registration client
//! (`examples/seed_client`) as separate processes that can be killed,
//! frozen and thawed.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::seed::SeedClient;
use common::{http_get, pid_alive, wait_for, wait_until, ws_connect, RedisServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_swocloud");
const SEED: &str = r#"{"ip":"192.168.100.153","port":9000}"#;

/// Sweep every 0.5 s, drop after 1.5 s of silence: lease = 1.5 + 0.5 = 2 s.
const FAST: &str = "heartbeat_check_interval = 0.5\nheartbeat_idle_time = 1.5\ncache_refresh = 1.0";

fn route(redis: &RedisServer, extra: &str) -> Daemon {
    let d = Daemon::new(
        BIN,
        &format!(
            "worker_num = 2\nredis_url = \"{}\"\n{FAST}\n{extra}",
            redis.url()
        ),
    );
    d.start();
    d
}

fn members(redis: &RedisServer) -> Vec<String> {
    let mut v: Vec<String> = redis::cmd("SMEMBERS")
        .arg("im_server")
        .query(&mut redis.client())
        .unwrap_or_default();
    v.sort();
    v
}

fn details(redis: &RedisServer, member: &str) -> Option<serde_json::Value> {
    let j: Option<String> = redis::cmd("HGET")
        .arg("{im_server}:details")
        .arg(member)
        .query(&mut redis.client())
        .ok()?;
    j.and_then(|j| serde_json::from_str(&j).ok())
}

fn api_servers(d: &Daemon) -> serde_json::Value {
    let (status, _, body) = http_get(d.addr(), "/api/servers").expect("GET /api/servers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn the_seed_register_is_stored_in_the_seed_encoding_and_removed_on_sigkill() {
    let redis = RedisServer::start();
    let d = route(&redis, "");
    let im = SeedClient::start(&d, &[]);
    let reply: serde_json::Value = serde_json::from_str(&im.line()).unwrap();
    assert_eq!(reply["method"], "registered");
    assert_eq!(members(&redis), vec![SEED]);
    let entry = details(&redis, SEED).unwrap();
    assert_eq!(entry["serviceName"], "IM_1");
    wait_until(Duration::from_secs(3), "the cache lists it", || {
        api_servers(&d)["servers"][0]["serviceName"] == "IM_1"
    });

    im.proc.signal(Signal::SIGKILL).unwrap();
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(1),
        "entry gone within 1 s of the IM server's SIGKILL",
        || members(&redis).is_empty(),
    );
    eprintln!("detection after SIGKILL: {} ms", t0.elapsed().as_millis());
    assert_eq!(details(&redis, SEED), None);
    d.stop();
}

#[test]
fn a_frozen_im_server_is_dropped_after_the_idle_time() {
    let redis = RedisServer::start();
    let d = route(&redis, "");
    let im = SeedClient::start(
        &d,
        &["--name", "IM_F", "--ip", "127.0.0.2", "--port", "9100"],
    );
    assert!(im.line().contains("registered"));
    // Alive and pinging: still there after more than the idle time. The
    // sleep deliberately waits out that period (1.5 s idle + a sweep):
    // nothing happens, so there is no event to wait on.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(members(&redis).len(), 1, "a pinging server is kept");
    im.proc.signal(Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    wait_until(
        Duration::from_millis(1500 + 500 + 700),
        "a frozen server gone within idle time + one sweep",
        || members(&redis).is_empty(),
    );
    eprintln!("detection after SIGSTOP: {} ms", t0.elapsed().as_millis());
    im.proc.signal(Signal::SIGCONT).unwrap();
    d.stop();
}

#[test]
fn route_answers_from_the_picker_and_records_the_choice_with_its_expiry() {
    let redis = RedisServer::start();
    let d = route(&redis, "");
    let im = SeedClient::start(&d, &[]);
    assert!(im.line().contains("registered"));
    let body = wait_for(Duration::from_secs(3), "/route answers 200", || {
        let (status, _, body) = http_get(d.addr(), "/route?uid=alice").ok()?;
        (status == 200).then_some(body)
    });
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ip"], "192.168.100.153");
    assert_eq!(v["port"], 9000);
    assert_eq!(v["serviceName"], "IM_1");
    assert_eq!(v["url"], "ws://192.168.100.153:9000/?uid=alice");
    wait_until(Duration::from_secs(2), "im_route:{alice} written", || {
        redis::cmd("GET")
            .arg("im_route:{alice}")
            .query::<Option<String>>(&mut redis.client())
            .ok()
            .flatten()
            .as_deref()
            == Some(SEED)
    });
    let ttl: i64 = redis::cmd("TTL")
        .arg("im_route:{alice}")
        .query(&mut redis.client())
        .unwrap();
    assert!(ttl > 3000, "the record expires in an hour: {ttl}");
    d.stop();
}

/// Freezes `im` until it has left `SMEMBERS im_server` (idle 1.5 s + one
/// sweep, with margin); returns when it has.
fn freeze_until_gone(redis: &RedisServer, im: &SeedClient) {
    im.proc.signal(Signal::SIGSTOP).unwrap();
    wait_until(
        Duration::from_millis(1500 + 500 + 1000),
        "the frozen server leaves SMEMBERS im_server",
        || members(redis).is_empty(),
    );
}

#[test]
fn a_thawed_im_server_is_readmitted_on_its_old_connection_within_the_grace_time() {
    let redis = RedisServer::start();
    let d = route(&redis, "heartbeat_grace_time = 4.0");
    let mut im = SeedClient::start(&d, &["--name", "IM_T"]);
    assert!(im.line().contains("registered"));
    let before = details(&redis, SEED).expect("registered");
    assert_eq!(
        common::metric(d.addr(), "swocloud_route_readmissions_total"),
        Some(0.0)
    );

    freeze_until_gone(&redis, &im);
    assert_eq!(
        details(&redis, SEED),
        None,
        "out of the registry while silent"
    );
    // Within the grace time (4 s from leaving): thaw, and it is back within
    // one heartbeat (its ping every 300 ms + one 500 ms sweep, with margin).
    im.proc.signal(Signal::SIGCONT).unwrap();
    let t0 = Instant::now();
    wait_until(
        Duration::from_millis(300 + 500 + 700),
        "the thawed server is back in SMEMBERS im_server",
        || members(&redis) == vec![SEED],
    );
    eprintln!("re-admitted {} ms after SIGCONT", t0.elapsed().as_millis());
    let after = details(&redis, SEED).expect("back");
    for field in ["serviceName", "epoch", "owner", "registered_at_ms"] {
        assert_eq!(after[field], before[field], "the old registration: {field}");
    }
    // The same TCP connection: the seed client exits when its connection
    // ends and never reconnects, and it printed nothing since (no close,
    // no second "registered").
    assert!(
        im.proc.try_wait().is_none(),
        "the client is still connected"
    );
    assert!(
        im.lines.try_recv().is_err(),
        "no frame since the registration"
    );
    assert_eq!(
        common::metric(d.addr(), "swocloud_route_readmissions_total"),
        Some(1.0)
    );
    assert!(d.log().contains("re-admitted IM_T"), "logged at info");
    // It stays: its lease is renewed across two more idle periods, and it
    // never leaves the set meanwhile.
    let seen = after["last_seen_ms"].as_u64().unwrap();
    wait_until(Duration::from_secs(6), "renewed for 3 s more", || {
        assert_eq!(members(&redis), vec![SEED], "stays in the set");
        details(&redis, SEED).and_then(|e| e["last_seen_ms"].as_u64()) >= Some(seen + 3000)
    });
    d.stop();
}

#[test]
fn a_silent_im_server_stays_out_across_a_reload_and_is_readmitted_after_it() {
    let redis = RedisServer::start();
    let d = route(&redis, "heartbeat_grace_time = 20.0");
    let mut im = SeedClient::start(&d, &["--name", "IM_R"]);
    assert!(im.line().contains("registered"));
    let before = details(&redis, SEED).expect("registered");
    freeze_until_gone(&redis, &im);
    // A rolling reload moves the silent connection to a new worker, which
    // must keep it silent (out of the registry), not store it again.
    d.reload_workers();
    // Two sweeps of the new workers (0.5 s each) with margin: still out.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(members(&redis).is_empty(), "a silent server stays out");
    im.proc.signal(Signal::SIGCONT).unwrap();
    wait_until(
        Duration::from_millis(300 + 500 + 700),
        "the thawed server is back in SMEMBERS im_server",
        || members(&redis) == vec![SEED],
    );
    let after = details(&redis, SEED).expect("back");
    for field in ["serviceName", "epoch", "registered_at_ms"] {
        assert_eq!(after[field], before[field], "the old registration: {field}");
    }
    assert!(im.proc.try_wait().is_none(), "the same connection");
    assert!(
        im.lines.try_recv().is_err(),
        "no frame since the registration"
    );
    d.stop();
}

#[test]
fn an_im_server_frozen_beyond_the_grace_time_is_closed() {
    let redis = RedisServer::start();
    let d = route(&redis, "heartbeat_grace_time = 3.0");
    let mut im = SeedClient::start(&d, &["--name", "IM_G"]);
    assert!(im.line().contains("registered"));
    freeze_until_gone(&redis, &im);
    let t0 = Instant::now();
    wait_until(
        Duration::from_millis(3000 + 2 * 500 + 3000),
        "the Route closes the connection after the grace time",
        || d.log().contains("after it left the registry; closing it"),
    );
    eprintln!(
        "closed {} ms after leaving the registry",
        t0.elapsed().as_millis()
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(2500),
        "not before the grace time"
    );
    im.proc.signal(Signal::SIGCONT).unwrap();
    assert!(
        im.proc.wait_timeout(Duration::from_secs(5)).is_some(),
        "the thawed client finds its connection closed and exits"
    );
    assert!(members(&redis).is_empty(), "never re-admitted");
    assert_eq!(
        common::metric(d.addr(), "swocloud_route_readmissions_total"),
        Some(0.0)
    );
    d.stop();
}

/// The Route worker (pid) holding `member`, from its registry owner.
fn owner_pid(redis: &RedisServer, member: &str) -> i32 {
    details(redis, member).unwrap()["owner"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Two seed clients registered through two different workers of `d`:
/// (client, member, owner pid) each.
fn on_two_workers(d: &Daemon, redis: &RedisServer) -> [(SeedClient, String, i32); 2] {
    let a = SeedClient::start(
        d,
        &["--name", "IM_A", "--ip", "127.0.0.2", "--port", "9001"],
    );
    assert!(a.line().contains("registered"));
    let a_member = r#"{"ip":"127.0.0.2","port":9001}"#.to_string();
    let a_pid = owner_pid(redis, &a_member);
    for i in 0..40 {
        let (name, port) = (format!("IM_B{i}"), format!("{}", 9100 + i));
        let args = ["--name", &name, "--ip", "127.0.0.3", "--port", &port];
        let b = SeedClient::start(d, &args);
        assert!(b.line().contains("registered"));
        let m = format!(r#"{{"ip":"127.0.0.3","port":{port}}}"#);
        let pid = owner_pid(redis, &m);
        if pid != a_pid {
            return [(a, a_member, a_pid), (b, m, pid)];
        }
    }
    panic!("no client landed on the other worker");
}

#[test]
fn a_dead_route_worker_leaves_nothing_stale_and_touches_no_other_entry() {
    let redis = RedisServer::start();
    let d = route(&redis, "");
    let [(_a, a_member, a_pid), (_b, b_member, _)] = on_two_workers(&d, &redis);
    let a_member = a_member.as_str();
    let b_before = details(&redis, &b_member).unwrap();
    kill(Pid::from_raw(a_pid), Signal::SIGKILL).unwrap();
    let t0 = Instant::now();
    // Lease 2 s + one sweep of the surviving worker.
    wait_until(
        Duration::from_millis(2000 + 500 + 700),
        "A's entry reaped after its lease",
        || {
            assert!(
                members(&redis).contains(&b_member),
                "B must stay registered throughout"
            );
            !members(&redis).contains(&a_member.to_string())
        },
    );
    eprintln!(
        "lease reap after a Route worker's SIGKILL: {} ms",
        t0.elapsed().as_millis()
    );
    let b_after = details(&redis, &b_member).unwrap();
    assert_eq!(
        b_after["registered_at_ms"], b_before["registered_at_ms"],
        "B untouched"
    );
    assert_eq!(b_after["owner"], b_before["owner"]);
    d.stop();
}

/// `member`'s lease expiry in ms (its score in `{im_server}:lease`).
fn lease_until(redis: &RedisServer, member: &str) -> Option<u64> {
    redis::cmd("ZSCORE")
        .arg("{im_server}:lease")
        .arg(member)
        .query(&mut redis.client())
        .ok()?
}

fn now_ms() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    t.unwrap().as_millis() as u64
}

#[test]
fn an_outage_longer_than_the_lease_reaps_nobody_when_redis_is_back() {
    let mut redis = RedisServer::start();
    let d = route(&redis, "");
    let [(_a, a, _), (_b, b, _)] = on_two_workers(&d, &redis);
    let at = |r: &RedisServer, m: &str| details(r, m).unwrap()["registered_at_ms"].clone();
    let registered = [at(&redis, &a), at(&redis, &b)];
    let lapse = lease_until(&redis, &a)
        .max(lease_until(&redis, &b))
        .unwrap();
    // Down with its data saved: the leases it keeps lapse while it is away.
    let _ = redis::cmd("SHUTDOWN")
        .arg("SAVE")
        .query::<()>(&mut redis.client());
    wait_until(Duration::from_secs(5), "Redis down", || !redis.is_up());
    redis.stop();
    wait_until(Duration::from_secs(5), "both workers saw it", || {
        d.log().matches("Redis is unreachable").count() == 2
    });
    wait_until(Duration::from_secs(10), "every lease lapsed", || {
        now_ms() > lapse + 500
    });
    redis.restart();
    assert!(
        lease_until(&redis, &a).is_some_and(|t| t < now_ms()),
        "lapsed"
    );
    // Each worker renews its own before anyone reaps: nobody was gone.
    wait_until(Duration::from_secs(5), "both leases renewed", || {
        let now = now_ms();
        [&a, &b]
            .iter()
            .all(|m| lease_until(&redis, m).is_some_and(|t| t > now))
    });
    let reaped = common::metric(d.addr(), "swocloud_route_removals_total{cause=\"lease\"}");
    assert_eq!(reaped, Some(0.0), "{}", d.log());
    assert!(!d.log().contains("reaped"), "{}", d.log());
    let now = [at(&redis, &a), at(&redis, &b)];
    assert_eq!(now, registered, "the same registrations");
    d.stop();
}

#[test]
fn redis_restarted_empty_is_rebuilt_within_one_sweep() {
    let mut redis = RedisServer::start();
    let d = route(&redis, "");
    let im = SeedClient::start(&d, &[]);
    assert!(im.line().contains("registered"));
    redis.restart();
    assert!(members(&redis).is_empty(), "the restarted Redis is empty");
    let t0 = Instant::now();
    // One sweep (0.5 s) plus the worker's reconnect backoff.
    wait_until(Duration::from_millis(2000), "registry rebuilt", || {
        members(&redis) == vec![SEED.to_string()]
    });
    eprintln!(
        "rebuilt after an empty Redis restart in {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(details(&redis, SEED).unwrap()["serviceName"], "IM_1");
    d.stop();
}

#[test]
fn without_redis_the_route_serves_from_cache_and_recovers() {
    let mut redis = RedisServer::start();
    let d = route(&redis, "");
    let _a = SeedClient::start(
        &d,
        &["--name", "IM_1", "--ip", "127.0.0.2", "--port", "9001"],
    );
    let _b = SeedClient::start(
        &d,
        &["--name", "IM_2", "--ip", "127.0.0.3", "--port", "9001"],
    );
    wait_until(Duration::from_secs(5), "both listed", || {
        api_servers(&d)["count"] == 2
    });
    wait_until(Duration::from_secs(3), "ready", || {
        http_get(d.addr(), "/ready").map(|r| r.0).ok() == Some(200)
    });
    redis.stop();
    wait_until(Duration::from_secs(4), "/ready turns 503", || {
        http_get(d.addr(), "/ready").map(|r| r.0).ok() == Some(503)
    });
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let v = api_servers(&d);
        assert_eq!(v["count"], 2, "served from cache without Redis: {v}");
        assert_eq!(http_get(d.addr(), "/health").unwrap().0, 200);
        // Paces the checks over a 2 s window without Redis.
        std::thread::sleep(Duration::from_millis(100));
    }
    let master = d.master_pid().unwrap();
    assert!(
        pid_alive(master) && d.worker_pids().len() == 2,
        "nothing crashed"
    );
    redis.restart();
    wait_until(
        Duration::from_secs(5),
        "both re-registered in the new Redis",
        || members(&redis).len() == 2,
    );
    wait_until(Duration::from_secs(5), "/ready back to 200", || {
        http_get(d.addr(), "/ready").map(|r| r.0).ok() == Some(200)
    });
    assert!(
        d.log().matches("Redis is unreachable").count() <= 2,
        "logged once per outage per worker:\n{}",
        d.log()
    );
    d.stop();
}

#[test]
fn registration_needs_a_valid_token_when_auth_is_on() {
    let redis = RedisServer::start();
    let d = route(&redis, "auth_secret = \"s3cret\"");
    let good = swocloud::auth::mint(b"s3cret", "IM_1", "register", 60);
    let forged = swocloud::auth::mint(b"guess", "IM_1", "register", 60);
    let other = swocloud::auth::mint(b"s3cret", "IM_2", "register", 60);
    for args in [
        vec![],
        vec!["--token", forged.as_str()],
        vec!["--token", other.as_str()],
        vec!["--token", "garbage"],
    ] {
        let c = SeedClient::start(&d, &args);
        let reply: serde_json::Value = serde_json::from_str(&c.line()).unwrap();
        assert_eq!(reply["error"]["code"], "unauthorized", "{args:?}: {reply}");
        assert!(
            c.line().starts_with("CLOSED 1008"),
            "closed after unauthorized"
        );
        assert!(members(&redis).is_empty(), "nothing stored for {args:?}");
    }
    let c = SeedClient::start(&d, &["--token", good.as_str()]);
    assert!(c.line().contains("registered"));
    assert_eq!(members(&redis), vec![SEED]);
    d.stop();
}

#[test]
fn bad_frames_get_error_frames_and_nothing_is_stored() {
    let redis = RedisServer::start();
    let d = route(&redis, "package_max_length = 65536");
    let url = format!("ws://{}/", d.addr());
    let mut ws = ws_connect(&url).unwrap();
    let mut expect = |frame: Message, code: &str| {
        ws.send(frame).unwrap();
        let v = ws.recv_text_json();
        assert_eq!(v["error"]["code"], code, "{v}");
    };
    expect(Message::text("{nope"), "bad_json");
    expect(
        Message::text(r#"{"method":"__destruct"}"#),
        "unknown_method",
    );
    expect(
        Message::text(
            r#"{"method":"register","serviceName":"IM_1","ip":"127.0.0.2","port":"9000"}"#,
        ),
        "bad_request",
    );
    expect(Message::binary(vec![1, 2, 3]), "bad_frame");
    // The fifth bad frame closes the connection (policy violation).
    ws.send(Message::text("[]")).unwrap();
    assert_eq!(ws.recv_text_json()["error"]["code"], "bad_json");
    assert!(
        ws.wait_closed(Duration::from_secs(2)),
        "a peer that keeps sending garbage is closed"
    );
    assert!(members(&redis).is_empty());

    // Oversize frame: closed with 1009; the worker still serves.
    let mut ws = ws_connect(&url).unwrap();
    let _ = ws.send(Message::text("x".repeat(70_000)));
    let closed = loop {
        match ws.recv() {
            Ok(Message::Close(Some(c))) => break u16::from(c.code),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    };
    assert_eq!(closed, 1009);
    assert_eq!(http_get(d.addr(), "/health").unwrap().0, 200);
    let mut ok = ws_connect(&url).unwrap();
    ok.send_text(r#"{"method":"register","serviceName":"IM_9","ip":"127.0.0.9","port":9000}"#)
        .unwrap();
    assert_eq!(ok.recv_text_json()["method"], "registered");
    d.stop();
}
