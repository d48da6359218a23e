//! The scoreboard: a shared-memory table of every process in the tree and its
//! counters, like Apache's scoreboard.
//!
//! The master maps one anonymous `MAP_SHARED` region before it forks, so the
//! manager and every worker see the same memory. Each process writes only its
//! own row, with relaxed atomics (no locks, no syscalls on the hot path);
//! anyone may read every row: the master answers `status` from it and any
//! worker can sum it for `/metrics`. Rows are allocated by the manager when it
//! forks a child and freed when it reaps it.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

/// What a row describes. Serialized (in `status`) as its [`name`](Role::name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The row is free.
    Free,
    /// The master process.
    Master,
    /// The manager process.
    Manager,
    /// An event worker (serves connections).
    Worker,
    /// A task worker (runs on_task jobs).
    TaskWorker,
}

impl Role {
    fn from_u32(v: u32) -> Role {
        match v {
            1 => Role::Master,
            2 => Role::Manager,
            3 => Role::Worker,
            4 => Role::TaskWorker,
            _ => Role::Free,
        }
    }
    fn as_u32(self) -> u32 {
        match self {
            Role::Free => 0,
            Role::Master => 1,
            Role::Manager => 2,
            Role::Worker => 3,
            Role::TaskWorker => 4,
        }
    }
    /// The name used in logs and `status`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Free => "free",
            Role::Master => "master",
            Role::Manager => "manager",
            Role::Worker => "worker",
            Role::TaskWorker => "task_worker",
        }
    }
}

/// A row counter that survives its process: [`Scoreboard::release`] folds
/// it into [`Totals::retired`], so sums over the tree never go backwards.
/// The discriminant is the index in that array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// [`Row::accepted`].
    Accepted,
    /// [`Row::closed`].
    Closed,
    /// [`Row::requests`].
    Requests,
    /// [`Row::messages_in`].
    MessagesIn,
    /// [`Row::messages_out`].
    MessagesOut,
    /// [`Row::redis_errors`].
    RedisErrors,
    /// [`Row::redis_reconnects`].
    RedisReconnects,
}

impl Retired {
    /// Every retired counter, in index order.
    pub const ALL: [Retired; 7] = [
        Retired::Accepted,
        Retired::Closed,
        Retired::Requests,
        Retired::MessagesIn,
        Retired::MessagesOut,
        Retired::RedisErrors,
        Retired::RedisReconnects,
    ];

    /// The row's live counter this one retires.
    pub fn of(self, r: &Row) -> &AtomicU64 {
        match self {
            Retired::Accepted => &r.accepted,
            Retired::Closed => &r.closed,
            Retired::Requests => &r.requests,
            Retired::MessagesIn => &r.messages_in,
            Retired::MessagesOut => &r.messages_out,
            Retired::RedisErrors => &r.redis_errors,
            Retired::RedisReconnects => &r.redis_reconnects,
        }
    }
}

/// One process's row. Every field is an atomic, so all-zero memory is a
/// valid (free) row.
#[repr(C)]
#[derive(Debug)]
pub struct Row {
    /// Process id, 0 when free.
    pub pid: AtomicI32,
    role: AtomicU32,
    /// Worker id (slot number) for workers and task workers.
    pub worker_id: AtomicU32,
    /// Start time, milliseconds since the Unix epoch.
    pub started_ms: AtomicU64,
    /// 1 while the process is stopping (draining).
    pub stopping: AtomicU32,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections closed since start.
    pub closed: AtomicU64,
    /// HTTP requests plus WebSocket messages handled (what `max_request` counts).
    pub requests: AtomicU64,
    /// WebSocket messages received.
    pub messages_in: AtomicU64,
    /// WebSocket messages sent.
    pub messages_out: AtomicU64,
    /// Tasks run (task workers) or dispatched (workers).
    pub tasks: AtomicU64,
    /// Resident memory in KiB, refreshed by the process now and then.
    pub rss_kib: AtomicU64,
    /// HTTP responses by status class: index 0 = 1xx … 4 = 5xx.
    pub http_status: [AtomicU64; 5],
    /// Application-defined counters (the Route and the IM server name their
    /// indices), summed by `/metrics` like the framework's.
    pub app: [AtomicU64; APP_COUNTERS],
    /// Failed Redis commands and connection attempts of this process's link.
    pub redis_errors: AtomicU64,
    /// Times this process's Redis link came back after an outage.
    pub redis_reconnects: AtomicU64,
    /// 1 while this process's Redis link is up (a gauge).
    pub redis_up: AtomicU64,
    /// Redis requests on the wire, waiting for their replies (a gauge).
    pub redis_pending: AtomicU64,
    /// Durable Redis requests waiting for the link to come back (a gauge).
    pub redis_queued: AtomicU64,
    /// Redis commands that completed with an error (server, link, timeout).
    pub redis_cmd_errors: AtomicU64,
    /// Redis requests that timed out (`redis_timeout`).
    pub redis_timeouts: AtomicU64,
    /// Durable Redis requests sent again after an outage.
    pub redis_retried: AtomicU64,
    /// Durable Redis requests dropped because their queue was full.
    pub redis_dropped: AtomicU64,
    /// Pub/sub probes that did not come back (each forced a resubscribe).
    pub redis_probe_failures: AtomicU64,
    /// 1 while the pub/sub link is verified by its probe, or unused (a gauge).
    pub redis_sub_verified: AtomicU64,
}

