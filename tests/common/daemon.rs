//! Driving a swocloud daemon binary from tests: a private directory with a
//! settings file, a free port, `start -d` / `stop` / `reload` / `status`,
//! and a guard that kills the whole tree if a test fails half-way (and
//! prints the tail of the daemon's log).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::{descendants_of, free_port, free_port_on, pid_alive, temp_dir, wait_until};

/// A daemon under test. Dropping it stops it (SIGKILL of the tree).
pub struct Daemon {
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub host: String,
    pub config: PathBuf,
}

impl Daemon {
    /// Prepares (does not start) a daemon of `bin` with `settings` (TOML
    /// lines) plus host, port, pid_file and log_file in a private dir.
    pub fn new(bin: &str, settings: &str) -> Daemon {
        Daemon::on_host(bin, "127.0.0.1", settings)
    }

    /// As [`Daemon::new`] on a chosen loopback address.
    ///
    /// The Route and IM binaries default `redis_url` to 127.0.0.1:6379, the
    /// machine's shared Redis. A test must never reach it, so a daemon of
    /// theirs whose `settings` name no Redis (`redis_url`, `redis_cluster`,
    /// `redis_sentinels`) gets a `redis_url` on a port where
    /// nothing listens (Redis down); tests that need Redis pass
    /// [`RedisServer::url`](super::RedisServer::url).
    pub fn on_host(bin: &str, host: &str, settings: &str) -> Daemon {
        let dir = temp_dir();
        // Free on that very address: a port in TIME_WAIT there (load tests
        // binding 127.0.0.x sources) cannot be listened on.
        let port = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => free_port_on(ip),
            Err(_) => free_port(),
        };
        let config = dir.path().join("swocloud.toml");
        let mut text = format!(
            "host = \"{host}\"\nport = {port}\npid_file = \"{}\"\nlog_file = \"{}\"\nmax_wait_time = 2.0\n{settings}\n",
            dir.path().join("swocloud.pid").display(),
            dir.path().join("swocloud.log").display()
        );
        let names_redis = ["redis_url", "redis_cluster", "redis_sentinels"]
            .iter()
            .any(|k| settings.contains(k));
        if defaults_to_shared_redis(bin) && !names_redis {
            text.push_str(&format!(
                "redis_url = \"redis://127.0.0.1:{}/\"\n",
                free_port()
            ));
        }
        std::fs::write(&config, text).unwrap();
        Daemon {
            bin: PathBuf::from(bin),
            dir,
            port,
            host: host.to_string(),
            config,
        }
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("swocloud.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("swocloud.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// `reload`, then waits until every worker it had is gone and the new
    /// ones are all different processes.
    #[track_caller]
    pub fn reload_workers(&self) {
        let old = self.worker_pids();
        let out = self.run("reload", &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until(Duration::from_secs(20), "every old worker gone", || {
            old.iter().all(|&p| !pid_alive(p))
        });
        let now = self.worker_pids();
        assert!(now.iter().all(|p| !old.contains(p)), "{old:?} → {now:?}");
    }

    /// Runs `bin VERB -c config ARGS…` and returns its output.
    pub fn run(&self, verb: &str, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg(verb)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()))
    }

    /// `start -d`, asserting success; returns the master pid.
    #[track_caller]
    pub fn start(&self) -> i32 {
        let out = self.run("start", &["-d"]);
        assert!(
            out.status.success(),
            "start -d failed: {}\n{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.master_pid().expect("pid file after start -d")
    }

    pub fn master_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The manager (the master's only child).
    #[track_caller]
    pub fn manager_pid(&self) -> i32 {
        let m = self.master_pid().expect("running");
        let kids = super::children_of(m);
        assert_eq!(
            kids.len(),
            1,
            "master {m} should have exactly one child (the manager): {kids:?}"
        );
        kids[0]
    }

    /// The manager's children (workers and task workers).
    pub fn worker_pids(&self) -> Vec<i32> {
        super::children_of(self.manager_pid())
    }

    /// `status --json`.
    #[track_caller]
    pub fn status(&self) -> serde_json::Value {
        let out = self.run("status", &["--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// `stop`, asserting success and that the tree is gone.
    #[track_caller]
    pub fn stop(&self) {
        let tree: Vec<i32> = self
            .master_pid()
            .into_iter()
            .flat_map(|m| std::iter::once(m).chain(descendants_of(m)))
            .collect();
        let out = self.run("stop", &[]);
        assert!(
            out.status.success(),
            "stop failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        wait_until(
            Duration::from_secs(5),
            "every process of the tree gone",
            || tree.iter().all(|&p| !pid_alive(p)),
        );
        assert!(!self.pid_file().exists(), "pid file removed by stop");
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether `bin` is one of the binaries whose `redis_url` defaults to
/// 127.0.0.1:6379 (`src/route/settings.rs`, `src/im/settings.rs`).
fn defaults_to_shared_redis(bin: &str) -> bool {
    let name = Path::new(bin).file_name().and_then(|n| n.to_str());
    matches!(name, Some("swocloud" | "swocloud-im"))
}

/// Lines of a daemon's log that a failing test prints ([`Daemon`]'s drop).
const LOG_TAIL: usize = 80;

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failing test takes its temp dir, and the log in it, along: the
        // log's tail goes to the test's captured output first, so a CI
        // failure can be read after the fact.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL);
            eprintln!(
                "--- {} on {}: last {} of {} log lines ---\n{}\n--- end of {} ---",
                self.bin.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                self.addr(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n"),
                self.addr()
            );
        }
        if let Some(m) = self.master_pid() {
            if pid_alive(m)
                && super::proc_cmdline(m)
                    .is_some_and(|c| c.contains(self.bin.to_str().unwrap_or("?")))
            {
                let tree = descendants_of(m);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(m),
                    nix::sys::signal::Signal::SIGKILL,
                );
                for p in tree {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}
