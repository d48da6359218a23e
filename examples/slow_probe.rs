//! Measures how a cluster answers while Redis is slow (scripts/bench_slow_redis.sh):
//! connects `--idle` users to an IM server, then for `--seconds` alternates
//! a `GET /health` on the Route and a WebSocket ping on an idle user, and
//! prints `RESULT {json}` with p50/p99/max of each (ms) and the failures.
//!
//! With `--ctl FILE` and one or more `--phase NAME=COMMAND`, the users are
//! connected once (before the first phase), then for each phase COMMAND is
//! written as a line to FILE (the fault proxy's control FIFO: `pass`,
//! `delay 300`) and the phase is measured for `--seconds`, printing
//! `RESULT NAME {json}`: the idle users were connected while Redis was
//! fast, as they would be before a latency spike.
//!
//! ```sh
//! slow_probe --route 127.0.0.1:9500 --im ws://127.0.0.2:9000/ --idle 50 --seconds 10
//! slow_probe ... --ctl /tmp/x/proxy.ctl --phase fast=pass --phase slow='delay 300'
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::Message;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Every value of a repeatable option.
fn args_all(name: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].clone())
        .collect()
}
fn health(route: &str) -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(route).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    buf.starts_with(b"HTTP/1.1 200").then(|| t.elapsed())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

fn main() {
    let route = arg("--route", "127.0.0.1:9500");
    let im = arg("--im", "ws://127.0.0.2:9000/");
    let idle: usize = arg("--idle", "50").parse().unwrap_or(50);
    let secs: f64 = arg("--seconds", "10").parse().unwrap_or(10.0);
    let prefix = arg("--uid-prefix", "probe");
    let ctl = arg("--ctl", "");
    let mut users = Vec::new();
    for i in 0..idle {
        let url = format!("{im}?uid={prefix}{i}");
        match tungstenite::connect(url.as_str()) {
            Ok((ws, _)) => users.push(ws),
            Err(e) => eprintln!("slow_probe: connect {url}: {e}"),
        }
    }
    for ws in &mut users {
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        }
    }
    let phases = args_all("--phase");
    if phases.is_empty() || ctl.is_empty() {
        let r = measure(&route, &mut users, secs);
        println!("RESULT {r}");
        return;
    }
    for ph in phases {
        let (name, cmd) = ph.split_once('=').unwrap_or((ph.as_str(), "pass"));
        let sent = std::fs::OpenOptions::new()
            .append(true)
            .open(&ctl)
            .and_then(|mut f| writeln!(f, "{cmd}"));
        if let Err(e) = sent {
            eprintln!("slow_probe: cannot write {cmd:?} to {ctl}: {e}");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(100)); // the proxy has read it
        let r = measure(&route, &mut users, secs);
        println!("RESULT {name} {r}");
    }
}

/// One phase: `/health` and pings alternately for `secs`; the JSON figures.
fn measure(route: &str, users: &mut [Ws], secs: f64) -> String {
    let (mut h, mut p) = (Vec::new(), Vec::new());
    let (mut h_fail, mut p_fail) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut i = 0usize;
    println!("MEASURE start");
    while t0.elapsed().as_secs_f64() < secs {
        match health(route) {
            Some(d) => h.push(d.as_secs_f64() * 1e3),
            None => h_fail += 1,
        }
        if !users.is_empty() {
            let n = users.len();
            let ws = &mut users[i % n];
            i += 1;
            let t = Instant::now();
            let ok = ws.send(Message::Ping(vec![1u8].into())).is_ok()
                && loop {
                    match ws.read() {
                        Ok(Message::Pong(_)) => break true,
                        Ok(_) => continue,
                        Err(_) => break false,
                    }
                };
            if ok {
                p.push(t.elapsed().as_secs_f64() * 1e3);
            } else {
                p_fail += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = (h.len(), p.len());
    format!(
        "{{\"health_n\":{},\"health_p50_ms\":{:.2},\"health_p99_ms\":{:.2},\"health_max_ms\":{:.2},\"health_failed\":{},\"ping_n\":{},\"ping_p50_ms\":{:.2},\"ping_p99_ms\":{:.2},\"ping_max_ms\":{:.2},\"ping_failed\":{}}}",
        n.0,
        pct(&mut h, 0.5),
        pct(&mut h, 0.99),
        pct(&mut h, 1.0),
        h_fail,
        n.1,
        pct(&mut p, 0.5),
        pct(&mut p, 0.99),
        pct(&mut p, 1.0),
        p_fail
    )
}
