//! The worker's Redis link: one blocking `redis::Connection` per worker,
//! opened before `on_worker_start` when `redis_url` is set, with short
//! timeouts so a dead Redis cannot stall the loop for long.
//!
//! When Redis is unreachable the worker keeps serving: `Server::redis()`
//! returns `None`, the outage is logged once at warn, and the loop retries
//! on its timer wheel with exponential backoff ([`BACKOFF_MIN`] doubling up
//! to [`BACKOFF_MAX`]). A command that fails with an I/O error marks the
//! link down the same way (`Server::redis_cmd` does it for you).
//!
//! The link counts into its process's scoreboard row (when given one with
//! [`RedisLink::with_row`]): failed commands and connection attempts,
//! reconnects after an outage, and whether it is up now, for `/metrics`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::process::scoreboard::Row;

/// Connect timeout: Redis is local or near; a slow connect means it is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Read and write timeout per command: bounds how long one command can
/// block the event loop.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// First retry delay after an outage begins.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: a restarted Redis is found within this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The link's state.
pub struct RedisLink {
    client: Option<redis::Client>,   // None: no redis_url
    conn: Option<redis::Connection>, // None: down (or not configured)
    backoff: Duration,               // next retry delay
    outage_logged: bool,             // the current outage was logged
    /// A retry timer is armed (the loop keeps this in step).
    pub retry_armed: bool,
    row: Option<&'static Row>, // where the link's counters go
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("configured", &self.client.is_some())
            .field("up", &self.conn.is_some())
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl RedisLink {
    /// A link for `url` (none: Redis is not used). The URL was validated
    /// when the settings loaded; a bad one here is logged and ignored.
    pub fn new(url: Option<&str>) -> RedisLink {
        let client = url.and_then(|u| match redis::Client::open(u) {
            Ok(c) => Some(c),
            Err(e) => {
                log::error!("redis: bad redis_url {u:?}: {e}");
                None
            }
        });
        RedisLink {
            client,
            conn: None,
            backoff: BACKOFF_MIN,
            outage_logged: false,
            retry_armed: false,
            row: None,
        }
    }

    /// Counts the link's errors, reconnects and state into `row`.
    pub fn with_row(mut self, row: &'static Row) -> RedisLink {
        self.row = Some(row);
        self
    }

    /// Counts a failed command that left the link up (a script error, a
    /// wrong type): link failures are counted by [`RedisLink::down`].
    pub fn count_error(&self) {
        if let Some(r) = self.row {
            r.redis_errors.fetch_add(1, Relaxed);
        }
    }

    /// Whether a Redis URL is configured.
    pub fn configured(&self) -> bool {
        self.client.is_some()
    }

    /// Whether the link is up.
    pub fn is_up(&self) -> bool {
        self.conn.is_some()
    }

    /// The connection, if up.
    pub fn conn(&mut self) -> Option<&mut redis::Connection> {
        self.conn.as_mut()
    }

    /// The delay before the next retry.
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// Tries to connect (blocking, at most [`CONNECT_TIMEOUT`]). Returns
    /// whether the link is up; on failure doubles the backoff.
    pub fn connect(&mut self, worker_id: usize) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        if self.conn.is_some() {
            return true;
        }
        let attempt = client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .and_then(|c| {
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(c)
            });
        match attempt {
            Ok(c) => {
                if self.outage_logged {
                    log::info!("worker {worker_id}: redis is back");
                    if let Some(r) = self.row {
                        r.redis_reconnects.fetch_add(1, Relaxed);
                    }
                }
                if let Some(r) = self.row {
                    r.redis_up.store(1, Relaxed);
                }
                self.conn = Some(c);
                self.backoff = BACKOFF_MIN;
                self.outage_logged = false;
                true
            }
            Err(e) => {
                self.down(worker_id, &format!("connect failed: {e}"));
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                false
            }
        }
    }

    /// Marks the link down (logged once per outage).
    pub fn down(&mut self, worker_id: usize, why: &str) {
        self.conn = None;
        if let Some(r) = self.row {
            r.redis_errors.fetch_add(1, Relaxed);
            r.redis_up.store(0, Relaxed);
        }
        if !self.outage_logged {
            log::warn!("worker {worker_id}: redis unavailable ({why}); serving without it, retrying with backoff");
            self.outage_logged = true;
        }
    }

    /// Whether `e` means the connection itself is broken.
    pub fn is_link_error(e: &redis::RedisError) -> bool {
        e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
    }
}
