//! Opening connections, shared by every mode: a loopback-only target with
//! its source-address rotation ([`Connector`]), bounded concurrency
//! ([`bounded`]), and the error tally every mode prints ([`ErrorLog`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{Target, Ws, CONNECT_TIMEOUT};

/// A resolved, loopback-only target with its source-address rotation.
pub struct Connector {
    url: String,            // the default URL (`--url`)
    addr: SocketAddr,       // its resolved IPv4 address
    src_ips: Vec<Ipv4Addr>, // source addresses, round-robin; empty: the kernel's
    next_src: AtomicUsize,  // rotation position
    config: WebSocketConfig,
}

impl Connector {
    /// The server's resolved address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Uses `bytes` for the WebSocket read and write buffers.
    pub fn buffer_size(mut self, bytes: usize) -> Self {
        self.config = self.config.read_buffer_size(bytes).write_buffer_size(bytes);
        self
    }
}

impl Connector {
    /// Resolves `target`; refuses anything but loopback.
    pub fn new(target: &Target) -> Result<Self, String> {
        let request = target
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad --url {}: {e}", target.url))?;
        let host = request.uri().host().unwrap_or("127.0.0.1").to_string();
        let port = request.uri().port_u16().unwrap_or(80);
        let addr = resolve_loopback(&host, (host.as_str(), port))?;
        let src_ips = match &target.src_ips {
            Some(spec) => parse_src_ips(spec)?,
            None => Vec::new(),
        };
        // Small buffers: the load generator's memory is not what is measured,
        // but 50,000 connections at tungstenite's default 128 KiB would be.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(4096);
        Ok(Connector {
            url: target.url.clone(),
            addr,
            src_ips,
            next_src: AtomicUsize::new(0),
            config,
        })
    }

    /// Connects (from the next source address, if any) and handshakes, all
    /// within [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Ws, String> {
        self.connect_url(&self.url).await
    }

    /// [`Connector::connect`] with another URL for the same address (e.g. a
    /// different query string).
    pub async fn connect_url(&self, url: &str) -> Result<Ws, String> {
        let src = (!self.src_ips.is_empty()).then(|| {
            let i = self.next_src.fetch_add(1, Ordering::Relaxed);
            self.src_ips[i % self.src_ips.len()]
        });
        let attempt = async {
            let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
            if let Some(ip) = src {
                socket
                    .bind(SocketAddr::from((ip, 0)))
                    .map_err(|e| format!("bind {ip}: {e}"))?;
            }
            let stream = socket
                .connect(self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(self.config))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
            Ok(ws)
        };
        timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err("connect timed out".to_string()))
    }

    /// Opens `n` connections with at most `concurrency` attempts in flight.
    /// Returns the successes in order; the failures go to `errors`.
    pub async fn connect_many(
        self: &Arc<Self>,
        n: usize,
        concurrency: usize,
        errors: &ErrorLog,
    ) -> Vec<Ws> {
        let results = bounded(n, concurrency, |i, permit| {
            let this = self.clone();
            async move {
                // `{n}` in the URL becomes the connection's number (a
                // distinct uid per user on an IM server, say).
                let res = if this.url.contains("{n}") {
                    this.connect_url(&this.url.replace("{n}", &i.to_string()))
                        .await
                } else {
                    this.connect().await
                };
                drop(permit);
                res
            }
        })
        .await;
        let mut out = Vec::with_capacity(n);
        for r in results {
            match r {
                Ok(ws) => out.push(ws),
                Err(e) => errors.record(e),
            }
        }
        out
    }
}

/// The IPv4 address `addr` (named `name` in errors) resolves to; refuses
/// anything but loopback.
pub fn resolve_loopback(name: &str, addr: impl ToSocketAddrs) -> Result<SocketAddr, String> {
    let addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {name}: {e}"))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("{name} has no IPv4 address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("refusing non-loopback target {addr}"));
    }
    Ok(addr)
}

/// Runs `make(i, permit)` for every `i` in `0..n` as its own task, with at
/// most `concurrency` permits out at once: a task holds its permit for as
/// long as the bounded part lasts (it drops it when done with that part, e.g.
/// after the handshake). Returns the results in index order; a task that
/// panicked counts as an error.
pub async fn bounded<T, Fut>(
    n: usize,
    concurrency: usize,
    mut make: impl FnMut(usize, OwnedSemaphorePermit) -> Fut,
) -> Vec<Result<T, String>>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        // The semaphore is never closed, so acquiring cannot fail.
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        tasks.push(tokio::spawn(make(i, permit)));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }
    out
}

/// Parses `a-b` (inclusive range within one /24), `a,b,c` or `a`; loopback only.
pub fn parse_src_ips(spec: &str) -> Result<Vec<Ipv4Addr>, String> {
    let parse = |s: &str| -> Result<Ipv4Addr, String> {
        let ip: Ipv4Addr = s
            .trim()
            .parse()
            .map_err(|e| format!("bad source address {s:?}: {e}"))?;
        if !ip.is_loopback() {
            return Err(format!("refusing non-loopback source address {ip}"));
        }
        Ok(ip)
    };
    let ips = if let Some((a, b)) = spec.split_once('-') {
        let (a, b) = (parse(a)?, parse(b)?);
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 255 {
            return Err(format!("bad source range {spec:?}"));
        }
        (a..=b).map(Ipv4Addr::from).collect()
    } else {
        spec.split(',').map(parse).collect::<Result<Vec<_>, _>>()?
    };
    if ips.is_empty() {
        return Err("empty --src-ips".into());
    }
    Ok(ips)
}

/// Counts errors by message, for a short summary.
#[derive(Default)]
pub struct ErrorLog(Mutex<BTreeMap<String, usize>>);

impl ErrorLog {
    /// Counts one occurrence of `e`.
    pub fn record(&self, e: String) {
        *self.map().entry(e).or_default() += 1;
    }

    /// Errors counted so far.
    pub fn total(&self) -> usize {
        self.map().values().sum()
    }

    /// The five most frequent errors, on stderr (`  error xN: message`).
    pub fn print(&self) {
        let map = self.map();
        let mut top: Vec<_> = map.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        for (msg, n) in top.into_iter().take(5) {
            eprintln!("  error x{n}: {msg}");
        }
    }

    /// The tally; a panic elsewhere while it was held leaves it usable.
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn src_ip_specs() {
        let r = parse_src_ips("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2], Ipv4Addr::new(127, 0, 0, 4));
        assert_eq!(parse_src_ips("127.0.0.5,127.0.0.9").unwrap().len(), 2);
        assert!(parse_src_ips("10.0.0.1").is_err());
        assert!(parse_src_ips("127.0.0.9-127.0.0.2").is_err());
    }

    #[tokio::test]
    async fn bounded_keeps_order_and_the_bound() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let out = bounded(20, 3, |i, permit| {
            let (live, peak) = (live.clone(), peak.clone());
            async move {
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                live.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
                if i == 7 {
                    Err("seven".to_string())
                } else {
                    Ok(i)
                }
            }
        })
        .await;
        assert_eq!(out.len(), 20);
        assert_eq!(out[7], Err("seven".to_string()));
        assert_eq!(out[19], Ok(19));
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }
}