/// Number of application-defined counters per row.
pub const APP_COUNTERS: usize = 32;

/// Counters that outlive any one process (kept by the manager).
#[repr(C)]
#[derive(Debug)]
pub struct Totals {
    /// Workers respawned after an abnormal exit.
    pub worker_restarts: AtomicU64,
    /// Workers replaced by a reload or `max_request`.
    pub worker_replacements: AtomicU64,
    /// Reloads performed.
    pub reloads: AtomicU64,
    /// Counters of processes that have exited, so sums never go backwards,
    /// indexed by [`Retired`] (read them with [`Totals::retired`]).
    retired: [AtomicU64; Retired::ALL.len()],
    /// Retired `http_status` counters.
    pub retired_http: [AtomicU64; 5],
    /// Retired application counters.
    pub retired_app: [AtomicU64; APP_COUNTERS],
}

impl Totals {
    /// The retired total of `counter` (processes that have exited).
    pub fn retired(&self, counter: Retired) -> u64 {
        self.retired[counter as usize].load(Relaxed)
    }
}

/// The shared table.
#[derive(Debug, Clone, Copy)]
pub struct Scoreboard {
    rows: &'static [Row],
    totals: &'static Totals,
}

/// A snapshot of one row, for `status` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RowSnapshot {
    /// Row index.
    #[serde(skip)]
    pub index: usize,
    /// Role (serialized as its name).
    pub role: Role,
    /// Worker id.
    pub id: u32,
    /// Process id.
    pub pid: i32,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Whether it is draining.
    pub stopping: bool,
    /// Open connections.
    pub connections: u64,
    /// Accepted connections.
    pub accepted: u64,
    /// Closed connections.
    pub closed: u64,
    /// Requests served.
    pub requests: u64,
    /// Messages in.
    pub messages_in: u64,
    /// Messages out.
    pub messages_out: u64,
    /// Tasks.
    pub tasks: u64,
    /// RSS in KiB.
    pub rss_kib: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Scoreboard {
    /// Maps a table with room for `capacity` processes. Called once, by the
    /// master, before any fork.
    pub fn create(capacity: usize) -> std::io::Result<Scoreboard> {
        let bytes = std::mem::size_of::<Totals>() + capacity * std::mem::size_of::<Row>();
        // SAFETY: an anonymous shared mapping with no address hint; the
        // result is checked for MAP_FAILED. The kernel zero-fills it, and an
        // all-zero bit pattern is a valid value for every atomic in Totals
        // and Row. Totals sits at the page-aligned start and Row's alignment
        // (8) divides size_of::<Totals>(), so both casts are aligned. The
        // mapping is never unmapped, so the 'static lifetime holds for the
        // life of the process (and of every forked child, which inherits it).
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let totals = &*(p as *const Totals);
            let rows_ptr = (p as *const u8).add(std::mem::size_of::<Totals>()) as *const Row;
            let rows = std::slice::from_raw_parts(rows_ptr, capacity);
            Ok(Scoreboard { rows, totals })
        }
    }

    /// The tree-wide counters.
    pub fn totals(&self) -> &'static Totals {
        self.totals
    }

    /// A row by index.
    pub fn row(&self, index: usize) -> &'static Row {
        &self.rows[index]
    }

    /// Claims a free row for a new process (the manager and master only).
    /// Returns `None` when the table is full.
    pub fn claim(&self, role: Role, worker_id: u32) -> Option<usize> {
        let index = self
            .rows
            .iter()
            .position(|r| Role::from_u32(r.role.load(Relaxed)) == Role::Free)?;
        let r = &self.rows[index];
        for c in [
            &r.connections,
            &r.accepted,
            &r.closed,
            &r.requests,
            &r.messages_in,
            &r.messages_out,
            &r.tasks,
            &r.rss_kib,
            &r.redis_errors,
            &r.redis_reconnects,
            &r.redis_up,
            &r.redis_pending,
            &r.redis_queued,
            &r.redis_cmd_errors,
            &r.redis_timeouts,
            &r.redis_retried,
            &r.redis_dropped,
            &r.redis_probe_failures,
            &r.redis_sub_verified,
        ] {
            c.store(0, Relaxed);
        }
        for c in r.http_status.iter().chain(r.app.iter()) {
            c.store(0, Relaxed);
        }
        r.pid.store(0, Relaxed);
        r.stopping.store(0, Relaxed);
        r.worker_id.store(worker_id, Relaxed);
        r.started_ms.store(now_ms(), Relaxed);
        r.role.store(role.as_u32(), Relaxed);
        Some(index)
    }

    /// Frees a row, folding its counters into the retired totals.
    pub fn release(&self, index: usize) {
        let r = &self.rows[index];
        for c in Retired::ALL {
            self.totals.retired[c as usize].fetch_add(c.of(r).load(Relaxed), Relaxed);
        }
        for (dst, src) in self.totals.retired_http.iter().zip(&r.http_status) {
            dst.fetch_add(src.load(Relaxed), Relaxed);
        }
        for (dst, src) in self.totals.retired_app.iter().zip(&r.app) {
            dst.fetch_add(src.load(Relaxed), Relaxed);
        }
        r.pid.store(0, Relaxed);
        r.role.store(Role::Free.as_u32(), Relaxed);
    }

    /// Snapshots of every used row.
    pub fn snapshot(&self) -> Vec<RowSnapshot> {
        let now = now_ms();
        self.rows
            .iter()
            .enumerate()
            .filter_map(|(index, r)| {
                let role = Role::from_u32(r.role.load(Relaxed));
                if role == Role::Free || r.pid.load(Relaxed) == 0 {
                    return None;
                }
                Some(RowSnapshot {
                    index,
                    role,
                    id: r.worker_id.load(Relaxed),
                    pid: r.pid.load(Relaxed),
                    uptime_s: now.saturating_sub(r.started_ms.load(Relaxed)) / 1000,
                    stopping: r.stopping.load(Relaxed) != 0,
                    connections: r.connections.load(Relaxed),
                    accepted: r.accepted.load(Relaxed),
                    closed: r.closed.load(Relaxed),
                    requests: r.requests.load(Relaxed),
                    messages_in: r.messages_in.load(Relaxed),
                    messages_out: r.messages_out.load(Relaxed),
                    tasks: r.tasks.load(Relaxed),
                    rss_kib: r.rss_kib.load(Relaxed),
                })
            })
            .collect()
    }

    /// An application counter summed over every live process of `role`
    /// plus the retired ones (monotonic: it never goes down when a worker
    /// is replaced).
    pub fn app_total(&self, index: usize) -> u64 {
        let live: u64 = self
            .rows
            .iter()
            .filter(|r| r.pid.load(Relaxed) != 0)
            .map(|r| r.app[index].load(Relaxed))
            .sum();
        live + self.totals.retired_app[index].load(Relaxed)
    }

    /// HTTP responses of status class `class` (1..=5), live plus retired.
    pub fn http_total(&self, class: usize) -> u64 {
        let i = class.clamp(1, 5) - 1;
        let live: u64 = self
            .rows
            .iter()
            .filter(|r| r.pid.load(Relaxed) != 0)
            .map(|r| r.http_status[i].load(Relaxed))
            .sum();
        live + self.totals.retired_http[i].load(Relaxed)
    }

    /// The role stored in a row.
    pub fn role(&self, index: usize) -> Role {
        Role::from_u32(self.rows[index].role.load(Relaxed))
    }
}

/// Reads this process's resident set size in KiB from /proc/self/statm.
pub fn self_rss_kib() -> u64 {
    let page_kib = (nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096)
        / 1024) as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page_kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_release_and_snapshot() {
        let sb = Scoreboard::create(4).unwrap();
        let i = sb.claim(Role::Worker, 2).unwrap();
        sb.row(i).pid.store(1234, Relaxed);
        sb.row(i).requests.store(7, Relaxed);
        let snap = sb.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(
            (snap[0].role, snap[0].id, snap[0].pid, snap[0].requests),
            (Role::Worker, 2, 1234, 7)
        );
        assert_eq!(serde_json::to_value(&snap[0]).unwrap()["role"], "worker");
        sb.row(i).redis_reconnects.store(2, Relaxed);
        sb.release(i);
        assert!(sb.snapshot().is_empty());
        assert_eq!(sb.totals().retired(Retired::Requests), 7);
        assert_eq!(sb.totals().retired(Retired::RedisReconnects), 2);
        assert_eq!(sb.totals().retired(Retired::Accepted), 0);
        for _ in 0..4 {
            sb.claim(Role::Worker, 0).unwrap();
        }
        assert!(sb.claim(Role::Worker, 0).is_none());
    }
}
