//! WebSocket load generator for `scripts/bench.sh` (a dev tool, built on
//! tokio + tokio-tungstenite).
//!
//! Modes:
//!
//! * `echo`: `--conns` connections each keep exactly one message of `--size`
//!   bytes in flight (send, wait for the echo, repeat) for `--warmup` +
//!   `--duration` seconds; reports messages/s and latency percentiles over the
//!   measured window. It prints `MEASURE_START` and `MEASURE_END` lines at the
//!   window's edges so a script can sample the server's CPU time there.
//! * `idle`: opens `--conns` connections, binding source addresses round-robin
//!   over `--src-ips` (to get past the ephemeral-port limit of one address),
//!   prints `HOLDING n` once they are all attempted, holds them for `--hold`
//!   seconds while answering pings, then closes them.
//! * `storm`: `--total` handshakes (connect, handshake, send Close, drop), at
//!   most `--concurrency` in flight; reports handshakes/s.
//!
//! Each mode prints human-readable lines, then one final line
//! `RESULT {json}` for scripts. Only loopback targets and source addresses are
//! accepted. `--threads` sizes the tokio runtime (default 1, so the load
//! generator leaves CPU to the server under test).
//!
//! ```text
//! loadgen --threads 1 echo --url ws://127.0.0.1:9001/ --conns 1000 --size 64 --duration 10
//! loadgen idle --url ws://127.0.0.1:9001/ --conns 12500 --src-ips 127.0.0.2-127.0.0.3 --hold 30
//! loadgen storm --url ws://127.0.0.1:9001/ --total 20000 --concurrency 200
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Bound on one TCP connect plus WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for one echo.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "WebSocket load generator (echo / idle / storm)")]
struct Cli {
    /// Tokio worker threads (1 = current-thread runtime).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Closed-loop echo throughput and latency.
    Echo(EchoArgs),
    /// Open and hold many idle connections.
    Idle(IdleArgs),
    /// Handshake rate.
    Storm(StormArgs),
}

#[derive(Args, Debug, Clone)]
struct Target {
    /// Server URL, e.g. ws://127.0.0.1:9001/ (loopback only).
    #[arg(long)]
    url: String,
    /// Source addresses to bind, round-robin: `127.0.0.2-127.0.0.9`,
    /// `127.0.0.2,127.0.0.5` or one address. Default: let the kernel choose.
    #[arg(long)]
    src_ips: Option<String>,
}

#[derive(Args, Debug)]
struct EchoArgs {
    #[command(flatten)]
    target: Target,
    /// Connections, each with one message in flight.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Message payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Send binary messages instead of text.
    #[arg(long)]
    binary: bool,
    /// Connection attempts in flight while connecting.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
}

#[derive(Args, Debug)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    /// Connections to open and hold.
    #[arg(long)]
    conns: usize,
    /// Seconds to hold the connections after `HOLDING`.
    #[arg(long, default_value_t = 30.0)]
    hold: f64,
    /// Connection attempts in flight while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
}

#[derive(Args, Debug)]
struct StormArgs {
    #[command(flatten)]
    target: Target,
    /// Handshakes to perform.
    #[arg(long, default_value_t = 20_000)]
    total: usize,
    /// Handshakes in flight at most.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
}

fn main() {
    let cli = Cli::parse();
    raise_nofile_limit();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.mode {
            Mode::Echo(a) => echo(a).await,
            Mode::Idle(a) => idle(a).await,
            Mode::Storm(a) => storm(a).await,
        }
    });
    match result {
        Ok(json) => println!("RESULT {json}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    }
    // Do not wait for lingering tasks (e.g. unanswered closes).
    runtime.shutdown_timeout(Duration::from_millis(200));
}

// ---------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------

/// A resolved, loopback-only target with its source-address rotation.
struct Connector {
    url: String,
    addr: SocketAddr,
    src_ips: Vec<Ipv4Addr>,
    next_src: AtomicUsize,
    config: WebSocketConfig,
}

impl Connector {
    fn new(target: &Target) -> Result<Self, String> {
        let request = target
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad --url {}: {e}", target.url))?;
        let host = request.uri().host().unwrap_or("127.0.0.1").to_string();
        let port = request.uri().port_u16().unwrap_or(80);
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| format!("{host} has no IPv4 address"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("refusing non-loopback target {addr}"));
        }
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
    async fn connect(&self) -> Result<Ws, String> {
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
            let (ws, _) = tokio_tungstenite::client_async_with_config(
                self.url.as_str(),
                stream,
                Some(self.config),
            )
            .await
            .map_err(|e| format!("handshake: {e}"))?;
            Ok(ws)
        };
        timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err("connect timed out".to_string()))
    }

    /// Opens `n` connections with at most `concurrency` attempts in flight.
    /// Returns the successes in completion order and the failures.
    async fn connect_many(
        self: &Arc<Self>,
        n: usize,
        concurrency: usize,
        errors: &ErrorLog,
    ) -> Vec<Ws> {
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let permit = sem.clone().acquire_owned().await.expect("semaphore");
            let this = self.clone();
            tasks.push(tokio::spawn(async move {
                let res = this.connect().await;
                drop(permit);
                res
            }));
        }
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            match t.await.expect("connect task") {
                Ok(ws) => out.push(ws),
                Err(e) => errors.record(e),
            }
        }
        out
    }
}

