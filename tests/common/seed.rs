//! The seed's registration client (`examples/seed_client`) as a separate
//! process playing an IM server against a Route: it can be killed, frozen
//! and thawed, and every line it prints (the Route's replies) is read on
//! a channel.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::daemon::Daemon;
use super::Proc;

/// A seed client process and the lines it prints.
pub struct SeedClient {
    pub proc: Proc,
    pub lines: mpsc::Receiver<String>,
}

impl SeedClient {
    /// Starts one against `d` (pinging every 300 ms) with `args`
    /// (`--name`, `--ip`, `--port`, …).
    pub fn start(d: &Daemon, args: &[&str]) -> SeedClient {
        let mut cmd = Command::new(super::example_bin("seed_client"));
        cmd.arg("--url")
            .arg(format!("ws://{}/", d.addr()))
            .arg("--ping-ms")
            .arg("300")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn(&mut cmd);
        let out = proc.child_mut().stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        SeedClient { proc, lines }
    }

    /// The next printed line (5 s at most).
    #[track_caller]
    pub fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .expect("the client printed a reply")
    }
}
