//! The process model: master → manager → workers, as in Swoole.
//!
//! - [`master`]: the `start` verb, the daemon, the pid file, the signals.
//! - [`manager`]: the process table; spawn, reap, respawn, rolling reload.
//! - worker processes run the [`crate::reactor`] loop.
//! - [`listen`]: one SO_REUSEPORT socket per worker slot, bound by the master.
//! - [`ipc`]: per-slot mailboxes (worker ↔ worker, worker ↔ task worker).
//! - [`scoreboard`]: shared-memory counters of every process.
//! - [`control`]: the master's status socket.
//! - [`notify`]: systemd's readiness protocol (`Type=notify`).
//! - [`signals`], [`pidfile`], [`daemon`]: the Unix plumbing.

pub mod control;
pub mod daemon;
pub mod ipc;
pub mod listen;
pub mod manager;
pub mod master;
pub mod notify;
pub mod pidfile;
pub mod scoreboard;
pub mod signals;
