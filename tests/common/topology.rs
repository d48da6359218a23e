//! Real multi-process Redis topologies for tests, on 127.0.0.1 only:
//!
//! * [`RedisCluster`]: a Redis Cluster of masters and replicas, each node a
//!   `redis-server` child joined by `redis-cli --cluster create`, with the
//!   faults a test needs (SIGKILL a node and wait for its replica to take
//!   over; restart a node on a new port);
//! * [`SentinelSet`]: a master, two replicas and three sentinels watching
//!   them (in `topology/sentinel.rs`).
//!
//! Every process is a child of the test on a free port, in its own temporary
//! directory; dropping the value SIGKILLs each by pid, reaps it and removes
//! the directories. Every wait polls a condition against a deadline and
//! panics with what it saw last; none is a fixed sleep. Nothing is
//! persisted (`--save "" --appendonly no`): a node restarted after SIGKILL
//! comes back empty, and its replicas resynchronise to that.

mod cluster;
mod sentinel;
// Each test binary uses its own subset (see `dead_code` in `common`).
#[allow(unused_imports)]
pub use {
    cluster::{ClusterBuilder, Node, RedisCluster, DEFAULT_NODE_TIMEOUT, SLOTS},
    sentinel::SentinelSet,
};

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{free_port, read_tail, redis_ping, temp_dir, POLL_INTERVAL};

/// How long a `redis-server` may take to answer PING after it is spawned.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a topology may take to settle (created, restarted).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Processes and queries shared by both topologies
// ---------------------------------------------------------------------------

/// One `redis-server` child (a cluster node, a data node or a sentinel) and
/// its directory. Dropping it SIGKILLs and reaps the process, then removes
/// the directory.
struct Instance {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Instance {
    /// Spawns `redis-server` with `args(port, dir)` on a port from
    /// `pick_port`, retrying with another port when one fails (taken between
    /// finding and binding it).
    #[track_caller]
    fn start(
        what: &str,
        mut pick_port: impl FnMut() -> u16,
        mut args: impl FnMut(u16, &Path) -> Vec<OsString>,
    ) -> Instance {
        let mut inst = Instance {
            port: 0,
            child: None,
            dir: temp_dir(),
        };
        let mut last = String::new();
        for _ in 0..5 {
            let port = pick_port();
            let argv = args(port, inst.dir.path());
            match inst.spawn(port, &argv) {
                Ok(()) => return inst,
                Err(e) => last = e,
            }
        }
        panic!("{what} did not start: {last}");
    }

