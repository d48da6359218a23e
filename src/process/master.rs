//! The master process: the `start` verb's checks, the listeners, the daemon,
//! the pid file, the control socket, and the loop that owns the signals.
//!
//! Start-up order, each step refusing with a clear message: pid file (live
//! master → "already running", stale → reported and replaced), pid and log
//! paths writable, listeners bound (port in use), daemonize, fork the
//! manager, wait for its `READY` (every worker serving), write the pid file,
//! report success to the launcher, run `on_start`. After that the loop
//! forwards reload and log-reopen signals to the manager, answers `status`,
//! respawns a manager that died, and on SIGTERM/SIGINT stops the tree within
//! `max_wait_time` (then SIGKILLs what is left).

use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::config::Settings;
use crate::event::{App, ServerInfo};
use crate::logging;
use crate::process::daemon::{self, Outcome, Readiness};
use crate::process::manager::{self, borrow, ManagerArgs};
use crate::process::pidfile::{self, PidState};
use crate::process::scoreboard::{Role, Scoreboard};
use crate::process::signals::{self, Control};
use crate::process::{control, listen, notify};

/// Extra time past `max_wait_time` the master gives the manager to finish
/// reaping before it SIGKILLs the whole tree.
const STOP_SLACK: Duration = Duration::from_secs(2);
/// Delay before a crashed manager is started again.
const MANAGER_RESPAWN: Duration = Duration::from_secs(1);

/// The master's lifecycle phase, logged on each change and shown by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    Stopping,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }
}

/// Runs the `start` verb; returns the process exit code.
pub fn start<A: App>(settings: Settings, app: A) -> i32 {
    daemon::cloexec_inherited();
    let _ = logging::init(settings.log_level.filter(), None, false);
    match pidfile::inspect(&settings.pid_file) {
        PidState::Running(pid) => {
            eprintln!(
                "already running (pid {pid}, pid file {})",
                settings.pid_file.display()
            );
            return 1;
        }
        PidState::Stale { why, .. } => {
            log::warn!(
                "stale pid file {} ({why}); replacing it",
                settings.pid_file.display()
            );
        }
        PidState::Absent => {}
    }
    let log_file = settings.log_file.clone().or_else(|| {
        settings
            .daemonize
            .then(|| settings.pid_file.with_extension("log"))
    });
    let checks = pidfile::check_writable(&settings.pid_file).and_then(|_| match &log_file {
        Some(p) => logging::open(p).map(drop),
        None => Ok(()),
    });
    if let Err(e) = checks {
        eprintln!("cannot start: {e}");
        return 1;
    }
    let mut listeners = match listen::bind_slots(settings.listen_addr(), settings.worker_num) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return 1;
        }
    };
    if let Some(admin) = settings.admin_addr() {
        // The admin slots follow the main ones (see `ManagerArgs::listeners`).
        match listen::bind_slots(admin, settings.worker_num) {
            Ok(l) => listeners.extend(l),
            Err(e) => {
                eprintln!("cannot start: admin_listen: {e}");
                return 1;
            }
        }
    }
    let mut readiness = Readiness::none();
    if settings.daemonize {
        match daemon::daemonize() {
            Ok(r) => readiness = r,
            Err(Outcome::Ready(pid)) => {
                println!(
                    "started (pid {pid}), listening on {}",
                    settings.listen_addr()
                );
                return 0;
            }
            Err(Outcome::Failed(why)) => {
                eprintln!("cannot start: {why}");
                return 1;
            }
        }
    }
    if let Err(e) = logging::init(
        settings.log_level.filter(),
        log_file.as_deref(),
        settings.daemonize,
    ) {
        readiness.failed(&e.to_string());
        eprintln!("cannot start: {e}");
        return 1;
    }
    logging::set_role("master");
    match Master::new(settings, listeners, readiness) {
        Ok(mut m) => m.run(app),
        Err((mut readiness, e)) => {
            log::error!("cannot start: {e}");
            readiness.failed(&e);
            1
        }
    }
}

struct Master {
    settings: Arc<Settings>,
    listeners: Vec<TcpListener>,
    readiness: Readiness,
    scoreboard: Scoreboard,
    control: UnixListener,
    manager: Option<(Pid, OwnedFd)>,
    manager_respawn_at: Option<Instant>,
    phase: Phase,
    stop_deadline: Option<Instant>,
    pid: Pid,
    row: Option<usize>,
}