/// Parses `a-b` (inclusive range within one /24), `a,b,c` or `a`; loopback only.
fn parse_src_ips(spec: &str) -> Result<Vec<Ipv4Addr>, String> {
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
struct ErrorLog(Mutex<BTreeMap<String, usize>>);

impl ErrorLog {
    fn record(&self, e: String) {
        *self.0.lock().unwrap().entry(e).or_default() += 1;
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }

    fn print(&self) {
        let map = self.0.lock().unwrap();
        let mut top: Vec<_> = map.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        for (msg, n) in top.into_iter().take(5) {
            eprintln!("  error x{n}: {msg}");
        }
    }
}

// ---------------------------------------------------------------------------
// echo
// ---------------------------------------------------------------------------

async fn echo(args: EchoArgs) -> Result<serde_json::Value, String> {
    let connector = Arc::new(Connector::new(&args.target)?);
    let errors = Arc::new(ErrorLog::default());
    let t0 = Instant::now();
    let conns = connector
        .connect_many(args.conns, args.connect_concurrency, &errors)
        .await;
    println!(
        "echo: {}/{} connections up in {:.2}s",
        conns.len(),
        args.conns,
        t0.elapsed().as_secs_f64()
    );
    if conns.is_empty() {
        errors.print();
        return Err("no connection could be opened".into());
    }

    let payload = if args.binary {
        Message::binary(vec![b'x'; args.size])
    } else {
        Message::text("x".repeat(args.size))
    };
    let start = Instant::now();
    let measure_start = start + Duration::from_secs_f64(args.warmup);
    let end = measure_start + Duration::from_secs_f64(args.duration);

    let markers = tokio::spawn(async move {
        sleep_until(measure_start).await;
        say("MEASURE_START");
        sleep_until(end).await;
        say("MEASURE_END");
    });
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| {
            let payload = payload.clone();
            let errors = errors.clone();
            tokio::spawn(echo_loop(ws, payload, measure_start, end, errors))
        })
        .collect();
    let mut samples: Vec<u32> = Vec::new();
    for t in tasks {
        samples.extend(t.await.expect("echo task"));
    }
    markers.await.expect("marker task");

    samples.sort_unstable();
    let msgs = samples.len();
    let rate = msgs as f64 / args.duration;
    let (p50, p99, p999, max) = (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        percentile(&samples, 99.9),
        samples.last().copied().unwrap_or(0),
    );
    let n_errors = errors.total();
    println!(
        "echo: {msgs} messages in {:.1}s = {rate:.0} msg/s; latency p50 {p50} us, p99 {p99} us, p99.9 {p999} us, max {max} us; {n_errors} errors",
        args.duration
    );
    errors.print();
    Ok(json!({
        "mode": "echo",
        "conns": args.conns,
        "size": args.size,
        "duration_s": args.duration,
        "msgs": msgs,
        "msgs_per_s": rate.round() as u64,
        "p50_us": p50,
        "p99_us": p99,
        "p999_us": p999,
        "max_us": max,
        "errors": n_errors,
    }))
}

