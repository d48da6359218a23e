//! Daemonizing with a readiness report: `start -d` exits 0 only for a server
//! that serves.
//!
//! The launching process forks and waits on a pipe; the child `setsid`s and
//! forks again so the daemon (the master) can never reacquire a terminal,
//! sets `umask`, changes to `/`, and points stdin at `/dev/null`. When the
//! master is serving (listeners bound, workers up, pid file written) it
//! writes `OK <pid>` to the pipe, or `ERR <reason>` when start-up failed; the
//! launcher prints the outcome and exits with it. A master that dies without
//! a word closes the pipe, which the launcher reports as a failure too.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::unistd::{fork, setsid, ForkResult};

/// The master's end of the readiness pipe (nothing in the foreground).
#[derive(Debug, Default)]
pub struct Readiness(Option<std::fs::File>);

impl Readiness {
    /// Foreground: nobody waits.
    pub fn none() -> Readiness {
        Readiness(None)
    }

    /// Reports success to the launcher (once).
    pub fn ready(&mut self, pid: i32) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "OK {pid}");
        }
    }

    /// Reports a start-up failure to the launcher (once).
    pub fn failed(&mut self, reason: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "ERR {reason}");
        }
    }

    /// Whether a launcher still waits.
    pub fn pending(&self) -> bool {
        self.0.is_some()
    }
}

/// What the launcher learned.
#[derive(Debug)]
pub enum Outcome {
    /// The daemon serves, as this pid.
    Ready(i32),
    /// It failed to start, for this reason.
    Failed(String),
}

/// Detaches from the terminal. Returns `Err` in the launcher with its
/// outcome (the caller prints it and exits), `Ok` in the daemon.
///
/// Must be called while the process is single-threaded.
pub fn daemonize() -> Result<Readiness, Outcome> {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Outcome::Failed(format!("pipe: {e}")))?;
    // SAFETY: the process is single-threaded here (documented contract), so
    // the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => Err(Outcome::Failed(format!("fork: {e}"))),
        Ok(ForkResult::Parent { child }) => {
            drop(w);
            let _ = nix::sys::wait::waitpid(child, None);
            // One line, not EOF: the daemon's children inherit the write end.
            let mut text = String::new();
            let _ = std::io::BufRead::read_line(
                &mut std::io::BufReader::new(std::fs::File::from(r)),
                &mut text,
            );
            let line = text.trim().to_string();
            Err(match line.split_once(' ') {
                Some(("OK", pid)) => Outcome::Ready(pid.parse().unwrap_or(0)),
                Some(("ERR", why)) => Outcome::Failed(why.to_string()),
                _ => Outcome::Failed(
                    "the daemon exited during start-up without a report (see log_file)".into(),
                ),
            })
        }
        Ok(ForkResult::Child) => {
            drop(r);
            let _ = setsid();
            // SAFETY: still single-threaded (we are the fresh child).
            match unsafe { fork() } {
                Ok(ForkResult::Parent { .. }) => std::process::exit(0),
                Err(e) => {
                    let mut f = std::fs::File::from(w);
                    let _ = writeln!(f, "ERR second fork: {e}");
                    std::process::exit(1);
                }
                Ok(ForkResult::Child) => {}
            }
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            let _ = std::env::set_current_dir("/");
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                // SAFETY: dup2 of a valid fd onto the standard descriptors.
                unsafe {
                    libc::dup2(null.as_raw_fd(), 0);
                    libc::dup2(null.as_raw_fd(), 1);
                    libc::dup2(null.as_raw_fd(), 2);
                }
            }
            Ok(Readiness(Some(std::fs::File::from(w))))
        }
    }
}

/// Marks every descriptor above stderr that this process inherited from
/// whatever started it close-on-exec (a shell, a CI runner or a test
/// harness may leak some): none of them is meant for the workers' children.
/// Nothing is closed, so a launcher that relies on one is not broken.
/// O(open fds), once at start.
pub fn cloexec_inherited() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD only change the descriptor flag of `fd`;
        // an fd that closed meanwhile (the read_dir handle) just fails.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}
