//! The worker's non-blocking Redis client against a real private Redis,
//! behind a fault proxy that delays or black-holes replies: the loop keeps
//! serving while Redis is slow, every callback fires (with an error when
//! Redis is gone), durable requests survive an outage, and a silent
//! pub/sub link is found by its probe while `/ready` says so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic by design

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::inproc::InProc;
use common::proxy::{FaultProxy, Mode};
use common::{http_get, wait_for, wait_until, RedisServer};
use swocloud::config::Settings;
use swocloud::event::App;
use swocloud::reactor::redis::{Request, Script};
use swocloud::reactor::{Request as HttpRequest, Response, Server};

/// A key-value app over the worker's Redis client.
#[derive(Default)]
struct Kv {
    got: HashMap<String, Vec<String>>, // pub/sub payloads by channel
}

fn query(path: &str) -> HashMap<String, String> {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn answer(srv: &mut Server<Kv>, fd: u64, r: redis::RedisResult<String>) {
    let resp = match r {
        Ok(v) => Response::text(200, &v),
        Err(e) => Response::text(503, &format!("redis: {e}")),
    };
    srv.respond(fd, resp);
}

impl App for Kv {
    fn on_request(&mut self, srv: &mut Server<Self>, req: &HttpRequest) -> Response {
        let q = query(&req.path);
        let arg = |k: &str| q.get(k).cloned().unwrap_or_default();
        let fd = req.fd;
        let path = req.path.split('?').next().unwrap_or("");
        match path {
            "/health" => Response::text(200, "ok"),
            "/ready" => match srv.redis_ready() {
                Ok(()) => Response::text(200, "ready"),
                Err(why) => Response::text(503, why),
            },
            "/set" => {
                let mut c = redis::cmd("SET");
                c.arg(arg("k")).arg(arg("v"));
                srv.redis(c, move |_: &mut Kv, srv, r: redis::RedisResult<String>| {
                    answer(srv, fd, r)
                });
                Response::later()
            }
            "/get" => {
                let mut c = redis::cmd("GET");
                c.arg(arg("k"));
                srv.redis(
                    c,
                    move |_: &mut Kv, srv, r: redis::RedisResult<Option<String>>| {
                        answer(srv, fd, r.map(|v| v.unwrap_or_else(|| "(nil)".into())))
                    },
                );
                Response::later()
            }
            // n INCRs, each its own request: the replies must come back in order.
            "/seq" => {
                let n: usize = arg("n").parse().unwrap_or(1);
                let key = arg("k");
                let state = std::rc::Rc::new(std::cell::RefCell::new((Vec::new(), 0usize)));
                for _ in 0..n {
                    let st = state.clone();
                    let mut c = redis::cmd("INCR");
                    c.arg(&key);
                    srv.redis(c, move |_: &mut Kv, srv, r: redis::RedisResult<i64>| {
                        let mut s = st.borrow_mut();
                        s.1 += 1;
                        if let Ok(v) = r {
                            s.0.push(v);
                        }
                        if s.1 == n {
                            let ok = s.0.len() == n && s.0.windows(2).all(|w| w[1] == w[0] + 1);
                            let body = format!(
                                "{} {}",
                                if ok { "in-order" } else { "OUT-OF-ORDER" },
                                s.0.len()
                            );
                            srv.respond(
                                fd,
                                Response::text(if s.0.len() == n { 200 } else { 503 }, &body),
                            );
                        }
                    });
                }
                Response::later()
            }
            "/pipe" => {
                let mut p = redis::pipe();
                p.cmd("SET").arg("pk").arg("pv").cmd("GET").arg("pk");
                srv.redis(
                    Request::Atomic(p),
                    move |_: &mut Kv, srv, r: redis::RedisResult<(String, String)>| {
                        answer(srv, fd, r.map(|(a, b)| format!("{a} {b}")))
                    },
                );
                Response::later()
            }
            "/script" => {
                let s = Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
                srv.redis(
                    s.call().key(arg("k")).arg(5),
                    move |_: &mut Kv, srv, r: redis::RedisResult<i64>| {
                        answer(srv, fd, r.map(|v| v.to_string()))
                    },
                );
                Response::later()
            }
            "/durable" => {
                let mut c = redis::cmd("RPUSH");
                c.arg(arg("k")).arg(arg("v"));
                srv.redis_durable(c);
                Response::text(200, "queued")
            }
            "/sub" => {
                let ch = arg("ch");
                let name = ch.clone();
                srv.redis_subscribe(ch.into_bytes(), move |app: &mut Kv, _srv, payload| {
                    app.got
                        .entry(name.clone())
                        .or_default()
                        .push(String::from_utf8_lossy(payload).into_owned());
                });
                Response::text(200, "subscribed")
            }
            "/got" => Response::text(
                200,
                &self
                    .got
                    .get(&arg("ch"))
                    .map(|v| v.join(","))
                    .unwrap_or_default(),
            ),
            "/backlog" => {
                let (p, q) = srv.redis_backlog();
                Response::text(200, &format!("{p} {q}"))
            }
            _ => Response::text(404, "no"),
        }
    }
}

fn start(url: &str, timeout: f64) -> InProc {
    let s = Settings {
        redis_url: Some(url.to_string()),
        redis_timeout: timeout,
        ..Settings::default()
    };
    InProc::start(s, Kv::default)
}

#[track_caller]
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (status, body)
}