/// One connection's closed loop. Returns the latencies (µs) of the round
/// trips that started and finished inside the measured window.
async fn echo_loop(
    mut ws: Ws,
    payload: Message,
    measure_start: Instant,
    end: Instant,
    errors: Arc<ErrorLog>,
) -> Vec<u32> {
    let expected_len = payload.len();
    let mut samples = Vec::new();
    loop {
        let sent_at = Instant::now();
        if sent_at >= end {
            break;
        }
        if let Err(e) = ws.send(payload.clone()).await {
            errors.record(format!("send: {e}"));
            return samples;
        }
        let reply = match timeout(ECHO_TIMEOUT, next_data(&mut ws)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                errors.record(e);
                return samples;
            }
            Err(_) => {
                errors.record("echo timed out".into());
                return samples;
            }
        };
        let done_at = Instant::now();
        if reply.len() != expected_len {
            errors.record(format!("echo of {} bytes for {expected_len}", reply.len()));
        } else if sent_at >= measure_start && done_at <= end {
            let us = done_at.duration_since(sent_at).as_micros();
            samples.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }
    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
    samples
}

/// The next Text or Binary message (control frames are skipped; pings are
/// answered by tungstenite).
async fn next_data(ws: &mut Ws) -> Result<Message, String> {
    loop {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(m),
            Some(Ok(Message::Close(_))) | None => return Err("closed by server".into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("recv: {e}")),
        }
    }
}

/// The `p`th percentile of sorted samples (nearest rank), 0 if empty.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    // The epsilon keeps float noise (0.999 * 1000 = 999.0000000001) from
    // bumping the rank.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------

async fn idle(args: IdleArgs) -> Result<serde_json::Value, String> {
    let connector = Arc::new(Connector::new(&args.target)?);
    let errors = ErrorLog::default();
    let t0 = Instant::now();
    let conns = connector
        .connect_many(args.conns, args.connect_concurrency, &errors)
        .await;
    let connect_s = t0.elapsed().as_secs_f64();
    let ok = conns.len();
    let failed = errors.total();
    println!(
        "idle: {ok}/{} connections up in {connect_s:.2}s, {failed} failed",
        args.conns
    );
    errors.print();

    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicUsize::new(0));
    let holders: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(hold(ws, stop_rx.clone(), dropped.clone())))
        .collect();
    say(&format!("HOLDING {ok}"));
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let dropped_n = dropped.load(Ordering::Relaxed);
    println!(
        "idle: held for {:.1}s, {dropped_n} dropped by the server",
        args.hold
    );

    let _ = stop_tx.send(true);
    let closing = async {
        for h in holders {
            let _ = h.await;
        }
    };
    let _ = timeout(Duration::from_secs(10), closing).await;
    println!("idle: closed");
    Ok(json!({
        "mode": "idle",
        "conns": args.conns,
        "ok": ok,
        "failed": failed,
        "dropped": dropped_n,
        "connect_s": (connect_s * 1000.0).round() / 1000.0,
        "conns_per_s": (ok as f64 / connect_s).round() as u64,
        "errors": failed + dropped_n,
    }))
}

/// Keeps one connection open (reading, so pings get answered) until told to
/// stop, then closes it.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>, dropped: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => break,
        }
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
}

// ---------------------------------------------------------------------------
// storm
// ---------------------------------------------------------------------------

async fn storm(args: StormArgs) -> Result<serde_json::Value, String> {
    let connector = Arc::new(Connector::new(&args.target)?);
    let errors = Arc::new(ErrorLog::default());
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.total);
    for _ in 0..args.total {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let connector = connector.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let res = connector.connect().await;
            let latency = started.elapsed();
            drop(permit);
            match res {
                Ok(mut ws) => {
                    // Send Close and drop without waiting for the reply.
                    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                    Some(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX))
                }
                Err(e) => {
                    errors.record(e);
                    None
                }
            }
        }));
    }
    let mut samples = Vec::with_capacity(args.total);
    for t in tasks {
        if let Some(us) = t.await.expect("storm task") {
            samples.push(us);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    samples.sort_unstable();
    let ok = samples.len();
    let failed = errors.total();
    let rate = ok as f64 / elapsed;
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    println!(
        "storm: {ok}/{} handshakes in {elapsed:.2}s = {rate:.0}/s; handshake p50 {p50} us, p99 {p99} us; {failed} failed",
        args.total
    );
    errors.print();
    Ok(json!({
        "mode": "storm",
        "total": args.total,
        "concurrency": args.concurrency,
        "ok": ok,
        "failed": failed,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "handshakes_per_s": rate.round() as u64,
        "p50_us": p50,
        "p99_us": p99,
        "errors": failed,
    }))
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

/// Prints a marker line for scripts and flushes it at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Raises the soft open-files limit to the hard limit.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
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

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
