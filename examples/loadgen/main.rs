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
//! * `group`: `--users` members on the IM servers `--ims` (alternating),
//!   joined to `--group` through the Route (`POST /api/groups/join`, over
//!   `--http-conns` keep-alive connections); once the Route counts them all
//!   online, `--messages` `POST /api/groups/send {"group","data":{"t","k"}}`
//!   with at most `--window` in flight (complete when every member has
//!   it): deliveries/s, the API call to the last member (p50, p99, max),
//!   lost frames, `servers` per send and the IM servers' group-message
//!   counters around the run; then, in the same run, one `POST /api/send`
//!   to each of `--sample` of the same members (`--http-conns` in flight):
//!   the time until all arrived and deliveries/s.
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
//! loadgen group --route http://127.0.0.1:9500 --ims ws://127.0.0.2:9000/,ws://127.0.0.3:9000/ --users 10000 --messages 200 --window 4
//! ```
//!
//! Layout: this file owns the command line and the dispatch;
//! [`connect`] opens WebSocket connections (loopback targets, source
//! addresses round-robin, bounded concurrency); [`measure`] owns the
//! measured window, its `MEASURE_*` markers and the latency figures;
//! [`httpc`] is a keep-alive HTTP/1.1 client; one module per mode does the
//! rest.

mod cluster;
mod connect;
mod deflate;
mod echo;
mod group;
mod http;
mod httpc;
mod idle;
mod measure;
mod register;
mod storm;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_tungstenite::WebSocketStream;

/// A client WebSocket over plain TCP.
type Ws = WebSocketStream<tokio::net::TcpStream>;

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
    /// One group's members on IM servers: group sends through the Route,
    /// against the same messages one by one through /api/send.
    Group(GroupArgs),
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
    /// A literal `{n}` in the URL's path or query is replaced, request by
    /// request, by a number cycling through 0..vary (e.g.
    /// `/route?uid=u{n}`: a different uid each time).
    #[arg(long, default_value_t = 1_000_000)]
    vary: u64,
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

#[derive(Args, Debug)]
struct GroupArgs {
    /// IM servers' WebSocket URLs, comma-separated; member i connects to
    /// the (i mod n)th with `?uid=<prefix><i>`.
    #[arg(long)]
    ims: String,
    /// The Route's base URL (`http://127.0.0.1:9500`).
    #[arg(long)]
    route: String,
    /// Members to connect and join.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// uid prefix.
    #[arg(long, default_value = "g")]
    uid_prefix: String,
    /// Source addresses for the members' sockets (see `echo --src-ips`).
    #[arg(long)]
    src_ips: Option<String>,
    /// The group (a fresh name per run: its members stay in Redis).
    #[arg(long, default_value = "bench")]
    group: String,
    /// Measured group messages.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Group messages before the measured ones, waited for, not measured
    /// (the first after the joins has each IM worker check the membership).
    #[arg(long, default_value_t = 1)]
    warmup_messages: usize,
    /// Group messages in flight at most (sent, not yet at every member).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Keep-alive HTTP connections to the Route (joins, one-by-one sends).
    #[arg(long, default_value_t = 16)]
    http_conns: usize,
    /// Members sent one /api/send each for the comparison (0: all).
    #[arg(long, default_value_t = 0)]
    sample: usize,
    /// Seconds a message may take to reach every member.
    #[arg(long, default_value_t = 30.0)]
    msg_timeout: f64,
    /// Quiet milliseconds after each MEASURE_*/SEND_* marker.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
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
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.mode {
            Mode::Echo(a) => echo::run(a).await,
            Mode::Idle(a) => idle::run(a).await,
            Mode::Storm(a) => storm::run(a).await,
            Mode::Http(a) => http::run(a).await,
            Mode::Register(a) => register::run(a).await,
            Mode::ApiSend(a) => cluster::run(a, false).await,
            Mode::U2u(a) => cluster::run(a, true).await,
            Mode::Deflate(a) => deflate::run(a).await,
            Mode::Group(a) => group::run(a).await,
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

/// Raises the soft open-files limit to the hard limit.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
