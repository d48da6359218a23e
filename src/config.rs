//! Settings: Swoole's `set()` keys read from a TOML file, each overridable on
//! the command line, validated before anything starts.
//!
//! A settings file is one flat TOML table. The framework's keys live in
//! [`Settings`]; an application (the Route, the IM server) adds its own keys
//! as a second `serde` type, and [`load`] hands each key to exactly one of
//! the two. A key neither knows, a value of the wrong type or out of range
//! stops `start` with an error that names the key and the file.
//!
//! Relative paths (`pid_file`, `log_file`, `control_socket`) are resolved
//! against the working directory at load time, because a daemon changes to
//! `/` before it opens them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    Info,
    /// Verbose.
    Debug,
    /// Very verbose.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The framework's settings, with Swoole's key names. Durations are in
/// seconds and may be fractional.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on.
    pub port: u16,
    /// Event workers (default: the number of CPUs).
    pub worker_num: usize,
    /// Task workers (0: none).
    pub task_worker_num: usize,
    /// Run as a daemon (`start -d`).
    pub daemonize: bool,
    /// Where the master writes its pid.
    pub pid_file: PathBuf,
    /// Log destination when daemonized (stderr in the foreground unless set).
    pub log_file: Option<PathBuf>,
    /// Log verbosity.
    pub log_level: LogLevel,
    /// Requests (HTTP requests + WebSocket messages) after which a worker is
    /// replaced; 0 disables.
    pub max_request: u64,
    /// Connections per worker; past it new connections are refused (HTTP 503
    /// or WebSocket close 1013).
    pub max_conn: usize,
    /// Live connections per source IP per worker; past it a new connection
    /// is answered HTTP 503 and closed at accept. 0 disables.
    pub max_conn_per_ip: usize,
    /// WebSocket messages per second per accepted connection (a token
    /// bucket holding one second's worth); past it the connection is closed
    /// with 1008 "rate limit". 0 disables.
    pub max_messages_per_second: u32,
    /// A second address (`ip:port`) each worker also accepts on; the
    /// application sees which one accepted a connection
    /// (`ConnectionInfo::admin`). The Route answers `/api/*`, `/metrics` and
    /// `/dashboard` only there when it is set.
    pub admin_listen: Option<String>,
    /// Seconds between idle-connection sweeps; 0 disables.
    pub heartbeat_check_interval: f64,
    /// Seconds of silence after which a connection is closed (default: twice
    /// the check interval).
    pub heartbeat_idle_time: f64,
    /// Largest HTTP body or WebSocket message, in bytes.
    pub package_max_length: usize,
    /// Largest pending output per connection, in bytes; a slower reader is
    /// disconnected.
    pub buffer_output_size: usize,
    /// Negotiate permessage-deflate (RFC 7692) with clients that offer it
    /// (Swoole's key).
    pub websocket_compression: bool,
    /// Payloads shorter than this many bytes are sent uncompressed.
    pub websocket_compression_threshold: usize,
    /// Honour a client's wish for context takeover (better ratios, about
    /// 300 KiB of zlib state per connection, and such a connection is
    /// closed with 1012 rather than moved by a handover); off: every
    /// message is compressed on its own and the state is shared per worker.
    pub websocket_compression_context_takeover: bool,
    /// Seconds a new connection may take to send a complete request or
    /// upgrade (slowloris guard).
    pub handshake_timeout: f64,
    /// Reload workers one at a time, each replacement serving before its
    /// predecessor leaves (Swoole's `reload_async`).
    pub reload_async: bool,
    /// Seconds a stopping worker may take before it is killed.
    pub max_wait_time: f64,
    /// Redis the workers connect to in on_worker_start; none: no Redis.
    pub redis_url: Option<String>,
    /// Sentinels (`redis://h:p`, …) naming `redis_sentinel_master`; wins
    /// over `redis_url` (see `reactor::redis::target`).
    pub redis_sentinels: Vec<String>,
    /// The master's name at the Sentinels.
    pub redis_sentinel_master: Option<String>,
    /// Redis Cluster seed nodes (`redis://h:p`, …); wins over the others.
    pub redis_cluster: Vec<String>,
    /// Cluster pub/sub: `sharded` (the default) or `classic`.
    pub redis_cluster_pubsub: String,
    /// Prefix of every Redis key and channel the applications use (no `{`
    /// or `}`: the key schema sets the hash tags).
    pub redis_prefix: String,
    /// Seconds a Redis request may go unanswered before the worker's link
    /// is declared broken (every pending callback then fails and it
    /// reconnects).
    pub redis_timeout: f64,
    /// Unix socket the master answers `status` on (default: pid_file with
    /// the extension `.sock`).
    pub control_socket: Option<PathBuf>,
}

