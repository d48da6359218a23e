//! The manager process: forks the workers and task workers, reaps them,
//! respawns the ones that die, and performs rolling reloads.
//!
//! The process table is plain data ([`Child`] rows), nginx-style: the
//! mechanism (spawn, reap, signal) is apart from the policy (when to respawn,
//! when to stop a predecessor). The loop sleeps in `poll(2)` on its signal
//! pipe and the workers' readiness pipe and handles, in this order: reaped
//! children, terminate, reloads, log reopen, readiness reports, deadlines.

use std::collections::VecDeque;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::event::{App, ServerInfo, WorkerFailure};
use crate::logging;
use crate::process::ipc::{Dest, Mailboxes};
use crate::process::scoreboard::{Role, Scoreboard};
use crate::process::signals::{self, Control};
use crate::reactor::handover::HandoverLink;
use crate::reactor::{self, Handover, WorkerContext, WorkerExit};

mod reload;

/// A worker that lived less than this before dying counts as crash-looping.
const QUICK_EXIT: Duration = Duration::from_secs(1);
/// First respawn delay of a crash-looping slot; doubles per quick exit.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest respawn delay: a broken worker is retried, never in a fork storm.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The respawn delay of a crash-looping slot.
const RESPAWN_BACKOFF: Backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
/// Exit code of a worker whose loop failed (panics and I/O errors).
const EXIT_FAILED: i32 = 70;

/// A slot in the worker pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Event worker `id`.
    Worker(usize),
    /// Task worker `id`.
    Task(usize),
}

impl Slot {
    fn dest(self) -> Dest {
        match self {
            Slot::Worker(i) => Dest::Worker(i),
            Slot::Task(i) => Dest::TaskWorker(i),
        }
    }
    fn id(self) -> usize {
        match self {
            Slot::Worker(i) | Slot::Task(i) => i,
        }
    }
    fn label(self) -> String {
        match self {
            Slot::Worker(i) => format!("worker#{i}"),
            Slot::Task(i) => format!("task#{i}"),
        }
    }
}

/// One row of the process table.
#[derive(Debug)]
struct Child {
    pid: Pid,
    slot: Slot,
    row: usize,
    spawned: Instant,
    ready: bool,
    /// Set when we asked it to stop (reload or shutdown).
    stopping_since: Option<Instant>,
    /// The predecessor to stop once this one serves (rolling reload).
    replaces: Option<Pid>,
}

/// Per-slot respawn policy state.
#[derive(Debug, Clone)]
struct SlotPolicy {
    quick_exits: u32,            // exits in a row within QUICK_EXIT of the spawn
    respawn_at: Option<Instant>, // when the slot is respawned, if it is empty
    backoff: Backoff,            // delay from the second quick exit on
}

impl Default for SlotPolicy {
    fn default() -> Self {
        SlotPolicy {
            quick_exits: 0,
            respawn_at: None,
            backoff: RESPAWN_BACKOFF,
        }
    }
}

/// What the manager needs from the master.
pub struct ManagerArgs {
    /// Settings.
    pub settings: Arc<Settings>,
    /// One listener per worker slot, then (with `admin_listen`) one admin
    /// listener per worker slot.
    pub listeners: Vec<TcpListener>,
    /// The shared scoreboard.
    pub scoreboard: Scoreboard,
    /// The master's pid (for parent-death checks).
    pub master_pid: Pid,
    /// Where the manager reports `READY` or `FAIL reason` to the master.
    pub status: std::fs::File,
}

struct Manager<'a, A: App> {
    args: ManagerArgs,
    app: &'a mut A,
    mailboxes: Mailboxes,
    /// One handover pair per event-worker slot (kept open here, so
    /// connections in flight outlive either worker).
    handovers: Vec<HandoverLink>,
    ready_r: OwnedFd,
    ready_w: OwnedFd,
    table: Vec<Child>,
    policy: Vec<SlotPolicy>,
    reload_queue: VecDeque<Slot>,
    /// A worker reload is under way: report `RELOADED` when it drains.
    reload_unreported: bool,
    reported_ready: bool,
    stopping: Option<Instant>,
}

