//! Signal handling for every swocloud process: the only place that installs
//! handlers.
//!
//! Handlers only set a flag and write one byte to a self-pipe (both
//! async-signal-safe); the process loops wake on the pipe's read end and turn
//! the flags into [`Control`] events with [`take_pending`]. Handlers are
//! installed once, in the master, before any fork; a forked child inherits
//! them and calls [`reset_after_fork`] (with signals still blocked by
//! [`block_all`]) to get its own pipe and a clean set of flags, so a signal
//! meant for the parent can never wake the child's loop or vice versa.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// What a process loop is asked to do, in the order loops handle them
/// (nginx's order: reap, terminate, reload, reopen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGCHLD: a child changed state; reap it.
    Child,
    /// SIGTERM or SIGINT: graceful stop.
    Terminate,
    /// SIGUSR1: rolling reload of the workers.
    Reload,
    /// SIGUSR2: rolling reload of the task workers.
    ReloadTasks,
    /// SIGHUP or SIGRTMIN: reopen the log file (logrotate).
    ReopenLog,
}

/// The signals swocloud handles, with the control event each one raises.
const HANDLED: [(libc::c_int, Control); 7] = [
    (libc::SIGCHLD, Control::Child),
    (libc::SIGTERM, Control::Terminate),
    (libc::SIGINT, Control::Terminate),
    (libc::SIGUSR1, Control::Reload),
    (libc::SIGUSR2, Control::ReloadTasks),
    (libc::SIGHUP, Control::ReopenLog),
    (0, Control::ReopenLog), // SIGRTMIN, resolved at run time (libc::SIGRTMIN() is a function)
];

/// One pending flag per entry of [`HANDLED`].
static PENDING: [AtomicBool; HANDLED.len()] = [const { AtomicBool::new(false) }; HANDLED.len()];
/// Write end of the current process's self-pipe, or -1.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The read end, owned here so it lives as long as the process.
static WAKE_READ: Mutex<Option<OwnedFd>> = Mutex::new(None);
/// Keeps the write end open; replaced on reset.
static WAKE_WRITE: Mutex<Option<OwnedFd>> = Mutex::new(None);
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn signum(i: usize) -> libc::c_int {
    match HANDLED[i].0 {
        0 => libc::SIGRTMIN(),
        s => s,
    }
}

/// Installs the handlers (once per process tree, in the master) and creates
/// this process's self-pipe.
pub fn install() -> io::Result<()> {
    new_pipe()?;
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    for (i, _) in HANDLED.iter().enumerate() {
        let sig = signum(i);
        // SAFETY: the closure is async-signal-safe: it only stores to a
        // static atomic and calls write(2) on a raw fd read from an atomic,
        // saving and restoring errno around the write.
        let res = unsafe {
            signal_hook::low_level::register(sig, move || {
                PENDING[i].store(true, Ordering::SeqCst);
                let fd = WAKE_FD.load(Ordering::SeqCst);
                if fd >= 0 {
                    let errno = *libc::__errno_location();
                    libc::write(fd, b"!".as_ptr().cast(), 1);
                    *libc::__errno_location() = errno;
                }
            })
        };
        res.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("installing handler for signal {sig}: {e}"),
            )
        })?;
    }
    Ok(())
}

fn new_pipe() -> io::Result<()> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| io::Error::other(format!("creating the signal self-pipe: {e}")))?;
    WAKE_FD.store(w.as_raw_fd(), Ordering::SeqCst);
    *WAKE_READ.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    // The old pipe (inherited from the parent, if any) is closed here.
    *WAKE_WRITE.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
    Ok(())
}

/// Blocks every signal and returns the previous mask; call before fork so
/// that no signal is handled between fork and [`reset_after_fork`].
pub fn block_all() -> SigSet {
    let mut old = SigSet::empty();
    // Cannot fail with valid arguments.
    let _ = nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    );
    old
}

/// Restores a mask saved by [`block_all`].
pub fn restore(mask: &SigSet) {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
}

/// In a freshly forked child (signals blocked): a pipe of its own and no
/// pending flags inherited from the parent.
pub fn reset_after_fork() -> io::Result<()> {
    for p in &PENDING {
        p.store(false, Ordering::SeqCst);
    }
    new_pipe()
}

/// The read end of this process's self-pipe, to register in a poll loop.
pub fn wake_fd() -> RawFd {
    WAKE_READ
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map_or(-1, |fd| fd.as_raw_fd())
}

/// Drains the self-pipe and returns the control events raised since the
/// last call, each at most once, in handling order.
pub fn take_pending() -> Vec<Control> {
    let fd = wake_fd();
    if fd >= 0 {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a local buffer of the stated length from a
        // non-blocking pipe fd owned by this module.
        while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
    let mut out = Vec::new();
    for (i, (_, ev)) in HANDLED.iter().enumerate() {
        if PENDING[i].swap(false, Ordering::SeqCst) && !out.contains(ev) {
            out.push(*ev);
        }
    }
    out
}

/// Ignores a signal in this process (workers leave SIGINT to the master:
/// a terminal's Ctrl-C reaches the whole process group).
pub fn ignore(sig: Signal) {
    // SAFETY: SIG_IGN is always a valid disposition.
    unsafe {
        let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn);
    }
}

/// Asks the kernel to send `sig` to this process when its parent dies, and
/// reports whether the parent is already gone (the race prctl leaves open).
pub fn die_with_parent(sig: Signal, expected_parent: nix::unistd::Pid) -> bool {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no pointers involved.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0);
    }
    nix::unistd::getppid() != expected_parent
}
