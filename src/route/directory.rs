//! The Route's read side of the registry: which IM servers are live, for
//! `/route`, `/api/servers`, `/ready` and `/metrics`.
//!
//! [`Directory`] owns the worker's registry cache (kept current on the
//! worker's loop by [`crate::route::cache`]), the balancer's state, the
//! serialised `/api/servers` answer per cache generation, and the batch of
//! [`Directory::record_route`]'s SETs (sent every 5 ms, never waited for).

use std::time::Duration;

use crate::cluster::servers::ServerEntry;
use crate::cluster::Keys;
use crate::event::{App, Holds};
use crate::reactor::Server;
use crate::route::balancer::Picker;
use crate::route::cache::{Cache, CacheOf};
use crate::route::registrations::Registrations;
use crate::route::settings::{Balancer, RouteSettings};

/// How long the uid → server choice is remembered in Redis.
const ROUTE_RECORD_TTL: u64 = 3600;
/// How long a uid → server record may wait for its batch: one timer tick.
const RECORD_FLUSH_MS: u64 = 5;
/// A batch this large goes out at once.
const RECORD_FLUSH_AT: usize = 1024;

/// The live IM servers as this worker sees them.
#[derive(Debug)]
pub struct Directory {
    keys: Keys,
    cache_refresh: f64,
    balancer: Balancer,
    cache: Cache,
    picker: Picker,
    /// `/api/servers` serialised for a cache generation (refreshes, connected).
    servers_body: Option<((u64, bool), Vec<u8>)>,
    /// uid → server records not sent yet (see [`Self::record_route`]).
    /// (`im_route:{<uid>}`, member) each.
    records: Vec<(String, String)>,
    /// Whether the records' flush timer is armed.
    flush_armed: bool,
}

/// The `/api/servers` document, serialised straight from the entries.
#[derive(serde::Serialize)]
struct ServersDoc<'a> {
    count: usize,
    source: &'a str,
    /// The Route node that answered.
    node: &'a str,
    /// The Route nodes the registry names, each with its IM servers.
    nodes: Vec<NodeDoc<'a>>,
    servers: &'a [ServerEntry],
}

/// One Route node as the registry knows it: the IM servers it holds.
#[derive(serde::Serialize)]
struct NodeDoc<'a> {
    node: &'a str,
    /// Their serviceNames, in the entries' order.
    servers: Vec<&'a str>,
}

/// The Route nodes named by `entries` (each entry carries the node holding
/// its connection), sorted, with their IM servers. O(n log n).
fn nodes_of(entries: &[ServerEntry]) -> Vec<NodeDoc<'_>> {
    let mut nodes: Vec<NodeDoc<'_>> = Vec::new();
    for e in entries {
        match nodes.binary_search_by(|n| n.node.cmp(e.node.as_str())) {
            Ok(i) => nodes[i].servers.push(&e.service_name),
            Err(i) => nodes.insert(
                i,
                NodeDoc {
                    node: &e.node,
                    servers: vec![&e.service_name],
                },
            ),
        }
    }
    nodes
}

/// How many Route nodes `entries` name. O(n log n).
pub fn node_count(entries: &[ServerEntry]) -> usize {
    nodes_of(entries).len()
}

impl Directory {
    /// A directory under `redis_prefix`; [`Self::start`] starts its cache.
    pub fn new(cfg: &RouteSettings, redis_prefix: &str) -> Directory {
        Directory {
            keys: Keys::new(redis_prefix),
            cache_refresh: cfg.cache_refresh,
            balancer: cfg.balancer,
            cache: Cache::default(),
            picker: Picker::default(),
            servers_body: None,
            records: Vec::new(),
            flush_armed: false,
        }
    }

    /// Starts the cache (when Redis is configured); `of` finds it in the
    /// application.
    pub fn start<A: App>(&mut self, srv: &mut Server<A>, of: CacheOf<A>) {
        if srv.redis_configured() {
            let refresh = Duration::from_secs_f64(self.cache_refresh.max(0.1));
            Cache::start(srv, &self.keys, refresh, of);
        }
    }

    /// The registry cache.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The registry cache, for its own callbacks.
    pub fn cache_mut(&mut self) -> &mut Cache {
        &mut self.cache
    }

    /// How old the cache may be and still count as fresh.
    fn max_age(&self) -> Duration {
        Duration::from_secs_f64(self.cache_refresh * 2.0 + 1.0)
    }