/// Runs the manager until the tree stops; returns the process exit code.
pub fn run<A: App>(args: ManagerArgs, app: &mut A) -> i32 {
    let ws = args.settings.worker_num;
    let ts = args.settings.task_worker_num;
    let mailboxes = match Mailboxes::create(ws, ts) {
        Ok(m) => m,
        Err(e) => return fail_early(args, &format!("creating worker mailboxes: {e}")),
    };
    let handovers = match (0..ws).map(|_| HandoverLink::pair()).collect() {
        Ok(h) => h,
        Err(e) => return fail_early(args, &format!("creating handover links: {e}")),
    };
    let (ready_r, ready_w) =
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
            Ok(p) => p,
            Err(e) => return fail_early(args, &format!("creating the readiness pipe: {e}")),
        };
    let mut m = Manager {
        policy: vec![SlotPolicy::default(); ws + ts],
        args,
        app,
        mailboxes,
        handovers,
        ready_r,
        ready_w,
        table: Vec::new(),
        reload_queue: VecDeque::new(),
        reload_unreported: false,
        reported_ready: false,
        stopping: None,
    };
    let info = info_of(&m.args);
    m.app.on_manager_start(&info);
    let slots: Vec<Slot> = (0..ws)
        .map(Slot::Worker)
        .chain((0..ts).map(Slot::Task))
        .collect();
    for slot in slots {
        if let Err(e) = m.spawn(slot, None) {
            m.report(&format!("FAIL cannot start {}: {e}", slot.label()));
            m.begin_stop();
            break;
        }
    }
    m.run_loop()
}

fn info_of(args: &ManagerArgs) -> ServerInfo<'_> {
    ServerInfo {
        settings: &args.settings,
        master_pid: args.master_pid.as_raw(),
        manager_pid: std::process::id() as i32,
    }
}

fn fail_early(mut args: ManagerArgs, why: &str) -> i32 {
    log::error!("{why}");
    let _ = writeln!(args.status, "FAIL {why}");
    1
}

