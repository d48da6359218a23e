//! The Route's read side of the registry: which IM servers are live, for
//! `/route`, `/api/servers`, `/ready` and `/metrics`.
//!
//! [`Directory`] owns the worker's registry cache (kept current by the
//! subscriber thread in [`crate::route::cache`]), the balancer's state, the
//! serialised `/api/servers` answer per cache generation, and the two Redis
//! calls of this side: [`Directory::servers`]' HGETALL when the cache is
//! cold (or `fresh` is asked), and [`Directory::record_route`]'s SET.

use std::time::Duration;

use crate::cluster::servers::{self, ServerEntry};
use crate::cluster::Keys;
use crate::event::App;
use crate::reactor::Server;
use crate::route::balancer::Picker;
use crate::route::cache::{self, Cache, SharedCache};
use crate::route::registrations::Registrations;
use crate::route::settings::{Balancer, RouteSettings};

/// How long the uid → server choice is remembered in Redis.
const ROUTE_RECORD_TTL: u64 = 3600;

/// The live IM servers as this worker sees them.
#[derive(Debug)]
pub struct Directory {
    keys: Keys,
    cache_refresh: f64,
    balancer: Balancer,
    cache: Option<SharedCache>,
    picker: Picker,
    /// `/api/servers` serialised for a cache generation (refreshes, connected).
    servers_body: Option<((u64, bool), Vec<u8>)>,
}

/// The `/api/servers` document, serialised straight from the entries.
#[derive(serde::Serialize)]
struct ServersDoc<'a> {
    count: usize,
    source: &'a str,
    servers: &'a [ServerEntry],
}

impl Directory {
    /// A directory under `redis_prefix`; [`Self::start`] starts its cache.
    pub fn new(cfg: &RouteSettings, redis_prefix: &str) -> Directory {
        Directory {
            keys: Keys::new(redis_prefix),
            cache_refresh: cfg.cache_refresh,
            balancer: cfg.balancer,
            cache: None,
            picker: Picker::default(),
            servers_body: None,
        }
    }

    /// Starts the cache's subscriber thread (when Redis is configured).
    pub fn start<A: App>(&mut self, srv: &Server<A>) {
        if let Some(url) = srv.settings().redis_url.clone() {
            let prefix = srv.settings().redis_prefix.clone();
            let refresh = Duration::from_secs_f64(self.cache_refresh.max(0.1));
            self.cache = Some(cache::spawn(url, prefix, refresh, srv.worker_id()));
        }
    }

    /// How old the cache may be and still count as fresh.
    fn max_age(&self) -> Duration {
        Duration::from_secs_f64(self.cache_refresh * 2.0 + 1.0)
    }

    fn with_cache<T>(&self, f: impl FnOnce(&Cache) -> T) -> Option<T> {
        let c = self.cache.as_ref()?;
        let g = c.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&g))
    }

    /// Why the cache cannot be trusted (for `/ready`); None when fresh or
    /// when there is no cache.
    pub fn stale_reason(&self) -> Option<String> {
        let max_age = self.max_age();
        self.with_cache(|g| {
            (!g.fresh(max_age)).then(|| {
                format!(
                    "registry cache stale ({})",
                    g.last_error.as_deref().unwrap_or("not refreshed yet")
                )
            })
        })
        .flatten()
    }

    /// (servers in the cache, whether it is fresh), for `/metrics`; None
    /// without a cache.
    pub fn cache_gauges(&self) -> Option<(usize, bool)> {
        let max_age = self.max_age();
        self.with_cache(|g| (g.entries.len(), g.fresh(max_age)))
    }

    /// The live servers: from the cache when warm (unless `fresh`), else
    /// from Redis, else from this worker's own registrations. Redis: one
    /// HGETALL when the cache is not used.
    pub fn servers<A: App>(
        &self,
        srv: &mut Server<A>,
        regs: &Registrations,
        fresh: bool,
    ) -> (Vec<ServerEntry>, &'static str) {
        if !fresh {
            let warm = self
                .with_cache(|g| {
                    g.refreshed_at.is_some().then(|| {
                        let source = if g.connected { "cache" } else { "stale-cache" };
                        (g.entries.clone(), source)
                    })
                })
                .flatten();
            if let Some(found) = warm {
                return found;
            }
        }
        let keys = &self.keys;
        if let Some(list) = srv.redis_cmd(|c| servers::list(c, keys)) {
            return (list, "redis");
        }
        (regs.held_entries(), "local")
    }

    /// The `/api/servers` body. From a warm cache the serialised answer is
    /// kept per cache generation (it changes only when the registry does),
    /// so a lookup costs neither Redis nor serialisation; `fresh` reads
    /// Redis every time.
    pub fn servers_json<A: App>(
        &mut self,
        srv: &mut Server<A>,
        regs: &Registrations,
        fresh: bool,
    ) -> Vec<u8> {
        if !fresh {
            if let Some(cache) = &self.cache {
                let g = cache.lock().unwrap_or_else(|p| p.into_inner());
                if g.refreshed_at.is_some() {
                    let generation = (g.refreshes, g.connected);
                    if let Some((gen, body)) = &self.servers_body {
                        if *gen == generation {
                            return body.clone();
                        }
                    }
                    let source = if g.connected { "cache" } else { "stale-cache" };
                    let doc = ServersDoc {
                        count: g.entries.len(),
                        source,
                        servers: &g.entries,
                    };
                    let body = serde_json::to_vec(&doc).unwrap_or_default();
                    drop(g);
                    self.servers_body = Some((generation, body.clone()));
                    return body;
                }
            }
        }
        let (servers, source) = self.servers(srv, regs, fresh);
        let doc = ServersDoc {
            count: servers.len(),
            source,
            servers: &servers,
        };
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// Picks a live, non-draining IM server for `uid` (the balancer).
    pub fn pick<A: App>(
        &mut self,
        srv: &mut Server<A>,
        regs: &Registrations,
        uid: &str,
    ) -> Option<ServerEntry> {
        let (servers, _) = self.servers(srv, regs, false);
        self.picker.pick(self.balancer, &servers, uid).cloned()
    }

    /// Remembers that `uid` was sent to `member` (`im_route:<uid>`, expiring).
    /// Redis: one SET.
    pub fn record_route<A: App>(&self, srv: &mut Server<A>, uid: &str, member: &str) {
        let key = self.keys.route(uid);
        let _ = srv.redis_cmd(|c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(member)
                .arg("EX")
                .arg(ROUTE_RECORD_TTL)
                .query::<()>(c)
        });
    }
}
