//! Simulated IM users for `scripts/soak.sh` (a dev tool on tokio +
//! tokio-tungstenite): `--users` users each ask the Route's `/route` for a
//! server (with a user token minted from `--secret`), connect, send a
//! message to a random other user every `--every` seconds, count what they
//! receive, and reconnect after a random lifetime of up to `--lifetime`
//! seconds — for `--duration` seconds. Source addresses rotate over
//! `--src-ips` (loopback only). Prints `RESULT {json}` at the end.
//!
//! ```text
//! im_users --route 127.0.0.1:9500 --secret s --users 2000 --duration 600
//! ```

// A dev tool: a bad argument or no runtime ends it with a message.
#![allow(clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug, Clone)]
#[command(about = "Simulated IM users: route, connect, chat, reconnect")]
struct Cli {
    /// The Route's HTTP address (loopback).
    #[arg(long)]
    route: SocketAddr,
    /// The cluster's auth_secret (to mint user tokens).
    #[arg(long, default_value = "")]
    secret: String,
    /// Users.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds between a user's messages.
    #[arg(long, default_value_t = 2.0)]
    every: f64,
    /// Longest connection lifetime before a reconnect, seconds.
    #[arg(long, default_value_t = 30.0)]
    lifetime: f64,
    /// Source addresses: first-last, e.g. 127.0.0.10-127.0.0.40.
    #[arg(long, default_value = "127.0.0.10-127.0.0.40")]
    src_ips: String,
}

#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    failures: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

fn ips(spec: &str) -> Vec<Ipv4Addr> {
    let (a, b) = spec.split_once('-').unwrap_or((spec, spec));
    let (a, b): (Ipv4Addr, Ipv4Addr) = (
        a.parse().expect("--src-ips: bad first address"),
        b.parse().expect("--src-ips: bad last address"),
    );
    assert!(a.is_loopback() && b.is_loopback(), "loopback sources only");
    (u32::from(a)..=u32::from(b)).map(Ipv4Addr::from).collect()
}

/// Tiny xorshift, so users don't march in step.
fn rnd(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed % 10_000) as f64 / 10_000.0
}

async fn route_url(cli: &Cli, uid: &str) -> Result<String, String> {
    let token = swocloud::auth::mint(cli.secret.as_bytes(), uid, "user", 3600);
    let mut s = TcpStream::connect(cli.route)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET /route?uid={uid}&token={token} HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).ok_or("no body")?;
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    v["url"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no url: {body}"))
}

async fn user(cli: Arc<Cli>, i: usize, src: Ipv4Addr, st: Arc<Stats>, until: Instant) {
    let uid = format!("soak{i}");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
    sleep(Duration::from_secs_f64(rnd(&mut seed) * 2.0)).await;
    while Instant::now() < until {
        let res: Result<(), String> = async {
            let url = route_url(&cli, &uid).await?;
            let target: SocketAddr = url
                .trim_start_matches("ws://")
                .split('/')
                .next()
                .and_then(|h| h.parse().ok())
                .ok_or("bad url")?;
            let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
            sock.bind(SocketAddr::from((src, 0)))
                .map_err(|e| e.to_string())?;
            let tcp = timeout(Duration::from_secs(10), sock.connect(target))
                .await
                .map_err(|_| "connect timeout")?
                .map_err(|e| e.to_string())?;
            let (ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            st.connects.fetch_add(1, Ordering::Relaxed);
            let (mut tx, mut rx) = ws.split();
            let life = Instant::now() + Duration::from_secs_f64(cli.lifetime * rnd(&mut seed));
            let mut next = Instant::now() + Duration::from_secs_f64(cli.every * rnd(&mut seed));
            loop {
                let deadline = next.min(life).min(until);
                tokio::select! {
                    m = rx.next() => match m {
                        Some(Ok(Message::Text(_))) => { st.received.fetch_add(1, Ordering::Relaxed); }
                        Some(Ok(_)) => {}
                        _ => return Err("closed".into()),
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        if Instant::now() >= life || Instant::now() >= until {
                            let _ = tx.send(Message::Close(None)).await;
                            return Ok(());
                        }
                        let to = format!("soak{}", (rnd(&mut seed) * cli.users as f64) as usize);
                        let m = json!({"to": to, "data": "hello"}).to_string();
                        tx.send(Message::Text(m.into())).await.map_err(|e| e.to_string())?;
                        st.sent.fetch_add(1, Ordering::Relaxed);
                        next = Instant::now() + Duration::from_secs_f64(cli.every);
                    }
                }
            }
        }
        .await;
        if res.is_err() {
            st.failures.fetch_add(1, Ordering::Relaxed);
            sleep(Duration::from_millis(500)).await;
        }
    }
}

fn main() {
    let cli = Arc::new(Cli::parse());
    assert!(cli.route.ip().is_loopback(), "loopback Route only");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let st = Arc::new(Stats::default());
    let sources = ips(&cli.src_ips);
    rt.block_on(async {
        let until = Instant::now() + Duration::from_secs_f64(cli.duration);
        let tasks: Vec<_> = (0..cli.users)
            .map(|i| {
                tokio::spawn(user(
                    cli.clone(),
                    i,
                    sources[i % sources.len()],
                    st.clone(),
                    until,
                ))
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "RESULT {}",
        json!({"users": cli.users, "connects": g(&st.connects), "failures": g(&st.failures),
               "sent": g(&st.sent), "received": g(&st.received)})
    );
}