fn upstream(r: &RedisServer) -> SocketAddr {
    format!("127.0.0.1:{}", r.port()).parse().unwrap()
}

#[test]
fn commands_pipelines_scripts_and_order() {
    let redis = RedisServer::start();
    let w = start(&redis.url(), 3.0);
    wait_until(Duration::from_secs(5), "ready", || {
        get(w.addr(), "/ready").0 == 200
    });
    assert_eq!(get(w.addr(), "/set?k=a&v=1"), (200, "OK".into()));
    assert_eq!(get(w.addr(), "/get?k=a"), (200, "1".into()));
    assert_eq!(get(w.addr(), "/get?k=nope"), (200, "(nil)".into()));
    assert_eq!(
        get(w.addr(), "/seq?k=n&n=500"),
        (200, "in-order 500".into())
    );
    assert_eq!(get(w.addr(), "/pipe"), (200, "OK pv".into()));
    assert_eq!(get(w.addr(), "/script?k=s"), (200, "5".into()));
    // The server forgets its scripts: the client falls back to EVAL.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.client())
        .unwrap();
    assert_eq!(get(w.addr(), "/script?k=s"), (200, "10".into()));
    // A wrong type is an error reply to that request only.
    assert_eq!(get(w.addr(), "/seq?k=a&n=1").0, 200);
    let (st, body) = get(w.addr(), "/script?k=a"); // INCRBY on "2" works; make it a list
    assert_eq!(st, 200, "{body}");
    let _: () = redis::cmd("RPUSH")
        .arg("l")
        .arg("x")
        .query(&mut redis.client())
        .unwrap();
    let (st, body) = get(w.addr(), "/get?k=l");
    assert_eq!(st, 503);
    assert!(body.contains("WRONGTYPE"), "{body}");
    assert_eq!(
        get(w.addr(), "/get?k=a").0,
        200,
        "the link survives a server error"
    );
}

#[test]
fn a_slow_redis_never_stalls_the_loop() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis));
    let w = start(&proxy.url(), 3.0);
    wait_until(Duration::from_secs(5), "ready", || {
        get(w.addr(), "/ready").0 == 200
    });
    proxy.set(Mode::Delay(Duration::from_millis(300)));
    // Twenty requests wait on Redis at once, on their own connections.
    let addr = w.addr();
    let waiting: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || (Instant::now(), get(addr, &format!("/seq?k=slow{i}&n=50"))))
        })
        .collect();
    wait_until(Duration::from_secs(5), "requests in flight", || {
        get(w.addr(), "/backlog").1.split(' ').next().unwrap_or("0") != "0"
    });
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get(w.addr(), "/health").0, 200);
        worst = worst.max(t.elapsed());
    }
    assert!(
        worst < Duration::from_millis(50),
        "/health took {worst:?} while Redis was slow"
    );
    for h in waiting {
        let (began, (status, body)) = h.join().unwrap();
        assert_eq!((status, body.as_str()), (200, "in-order 50"));
        assert!(
            began.elapsed() >= Duration::from_millis(300),
            "the delay applied"
        );
    }
}

