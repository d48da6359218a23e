//! A private, throw-away `redis-server` per test ([`RedisServer`]): a
//! free loopback port, no persistence, stopped (SIGKILL) when dropped.

use std::fs;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use super::{free_port, read_tail, redis_ping, temp_dir, topology, IO_TIMEOUT, POLL_INTERVAL};

/// A private `redis-server` on a free loopback port, without persistence,
/// killed when dropped.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    ///
    /// Panics if `redis-server` is not installed, or if it does not come up.
    #[track_caller]
    pub fn start() -> Self {
        let mut dir = temp_dir();
        let mut last_error = String::new();
        // A free port can be taken between finding it and redis binding it:
        // retry a few times with a new one.
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                dir,
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    dir = std::mem::replace(&mut server.dir, temp_dir());
                }
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server and starts a new, empty one on the same port.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("redis-server did not restart on port {}: {e}", self.port);
        }
    }

    /// A new synchronous connection to this server.
    #[track_caller]
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url()))
    }

    /// Whether the server currently answers PING.
    pub fn is_up(&self) -> bool {
        redis_ping(self.port)
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("redis.log");
        let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = topology::spawn_redis_server(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--bind", "127.0.0.1", "--daemonize", "no"])
                .arg("--dir")
                .arg(self.dir.path()),
            log,
            log_err,
        );
        let pid = child.id().to_string();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "exited with {status} on port {}: {}",
                    self.port,
                    read_tail(&log_path)
                ));
            }
            // Ours, not another test's server that took the port first
            // (ours then exits: "address already in use").
            if redis_ping(self.port) {
                let info = topology::query_text(self.port, &["INFO", "server"]).unwrap_or_default();
                if topology::field(&info, "process_id") == Some(pid.as_str()) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "no PONG within 10 s on port {}: {}",
                    self.port,
                    read_tail(&log_path)
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