impl Master {
    fn new(
        settings: Settings,
        listeners: Vec<TcpListener>,
        readiness: Readiness,
    ) -> Result<Master, (Readiness, String)> {
        if let Err(e) = signals::install() {
            return Err((readiness, e.to_string()));
        }
        let cap = 4 + 2 * (settings.worker_num + settings.task_worker_num);
        let scoreboard = match Scoreboard::create(cap) {
            Ok(s) => s,
            Err(e) => return Err((readiness, format!("cannot map the scoreboard: {e}"))),
        };
        let control = match control::bind(&settings.control_path()) {
            Ok(c) => c,
            Err(e) => return Err((readiness, e.to_string())),
        };
        let pid = nix::unistd::getpid();
        let row = scoreboard.claim(Role::Master, 0);
        if let Some(row) = row {
            scoreboard
                .row(row)
                .pid
                .store(pid.as_raw(), std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Master {
            settings: Arc::new(settings),
            listeners,
            readiness,
            scoreboard,
            control,
            manager: None,
            manager_respawn_at: None,
            phase: Phase::Starting,
            stop_deadline: None,
            pid,
            row,
        })
    }

    fn info(&self) -> ServerInfo<'_> {
        ServerInfo {
            settings: &self.settings,
            master_pid: self.pid.as_raw(),
            manager_pid: self.manager.as_ref().map_or(0, |(p, _)| p.as_raw()),
        }
    }

    fn set_phase(&mut self, p: Phase) {
        if self.phase != p {
            log::info!("phase: {} -> {}", self.phase.name(), p.name());
            self.phase = p;
        }
    }

    fn spawn_manager<A: App>(&mut self, app: &mut A) -> Result<(), String> {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| format!("manager status pipe: {e}"))?;
        let row = self
            .scoreboard
            .claim(Role::Manager, 0)
            .ok_or("scoreboard full")?;
        let mask = signals::block_all();
        // SAFETY: the master is single-threaded, so the child may run
        // arbitrary code after fork.
        match unsafe { fork() } {
            Err(e) => {
                signals::restore(&mask);
                self.scoreboard.release(row);
                Err(format!("fork of the manager: {e}"))
            }
            Ok(ForkResult::Child) => {
                // The launcher's pipe is the master's to answer, not ours.
                drop(std::mem::take(&mut self.readiness));
                logging::set_role("manager");
                let code = match signals::reset_after_fork() {
                    Err(e) => {
                        log::error!("{e}");
                        1
                    }
                    Ok(()) => {
                        signals::ignore(Signal::SIGINT);
                        signals::restore(&mask);
                        if signals::die_with_parent(Signal::SIGTERM, self.pid) {
                            std::process::exit(0);
                        }
                        self.scoreboard.row(row).pid.store(
                            std::process::id() as i32,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        drop(r);
                        let status = std::fs::File::from(w);
                        let mut w = nix::fcntl::fcntl(&status, nix::fcntl::FcntlArg::F_GETFL)
                            .map(nix::fcntl::OFlag::from_bits_truncate)
                            .unwrap_or(nix::fcntl::OFlag::empty());
                        w.remove(nix::fcntl::OFlag::O_NONBLOCK);
                        let _ = nix::fcntl::fcntl(&status, nix::fcntl::FcntlArg::F_SETFL(w));
                        let args = ManagerArgs {
                            settings: self.settings.clone(),
                            listeners: std::mem::take(&mut self.listeners),
                            scoreboard: self.scoreboard,
                            master_pid: self.pid,
                            status,
                        };
                        manager::run(args, app)
                    }
                };
                std::process::exit(code);
            }
            Ok(ForkResult::Parent { child }) => {
                signals::restore(&mask);
                drop(w);
                self.scoreboard
                    .row(row)
                    .pid
                    .store(child.as_raw(), std::sync::atomic::Ordering::Relaxed);
                self.manager = Some((child, r));
                Ok(())
            }
        }
    }

