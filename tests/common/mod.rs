//! Shared helpers for the integration tests (`mod common;` in each test file).
//!
//! This module owns everything a test needs to drive real processes over
//! loopback without an async runtime:
//!
//! * ports and temporary directories: [`free_port`], [`free_port_on`]
//!   (below the ephemeral range, each handed out once: [`port_pool`]),
//!   [`temp_dir`], [`assert_port_free`], [`port_accepts`];
//! * a private, throw-away Redis: [`RedisServer`] (`redis_server.rs`); a real local Redis
//!   Cluster and a Redis Sentinel set: [`topology`];
//! * the seed's registration client as a process: [`seed::SeedClient`];
//! * polling: [`wait_until`], [`wait_for`];
//! * a tiny blocking HTTP/1.1 client: [`http_get`], [`http_request`];
//! * a blocking WebSocket client with timeouts: [`ws_connect`],
//!   [`ws_connect_from`], [`WsClient`];
//! * process inspection and cleanup: [`Proc`], [`pid_alive`],
//!   [`children_of`], [`descendants_of`], [`proc_cmdline`].
//!
//! Every helper talks to 127.0.0.0/8 only. Each test binary compiles this
//! module separately and uses a different subset, hence the blanket
//! `dead_code` allowance. The WebSocket helpers return `tungstenite::Error`
//! unboxed, exactly as tungstenite does, hence `result_large_err`.
#![allow(dead_code, clippy::result_large_err)]

pub mod cluster;
pub mod daemon;
pub mod frames;
pub mod inproc;
pub mod nodes;
pub mod proxy;
mod redis_server;
pub mod seed;
pub mod topology;
mod ws;

pub use redis_server::RedisServer;
pub use ws::*;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::{Message, WebSocket};

/// Default timeout for the blocking network helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Interval at which [`wait_until`] and [`wait_for`] poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Ports and directories
// ---------------------------------------------------------------------------

/// The path of example `name` (built by `cargo test` beside the test
/// binaries, in `target/<profile>/examples/`).
pub fn example_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    profile_dir.join("examples").join(name)
}

/// The framework's minimal daemon (`examples/health_daemon.rs`), as a path
/// string for [`daemon::Daemon`].
pub fn health_daemon_bin() -> String {
    example_bin("health_daemon").display().to_string()
}

/// A TCP port on 127.0.0.1 that is free, from [`port_pool`].
pub fn free_port() -> u16 {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// The first port tests hand out: below it are the machine's own services.
const POOL_START: u16 = 16384;

/// Where [`free_port_on`] takes ports from: `[POOL_START, the kernel's
/// ephemeral range)`, `None` when the ephemeral range leaves no room.
///
/// Outgoing connections take their local ports from the ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768–60999 by default), and so does
/// binding port 0. A port found by binding port 0 and dropping the
/// listener could therefore be taken a moment later as the source port of
/// another test's connection (a connection storm makes thousands), and
/// the daemon then failed to start with "address already in use" (seen in
/// CI). Below the ephemeral range only listeners take ports, and those are
/// ours: handed out once each.
pub fn port_pool() -> Option<(u16, u16)> {
    static POOL: OnceLock<Option<(u16, u16)>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let low: u16 = range.split_whitespace().next()?.parse().ok()?;
        (low >= POOL_START + 2048).then_some((POOL_START, low))
    })
}

/// A TCP port on `ip` that is free now and that no other call in this
/// process has handed out (see [`port_pool`]). Without a pool, a port
/// found by binding port 0 (free a moment ago).
pub fn free_port_on(ip: impl Into<IpAddr>) -> u16 {
    pool_port(ip.into(), 0)
}

/// A free port `p` on 127.0.0.1 with `p + offset` free too (a Redis
/// Cluster node and its bus port), both taken, so both below the
/// ephemeral range when there is a pool.
pub fn free_port_and(offset: u16) -> u16 {
    pool_port(IpAddr::V4(Ipv4Addr::LOCALHOST), offset)
}

/// The one port search: walks the pool (`[lo, hi - offset)`) from a
/// per-process offset, so that two test processes at once rarely meet,
/// and returns the first `p` such that `p` and (if `offset` > 0)
/// `p + offset` are bindable on `ip` and not handed out yet; takes both.
/// A `p` whose companion is not free stays taken: one port lost.
fn pool_port(ip: IpAddr, offset: u16) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let free = |p: u16| TcpListener::bind((ip, p)).is_ok();
    let companion_ok = |p: u16| {
        offset == 0
            || p.checked_add(offset)
                .is_some_and(|q| free(q) && take_port(q))
    };
    let Some((lo, hi)) = port_pool().filter(|(lo, hi)| hi - lo > offset + 64) else {
        for _ in 0..1000 {
            let p = TcpListener::bind((ip, 0))
                .and_then(|l| l.local_addr())
                .unwrap_or_else(|e| panic!("cannot bind {ip}:0 to find a free port: {e}"))
                .port();
            if take_port(p) && companion_ok(p) {
                return p;
            }
        }
        panic!("no free port P on {ip} with P+{offset} free");
    };
    let span = u32::from(hi - offset - lo);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let p = lo + ((start + NEXT.fetch_add(1, SeqCst)) % span) as u16;
        if free(p) && take_port(p) && companion_ok(p) {
            return p;
        }
    }
    panic!("no free port P on {ip} with P+{offset} free in {lo}..{hi}");
}

