//! Each Route worker's in-memory copy of the registry (the seed's duty 7):
//! lookups cost no Redis round trip when warm.
//!
//! The copy lives on the worker's loop: its subscriber connection listens
//! to the registry's change channel, and every change message, and every
//! `cache_refresh` interval, re-reads the details hash with one HGETALL on
//! the worker's non-blocking client (a registry is at most thousands of
//! entries). Reads are coalesced: a change that arrives while one is under
//! way only asks for one more afterwards. While Redis is unreachable the
//! cache keeps its last content, marked stale.
//!
//! A read is *trusted* only if the change channel was proven (its
//! subscriber verified by a probe, [`Server::redis_ready`]) when the read
//! went out and the subscriber did not reconnect before the answer came:
//! every later change then reaches the cache as an event. Any other read
//! may have missed a change published while the subscription was not up:
//! a worker's first read races its own SUBSCRIBE (and the registration it
//! takes next is announced on that very channel), and a subscriber that
//! reconnects misses what was published in between. A watcher every
//! [`WATCH_EVERY`] reads again as soon as the channel is proven and the
//! last trusted read is not of the current subscriber connection. Without
//! it such a worker routed by a registry missing a server for up to a
//! whole `cache_refresh` (seen in CI: two Route workers of one node
//! answering two servers for one uid).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::cluster::keys::Keys;
use crate::cluster::servers::{self, ServerEntry};
use crate::event::App;
use crate::reactor::Server;

/// How often the cache checks that its last trusted read covers the
/// current subscriber connection (two integer compares when it does).
pub const WATCH_EVERY: Duration = Duration::from_millis(50);

/// Where the reads stand.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// No read under way.
    #[default]
    Idle,
    /// One is under way.
    Busy,
    /// One is under way and a change came meanwhile: read once more.
    BusyAgain,
}

/// The cached registry.
#[derive(Debug, Default, Clone)]
pub struct Cache {
    /// The live IM servers, as of the last refresh.
    pub entries: Vec<ServerEntry>,
    /// When the last successful refresh happened.
    pub refreshed_at: Option<Instant>,
    /// Whether the last read succeeded and was trusted (see the module
    /// doc): the change channel was verified all along.
    pub connected: bool,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Refreshes so far (a generation number: it changes with `entries`).
    pub refreshes: u64,
    /// member → index in `entries`.
    pub by_member: HashMap<String, usize>,
    /// A hash of every entry's (member, epoch, owner): it changes when a
    /// server comes, goes, restarts or moves to another Route worker, not
    /// when only loads change.
    pub topology: u64,
    reading: Reading, // coalesces reads
    /// The subscriber generation ([`Server::redis_sub_generation`]) the
    /// last trusted read was made under.
    trusted_gen: Option<u64>,
}

/// How the cache's owner finds it in its application.
pub type CacheOf<A> = fn(&mut A) -> &mut Cache;

impl Cache {
    /// Whether the content is recent enough to trust (refreshed within
    /// `max_age` and the change channel verified).
    pub fn fresh(&self, max_age: Duration) -> bool {
        self.connected && self.refreshed_at.is_some_and(|t| t.elapsed() <= max_age)
    }

    /// The entry of `member`, if registered.
    pub fn entry(&self, member: &str) -> Option<&ServerEntry> {
        self.by_member
            .get(member)
            .and_then(|i| self.entries.get(*i))
    }

    fn set_entries(&mut self, entries: Vec<ServerEntry>) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.by_member.clear();
        for (i, e) in entries.iter().enumerate() {
            let m = e.member();
            (&m, &e.epoch, &e.owner).hash(&mut h);
            self.by_member.insert(m.to_string(), i);
        }
        self.topology = h.finish();
        self.entries = entries;
    }

    /// Subscribes to the registry's changes, reads it now and every
    /// `refresh`. `of` finds the cache in the application.
    pub fn start<A: App>(srv: &mut Server<A>, keys: &Keys, refresh: Duration, of: CacheOf<A>) {
        let k = keys.clone();
        srv.redis_subscribe(keys.channel.clone(), move |app: &mut A, srv, _payload| {
            Cache::reload(app, srv, &k, of);
        });
        let k = keys.clone();
        // Through `reload`, so that the first read is coalesced too.
        srv.after(0, move |app: &mut A, srv, _| {
            Cache::reload(app, srv, &k, of)
        });
        let k = keys.clone();
        let ms = (refresh.as_secs_f64().max(0.05) * 1000.0) as u64;
        srv.tick(ms, move |app: &mut A, srv, _| {
            Cache::reload(app, srv, &k, of)
        });
        let k = keys.clone();
        srv.tick(
            WATCH_EVERY.as_millis() as u64,
            move |app: &mut A, srv, _| {
                let c = of(app);
                let current = Some(srv.redis_sub_generation());
                if c.trusted_gen != current
                    && c.reading == Reading::Idle
                    && srv.redis_ready().is_ok()
                {
                    Cache::reload(app, srv, &k, of);
                }
            },
        );
    }

    /// Asks for a re-read (coalesced with one under way).
    pub fn reload<A: App>(app: &mut A, srv: &mut Server<A>, keys: &Keys, of: CacheOf<A>) {
        let c = of(app);
        match c.reading {
            Reading::Idle => {
                c.reading = Reading::Busy;
                Cache::reload_now(srv, keys, of);
            }
            Reading::Busy | Reading::BusyAgain => c.reading = Reading::BusyAgain,
        }
    }

    fn reload_now<A: App>(srv: &mut Server<A>, keys: &Keys, of: CacheOf<A>) {
        let k = keys.clone();
        // The subscriber generation this read is covered by, if the change
        // channel is proven now.
        let covered_by = srv
            .redis_ready()
            .is_ok()
            .then(|| srv.redis_sub_generation());
        srv.redis(
            servers::list(keys),
            move |app: &mut A, srv, r: redis::RedisResult<HashMap<String, String>>| {
                let trusted = covered_by == Some(srv.redis_sub_generation())
                    && srv.redis_ready().is_ok();
                let c = of(app);
                match r {
                    Ok(map) => {
                        c.set_entries(servers::parse_list(map));
                        c.refreshed_at = Some(Instant::now());
                        c.refreshes += 1;
                        if c.last_error.take().is_some() {
                            log::info!("registry cache: Redis is back");
                        }
                        c.connected = trusted;
                        if trusted {
                            c.trusted_gen = covered_by;
                        }
                        log::debug!(
                            "registry cache: read {} servers ({})",
                            c.entries.len(),
                            if trusted { "trusted" } else { "to be read again" }
                        );
                    }
                    Err(e) => {
                        if c.connected || c.last_error.is_none() {
                            log::warn!("registry cache: cannot read the registry ({e}); serving the last known list");
                        }
                        c.connected = false;
                        c.last_error = Some(e.to_string());
                    }
                }
                let again = c.reading == Reading::BusyAgain;
                c.reading = if again { Reading::Busy } else { Reading::Idle };
                if again {
                    Cache::reload_now(srv, &k, of);
                }
            },
        );
    }
}