    fn with_cache<T>(&self, f: impl FnOnce(&Cache) -> T) -> Option<T> {
        // A Route without Redis has no cache to speak of.
        (self.cache.refreshes > 0 || self.cache.last_error.is_some()).then(|| f(&self.cache))
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

    /// (servers in the cache, Route nodes holding them, whether it is
    /// fresh), for `/metrics`; None without a cache.
    pub fn cache_gauges(&self) -> Option<(usize, usize, bool)> {
        let max_age = self.max_age();
        self.with_cache(|g| (g.entries.len(), node_count(&g.entries), g.fresh(max_age)))
    }

    /// The live servers: from the cache when warm, else this worker's own
    /// registrations. No Redis call.
    pub fn servers(&self, regs: &Registrations) -> (Vec<ServerEntry>, &'static str) {
        let g = &self.cache;
        if g.refreshed_at.is_some() {
            let source = if g.connected { "cache" } else { "stale-cache" };
            return (g.entries.clone(), source);
        }
        (regs.held_entries(), "local")
    }

    /// The `/api/servers` body from the cache: the serialised answer is
    /// kept per cache generation (it changes only when the registry does),
    /// so a lookup costs neither Redis nor serialisation.
    pub fn servers_json(&mut self, regs: &Registrations) -> Vec<u8> {
        let g = &self.cache;
        if g.refreshed_at.is_some() {
            let generation = (g.refreshes, g.connected);
            if let Some((gen, body)) = &self.servers_body {
                if *gen == generation {
                    return body.clone();
                }
            }
            let source = if g.connected { "cache" } else { "stale-cache" };
            let body = servers_doc(&g.entries, source, regs.node());
            self.servers_body = Some((generation, body.clone()));
            return body;
        }
        let (servers, source) = self.servers(regs);
        servers_doc(&servers, source, regs.node())
    }

    /// Picks a live, non-draining IM server for `uid` (the balancer) and
    /// builds its `/route` answer for `uid` and `token`; also returns the
    /// member, for [`Self::record_route`]. The picker is brought up to date
    /// with the cache first, which costs nothing unless the cache
    /// generation changed (see [`Picker::sync`]); without a warm cache it
    /// is rebuilt from this worker's own registrations each time. The pick
    /// itself is O(1) to O(log n) and allocates nothing; the answer is one
    /// allocation.
    pub fn route(
        &mut self,
        regs: &Registrations,
        uid: &str,
        token: &str,
    ) -> Option<(Vec<u8>, std::sync::Arc<str>)> {
        let g = &self.cache;
        if g.refreshed_at.is_some() {
            self.picker.sync(Some(g.refreshes), &g.entries);
        } else {
            self.picker.sync(None, &regs.held_entries());
        }
        let slot = self.picker.pick(self.balancer, uid)?;
        Some((slot.answer(uid, token), slot.member.clone()))
    }

    /// Remembers that `uid` was sent to `member` (`im_route:{<uid>}`,
    /// expiring): the SET joins this worker's batch, sent as one pipeline
    /// by [`Self::flush_records`] within [`RECORD_FLUSH_MS`] (or at once
    /// past [`RECORD_FLUSH_AT`] records) and never waited for. Sending each
    /// SET with its loop iteration instead (one write to Redis, and one
    /// wake-up of it, per iteration) held `/route` at 0.55–0.67× `/health`
    /// where the batch gives 0.85–0.91× (bench_route.sh part 3, 100
    /// servers). O(1).
    pub fn record_route<A: Holds<Directory>>(
        &mut self,
        srv: &mut Server<A>,
        uid: &str,
        member: &str,
    ) {
        self.records
            .push((self.keys.route(uid), member.to_string()));
        if self.records.len() >= RECORD_FLUSH_AT {
            self.flush_records(srv);
        } else if !self.flush_armed {
            self.flush_armed = true;
            srv.after(RECORD_FLUSH_MS, |app: &mut A, srv, _| {
                let d = app.part();
                d.flush_armed = false;
                d.flush_records(srv);
            });
        }
    }

    /// Sends the pending uid → server records as one pipeline, not waited
    /// for (records are hints with an expiry: one lost with Redis is
    /// written again at the user's next `/route`).
    pub fn flush_records<A: App>(&mut self, srv: &mut Server<A>) {
        if self.records.is_empty() {
            return;
        }
        let mut batch = redis::pipe();
        for (key, member) in self.records.drain(..) {
            batch
                .cmd("SET")
                .arg(key)
                .arg(member)
                .arg("EX")
                .arg(ROUTE_RECORD_TTL);
        }
        srv.redis_send(batch);
    }
}

/// The `/api/servers` document for `entries`, answered by Route node `node`.
pub fn servers_doc(entries: &[ServerEntry], source: &str, node: &str) -> Vec<u8> {
    serde_json::to_vec(&ServersDoc {
        count: entries.len(),
        source,
        node,
        nodes: nodes_of(entries),
        servers: entries,
    })
    .unwrap_or_default()
}