impl<A: App> Manager<'_, A> {
    fn report(&mut self, line: &str) {
        let _ = writeln!(self.args.status, "{line}");
    }

    fn slot_index(&self, slot: Slot) -> usize {
        match slot {
            Slot::Worker(i) => i,
            Slot::Task(i) => self.args.settings.worker_num + i,
        }
    }

    /// Forks a worker for `slot`. The child never returns.
    fn spawn(&mut self, slot: Slot, replaces: Option<Pid>) -> std::io::Result<Pid> {
        let role = if matches!(slot, Slot::Worker(_)) {
            Role::Worker
        } else {
            Role::TaskWorker
        };
        let row = self
            .args
            .scoreboard
            .claim(role, slot.id() as u32)
            .ok_or_else(|| std::io::Error::other("scoreboard full"))?;
        let mask = signals::block_all();
        // Taken before the fork: a child reading getppid() after it could
        // already see init if the manager died in between, and live on.
        let manager = nix::unistd::getpid();
        // SAFETY: the manager is single-threaded (it never starts threads),
        // so the child may run arbitrary code after fork.
        match unsafe { fork() } {
            Err(e) => {
                signals::restore(&mask);
                self.args.scoreboard.release(row);
                Err(std::io::Error::other(format!(
                    "fork for {}: {e}",
                    slot.label()
                )))
            }
            Ok(ForkResult::Child) => {
                let code = self.child_main(slot, row, &mask, manager, replaces.is_some());
                std::process::exit(code);
            }
            Ok(ForkResult::Parent { child }) => {
                signals::restore(&mask);
                self.args
                    .scoreboard
                    .row(row)
                    .pid
                    .store(child.as_raw(), std::sync::atomic::Ordering::Relaxed);
                log::debug!("spawned {} pid {child}", slot.label());
                self.table.push(Child {
                    pid: child,
                    slot,
                    row,
                    spawned: Instant::now(),
                    ready: false,
                    stopping_since: None,
                    replaces,
                });
                Ok(child)
            }
        }
    }

    /// Body of a freshly forked worker: set up, run the reactor, exit code.
    fn child_main(
        &mut self,
        slot: Slot,
        row: usize,
        mask: &nix::sys::signal::SigSet,
        manager: Pid,
        replaces: bool,
    ) -> i32 {
        logging::set_role(slot.label());
        if let Err(e) = signals::reset_after_fork() {
            log::error!("{e}");
            return EXIT_FAILED;
        }
        signals::ignore(Signal::SIGINT);
        signals::restore(mask);
        if signals::die_with_parent(Signal::SIGTERM, manager) {
            return 0;
        }
        let r = self.args.scoreboard.row(row);
        r.pid.store(
            std::process::id() as i32,
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut all: Vec<Option<TcpListener>> = std::mem::take(&mut self.args.listeners)
            .into_iter()
            .map(Some)
            .collect();
        let (listener, admin_listener) = match slot {
            Slot::Worker(i) => {
                let n = self.args.settings.worker_num;
                let mut take = |k: usize| all.get_mut(k).and_then(Option::take);
                (take(i), take(n + i))
            }
            Slot::Task(_) => (None, None),
        };
        drop(all);
        let postbox = match self.mailboxes.postbox(slot.dest()) {
            Ok(p) => p,
            Err(e) => {
                log::error!("mailbox for {}: {e}", slot.label());
                return EXIT_FAILED;
            }
        };
        let ready_fd = match self.ready_w.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("readiness pipe: {e}");
                return EXIT_FAILED;
            }
        };
        let handover = match slot {
            Slot::Worker(i) => match (self.handovers[i].try_clone(), ready_fd.try_clone()) {
                (Ok(link), Ok(fd)) => Some(Handover {
                    link,
                    expect_predecessor: replaces,
                    // A negative pid asks the manager for a replacement.
                    request_replacement: Box::new(move || {
                        let pid = (-(std::process::id() as i32)).to_le_bytes();
                        let _ = nix::unistd::write(fd.as_fd(), &pid);
                    }),
                }),
                (Err(e), _) | (_, Err(e)) => {
                    log::error!("handover link for {}: {e}", slot.label());
                    return EXIT_FAILED;
                }
            },
            Slot::Task(_) => None,
        };
        let ctx = WorkerContext {
            handover,
            worker_id: slot.id(),
            task_worker: matches!(slot, Slot::Task(_)),
            settings: self.args.settings.clone(),
            listener,
            admin_listener,
            postbox,
            row: r,
            scoreboard: self.args.scoreboard,
            on_ready: Some(Box::new(move || {
                let pid = (std::process::id() as i32).to_le_bytes();
                let _ = nix::unistd::write(ready_fd.as_fd(), &pid);
            })),
            watch_signals: true,
        };
        let app = &mut *self.app;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            reactor::run_worker(ctx, app)
        })) {
            Ok(Ok(WorkerExit::Stopped)) => 0,
            Ok(Ok(WorkerExit::HandedOver)) => 0,
            Ok(Ok(WorkerExit::MaxRequest)) => {
                log::info!("reached max_request; leaving to be replaced");
                0
            }
            Ok(Err(e)) => {
                log::error!("worker loop failed: {e}");
                EXIT_FAILED
            }
            Err(_) => {
                log::error!("worker loop panicked");
                EXIT_FAILED
            }
        }
    }

    fn run_loop(&mut self) -> i32 {
        loop {
            let timeout = self.poll_timeout();
            let mut fds = [
                nix::poll::PollFd::new(borrow(signals::wake_fd()), nix::poll::PollFlags::POLLIN),
                nix::poll::PollFd::new(self.ready_r.as_fd(), nix::poll::PollFlags::POLLIN),
            ];
            let _ = nix::poll::poll(&mut fds, timeout);
            for ev in signals::take_pending() {
                match ev {
                    Control::Child => self.reap(),
                    Control::Terminate => self.begin_stop(),
                    Control::Reload => self.queue_reload(true),
                    Control::ReloadTasks => self.queue_reload(false),
                    Control::ReopenLog => {
                        logging::reopen();
                        self.signal_all(Signal::SIGHUP);
                    }
                }
            }
            self.reap();
            self.read_ready();
            self.refresh_own_rss();
            if self.stopping.is_none() && nix::unistd::getppid() != self.args.master_pid {
                log::warn!("the master is gone; stopping");
                self.begin_stop();
            }
            self.deadlines();
            self.advance_reload();
            if self.stopping.is_some() && self.table.is_empty() {
                let info = info_of(&self.args);
                self.app.on_manager_stop(&info);
                log::info!("all workers stopped; manager exits");
                return 0;
            }
        }
    }

    fn refresh_own_rss(&self) {
        let me = std::process::id() as i32;
        if let Some(r) = self.args.scoreboard.snapshot().iter().find(|r| r.pid == me) {
            self.args.scoreboard.row(r.index).rss_kib.store(
                crate::process::scoreboard::self_rss_kib(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    fn poll_timeout(&self) -> nix::poll::PollTimeout {
        let busy = self.stopping.is_some()
            || self.policy.iter().any(|p| p.respawn_at.is_some())
            || self.table.iter().any(|c| c.stopping_since.is_some());
        nix::poll::PollTimeout::from(if busy { 50u16 } else { 500u16 })
    }

    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.exited(pid, code, 0),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.exited(pid, 0, sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    fn exited(&mut self, pid: Pid, code: i32, signal: i32) {
        let Some(pos) = self.table.iter().position(|c| c.pid == pid) else {
            return;
        };
        let child = self.table.swap_remove(pos);
        self.args.scoreboard.release(child.row);
        let how = if signal != 0 {
            format!("exited on signal {signal}")
        } else {
            format!("exited with code {code}")
        };
        let label = child.slot.label();
        if self.stopping.is_some() || child.stopping_since.is_some() {
            log::info!("{label} (pid {pid}) {how}");
            return;
        }
        // A replacement spawned by a reload that died before serving: the
        // predecessor keeps its slot.
        if child.replaces.is_some() && !child.ready {
            log::error!(
                "replacement {label} (pid {pid}) {how} before serving; keeping its predecessor"
            );
            return;
        }
        if !self.reported_ready {
            self.report(&format!(
                "FAIL {label} (pid {pid}) {how} during start-up (see the log)"
            ));
            log::error!("{label} (pid {pid}) {how} during start-up; stopping");
            self.begin_stop();
            return;
        }
        let idx = self.slot_index(child.slot);
        if signal == 0 && code == 0 {
            log::info!("{label} (pid {pid}) left cleanly (max_request); replacing it");
            self.args
                .scoreboard
                .totals()
                .worker_replacements
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.policy[idx] = SlotPolicy {
                respawn_at: Some(Instant::now()),
                ..SlotPolicy::default()
            };
            return;
        }
        log::error!("{label} (pid {pid}) {how}; respawning");
        self.args
            .scoreboard
            .totals()
            .worker_restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let failure = WorkerFailure {
            worker_id: child.slot.id(),
            pid: pid.as_raw(),
            exit_code: code,
            signal,
        };
        let info = info_of(&self.args);
        let app = &mut *self.app;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            app.on_worker_error(&info, &failure)
        }))
        .is_err()
        {
            log::error!("on_worker_error panicked");
        }
        let p = &mut self.policy[idx];
        p.quick_exits = if child.spawned.elapsed() < QUICK_EXIT {
            p.quick_exits + 1
        } else {
            0
        };
        // One quick exit is respawned at once; from the second in a row on,
        // 100 ms doubling up to 5 s.
        let delay = if p.quick_exits <= 1 {
            p.backoff.reset();
            Duration::ZERO
        } else {
            p.backoff.next()
        };
        if !delay.is_zero() {
            log::warn!(
                "{label} is crash-looping ({} quick exits); respawning in {} ms",
                p.quick_exits,
                delay.as_millis()
            );
        }
        p.respawn_at = Some(Instant::now() + delay);
    }

    fn read_ready(&mut self) {
        let mut buf = [0u8; 4 * 64];
        loop {
            match nix::unistd::read(self.ready_r.as_fd(), &mut buf) {
                Ok(n) if n > 0 => {
                    for chunk in buf[..n].chunks_exact(4) {
                        let raw = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                        if raw < 0 {
                            self.replace_worker(Pid::from_raw(-raw));
                        } else {
                            self.mark_ready(Pid::from_raw(raw));
                        }
                    }
                }
                _ => break,
            }
        }
        if !self.reported_ready
            && self.stopping.is_none()
            && !self.table.is_empty()
            && self.table.iter().all(|c| c.ready)
        {
            self.reported_ready = true;
            self.report("READY");
        }
    }

    fn mark_ready(&mut self, pid: Pid) {
        let Some(c) = self.table.iter_mut().find(|c| c.pid == pid) else {
            return;
        };
        c.ready = true;
        let (label, old, slot) = (c.slot.label(), c.replaces, c.slot);
        if let Some(old) = old {
            if let Some(o) = self
                .table
                .iter_mut()
                .find(|c| c.pid == old && c.stopping_since.is_none())
            {
                o.stopping_since = Some(Instant::now());
                self.args
                    .scoreboard
                    .row(o.row)
                    .stopping
                    .store(1, std::sync::atomic::Ordering::Relaxed);
                // An event worker hands its connections over (SIGUSR1); a
                // task worker just stops.
                let sig = if matches!(slot, Slot::Worker(_)) {
                    log::info!("{label} (pid {pid}) serves; its predecessor pid {old} hands over");
                    Signal::SIGUSR1
                } else {
                    log::info!("{label} (pid {pid}) serves; stopping its predecessor pid {old}");
                    Signal::SIGTERM
                };
                let _ = kill(old, sig);
            }
        }
    }
}

/// Borrows a raw fd owned elsewhere for the duration of a poll call.
pub(crate) fn borrow(fd: std::os::fd::RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the signal self-pipe is owned by `signals` for the life of the
    // process and is only replaced right after fork, never during a poll.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