impl Settings {
    /// The permessage-deflate part of the settings.
    pub fn deflate_config(&self) -> crate::reactor::deflate::Config {
        crate::reactor::deflate::Config {
            enabled: self.websocket_compression,
            context_takeover: self.websocket_compression_context_takeover,
            threshold: self.websocket_compression_threshold,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: "0.0.0.0".into(),
            port: 9500,
            worker_num: std::thread::available_parallelism().map_or(1, |n| n.get()),
            task_worker_num: 0,
            daemonize: false,
            pid_file: PathBuf::from("swocloud.pid"),
            log_file: None,
            log_level: LogLevel::Info,
            max_request: 0,
            max_conn: 10_000,
            max_conn_per_ip: 0,
            max_messages_per_second: 0,
            admin_listen: None,
            heartbeat_check_interval: 0.0,
            heartbeat_idle_time: 0.0,
            package_max_length: 2 * 1024 * 1024,
            buffer_output_size: 2 * 1024 * 1024,
            websocket_compression: false,
            websocket_compression_threshold: 128,
            websocket_compression_context_takeover: false,
            handshake_timeout: 5.0,
            reload_async: true,
            max_wait_time: 3.0,
            redis_url: None,
            redis_sentinels: Vec::new(),
            redis_sentinel_master: None,
            redis_cluster: Vec::new(),
            redis_cluster_pubsub: "sharded".into(),
            redis_prefix: String::new(),
            redis_timeout: 3.0,
            control_socket: None,
        }
    }
}

/// Where a setting came from, for error messages.
#[derive(Debug, Clone)]
pub enum Source {
    /// The settings file.
    File(PathBuf),
    /// A command-line flag.
    Flag,
    /// The program's built-in defaults.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Flag => f.write_str("the command line"),
            Source::Default => f.write_str("the built-in defaults"),
        }
    }
}

