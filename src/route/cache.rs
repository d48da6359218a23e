//! Each Route worker's in-memory copy of the registry (the seed's duty 7):
//! lookups cost no Redis round trip when warm.
//!
//! A subscriber thread per worker (started after fork, in on_worker_start)
//! holds two Redis connections of its own: one SUBSCRIBEd to the registry's
//! change channel, one to re-read the details hash. Every change message,
//! and every `refresh` interval without one, triggers a full re-read (a
//! registry is at most thousands of entries: one HGETALL). While Redis is
//! unreachable the cache keeps its last content, marked stale, and the
//! thread reconnects with backoff.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::servers::ServerEntry;
use crate::route::registry::Registry;

/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Connect timeout for the subscriber's connections.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The cached registry.
#[derive(Debug, Default, Clone)]
pub struct Cache {
    /// The live IM servers, as of the last refresh.
    pub entries: Vec<ServerEntry>,
    /// When the last successful refresh happened.
    pub refreshed_at: Option<Instant>,
    /// Whether the subscriber is connected now.
    pub connected: bool,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Refreshes so far.
    pub refreshes: u64,
}

impl Cache {
    /// Whether the content is recent enough to trust (refreshed within
    /// `max_age` and the subscriber connected).
    pub fn fresh(&self, max_age: Duration) -> bool {
        self.connected && self.refreshed_at.is_some_and(|t| t.elapsed() <= max_age)
    }
}

/// A cache shared between the worker's loop and its subscriber thread.
pub type SharedCache = Arc<Mutex<Cache>>;

/// Starts the subscriber thread for `url` and returns the shared cache.
pub fn spawn(url: String, prefix: String, refresh: Duration, worker_id: usize) -> SharedCache {
    let cache: SharedCache = Arc::default();
    let shared = cache.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("route-cache-{worker_id}"))
        .spawn(move || run(&url, &Registry::new(&prefix), refresh, &shared));
    if let Err(e) = spawned {
        log::error!("cannot start the registry cache thread: {e}");
    }
    cache
}

fn lock(c: &SharedCache) -> std::sync::MutexGuard<'_, Cache> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(url: &str, registry: &Registry, refresh: Duration, cache: &SharedCache) {
    let mut backoff = BACKOFF_START;
    loop {
        match session(url, registry, refresh, cache) {
            Ok(()) => return,
            Err(e) => {
                let mut c = lock(cache);
                if c.connected || c.last_error.is_none() {
                    log::warn!("registry cache: lost Redis ({e}); serving the last known list while reconnecting");
                }
                c.connected = false;
                c.last_error = Some(e.to_string());
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if lock(cache).connected {
            backoff = BACKOFF_START;
        }
    }
}

/// One connected period: subscribe, refresh, wait for changes.
fn session(
    url: &str,
    registry: &Registry,
    refresh: Duration,
    cache: &SharedCache,
) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut data = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    data.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut sub = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe(&registry.keys().channel)?;
    pubsub.set_read_timeout(Some(refresh))?;
    reload(&mut data, registry, cache)?;
    if lock(cache).last_error.take().is_some() {
        log::info!("registry cache: Redis is back");
    }
    loop {
        match pubsub.get_message() {
            Ok(_) => reload(&mut data, registry, cache)?,
            Err(e) if e.is_timeout() => reload(&mut data, registry, cache)?,
            Err(e) => return Err(e),
        }
    }
}

fn reload(
    c: &mut redis::Connection,
    registry: &Registry,
    cache: &SharedCache,
) -> redis::RedisResult<()> {
    let entries = registry.list(c)?;
    let mut g = lock(cache);
    g.entries = entries;
    g.refreshed_at = Some(Instant::now());
    g.connected = true;
    g.refreshes += 1;
    Ok(())
}
