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
//! * `http`: `--conns` keep-alive HTTP/1.1 connections each with one `GET
//!   --url` in flight for `--warmup` + `--duration` seconds; requests/s and
//!   latency percentiles over the measured window, non-2xx answers as errors.
//! * `register`: `--count` fake IM servers registering with a Route
//!   (`{"method":"register","serviceName":"IM_i","ip":"127.0.0.x","port":N}`)
//!   and pinging every `--ping-ms`; prints `REGISTERED n` once every one got
//!   its `registered` answer (or failed), then holds them for `--hold` s.
//! * `api-send`: connects `--users` users to the IM servers `--ims`
//!   (alternating, `?uid=<prefix><i>`), then `--http-conns` keep-alive
//!   connections `POST /api/send {"uid","data":{"t":<ns>}}` to the Route
//!   `--route`, at most `--window` messages in flight (sent, not yet received
//!   by the user); reports sent and received messages/s and the end-to-end
//!   latency (send timestamp → the user's socket reads it).
//! * `u2u`: the same users; `--senders` users on the first IM server send
//!   `{"to":"<a user on the second>","data":{"t":<ns>}}`, same window and
//!   figures.
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
//! loadgen http --url http://127.0.0.1:9500/api/servers --conns 32 --duration 10
//! loadgen register --url ws://127.0.0.1:9500/ --count 100 --hold 600
//! loadgen api-send --route http://127.0.0.1:9500 --ims ws://127.0.0.2:9000/,ws://127.0.0.3:9000/ --users 10000
//! loadgen u2u --ims ws://127.0.0.2:9000/,ws://127.0.0.3:9000/ --users 10000 --senders 64
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
    /// Keep-alive HTTP GET throughput.
    Http(HttpArgs),
    /// Fake IM server registrations held against a Route.
    Register(RegisterArgs),
    /// Users on IM servers, messages sent through the Route's POST /api/send.
    ApiSend(ClusterArgs),
    /// Users on IM servers, user-to-user messages across two IM servers.
    U2u(ClusterArgs),
    /// Closed-loop echo of chat-like JSON over raw sockets, with or without
    /// permessage-deflate: msgs/s and bytes on the wire per message.
    Deflate(DeflateArgs),
}

#[derive(Args, Debug)]
struct DeflateArgs {
    #[command(flatten)]
    target: Target,
    /// Connections, each with one message in flight.
    #[arg(long, default_value_t = 50)]
    conns: usize,
    /// JSON message size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Offer permessage-deflate (the server must accept it) and send
    /// compressed messages.
    #[arg(long)]
    compress: bool,
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
    /// Our WebSocket read and write buffer size in bytes (default: the
    /// message size within 4 KiB..128 KiB, so large messages are not read
    /// 4 KiB at a time while small ones keep the 4 KiB of the other modes).
    #[arg(long)]
    buffer: Option<usize>,
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

#[derive(Args, Debug)]
struct HttpArgs {
    /// `http://127.0.0.1:P/path?query` (loopback only).
    #[arg(long)]
    url: String,
    /// Keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
}

#[derive(Args, Debug)]
struct RegisterArgs {
    #[command(flatten)]
    target: Target,
    /// Registrations (`IM_<first>` … `IM_<first+count-1>`).
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Index of the first serviceName.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Advertised port of registration i: `port_base + i`; advertised IP
    /// 127.0.0.(10 + i % 240) (data only: nothing connects to it).
    #[arg(long, default_value_t = 20000)]
    port_base: u16,
    /// Ping interval in milliseconds (the seed: 3000).
    #[arg(long, default_value_t = 3000)]
    ping_ms: u64,
    /// Seconds to hold the registrations after `REGISTERED`.
    #[arg(long, default_value_t = 60.0)]
    hold: f64,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// IM servers' WebSocket URLs, comma-separated (`ws://127.0.0.2:9000/`);
    /// user i connects to the (i mod n)th with `?uid=<prefix><i>`.
    #[arg(long)]
    ims: String,
    /// The Route's base URL (`http://127.0.0.1:9500`), for api-send.
    #[arg(long)]
    route: Option<String>,
    /// Users to connect.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// uid prefix.
    #[arg(long, default_value = "u")]
    uid_prefix: String,
    /// Source addresses for the users' sockets (see `echo --src-ips`).
    #[arg(long)]
    src_ips: Option<String>,
    /// Messages in flight at most (sent, not yet received).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// api-send: keep-alive HTTP connections to the Route.
    #[arg(long, default_value_t = 16)]
    http_conns: usize,
    /// u2u: sending users (on the first IM server).
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// Total send rate cap in messages/s (0: as fast as the window allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Connection attempts in flight while connecting.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
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
            Mode::Http(a) => http(a).await,
            Mode::Register(a) => register(a).await,
            Mode::ApiSend(a) => cluster(a, false).await,
            Mode::U2u(a) => cluster(a, true).await,
            Mode::Deflate(a) => deflate_echo(a).await,
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
        self.connect_url(&self.url).await
    }