/// A settings error: which key, from where, and why.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key nobody knows.
    UnknownKey {
        /// The key.
        key: String,
        /// Where it was set.
        source: Source,
    },
    /// A value of the wrong type or out of range.
    BadValue {
        /// The key.
        key: String,
        /// Where it was set.
        source: Source,
        /// Why it is refused.
        message: String,
    },
    /// A `--set` argument that is not `key=value`.
    BadOverride(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => {
                write!(f, "cannot read settings file {}: {error}", path.display())
            }
            ConfigError::Syntax { path, message } => write!(
                f,
                "settings file {} is not valid TOML: {message}",
                path.display()
            ),
            ConfigError::UnknownKey { key, source } => {
                write!(f, "unknown setting `{key}` in {source}")
            }
            ConfigError::BadValue {
                key,
                source,
                message,
            } => write!(f, "bad value for setting `{key}` in {source}: {message}"),
            ConfigError::BadOverride(s) => {
                write!(f, "bad --set argument `{s}`: expected KEY=VALUE")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// No application keys (the framework alone).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoAppSettings {}

/// Parses `key=value` into a TOML value: a TOML literal when it parses as
/// one (`8`, `true`, `"x"`), else the raw text as a string.
pub fn parse_override(arg: &str) -> Result<(String, toml::Value), ConfigError> {
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride(arg.into()))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(ConfigError::BadOverride(arg.into()));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

/// Framework keys whose default (`None`) does not serialize.
const OPTIONAL_KEYS: [&str; 5] = [
    "log_file",
    "redis_url",
    "redis_sentinel_master",
    "control_socket",
    "admin_listen",
];

/// The framework's key names.
fn framework_keys() -> Vec<String> {
    match toml::Value::try_from(Settings::default()) {
        Ok(toml::Value::Table(t)) => t
            .keys()
            .cloned()
            .chain(OPTIONAL_KEYS.map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// The application's key names: those its default value serializes.
fn app_keys<X: Serialize + Default>() -> Vec<String> {
    match toml::Value::try_from(X::default()) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Deserializes `table` into `T`; on failure, finds the key at fault by
/// trying each one alone, so the error can name it.
fn typed<T: DeserializeOwned>(
    table: &toml::Table,
    sources: &dyn Fn(&str) -> Source,
) -> Result<T, ConfigError> {
    match toml::Value::Table(table.clone()).try_into::<T>() {
        Ok(v) => Ok(v),
        Err(whole) => {
            for (k, v) in table {
                let mut one = toml::Table::new();
                one.insert(k.clone(), v.clone());
                if let Err(e) = toml::Value::Table(one).try_into::<T>() {
                    return Err(ConfigError::BadValue {
                        key: k.clone(),
                        source: sources(k),
                        message: e.message().trim().to_string(),
                    });
                }
            }
            Err(ConfigError::BadValue {
                key: "?".into(),
                source: Source::Default,
                message: whole.message().trim().to_string(),
            })
        }
    }
}

/// Loads settings: program defaults, then the file (if any), then the
/// `--set`/flag overrides, each key checked against the framework's and the
/// application's known keys. Returns the framework settings and the
/// application's.
pub fn load<X>(
    defaults: toml::Table,
    file: Option<&Path>,
    overrides: &[(String, toml::Value)],
) -> Result<(Settings, X), ConfigError>
where
    X: DeserializeOwned + Serialize + Default,
{
    let mut merged = defaults;
    let mut origin: std::collections::HashMap<String, Source> = merged
        .keys()
        .map(|k| (k.clone(), Source::Default))
        .collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        for (k, v) in table {
            origin.insert(k.clone(), Source::File(abs.clone()));
            merged.insert(k, v);
        }
    }
    for (k, v) in overrides {
        origin.insert(k.clone(), Source::Flag);
        merged.insert(k.clone(), v.clone());
    }
    let source_of = |k: &str| origin.get(k).cloned().unwrap_or(Source::Default);

    let fw_keys = framework_keys();
    let ap_keys = app_keys::<X>();
    let (mut fw, mut app) = (toml::Table::new(), toml::Table::new());
    for (k, v) in merged {
        if fw_keys.contains(&k) {
            fw.insert(k, v);
        } else if ap_keys.contains(&k) {
            app.insert(k, v);
        } else {
            return Err(ConfigError::UnknownKey {
                source: source_of(&k),
                key: k,
            });
        }
    }
    let mut settings: Settings = typed(&fw, &source_of)?;
    let app: X = typed(&app, &source_of)?;
    settings.validate(&source_of)?;
    settings.resolve_paths();
    Ok((settings, app))
}

impl Settings {
    fn validate(&mut self, source_of: &dyn Fn(&str) -> Source) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::BadValue {
            key: key.into(),
            source: source_of(key),
            message: message.into(),
        };
        if self.host.parse::<std::net::IpAddr>().is_err() {
            return Err(bad(
                "host",
                "expected an IP address such as 0.0.0.0 or 127.0.0.1",
            ));
        }
        if self.worker_num == 0 || self.worker_num > 1024 {
            return Err(bad("worker_num", "expected 1..=1024"));
        }
        if self.task_worker_num > 1024 {
            return Err(bad("task_worker_num", "expected 0..=1024"));
        }
        if self.max_conn == 0 {
            return Err(bad("max_conn", "expected at least 1"));
        }
        for (key, v) in [
            ("heartbeat_check_interval", self.heartbeat_check_interval),
            ("heartbeat_idle_time", self.heartbeat_idle_time),
            ("handshake_timeout", self.handshake_timeout),
            ("max_wait_time", self.max_wait_time),
            ("redis_timeout", self.redis_timeout),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(bad(key, "expected a non-negative number of seconds"));
            }
        }
        if self.package_max_length < 1024 {
            return Err(bad("package_max_length", "expected at least 1024 bytes"));
        }
        if self.buffer_output_size < 1024 {
            return Err(bad("buffer_output_size", "expected at least 1024 bytes"));
        }
        if let Some(a) = &self.admin_listen {
            match a.parse::<std::net::SocketAddr>() {
                Err(_) => {
                    return Err(bad(
                        "admin_listen",
                        "expected ip:port such as 127.0.0.1:9501",
                    ))
                }
                Ok(addr) if addr.port() != 0 && addr == self.listen_addr() => {
                    return Err(bad("admin_listen", "must differ from host:port"))
                }
                Ok(_) => {}
            }
        }
        if let Err((key, why)) = crate::reactor::redis::target::Plan::check(self) {
            return Err(bad(key, &why));
        }
        if self.heartbeat_check_interval > 0.0 && self.heartbeat_idle_time == 0.0 {
            self.heartbeat_idle_time = 2.0 * self.heartbeat_check_interval;
        }
        Ok(())
    }

    fn resolve_paths(&mut self) {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        self.pid_file = abs(&self.pid_file);
        self.log_file = self.log_file.as_deref().map(abs);
        self.control_socket = Some(abs(&self
            .control_socket
            .clone()
            .unwrap_or_else(|| self.pid_file.with_extension("sock"))));
    }

    /// The control socket path (always set after [`load`]).
    pub fn control_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.pid_file.with_extension("sock"))
    }

    /// `admin_listen` as a socket address (validated by [`load`]).
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_listen.as_deref().and_then(|a| a.parse().ok())
    }

    /// `host:port` as a socket address.
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        let ip: std::net::IpAddr = self
            .host
            .parse()
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        std::net::SocketAddr::new(ip, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    struct App {
        balancer: String,
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("s.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn file_then_flags_win_and_app_keys_are_split() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "port = 7000\nworker_num = 3\nbalancer = \"round_robin\"\n",
        );
        let (s, a): (Settings, App) = load(
            toml::Table::new(),
            Some(&p),
            &[parse_override("port=7001").unwrap()],
        )
        .unwrap();
        assert_eq!(
            (s.port, s.worker_num, a.balancer.as_str()),
            (7001, 3, "round_robin")
        );
        assert!(s.pid_file.is_absolute());
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "port = 7000\nwroker_num = 3\n");
        let e = load::<App>(toml::Table::new(), Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("wroker_num") && e.contains("s.toml"), "{e}");
    }

    #[test]
    fn bad_value_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "port = \"high\"\nworker_num = 3\n");
        let e = load::<App>(toml::Table::new(), Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`port`") && e.contains("s.toml"), "{e}");
        let p = write(dir.path(), "worker_num = 0\n");
        let e = load::<App>(toml::Table::new(), Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`worker_num`") && e.contains("1..=1024"), "{e}");
        let p = write(dir.path(), "redis_prefix = \"{app}:\"\n");
        let e = load::<App>(toml::Table::new(), Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`redis_prefix`") && e.contains("hash tags"),
            "{e}"
        );
        let p = write(dir.path(), "log_level = \"loud\"\n");
        let e = load::<App>(toml::Table::new(), Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`log_level`"), "{e}");
    }

    #[test]
    fn overrides_parse_toml_literals_or_strings() {
        assert_eq!(
            parse_override("worker_num=4").unwrap().1,
            toml::Value::Integer(4)
        );
        assert_eq!(
            parse_override("host=127.0.0.1").unwrap().1,
            toml::Value::String("127.0.0.1".into())
        );
        assert!(parse_override("novalue").is_err());
    }
}
