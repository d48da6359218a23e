//! The daemon command line shared by `swocloud` and `swocloud-im`:
//! `start [-d]`, `stop`, `reload`, `status [--json]`, each taking `-c FILE`
//! and `--set KEY=VALUE` (any setting), plus flags for the common settings.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, FromArgMatches, Parser, Subcommand};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::config::{self, Settings};
use crate::event::App;
use crate::process::pidfile::{self, PidState};
use crate::process::{control, master};

/// Exit code of `status` when nothing runs (LSB).
pub const EXIT_NOT_RUNNING: i32 = 3;
/// How long `stop` waits past `max_wait_time` for the master to go.
const STOP_SLACK: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the server (in the foreground unless -d).
    Start(StartArgs),
    /// Stop a running server gracefully (SIGTERM) and wait until it is gone.
    Stop(Common),
    /// Reload the workers one at a time without dropping the port (SIGUSR1).
    Reload(ReloadArgs),
    /// Show the master, manager and workers with their load.
    Status(StatusArgs),
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Settings file (TOML, Swoole key names).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override any setting, e.g. --set max_request=1000 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Override pid_file.
    #[arg(long)]
    pid_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct StartArgs {
    #[command(flatten)]
    common: Common,
    /// Run as a daemon (returns once the server serves).
    #[arg(short = 'd', long = "daemonize")]
    daemonize: bool,
    /// Override host.
    #[arg(long)]
    host: Option<String>,
    /// Override port.
    #[arg(short = 'p', long)]
    port: Option<u16>,
    /// Override worker_num.
    #[arg(short = 'w', long)]
    worker_num: Option<usize>,
    /// Override task_worker_num.
    #[arg(long)]
    task_worker_num: Option<usize>,
    /// Override log_file.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Override log_level (error, warn, info, debug, trace).
    #[arg(long)]
    log_level: Option<String>,
    /// Override max_request.
    #[arg(long)]
    max_request: Option<u64>,
}

#[derive(Args, Debug)]
struct ReloadArgs {
    #[command(flatten)]
    common: Common,
    /// Reload the task workers instead (SIGUSR2).
    #[arg(long)]
    tasks: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    common: Common,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// What a program adds to `status` beside the process table (the Route:
/// its IM servers and its Redis state).
#[derive(Debug, Default, Clone)]
pub struct StatusExtra {
    /// Keys merged into the `status --json` document.
    pub json: serde_json::Map<String, Value>,
    /// Text printed below the table.
    pub text: String,
}

/// A program's `status` hook: gets the settings and the program's own
/// settings, runs only once the master answered.
pub type StatusHook<X> = fn(&Settings, &X) -> StatusExtra;

/// Runs the CLI for a program whose application is built by `make_app`
/// from the settings. `defaults` holds the program's own defaults for
/// framework keys (port, pid_file, …). Returns the process exit code.
pub fn main<X, A>(
    program: &'static str,
    about: &'static str,
    defaults: toml::Table,
    make_app: impl FnOnce(&Settings, X) -> Result<A, String>,
) -> i32
where
    X: DeserializeOwned + Serialize + Default,
    A: App,
{
    main_with_status(program, about, defaults, make_app, None)
}

/// [`main`] with a hook that adds the program's own section to `status`.
pub fn main_with_status<X, A>(
    program: &'static str,
    about: &'static str,
    defaults: toml::Table,
    make_app: impl FnOnce(&Settings, X) -> Result<A, String>,
    status_hook: Option<StatusHook<X>>,
) -> i32
where
    X: DeserializeOwned + Serialize + Default,
    A: App,
{
    let cmd = <Cli as clap::CommandFactory>::command()
        .name(program)
        .bin_name(program)
        .about(about);
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let (common, mut overrides) = match &cli.cmd {
        Cmd::Start(a) => (a.common.clone(), start_overrides(a)),
        Cmd::Stop(c) => (c.clone(), Vec::new()),
        Cmd::Reload(a) => (a.common.clone(), Vec::new()),
        Cmd::Status(a) => (a.common.clone(), Vec::new()),
    };
    for s in &common.set {
        match config::parse_override(s) {
            Ok(kv) => overrides.push(kv),
            Err(e) => return fail(program, &e.to_string()),
        }
    }
    if let Some(p) = &common.pid_file {
        overrides.push((
            "pid_file".into(),
            toml::Value::String(p.display().to_string()),
        ));
    }
    let (settings, app_settings): (Settings, X) =
        match config::load(defaults, common.config.as_deref(), &overrides) {
            Ok(v) => v,
            Err(e) => return fail(program, &e.to_string()),
        };
    match cli.cmd {
        Cmd::Start(_) => match make_app(&settings, app_settings) {
            Ok(app) => master::start(settings, app),
            Err(e) => fail(program, &e),
        },
        Cmd::Stop(_) => stop(program, &settings),
        Cmd::Reload(a) => reload(program, &settings, a.tasks),
        Cmd::Status(a) => status(program, &settings, a.json, &|| {
            status_hook.map(|h| h(&settings, &app_settings))
        }),
    }
}

fn fail(program: &str, msg: &str) -> i32 {
    eprintln!("{program}: {msg}");
    2
}

fn start_overrides(a: &StartArgs) -> Vec<(String, toml::Value)> {
    let mut v: Vec<(String, toml::Value)> = Vec::new();
    let s = |x: &str| toml::Value::String(x.to_string());
    if a.daemonize {
        v.push(("daemonize".into(), toml::Value::Boolean(true)));
    }
    if let Some(h) = &a.host {
        v.push(("host".into(), s(h)));
    }
    if let Some(p) = a.port {
        v.push(("port".into(), toml::Value::Integer(p.into())));
    }
    if let Some(n) = a.worker_num {
        v.push(("worker_num".into(), toml::Value::Integer(n as i64)));
    }
    if let Some(n) = a.task_worker_num {
        v.push(("task_worker_num".into(), toml::Value::Integer(n as i64)));
    }
    if let Some(p) = &a.log_file {
        v.push(("log_file".into(), s(&p.display().to_string())));
    }
    if let Some(l) = &a.log_level {
        v.push(("log_level".into(), s(l)));
    }
    if let Some(n) = a.max_request {
        v.push(("max_request".into(), toml::Value::Integer(n as i64)));
    }
    v
}

/// The live master's pid, or an exit code and message.
fn running(program: &str, settings: &Settings) -> Result<i32, i32> {
    match pidfile::inspect(&settings.pid_file) {
        PidState::Running(pid) => Ok(pid),
        PidState::Absent => {
            eprintln!(
                "{program}: not running (no pid file at {})",
                settings.pid_file.display()
            );
            Err(EXIT_NOT_RUNNING)
        }
        PidState::Stale { why, .. } => {
            eprintln!(
                "{program}: not running (stale pid file {}: {why}); nothing signalled",
                settings.pid_file.display()
            );
            Err(EXIT_NOT_RUNNING)
        }
    }
}

fn stop(program: &str, settings: &Settings) -> i32 {
    let pid = match running(program, settings) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGTERM) {
        eprintln!("{program}: cannot signal pid {pid}: {e}");
        return 1;
    }
    let limit = Duration::from_secs_f64(settings.max_wait_time) + STOP_SLACK;
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if !pidfile::alive(pid) && !settings.pid_file.exists() {
            println!("stopped (pid {pid})");
            return 0;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "{program}: pid {pid} did not stop within {:.1}s",
        limit.as_secs_f64()
    );
    1
}