#[test]
fn redis_killed_in_flight_fails_every_callback_and_durable_work_waits() {
    let mut redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis));
    let w = start(&proxy.url(), 10.0);
    wait_until(Duration::from_secs(5), "ready", || {
        get(w.addr(), "/ready").0 == 200
    });
    proxy.set(Mode::Delay(Duration::from_millis(1500)));
    let addr = w.addr();
    let waiting: Vec<_> = (0..5)
        .map(|i| std::thread::spawn(move || get(addr, &format!("/get?k=k{i}"))))
        .collect();
    wait_until(Duration::from_secs(5), "5 in flight", || {
        get(w.addr(), "/backlog").1 == "5 0"
    });
    redis.stop();
    let t = Instant::now();
    for h in waiting {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 503, "{body}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "errors came without waiting for redis_timeout"
    );
    proxy.set(Mode::Pass);
    // Down: plain requests fail at once, durable ones wait.
    wait_until(Duration::from_secs(5), "not ready", || {
        get(w.addr(), "/ready").0 == 503
    });
    assert_eq!(get(w.addr(), "/get?k=x").0, 503);
    for v in ["a", "b", "c"] {
        assert_eq!(get(w.addr(), &format!("/durable?k=q&v={v}")).0, 200);
    }
    assert_eq!(get(w.addr(), "/backlog").1, "0 3");
    assert_eq!(
        get(w.addr(), "/health").0,
        200,
        "the loop serves without Redis"
    );
    redis.restart();
    wait_until(Duration::from_secs(10), "ready again", || {
        get(w.addr(), "/ready").0 == 200
    });
    let list: Vec<String> = wait_for(Duration::from_secs(5), "durable work applied", || {
        let l: Vec<String> = redis::cmd("LRANGE")
            .arg("q")
            .arg(0)
            .arg(-1)
            .query(&mut redis.client())
            .ok()?;
        (l.len() == 3).then_some(l)
    });
    assert_eq!(list, ["a", "b", "c"], "applied once each, in order");
    wait_until(Duration::from_secs(2), "the retries counted", || {
        w.row
            .redis_retried
            .load(std::sync::atomic::Ordering::Relaxed)
            == 3
    });
}

#[test]
fn a_black_holed_link_times_out_and_a_silent_subscriber_is_probed() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis));
    let w = start(&proxy.url(), 1.0);
    assert_eq!(get(w.addr(), "/sub?ch=news").0, 200);
    wait_until(Duration::from_secs(8), "ready (probe verified)", || {
        get(w.addr(), "/ready").0 == 200
    });
    let publish = |m: &str| -> i64 {
        redis::cmd("PUBLISH")
            .arg("news")
            .arg(m)
            .query(&mut redis.client())
            .unwrap()
    };
    assert_eq!(publish("one"), 1);
    wait_until(Duration::from_secs(5), "message", || {
        get(w.addr(), "/got?ch=news").1 == "one"
    });
    proxy.set(Mode::BlackHole);
    let t = Instant::now();
    let (status, body) = get(w.addr(), "/get?k=a");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("timeout"), "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "redis_timeout bounds the wait"
    );
    wait_until(
        Duration::from_secs(10),
        "/ready not green while the links are silent",
        || get(w.addr(), "/ready").0 == 503,
    );
    wait_until(Duration::from_secs(10), "the probe failed", || {
        w.row
            .redis_probe_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    });
    assert_eq!(get(w.addr(), "/health").0, 200);
    proxy.set(Mode::Pass);
    wait_until(Duration::from_secs(15), "ready again", || {
        get(w.addr(), "/ready").0 == 200
    });
    assert!(publish("two") >= 1, "resubscribed");
    wait_until(
        Duration::from_secs(5),
        "message after the reconnect",
        || get(w.addr(), "/got?ch=news").1 == "one,two",
    );
}