    /// [`Connector::connect`] with another URL for the same address (e.g. a
    /// different query string).
    async fn connect_url(&self, url: &str) -> Result<Ws, String> {
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
    let mut connector = Connector::new(&args.target)?;
    let buffer = args.buffer.unwrap_or(args.size.clamp(4096, 128 * 1024));
    connector.config = connector
        .config
        .read_buffer_size(buffer)
        .write_buffer_size(buffer);
    let connector = Arc::new(connector);
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
// http
// ---------------------------------------------------------------------------

/// A parsed `http://host:port/path` URL: the loopback address and the
/// request target.
fn parse_http_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("bad --url {url}: only http:// is supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("{hostport} has no IPv4 address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("refusing non-loopback target {addr}"));
    }
    Ok((addr, hostport.to_string(), path.to_string()))
}

/// One keep-alive HTTP/1.1 connection.
struct HttpConn {
    stream: tokio::io::BufReader<TcpStream>,
    host: String,
}

impl HttpConn {
    async fn open(addr: SocketAddr, host: &str) -> Result<Self, String> {
        let stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(HttpConn {
            stream: tokio::io::BufReader::new(stream),
            host: host.to_string(),
        })
    }

    /// Sends one request and reads the answer: (status, body).
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        let exchange = async {
            self.stream
                .get_mut()
                .write_all(&bytes)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut line = String::new();
            let mut status = 0u16;
            let mut len = 0usize;
            let mut first = true;
            loop {
                line.clear();
                let n = self
                    .stream
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("recv: {e}"))?;
                if n == 0 {
                    return Err("closed by server".to_string());
                }
                let l = line.trim_end();
                if first {
                    first = false;
                    status = l
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("bad status line {l:?}"))?;
                } else if l.is_empty() {
                    break;
                } else if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().map_err(|_| "bad Content-Length")?;
                    }
                }
            }
            let mut out = vec![0u8; len];
            self.stream
                .read_exact(&mut out)
                .await
                .map_err(|e| format!("recv body: {e}"))?;
            Ok((status, out))
        };
        timeout(ECHO_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err("request timed out".to_string()))
    }
}