    /// Stops the current process if any, then spawns `redis-server args` on
    /// `port` and waits until it answers PING and `INFO server` names its pid
    /// (so a stranger that grabbed the port is not mistaken for it).
    fn spawn(&mut self, port: u16, args: &[OsString]) -> Result<(), String> {
        self.stop();
        self.port = port;
        let log_path = self.log_path();
        let open_log = || -> io::Result<fs::File> {
            OpenOptions::new().create(true).append(true).open(&log_path)
        };
        let (log, log_err) = match (open_log(), open_log()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Err(format!("{}: {e}", log_path.display())),
        };
        let child = spawn_redis_server(Command::new("redis-server").args(args), log, log_err);
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + SPAWN_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "exited with {status} on port {port}: {}",
                    read_tail(&log_path)
                ));
            }
            if redis_ping(port) {
                let info = query_text(port, &["INFO", "server"]).unwrap_or_default();
                if field(&info, "process_id") == Some(pid.to_string().as_str()) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "no PONG from pid {pid} within {SPAWN_TIMEOUT:?} on port {port}: {}",
                    read_tail(&log_path)
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `sig` to the process by pid (SIGSTOP, SIGCONT).
    #[track_caller]
    fn signal(&self, sig: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("a running redis-server");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the process by pid and reaps it. Idempotent.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The arguments of a data node (not a sentinel) on `port` in `dir`, then
/// `extra` (split at whitespace): loopback only, no persistence, in the
/// foreground. `repl-diskless-sync-delay 0`: Redis 7 otherwise waits 5 s
/// for more replicas before it starts a full sync, which every new or
/// restarted replica (and the replicas of a restarted master) needs.
fn server_args(port: u16, dir: &Path, extra: &str) -> Vec<OsString> {
    let mut v: Vec<OsString> = format!(
        "--port {port} --bind 127.0.0.1 --daemonize no --appendonly no \
         --repl-diskless-sync-delay 0 {extra}"
    )
    .split_whitespace()
    .map(OsString::from)
    .collect();
    v.extend(["--save".into(), OsString::new(), "--dir".into()]);
    v.push(dir.as_os_str().to_owned());
    v
}

/// The port of `127.0.0.1:P`, `redis://127.0.0.1:P` or `redis://127.0.0.1:P/`.
#[track_caller]
fn port_of(addr: &str) -> u16 {
    addr.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a 127.0.0.1:PORT address: {addr:?}"))
}

/// A new blocking connection to 127.0.0.1:`port`, with short timeouts.
fn connect(port: u16) -> Result<redis::Connection, String> {
    let fail = |e: redis::RedisError| format!("127.0.0.1:{port}: {e}");
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(fail)?;
    let con = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(fail)?;
    con.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(fail)?;
    con.set_write_timeout(Some(Duration::from_secs(3)))
        .map_err(fail)?;
    Ok(con)
}

/// Runs one command on `con`.
fn run(con: &mut redis::Connection, args: &[&str]) -> Result<redis::Value, String> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(con).map_err(|e| format!("{args:?}: {e}"))
}

/// Runs one command on a new connection to 127.0.0.1:`port`.
fn query(port: u16, args: &[&str]) -> Result<redis::Value, String> {
    run(&mut connect(port)?, args).map_err(|e| format!("127.0.0.1:{port} {e}"))
}

/// Like [`query`], for a reply that is one string (INFO, CLUSTER NODES, …).
pub(crate) fn query_text(port: u16, args: &[&str]) -> Result<String, String> {
    query(port, args).map(|v| text(&v))
}

/// A scalar reply as text (an array's elements joined by newlines).
fn text(v: &redis::Value) -> String {
    use redis::Value as V;
    match v {
        V::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        V::SimpleString(s) => s.clone(),
        V::Okay => "OK".into(),
        V::Int(n) => n.to_string(),
        V::Nil => String::new(),
        V::Array(items) => items.iter().map(text).collect::<Vec<_>>().join("\n"),
        other => format!("{other:?}"),
    }
}

/// The value of `name:value` in an INFO-style reply.
pub(crate) fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Runs `redis-cli -h 127.0.0.1 -p PORT args…` against `addr` and returns
/// its stdout and stderr, trimmed. `args` go to redis-cli verbatim, so
/// options work too (`-c` to follow redirections). Output is redis-cli's
/// raw form (not a terminal): `OK`, `v`, `MOVED 1234 127.0.0.1:P`, …
#[track_caller]
pub fn redis_cli(addr: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port_of(addr).to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-cli (scripts/setup.sh installs redis-tools): {e}")
        });
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s.trim().to_string()
}

/// Polls `f` until it returns `Ok`, and returns that value; panics after
/// `timeout` with `what` and the last error.
#[track_caller]
fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Spawns `cmd` (a `redis-server` command line) with its output in `log`;
/// a missing binary is a clear panic that names the setup script.
pub fn spawn_redis_server(
    cmd: &mut Command,
    log: fs::File,
    log_err: fs::File,
) -> std::process::Child {
    match cmd.stdin(Stdio::null()).stdout(log).stderr(log_err).spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "redis-server is not on PATH: run scripts/setup.sh to install the test dependencies"
        ),
        Err(e) => panic!("cannot spawn redis-server: {e}"),
    }
}
