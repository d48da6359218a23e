//! Operations end to end, the observable side: `/metrics` parsed by a
//! real Prometheus parser (Python's `prometheus_client`) while traffic
//! moves the counters, `/dashboard`, the Route's section of `status`, and
//! `/ready` following Redis (the rest of operations is `ops.rs`).

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::seed::SeedClient;
use common::{http_get, http_request, wait_for, wait_until, RedisServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_swocloud");
const FAST: &str = "heartbeat_check_interval = 0.5\nheartbeat_idle_time = 1.5\ncache_refresh = 1.0";

// ---------------------------------------------------------------------------
// /metrics, /dashboard, status
// ---------------------------------------------------------------------------

/// One sample as the Prometheus parser sees it.
#[derive(Debug, Clone)]
struct Sample {
    family_type: String,
    name: String,
    labels: serde_json::Map<String, Value>,
    value: f64,
}

/// Parses the exposition with `prometheus_client` (a parse error fails
/// the test).
fn parse_prometheus(text: &str) -> Vec<Sample> {
    const PY: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh installs it with prometheus_client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|s| Sample {
            family_type: s["type"].as_str().unwrap_or("").to_string(),
            name: s["name"].as_str().unwrap_or("").to_string(),
            labels: s["labels"].as_object().cloned().unwrap_or_default(),
            value: s["value"].as_f64().unwrap_or(f64::NAN),
        })
        .collect()
}

