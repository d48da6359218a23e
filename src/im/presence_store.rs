//! This IM server's reads and writes of the cluster's shared state in
//! Redis: its users' presence records (format: [`crate::cluster::presence`])
//! and the registry read it needs when draining.
//!
//! [`PresenceStore`] knows who this server is (its registry member and
//! instance epoch). Nothing here waits for Redis: writes go out on the
//! worker's non-blocking client (removals and handover moves as durable
//! requests), and the registry is re-read in the background.

use crate::cluster::presence::{self, Presence};
use crate::cluster::servers::{self, ServerEntry};
use crate::cluster::Keys;
use crate::event::App;
use crate::reactor::{Fd, Server};

/// Presence records of this server's users, and the registry read.
#[derive(Debug)]
pub struct PresenceStore {
    keys: Keys,
    /// This server's registry member (`{"ip":…,"port":…}`).
    member: String,
    /// This instance's epoch.
    epoch: String,
    /// TTL of a user's presence key (last-resort expiry).
    ttl_secs: u64,
    /// The registry as last read (for the farewell's reconnect hints).
    servers: Vec<ServerEntry>,
    /// A re-read after an update event is scheduled.
    update_due: bool,
    /// A registry read is under way.
    reading: bool,
    /// Another read was asked for while one was under way.
    read_again: bool,
}

/// After an update event (load, draining), wait this long before
/// re-reading: updates come with every renewal, one read serves them all.
pub const SERVERS_COALESCE: std::time::Duration = std::time::Duration::from_millis(1000);

/// Connections per presence-refresh request: bounds the size of one
/// request and of the loop iteration that builds it.
pub const REFRESH_CHUNK: usize = 1000;