/// Marks `port` handed out (by [`free_port_on`], or a companion port such
/// as a Redis Cluster node's bus port); false if it already was.
pub fn take_port(port: u16) -> bool {
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    TAKEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port)
}

/// A fresh temporary directory, removed when the returned guard drops.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("swocloud-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// Panics unless 127.0.0.1:`port` can be bound by a plain listener.
///
/// The std listener sets `SO_REUSEADDR` (so lingering TIME_WAIT sockets do not
/// count) but not `SO_REUSEPORT`, so this fails while any socket still
/// listens on the port, including one that was opened with `SO_REUSEPORT`.
#[track_caller]
pub fn assert_port_free(port: u16) {
    if let Err(e) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        panic!("port {port} is still in use: {e}");
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` right now.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

/// Polls `cond` every 20 ms until it returns true; panics with `what` after
/// `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `f` every 20 ms until it returns `Some`, and returns that value;
/// panics with `what` after `timeout`.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// Private Redis
// ---------------------------------------------------------------------------

/// Whether a WebSocket read failed only because its timeout passed.
pub fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e)
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// Runs one of the worker client's [`Request`]s on a plain blocking
/// connection (the registry and presence builders, in tests).
pub fn redis_run<T: redis::FromRedisValue>(
    c: &mut redis::Connection,
    req: swocloud::reactor::redis::Request,
) -> redis::RedisResult<T> {
    use swocloud::reactor::redis::Request;
    match req {
        Request::Cmd(cmd) => cmd.query(c),
        Request::Pipe(p) => p.query(c),
        Request::Atomic(mut p) => p.atomic().query(c),
        Request::Script(s) => s.eval_cmd().query(c),
    }
}

/// Raw RESP `PING` on 127.0.0.1:`port`, true on `+PONG`.
fn redis_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok()
        && matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

fn read_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

// ---------------------------------------------------------------------------
// Blocking HTTP/1.1 client
// ---------------------------------------------------------------------------

/// Status, headers in order, and body (decoded from chunked if needed, lossy
/// UTF-8).
pub type HttpResponse = (u16, Vec<(String, String)>, String);

/// `GET path` with `Connection: close`; see [`http_request`].
pub fn http_get(addr: impl ToSocketAddrs, path: &str) -> io::Result<HttpResponse> {
    http_request(addr, "GET", path, &[], b"")
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole
/// response, with a 5 s timeout on connect and on each read and write.
///
/// `Host`, `Connection` and (for a non-empty body) `Content-Length` are added
/// unless given in `headers`. Connection and protocol failures are returned
/// as errors, never panics, so load-style tests can count them.
pub fn http_request(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let addr = resolve(addr)?;
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;

    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    if !has("connection") {
        req.push_str("Connection: close\r\n");
    }
    if !body.is_empty() && !has("content-length") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let mut header_buf = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut header_buf);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(invalid(format!(
                "incomplete HTTP response ({} bytes): {:?}",
                raw.len(),
                String::from_utf8_lossy(raw)
            )))
        }
        Err(e) => return Err(invalid(format!("bad HTTP response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let mut body = &raw[head_len..];
    let decoded;
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        decoded = decode_chunked(body).ok_or_else(|| invalid("bad chunked body".into()))?;
        body = &decoded;
    } else if let Some(len) = header("content-length").and_then(|v| v.trim().parse().ok()) {
        if body.len() < len {
            return Err(invalid(format!(
                "body truncated: {} of {len} bytes",
                body.len()
            )));
        }
        body = &body[..len];
    }
    Ok((status, headers, String::from_utf8_lossy(body).into_owned()))
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

fn resolve(addr: impl ToSocketAddrs) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing"))
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A child process that is killed (SIGKILL), together with all its
/// descendants, and reaped when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Spawns `cmd` (its stdio settings are kept as given).
    #[track_caller]
    pub fn spawn(cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        Proc { child }
    }

    /// Wraps an already spawned child.
    pub fn from_child(child: Child) -> Self {
        Proc { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `sig` to the process (not to its descendants).
    pub fn signal(&self, sig: Signal) -> nix::Result<()> {
        signal::kill(Pid::from_raw(self.pid()), sig)
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGKILLs the process and all its descendants, then reaps it.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            // Collect the tree first: once the parent dies its children are
            // re-parented and can no longer be found through it.
            let tree = descendants_of(self.pid());
            let _ = self.child.kill();
            for pid in tree {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match signal::kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    match proc_stat(pid) {
        Some((state, _)) => state != 'Z',
        None => false,
    }
}

/// State character and parent pid from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or
    // parentheses: the fields we want follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Live (non-zombie) direct children of `pid`, found by scanning `/proc`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| matches!(proc_stat(p), Some((state, ppid)) if ppid == pid && state != 'Z'))
        .collect();
    out.sort_unstable();
    out
}

/// All live descendants of `pid`, parents before their children.
pub fn descendants_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for child in children_of(p) {
            out.push(child);
            frontier.push(child);
        }
    }
    out
}

/// The command line of `pid`, arguments joined by spaces, or `None` if the
/// process is gone.
pub fn proc_cmdline(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

/// The value of an unlabelled Prometheus sample `name` in `GET /metrics`
/// of `addr` (None when the scrape fails or the sample is absent).
pub fn metric(addr: impl ToSocketAddrs, name: &str) -> Option<f64> {
    let (status, _, body) = http_get(addr, "/metrics").ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