fn scrape(d: &Daemon) -> Vec<Sample> {
    let (status, _, body) = http_get(d.addr(), "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    parse_prometheus(&body)
}

/// The value of `name{labels}` (labels: a subset to match); panics if absent.
#[track_caller]
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).and_then(Value::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

#[test]
fn metrics_parse_as_prometheus_and_move_with_traffic() {
    let redis = RedisServer::start();
    let d = Daemon::new(
        BIN,
        &format!(
            "worker_num = 2\nredis_url = \"{}\"\napi_key = \"k3y\"\n{FAST}",
            redis.url()
        ),
    );
    d.start();

    let s = scrape(&d);
    let ty = |name: &str| {
        s.iter()
            .find(|x| x.name == name)
            .map(|x| x.family_type.clone())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(ty("swocloud_connections_open"), "gauge");
    assert_eq!(ty("swocloud_connections_accepted_total"), "counter");
    assert_eq!(ty("swocloud_http_responses_total"), "counter");
    assert_eq!(ty("swocloud_worker_rss_bytes"), "gauge");
    assert_eq!(ty("swocloud_route_removals_total"), "counter");
    let workers: Vec<&Sample> = s
        .iter()
        .filter(|x| x.name == "swocloud_worker_connections")
        .collect();
    assert_eq!(workers.len(), 2, "one series per worker");
    assert!(value(&s, "swocloud_worker_rss_bytes", &[("worker", "0")]) > 1e5);
    assert!(
        value(
            &s,
            "swocloud_process_resident_memory_bytes",
            &[("role", "master")]
        ) > 1e5
    );
    for name in [
        "swocloud_messages_received_total",
        "swocloud_messages_sent_total",
        "swocloud_connections_closed_total",
        "swocloud_worker_replacements_total",
        "swocloud_reloads_total",
        "swocloud_redis_errors_total",
        "swocloud_redis_reconnects_total",
        "swocloud_route_protocol_errors_total",
        "swocloud_route_auth_failures_total",
        "swocloud_route_rebuilt_entries_total",
    ] {
        assert_eq!(value(&s, name, &[]), 0.0, "{name} starts at 0");
    }
    assert_eq!(value(&s, "swocloud_worker_restarts_total", &[]), 0.0);

    // HTTP traffic: counted by class, summed over both workers (each
    // request is a new connection, so SO_REUSEPORT spreads them).
    let ok0 = value(&s, "swocloud_http_responses_total", &[("class", "2xx")]);
    for _ in 0..20 {
        assert_eq!(http_get(d.addr(), "/health").unwrap().0, 200);
    }
    assert_eq!(http_get(d.addr(), "/nope").unwrap().0, 404);
    assert_eq!(
        http_get(d.addr(), "/api/servers").unwrap().0,
        401,
        "the API needs the key"
    );
    let s = scrape(&d);
    let ok1 = value(&s, "swocloud_http_responses_total", &[("class", "2xx")]);
    assert!(ok1 >= ok0 + 20.0, "2xx {ok0} -> {ok1}");
    assert!(value(&s, "swocloud_http_responses_total", &[("class", "4xx")]) >= 2.0);
    let served: Vec<f64> = s
        .iter()
        .filter(|x| x.name == "swocloud_worker_requests_total")
        .map(|x| x.value)
        .collect();
    eprintln!("requests per worker after 23 requests + scrapes: {served:?}");

    // A registration, then its removal when the IM server closes.
    let mut im = SeedClient::start(&d, &[]);
    let reply = im.line();
    assert!(reply.contains("registered"), "{reply}");
    wait_until(
        Duration::from_secs(3),
        "registration counted, cache lists it",
        || {
            let s = scrape(&d);
            value(&s, "swocloud_route_registrations_total", &[]) == 1.0
                && value(&s, "swocloud_route_im_servers", &[]) == 1.0
                && value(&s, "swocloud_messages_received_total", &[]) >= 1.0
                && value(&s, "swocloud_connections_open", &[]) >= 1.0
        },
    );

    // status: the process table plus the Route's section (with the key).
    let st = d.status();
    assert_eq!(st["im_servers"][0]["serviceName"], "IM_1", "{st}");
    assert_eq!(st["redis"]["ready"], true, "{st}");
    let out = d.run("status", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("IM servers: 1") && text.contains("IM_1"),
        "{text}"
    );
    assert!(text.contains("Redis: ok"), "{text}");

    im.proc.signal(Signal::SIGKILL).unwrap();
    let _ = im.proc.wait_timeout(Duration::from_secs(2));
    wait_until(
        Duration::from_secs(3),
        "removal{cause=closed} counted",
        || {
            let s = scrape(&d);
            value(&s, "swocloud_route_removals_total", &[("cause", "closed")]) == 1.0
        },
    );

    // A worker killed with SIGKILL: respawned and counted; its counters
    // survive in the retired totals (counters never go backwards).
    let before = scrape(&d);
    let accepted0 = value(&before, "swocloud_connections_accepted_total", &[]);
    let victim = d.worker_pids()[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(5), "worker_restarts_total 1", || {
        let s = scrape(&d);
        value(&s, "swocloud_worker_restarts_total", &[]) == 1.0
            && s.iter()
                .filter(|x| x.name == "swocloud_worker_connections")
                .count()
                == 2
    });
    let s = scrape(&d);
    assert!(value(&s, "swocloud_connections_accepted_total", &[]) >= accepted0);
    assert_eq!(value(&s, "swocloud_route_registrations_total", &[]), 1.0);
    assert_eq!(
        value(&s, "swocloud_route_removals_total", &[("cause", "closed")]),
        1.0
    );
    assert!(
        !s.iter()
            .any(|x| x.labels.get("pid").and_then(Value::as_str) == Some(&victim.to_string())),
        "the dead worker's series are gone"
    );

    // The dashboard: open, HTML, nothing fetched from elsewhere.
    let (status, headers, body) = http_get(d.addr(), "/dashboard").unwrap();
    assert_eq!(status, 200);
    let ctype = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let lower = body.to_lowercase();
    assert!(lower.starts_with("<!doctype html>"));
    for external in [
        "http://",
        "https://",
        "<script src",
        "<link",
        "@import",
        "url(",
    ] {
        assert!(
            !lower.contains(external),
            "the dashboard must be self-contained: {external}"
        );
    }
    for endpoint in ["\"/metrics\"", "\"/api/servers\"", "\"/ready\""] {
        assert!(body.contains(endpoint), "the dashboard polls {endpoint}");
    }
    // The API with the key works (what the dashboard does with #key=).
    let (status, _, _) = http_request(
        d.addr(),
        "GET",
        "/api/servers",
        &[("Authorization", "Bearer k3y")],
        b"",
    )
    .unwrap();
    assert_eq!(status, 200);
    d.stop();
}

// ---------------------------------------------------------------------------
// /ready follows Redis
// ---------------------------------------------------------------------------

/// `n` consecutive answers of `/ready` (new connections, so both workers
/// answer some) all have `status`.
fn ready_is(d: &Daemon, status: u16, n: usize) -> bool {
    (0..n).all(|_| http_get(d.addr(), "/ready").map(|r| r.0).ok() == Some(status))
}

#[test]
fn ready_turns_503_within_3s_of_redis_failing_and_200_after_it_returns() {
    let mut redis = RedisServer::start();
    // The Route's default timings (3 s sweeps, 5 s cache refresh): the
    // registry cache notices a dead Redis at once, not at its next sweep.
    let d = Daemon::new(
        BIN,
        &format!("worker_num = 2\nredis_url = \"{}\"", redis.url()),
    );
    d.start();
    wait_until(Duration::from_secs(5), "/ready 200", || {
        ready_is(&d, 200, 4)
    });

    redis.stop();
    let t0 = Instant::now();
    wait_until(Duration::from_secs(3), "/ready 503 on every worker", || {
        ready_is(&d, 503, 6)
    });
    eprintln!(
        "/ready turned 503 {} ms after Redis died",
        t0.elapsed().as_millis()
    );
    let (_, _, body) = http_get(d.addr(), "/ready").unwrap();
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["ready"], false);
    assert!(
        !doc["reasons"].as_array().unwrap().is_empty(),
        "503 says why: {doc}"
    );
    let st = d.status();
    assert_eq!(st["redis"]["ready"], false, "status shows the outage: {st}");
    // Stay down until the workers' own links have failed too (their next
    // sweep, within 3 s), so the return is a reconnect of every link.
    wait_until(
        Duration::from_secs(10),
        "every worker's Redis link down",
        || {
            let s = scrape(&d);
            let up: Vec<f64> = s
                .iter()
                .filter(|x| x.name == "swocloud_worker_redis_up")
                .map(|x| x.value)
                .collect();
            up.len() == 2 && up.iter().all(|&v| v == 0.0)
        },
    );

    redis.restart();
    let t0 = Instant::now();
    wait_until(Duration::from_secs(10), "/ready back to 200", || {
        ready_is(&d, 200, 6)
    });
    eprintln!(
        "/ready back to 200 {} ms after Redis returned",
        t0.elapsed().as_millis()
    );
    let s = wait_for(Duration::from_secs(10), "a reconnect counted", || {
        let s = scrape(&d);
        (value(&s, "swocloud_redis_reconnects_total", &[]) >= 1.0).then_some(s)
    });
    assert!(value(&s, "swocloud_redis_errors_total", &[]) >= 1.0);
    d.stop();
}