/// How often the registry is re-read for the farewell hints.
pub const SERVERS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl PresenceStore {
    /// The store of the server at `member` with instance `epoch`.
    pub fn new(redis_prefix: &str, member: String, epoch: String, ttl_secs: u64) -> Self {
        PresenceStore {
            keys: Keys::new(redis_prefix),
            member,
            epoch,
            ttl_secs,
            servers: Vec::new(),
            update_due: false,
            reading: false,
            read_again: false,
        }
    }

    /// This server's registry member.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// This instance's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Whether `p` is a record of this very instance.
    pub fn is_mine(&self, p: &Presence) -> bool {
        p.member == self.member && p.epoch == self.epoch
    }

    fn record_of<A: App>(&self, srv: &Server<A>, fd: Fd) -> Presence {
        Presence {
            member: self.member.clone(),
            worker: srv.worker_id(),
            fd,
            epoch: self.epoch.clone(),
        }
    }

    /// Records connection `fd` of `uid` and announces it. Redis: HSET +
    /// EXPIRE (+ PUBLISH, see [`presence::Announced`]), durable: a user who
    /// connects while Redis is away is recorded, and announced (so the
    /// Routes forget where it was), as soon as Redis is back, before
    /// anything later of its own.
    pub fn record<A: App>(&self, srv: &mut Server<A>, uid: &str, fd: Fd) {
        let p = self.record_of(srv, fd);
        Self::send(srv, presence::add(&self.keys, uid, &p, self.ttl_secs));
    }

    /// Moves `uid`'s record from `old_fd` to `new_fd` (handover). Redis:
    /// HDEL + HSET + EXPIRE in MULTI (+ PUBLISH), durable (kept and sent
    /// again if Redis is away).
    pub fn rekey<A: App>(&self, srv: &mut Server<A>, uid: &str, old_fd: Fd, new_fd: Fd) {
        let new = self.record_of(srv, new_fd);
        let old = Presence {
            fd: old_fd,
            ..new.clone()
        };
        let a = presence::rekey(&self.keys, uid, &old, &new, self.ttl_secs);
        Self::send(srv, a);
    }

    /// Sends a presence write and its event, durable. A single Redis
    /// server gets both in one MULTI; a Redis Cluster gets the write, and
    /// the event once the write's reply is in (whatever it was: an event
    /// only makes a Route read the user again), so that it never overtakes
    /// the write ([`presence::Announced`]). The cost there: a worker that
    /// ends before its last replies arrive leaves their events unsent, and
    /// the Routes serve those users' old locations until their next event
    /// or at most [`crate::route::locations::MAX_AGE`].
    fn send<A: App>(srv: &mut Server<A>, a: presence::Announced) {
        if !srv.redis_cluster() {
            return srv.redis_durable(a.together());
        }
        let (write, event) = a.split();
        srv.redis_durable_then(
            write,
            move |_: &mut A, srv, _: redis::RedisResult<redis::Value>| {
                srv.redis_durable(event);
            },
        );
    }

    /// Rewrites the records of every connection in `users` (so a Redis
    /// restarted empty heals): [`REFRESH_CHUNK`] connections per request,
    /// one request per loop iteration, so neither a write nor an iteration
    /// grows with the number of users.
    pub fn refresh<'u, A: App>(
        &self,
        srv: &mut Server<A>,
        users: impl Iterator<Item = (Fd, &'u str)>,
    ) {
        if !srv.redis_ok() {
            return;
        }
        let records: Vec<(String, Presence)> = users
            .map(|(fd, uid)| (uid.to_string(), self.record_of(srv, fd)))
            .collect();
        refresh_step(srv, self.keys.clone(), self.ttl_secs, records);
    }

    /// Forgets connection `fd` of `uid` and announces it. Redis: HDEL
    /// (+ PUBLISH, see [`presence::Announced`]), durable.
    pub fn forget<A: App>(&self, srv: &mut Server<A>, uid: &str, fd: Fd) {
        let p = self.record_of(srv, fd);
        Self::send(srv, presence::remove(&self.keys, uid, &p));
    }

    /// Keeps a copy of the registry so that a draining worker can point
    /// its users at the other servers without asking Redis then: read now,
    /// once more a second later, every [`SERVERS_EVERY`], at once when a
    /// server registers or is removed, and at most once per
    /// [`SERVERS_COALESCE`] for other changes (load and draining updates).
    /// `of` finds this store in the application.
    pub fn watch_servers<A: App>(srv: &mut Server<A>, of: fn(&mut A) -> &mut PresenceStore) {
        let keys = Keys::new(&srv.settings().redis_prefix);
        srv.redis_subscribe(keys.channel.clone(), move |app: &mut A, srv, payload| {
            let membership = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| {
                    v.get("event")
                        .and_then(|e| e.as_str())
                        .map(|e| e != "update")
                })
                .unwrap_or(true);
            if membership {
                return Self::read_servers(app, srv, of);
            }
            let me = of(app);
            if !me.update_due {
                me.update_due = true;
                srv.after(
                    SERVERS_COALESCE.as_millis() as u64,
                    move |app: &mut A, srv, _| {
                        of(app).update_due = false;
                        Self::read_servers(app, srv, of);
                    },
                );
            }
        });
        srv.after(0, move |app: &mut A, srv, _| {
            Self::read_servers(app, srv, of)
        });
        // Once more when the subscription is surely up: what changed
        // before it was is not announced to it.
        srv.after(1000, move |app: &mut A, srv, _| {
            Self::read_servers(app, srv, of)
        });
        srv.tick(
            SERVERS_EVERY.as_millis() as u64,
            move |app: &mut A, srv, _| Self::read_servers(app, srv, of),
        );
    }

    /// One registry read at a time; a read asked for meanwhile runs after.
    fn read_servers<A: App>(
        app: &mut A,
        srv: &mut Server<A>,
        of: fn(&mut A) -> &mut PresenceStore,
    ) {
        let me = of(app);
        if me.reading {
            me.read_again = true;
            return;
        }
        me.reading = true;
        srv.redis(
            servers::list(&me.keys),
            move |app: &mut A,
                  srv,
                  r: redis::RedisResult<std::collections::HashMap<String, String>>| {
                let me = of(app);
                me.reading = false;
                if let Ok(map) = r {
                    me.servers = servers::parse_list(map);
                }
                if std::mem::take(&mut me.read_again) {
                    Self::read_servers(app, srv, of);
                }
            },
        );
    }

    /// The other live, non-draining IM servers, least loaded first, as of
    /// the last read (no Redis call).
    pub fn other_servers(&self) -> Vec<ServerEntry> {
        let mut others: Vec<ServerEntry> = self
            .servers
            .iter()
            .filter(|e| e.member() != self.member && !e.draining)
            .cloned()
            .collect();
        others.sort_by_key(|e| e.load);
        others
    }
}

/// Sends one chunk of a refresh and schedules the next.
fn refresh_step<A: App>(
    srv: &mut Server<A>,
    keys: Keys,
    ttl: u64,
    mut rest: Vec<(String, Presence)>,
) {
    if rest.is_empty() {
        return;
    }
    let tail = rest.split_off(rest.len().min(REFRESH_CHUNK));
    srv.redis_send(presence::add_many(&keys, &rest, ttl));
    if !tail.is_empty() {
        let mut tail = Some(tail);
        srv.after(0, move |_: &mut A, srv, _| {
            if let Some(t) = tail.take() {
                refresh_step(srv, keys.clone(), ttl, t);
            }
        });
    }
}