    fn run<A: App>(&mut self, mut app: A) -> i32 {
        if let Err(e) = self.spawn_manager(&mut app) {
            self.readiness.failed(&e);
            log::error!("cannot start: {e}");
            return 1;
        }
        let mut exit_code = 0;
        loop {
            let timeout = if self.stop_deadline.is_some() || self.manager_respawn_at.is_some() {
                50u16
            } else {
                1000
            };
            {
                let mut fds = vec![
                    PollFd::new(borrow(signals::wake_fd()), PollFlags::POLLIN),
                    PollFd::new(self.control.as_fd(), PollFlags::POLLIN),
                ];
                if let Some((_, r)) = &self.manager {
                    fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
                }
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(timeout));
            }
            for ev in signals::take_pending() {
                match ev {
                    Control::Child => {}
                    Control::Terminate => self.begin_stop(),
                    Control::Reload => {
                        if self.phase == Phase::Running && self.manager.is_some() {
                            notify::reloading(); // READY=1 again on the manager's RELOADED
                        }
                        self.forward(Signal::SIGUSR1)
                    }
                    Control::ReloadTasks => self.forward(Signal::SIGUSR2),
                    Control::ReopenLog => {
                        logging::reopen();
                        self.forward(Signal::SIGHUP);
                    }
                }
            }
            if let Some(row) = self.row {
                self.scoreboard.row(row).rss_kib.store(
                    crate::process::scoreboard::self_rss_kib(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            if let Some(code) = self.read_manager_status() {
                exit_code = code;
            }
            if let Some(done) = self.reap_manager() {
                exit_code = exit_code.max(done);
                break;
            }
            if self.phase == Phase::Stopping && self.manager.is_none() {
                break;
            }
            if self.phase == Phase::Running {
                let (sb, listen, phase) = (
                    self.scoreboard,
                    self.settings.listen_addr().to_string(),
                    self.phase.name(),
                );
                control::serve_pending(&self.control, &|req| match req {
                    "status" => control::status(&sb, &listen, phase),
                    other => serde_json::json!({"error": format!("unknown request {other:?}")}),
                });
            }
            if self.stop_deadline.is_some_and(|d| Instant::now() > d) {
                log::warn!("the tree did not stop in time; killing what is left");
                self.kill_tree();
                self.stop_deadline = Some(Instant::now() + STOP_SLACK);
            }
            if self.manager_respawn_at.is_some_and(|t| Instant::now() >= t) {
                self.manager_respawn_at = None;
                if let Err(e) = self.spawn_manager(&mut app) {
                    log::error!("respawning the manager: {e}");
                    self.manager_respawn_at = Some(Instant::now() + MANAGER_RESPAWN);
                }
            }
        }
        let info = self.info();
        app.on_shutdown(&info);
        pidfile::remove_if_ours(&self.settings.pid_file, self.pid.as_raw());
        let _ = std::fs::remove_file(self.settings.control_path());
        log::info!("stopped");
        exit_code
    }

    /// Handles `READY` / `RELOADED` / `FAIL` lines from the manager. Returns an exit code
    /// when start-up failed.
    fn read_manager_status(&mut self) -> Option<i32> {
        let (_, r) = self.manager.as_ref()?;
        let mut buf = [0u8; 1024];
        let n = match nix::unistd::read(r.as_fd(), &mut buf) {
            Ok(n) if n > 0 => n,
            _ => return None,
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut code = None;
        for line in text.lines().map(str::trim) {
            if line == "READY" && self.phase == Phase::Starting {
                if let Err(e) = pidfile::write(&self.settings.pid_file, self.pid.as_raw()) {
                    log::error!("{e}");
                    self.readiness.failed(&e.to_string());
                    self.begin_stop();
                    code = Some(1);
                    continue;
                }
                self.set_phase(Phase::Running);
                log::info!(
                    "serving on {} with {} workers and {} task workers (master pid {})",
                    self.settings.listen_addr(),
                    self.settings.worker_num,
                    self.settings.task_worker_num,
                    self.pid
                );
                self.readiness.ready(self.pid.as_raw());
                notify::ready();
            } else if line == "RELOADED" && self.phase == Phase::Running {
                notify::ready();
            } else if let Some(why) = line.strip_prefix("FAIL ") {
                log::error!("start-up failed: {why}");
                self.readiness.failed(why);
                self.begin_stop();
                code = Some(1);
            }
        }
        code
    }

    /// Reaps the manager. Returns Some(exit code) when the master should exit.
    fn reap_manager(&mut self) -> Option<i32> {
        let (pid, _) = self.manager.as_ref()?;
        let pid = *pid;
        let how = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => format!("exited with code {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => format!("exited on signal {sig}"),
            _ => return None,
        };
        self.manager = None;
        if let Some(i) = self
            .scoreboard
            .snapshot()
            .iter()
            .find(|r| r.pid == pid.as_raw())
            .map(|r| r.index)
        {
            self.scoreboard.release(i);
        }
        if self.phase == Phase::Stopping {
            log::info!("manager (pid {pid}) {how}");
            return Some(0);
        }
        if self.phase == Phase::Starting {
            let why = format!("the manager (pid {pid}) {how} during start-up");
            log::error!("{why}");
            self.readiness.failed(&why);
            return Some(1);
        }
        log::error!(
            "manager (pid {pid}) {how}; starting a new one in {}s",
            MANAGER_RESPAWN.as_secs()
        );
        self.manager_respawn_at = Some(Instant::now() + MANAGER_RESPAWN);
        None
    }

    fn forward(&self, sig: Signal) {
        if let Some((pid, _)) = &self.manager {
            let _ = kill(*pid, sig);
        }
    }

    fn begin_stop(&mut self) {
        if self.phase == Phase::Stopping {
            log::warn!("second stop request: killing the tree now");
            self.kill_tree();
            return;
        }
        self.set_phase(Phase::Stopping);
        notify::stopping();
        self.manager_respawn_at = None;
        self.forward(Signal::SIGTERM);
        self.stop_deadline = Some(
            Instant::now() + Duration::from_secs_f64(self.settings.max_wait_time) + STOP_SLACK,
        );
        if self.manager.is_none() {
            self.stop_deadline = Some(Instant::now());
        }
    }

    fn kill_tree(&self) {
        for r in self.scoreboard.snapshot() {
            if r.pid != self.pid.as_raw() && r.pid > 0 {
                let _ = kill(Pid::from_raw(r.pid), Signal::SIGKILL);
            }
        }
        self.forward(Signal::SIGKILL);
    }
}