fn reload(program: &str, settings: &Settings, tasks: bool) -> i32 {
    let pid = match running(program, settings) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let sig = if tasks {
        Signal::SIGUSR2
    } else {
        Signal::SIGUSR1
    };
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) => {
            println!(
                "reload requested (pid {pid}, {})",
                if tasks { "task workers" } else { "workers" }
            );
            0
        }
        Err(e) => {
            eprintln!("{program}: cannot signal pid {pid}: {e}");
            1
        }
    }
}

fn status(
    program: &str,
    settings: &Settings,
    json: bool,
    extra: &dyn Fn() -> Option<StatusExtra>,
) -> i32 {
    let pid = match running(program, settings) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut doc = match control::request(&settings.control_path(), "status") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{program}: master pid {pid} runs but does not answer: {e}");
            return 1;
        }
    };
    let extra = extra().unwrap_or_default();
    if json {
        if let Some(obj) = doc.as_object_mut() {
            obj.extend(extra.json);
        }
        println!("{doc}");
    } else {
        print!("{}{}", render_table(program, &doc), extra.text);
    }
    0
}

/// Timeout of each step of [`local_http_get`]: the server is on this host.
const LOCAL_HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// A blocking `GET path` to the server's own HTTP port (for `status`
/// hooks): `host` from the settings, the loopback address when it is the
/// wildcard. Sends `Authorization: Bearer` when `bearer` is given. Returns
/// the status code and the body; errors name the address.
pub fn local_http_get(
    settings: &Settings,
    path: &str,
    bearer: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
    let mut addr = settings.listen_addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let ctx =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("GET {path} on {addr}: {e}"));
    let mut s = TcpStream::connect_timeout(&addr, LOCAL_HTTP_TIMEOUT).map_err(ctx)?;
    s.set_read_timeout(Some(LOCAL_HTTP_TIMEOUT)).map_err(ctx)?;
    s.set_write_timeout(Some(LOCAL_HTTP_TIMEOUT)).map_err(ctx)?;
    let auth = bearer
        .filter(|k| !k.is_empty())
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(ctx)?;
    let mut raw = Vec::new();
    s.take(16 << 20).read_to_end(&mut raw).map_err(ctx)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || ctx(std::io::Error::other("malformed HTTP answer"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_string()))
}

fn human_uptime(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s / 60 % 60),
    }
}

/// Renders the status document as a table.
pub fn render_table(program: &str, doc: &Value) -> String {
    let mut out = format!(
        "{program} {} on {}\n{:<12} {:>3} {:>8} {:>8} {:>7} {:>10} {:>9}\n",
        doc["phase"].as_str().unwrap_or("?"),
        doc["listen"].as_str().unwrap_or("?"),
        "ROLE",
        "ID",
        "PID",
        "UPTIME",
        "CONNS",
        "REQUESTS",
        "RSS(KiB)"
    );
    let mut line = |role: &str, r: &Value, with_load: bool| {
        let n = |k: &str| r[k].as_u64().map_or("-".to_string(), |v| v.to_string());
        out.push_str(&format!(
            "{:<12} {:>3} {:>8} {:>8} {:>7} {:>10} {:>9}\n",
            role,
            if with_load { n("id") } else { "-".into() },
            n("pid"),
            human_uptime(r["uptime_s"].as_u64().unwrap_or(0)),
            if with_load {
                n("connections")
            } else {
                "-".into()
            },
            if with_load { n("requests") } else { "-".into() },
            n("rss_kib"),
        ));
    };
    line("master", &doc["master"], false);
    line("manager", &doc["manager"], false);
    for w in doc["workers"].as_array().into_iter().flatten() {
        line(
            if w["stopping"].as_bool() == Some(true) {
                "worker*"
            } else {
                "worker"
            },
            w,
            true,
        );
    }
    for w in doc["task_workers"].as_array().into_iter().flatten() {
        line("task_worker", w, true);
    }
    out
}