async fn http(args: HttpArgs) -> Result<serde_json::Value, String> {
    let (addr, host, path) = parse_http_url(&args.url)?;
    let errors = Arc::new(ErrorLog::default());
    let start = Instant::now();
    let measure_start = start + Duration::from_secs_f64(args.warmup);
    let end = measure_start + Duration::from_secs_f64(args.duration);
    let markers = tokio::spawn(async move {
        sleep_until(measure_start).await;
        say("MEASURE_START");
        sleep_until(end).await;
        say("MEASURE_END");
    });
    let tasks: Vec<_> = (0..args.conns)
        .map(|_| {
            let (host, path, errors) = (host.clone(), path.clone(), errors.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut conn = match HttpConn::open(addr, &host).await {
                    Ok(c) => c,
                    Err(e) => {
                        errors.record(e);
                        return samples;
                    }
                };
                loop {
                    let sent_at = Instant::now();
                    if sent_at >= end {
                        break;
                    }
                    match conn.request("GET", &path, b"").await {
                        Ok((s, _)) if (200..300).contains(&s) => {
                            let done_at = Instant::now();
                            if sent_at >= measure_start && done_at <= end {
                                let us = done_at.duration_since(sent_at).as_micros();
                                samples.push(u32::try_from(us).unwrap_or(u32::MAX));
                            }
                        }
                        Ok((s, _)) => errors.record(format!("HTTP {s}")),
                        Err(e) => {
                            errors.record(e);
                            return samples;
                        }
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples: Vec<u32> = Vec::new();
    for t in tasks {
        samples.extend(t.await.expect("http task"));
    }
    markers.await.expect("marker task");
    samples.sort_unstable();
    let n = samples.len();
    let rate = n as f64 / args.duration;
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    let n_errors = errors.total();
    println!(
        "http: {n} requests in {:.1}s = {rate:.0} req/s; latency p50 {p50} us, p99 {p99} us; {n_errors} errors",
        args.duration
    );
    errors.print();
    Ok(json!({
        "mode": "http",
        "url": args.url,
        "conns": args.conns,
        "duration_s": args.duration,
        "requests": n,
        "requests_per_s": rate.round() as u64,
        "p50_us": p50,
        "p99_us": p99,
        "errors": n_errors,
    }))
}

// ---------------------------------------------------------------------------
// register
// ---------------------------------------------------------------------------

async fn register(args: RegisterArgs) -> Result<serde_json::Value, String> {
    let connector = Arc::new(Connector::new(&args.target)?);
    let errors = Arc::new(ErrorLog::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..args.count {
        let i = args.first + k;
        let frame = json!({
            "method": "register",
            "serviceName": format!("IM_{i}"),
            "ip": format!("127.0.0.{}", 10 + i % 240),
            "port": args.port_base as usize + i,
        })
        .to_string();
        let (connector, errors, ack_tx) = (connector.clone(), errors.clone(), ack_tx.clone());
        let mut stop = stop_rx.clone();
        let ping = Duration::from_millis(args.ping_ms.max(1));
        tasks.push(tokio::spawn(async move {
            let mut ws = match connector.connect().await {
                Ok(ws) => ws,
                Err(e) => {
                    errors.record(e);
                    let _ = ack_tx.send(false);
                    return;
                }
            };
            if let Err(e) = ws.send(Message::text(frame)).await {
                errors.record(format!("send: {e}"));
                let _ = ack_tx.send(false);
                return;
            }
            let mut acked = false;
            let mut tick = tokio::time::interval_at(Instant::now() + ping, ping);
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(t))) => {
                            if !acked && t.contains("\"registered\"") {
                                acked = true;
                                let _ = ack_tx.send(true);
                            } else if t.contains("\"error\"") {
                                errors.record(format!("route: {t}"));
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            errors.record("closed by the Route".into());
                            if !acked {
                                let _ = ack_tx.send(false);
                            }
                            return;
                        }
                    },
                    _ = tick.tick() => {
                        if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                            errors.record("ping failed".into());
                            return;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
        }));
    }
    drop(ack_tx);
    let (mut ok, mut failed) = (0usize, 0usize);
    while ok + failed < args.count {
        match timeout(CONNECT_TIMEOUT, ack_rx.recv()).await {
            Ok(Some(true)) => ok += 1,
            Ok(Some(false)) => failed += 1,
            Ok(None) | Err(_) => break,
        }
    }
    let took = t0.elapsed().as_secs_f64();
    say(&format!("REGISTERED {ok}"));
    println!("register: {ok}/{} registered in {took:.2}s", args.count);
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let _ = stop_tx.send(true);
    let _ = timeout(Duration::from_secs(5), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    errors.print();
    Ok(json!({
        "mode": "register",
        "count": args.count,
        "registered": ok,
        "failed": args.count - ok,
        "register_s": (took * 1000.0).round() / 1000.0,
        "errors": errors.total(),
    }))
}

// ---------------------------------------------------------------------------
// api-send / u2u
// ---------------------------------------------------------------------------

/// Nanoseconds since the Unix epoch (the timestamp carried in messages).
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Shared figures of a cluster run.
#[derive(Default)]
struct Flow {
    sent: AtomicUsize,
    sent_in_window: AtomicUsize,
    received: AtomicUsize,
    received_in_window: AtomicUsize,
    samples: Mutex<Vec<u32>>,
}

async fn cluster(args: ClusterArgs, u2u: bool) -> Result<serde_json::Value, String> {
    use futures_util::stream::{SplitSink, SplitStream};
    let ims: Vec<String> = args.ims.split(',').map(|s| s.trim().to_string()).collect();
    if u2u && ims.len() < 2 {
        return Err("u2u needs two IM servers in --ims".into());
    }
    let connectors = ims
        .iter()
        .map(|u| {
            Connector::new(&Target {
                url: u.clone(),
                src_ips: args.src_ips.clone(),
            })
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let errors = Arc::new(ErrorLog::default());
    let uid = |i: usize| format!("{}{i}", args.uid_prefix);

    // Connect every user (bounded concurrency), keeping the index.
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(args.users);
    for i in 0..args.users {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let c = connectors[i % connectors.len()].clone();
        let base = ims[i % ims.len()].clone();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}uid={}", uid(i));
        tasks.push(tokio::spawn(async move {
            let r = c.connect_url(&url).await;
            drop(permit);
            r
        }));
    }
    let mut sinks: Vec<Option<SplitSink<Ws, Message>>> = Vec::with_capacity(args.users);
    let mut streams: Vec<SplitStream<Ws>> = Vec::with_capacity(args.users);
    let mut up = 0usize;
    for t in tasks {
        match t.await.expect("connect task") {
            Ok(ws) => {
                let (si, st) = ws.split();
                sinks.push(Some(si));
                streams.push(st);
                up += 1;
            }
            Err(e) => {
                errors.record(e);
                sinks.push(None);
            }
        }
    }
    println!(
        "{}: {up}/{} users up in {:.2}s",
        if u2u { "u2u" } else { "api-send" },
        args.users,
        t0.elapsed().as_secs_f64()
    );
    if up < args.users {
        errors.print();
        return Err(format!(
            "only {up}/{} users connected; refusing to measure a partial cluster",
            args.users
        ));
    }
    // Let the IM servers record every user's presence.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let flow = Arc::new(Flow::default());
    let window = Arc::new(Semaphore::new(args.window.max(1)));
    let start = Instant::now();
    let base_ns = now_ns();
    let measure_start = start + Duration::from_secs_f64(args.warmup);
    let end = measure_start + Duration::from_secs_f64(args.duration);
    let ms_ns = base_ns + (args.warmup * 1e9) as u64;
    let end_ns = ms_ns + (args.duration * 1e9) as u64;
    let (stop_tx, stop_rx) = watch::channel(false);

    // Readers: every user's socket.
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut st| {
            let (flow, window, errors) = (flow.clone(), window.clone(), errors.clone());
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        m = st.next() => m,
                        _ = stop.changed() => return,
                    };
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => {
                            errors.record("user connection closed by the server".into());
                            return;
                        }
                    };
                    let v: serde_json::Value = match serde_json::from_str(&text) {
                        Ok(v) => v,
                        Err(_) => {
                            errors.record("non-JSON frame".into());
                            continue;
                        }
                    };
                    if let Some(code) = v.pointer("/error/code").and_then(|c| c.as_str()) {
                        errors.record(format!("error frame: {code}"));
                        window.add_permits(1);
                        continue;
                    }
                    let Some(t) = v.pointer("/data/t").and_then(|t| t.as_u64()) else {
                        errors.record(format!("unexpected frame: {text}"));
                        continue;
                    };
                    let now = now_ns();
                    window.add_permits(1);
                    flow.received.fetch_add(1, Ordering::Relaxed);
                    if now >= ms_ns && now <= end_ns {
                        flow.received_in_window.fetch_add(1, Ordering::Relaxed);
                    }
                    if t >= ms_ns && now <= end_ns {
                        let us = (now.saturating_sub(t) / 1000) as u32;
                        flow.samples.lock().unwrap().push(us);
                    }
                }
            })
        })
        .collect();

    let markers = tokio::spawn(async move {
        sleep_until(measure_start).await;
        say("MEASURE_START");
        sleep_until(end).await;
        say("MEASURE_END");
    });
    let nsenders = if u2u { args.senders } else { args.http_conns }.max(1);
    let pace = (args.rate > 0.0).then(|| Duration::from_secs_f64(nsenders as f64 / args.rate));
    let next_msg = Arc::new(AtomicUsize::new(0));
    let half = args.users / 2;
    let mut senders = Vec::new();
    for k in 0..nsenders {
        let (flow, window, errors, next_msg) = (
            flow.clone(),
            window.clone(),
            errors.clone(),
            next_msg.clone(),
        );
        let prefix = args.uid_prefix.clone();
        // Acquire a window slot, or give up at the end of the run.
        let slot = move |window: Arc<Semaphore>| async move {
            match timeout(
                end.saturating_duration_since(Instant::now()),
                window.acquire_owned(),
            )
            .await
            {
                Ok(Ok(p)) => {
                    p.forget();
                    true
                }
                _ => false,
            }
        };
        let sent = move |flow: &Flow| {
            flow.sent.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            if now >= measure_start && now <= end {
                flow.sent_in_window.fetch_add(1, Ordering::Relaxed);
            }
        };
        if u2u {
            // Sender: user 2k (on the first IM server); targets: odd users
            // (the second), rotating.
            let Some(mut sink) = sinks.get_mut((2 * k) % args.users).and_then(Option::take) else {
                break;
            };
            senders.push(tokio::spawn(async move {
                let mut next = Instant::now();
                while Instant::now() < end {
                    if let Some(p) = pace {
                        sleep_until(next).await;
                        next += p;
                    }
                    if !slot(window.clone()).await {
                        break;
                    }
                    let m = next_msg.fetch_add(1, Ordering::Relaxed);
                    let to = format!("{prefix}{}", 2 * (m % half.max(1)) + 1);
                    let frame = json!({"to": to, "data": {"t": now_ns()}}).to_string();
                    if let Err(e) = sink.send(Message::text(frame)).await {
                        errors.record(format!("send: {e}"));
                        return;
                    }
                    sent(&flow);
                }
                // Not closed here: the user's reader still runs until the
                // drain ends (a Close now would read as a server close).
                drop(sink);
            }));
        } else {
            let route = args
                .route
                .clone()
                .ok_or("api-send needs --route http://127.0.0.1:P")?;
            let (addr, host, base_path) = parse_http_url(&route)?;
            let path = format!("{}/api/send", base_path.trim_end_matches('/'));
            let users = args.users;
            senders.push(tokio::spawn(async move {
                let mut conn = match HttpConn::open(addr, &host).await {
                    Ok(c) => c,
                    Err(e) => {
                        errors.record(e);
                        return;
                    }
                };
                let mut next = Instant::now();
                while Instant::now() < end {
                    if let Some(p) = pace {
                        sleep_until(next).await;
                        next += p;
                    }
                    if !slot(window.clone()).await {
                        break;
                    }
                    let m = next_msg.fetch_add(1, Ordering::Relaxed);
                    let body =
                        json!({"uid": format!("{prefix}{}", m % users), "data": {"t": now_ns()}})
                            .to_string();
                    match conn.request("POST", &path, body.as_bytes()).await {
                        Ok((200, _)) => sent(&flow),
                        Ok((s, b)) => {
                            window.add_permits(1);
                            errors.record(format!(
                                "HTTP {s} {}",
                                String::from_utf8_lossy(&b)
                                    .chars()
                                    .take(80)
                                    .collect::<String>()
                            ));
                        }
                        Err(e) => {
                            window.add_permits(1);
                            errors.record(e);
                            return;
                        }
                    }
                }
            }));
        }
    }
    for s in senders {
        let _ = s.await;
    }
    markers.await.expect("marker task");
    // Let what is in flight arrive, then stop the readers.
    let drain_until = Instant::now() + Duration::from_secs(3);
    while flow.received.load(Ordering::Relaxed) < flow.sent.load(Ordering::Relaxed)
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    drop(sinks);

    let mut samples = std::mem::take(&mut *flow.samples.lock().unwrap());
    samples.sort_unstable();
    let (sent_total, recv_total) = (
        flow.sent.load(Ordering::Relaxed),
        flow.received.load(Ordering::Relaxed),
    );
    let sent_rate = flow.sent_in_window.load(Ordering::Relaxed) as f64 / args.duration;
    let recv_rate = flow.received_in_window.load(Ordering::Relaxed) as f64 / args.duration;
    let (p50, p99, max) = (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or(0),
    );
    let lost = sent_total.saturating_sub(recv_total);
    let n_errors = errors.total();
    println!(
        "{}: sent {sent_rate:.0} msg/s, received {recv_rate:.0} msg/s; end-to-end p50 {p50} us, p99 {p99} us, max {max} us; {sent_total} sent, {recv_total} received, {lost} not received; {n_errors} errors",
        if u2u { "u2u" } else { "api-send" }
    );
    errors.print();
    Ok(json!({
        "mode": if u2u { "u2u" } else { "api-send" },
        "users": args.users,
        "window": args.window,
        "senders": nsenders,
        "rate_cap": args.rate,
        "duration_s": args.duration,
        "sent_per_s": sent_rate.round() as u64,
        "received_per_s": recv_rate.round() as u64,
        "sent": sent_total,
        "received": recv_total,
        "lost": lost,
        "p50_us": p50,
        "p99_us": p99,
        "max_us": max,
        "samples": samples.len(),
        "errors": n_errors,
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

// ---- deflate: raw-socket echo with permessage-deflate ----------------------

/// Chat-like JSON of exactly `n` bytes (varied enough not to be trivial).
fn chat_json(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 200);
    let mut i = 0u64;
    while v.len() < n {
        let line = format!(
            r#"{{"type":"message","id":{},"from":"user-{}","to":"room-{}","ts":{},"text":"message number {} about the meeting at {} o'clock"}},"#,
            i * 7919 % 100_000,
            i * 31 % 977,
            i % 13,
            1_733_097_600_000u64 + i * 1337,
            i,
            i % 24
        );
        v.extend_from_slice(line.as_bytes());
        i += 1;
    }
    v.truncate(n);
    v
}

/// A masked client text frame.
fn masked_frame(rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81 | if rsv1 { 0x40 } else { 0 }];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

async fn deflate_echo(args: DeflateArgs) -> Result<serde_json::Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = Connector::new(&args.target)?;
    let text = chat_json(args.size);
    let wire = if args.compress {
        let mut c = flate2::Compress::new(flate2::Compression::new(6), false);
        let mut z = Vec::with_capacity(text.len() + 64);
        c.compress_vec(&text, &mut z, flate2::FlushCompress::Sync)
            .map_err(|e| format!("deflate: {e}"))?;
        z.truncate(z.len().saturating_sub(4)); // 00 00 ff ff
        masked_frame(true, &z)
    } else {
        masked_frame(false, &text)
    };
    let offer = if args.compress {
        "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_no_context_takeover\r\n"
    } else {
        ""
    };
    let mut streams = Vec::new();
    for _ in 0..args.conns {
        let mut s = TcpStream::connect(connector.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b)
                .await
                .map_err(|e| format!("101: {e}"))?;
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") {
            return Err(format!("upgrade refused: {head}"));
        }
        if args.compress && !head.contains("permessage-deflate") {
            return Err("the server did not accept permessage-deflate".into());
        }
        streams.push(s);
    }
    println!("deflate: {} connections up", streams.len());
    let start = Instant::now();
    let measure_start = start + Duration::from_secs_f64(args.warmup);
    let end = measure_start + Duration::from_secs_f64(args.duration);
    let markers = tokio::spawn(async move {
        sleep_until(measure_start).await;
        say("MEASURE_START");
        sleep_until(end).await;
        say("MEASURE_END");
    });
    let wire = Arc::new(wire);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let wire = wire.clone();
            tokio::spawn(async move {
                // (messages, bytes in from the server) inside the window
                let (mut msgs, mut bytes_in) = (0u64, 0u64);
                let mut buf = Vec::new();
                loop {
                    let sent_at = Instant::now();
                    if sent_at >= end {
                        break;
                    }
                    if s.write_all(&wire).await.is_err() {
                        break;
                    }
                    let mut h = [0u8; 2];
                    if s.read_exact(&mut h).await.is_err() {
                        break;
                    }
                    let (len, ext) = match h[1] & 0x7f {
                        126 => {
                            let mut b = [0u8; 2];
                            let _ = s.read_exact(&mut b).await;
                            (u16::from_be_bytes(b) as usize, 2)
                        }
                        127 => {
                            let mut b = [0u8; 8];
                            let _ = s.read_exact(&mut b).await;
                            (u64::from_be_bytes(b) as usize, 8)
                        }
                        n => (n as usize, 0),
                    };
                    buf.resize(len, 0);
                    if s.read_exact(&mut buf).await.is_err() || h[0] & 0x0f != 1 {
                        break;
                    }
                    if sent_at >= measure_start && Instant::now() <= end {
                        msgs += 1;
                        bytes_in += (2 + ext + len) as u64;
                    }
                }
                (msgs, bytes_in)
            })
        })
        .collect();
    let (mut msgs, mut bytes_in) = (0u64, 0u64);
    for t in tasks {
        let (m, b) = t.await.map_err(|e| e.to_string())?;
        msgs += m;
        bytes_in += b;
    }
    markers.await.map_err(|e| e.to_string())?;
    let rate = msgs as f64 / args.duration;
    println!(
        "deflate: {msgs} messages = {rate:.0} msg/s, {} B per message from the server, {} B to it",
        bytes_in / msgs.max(1),
        wire.len()
    );
    Ok(json!({
        "mode": "deflate",
        "compress": args.compress,
        "conns": args.conns,
        "size": args.size,
        "msgs": msgs,
        "msgs_per_s": rate.round() as u64,
        "wire_in_per_msg": bytes_in / msgs.max(1),
        "wire_out_per_msg": wire.len(),
        "errors": 0,
    }))
}
