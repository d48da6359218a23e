//! This IM server's reads and writes of the cluster's shared state in
//! Redis: its users' presence records (format: [`crate::cluster::presence`])
//! and the registry read it needs when draining.
//!
//! [`PresenceStore`] knows who this server is (its registry member and
//! instance epoch); every method is one Redis call.

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
}

impl PresenceStore {
    /// The store of the server at `member` with instance `epoch`.
    pub fn new(redis_prefix: &str, member: String, epoch: String, ttl_secs: u64) -> Self {
        PresenceStore {
            keys: Keys::new(redis_prefix),
            member,
            epoch,
            ttl_secs,
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

    /// Records connection `fd` of `uid`. False when Redis is unavailable.
    /// Redis: HSET + EXPIRE in MULTI.
    pub fn record<A: App>(&self, srv: &mut Server<A>, uid: &str, fd: Fd) -> bool {
        let p = self.record_of(srv, fd);
        srv.redis_cmd(|c| presence::add(c, &self.keys, uid, &p, self.ttl_secs))
            .is_some()
    }

    /// Moves `uid`'s record from `old_fd` to `new_fd` (handover). False when
    /// Redis is unavailable. Redis: HDEL + HSET + EXPIRE in MULTI.
    pub fn rekey<A: App>(&self, srv: &mut Server<A>, uid: &str, old_fd: Fd, new_fd: Fd) -> bool {
        let new = self.record_of(srv, new_fd);
        let old = Presence {
            fd: old_fd,
            ..new.clone()
        };
        srv.redis_cmd(|c| presence::rekey(c, &self.keys, uid, &old, &new, self.ttl_secs))
            .is_some()
    }

    /// Rewrites the records of every connection in `users` (so a Redis
    /// restarted empty heals). Redis: one pipeline. O(users).
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
        if records.is_empty() {
            return;
        }
        let _ = srv.redis_cmd(|c| presence::add_many(c, &self.keys, &records, self.ttl_secs));
    }

    /// Forgets connection `fd` of `uid`. Redis: HDEL.
    pub fn forget<A: App>(&self, srv: &mut Server<A>, uid: &str, fd: Fd) {
        let p = self.record_of(srv, fd);
        let _ = srv.redis_cmd(|c| presence::remove(c, &self.keys, uid, &p));
    }

    /// Every record of `uid`, on any server; None when Redis is
    /// unavailable. Redis: HGETALL.
    pub fn lookup<A: App>(&self, srv: &mut Server<A>, uid: &str) -> Option<Vec<Presence>> {
        srv.redis_cmd(|c| presence::all(c, &self.keys, uid))
    }

    /// The other live, non-draining IM servers, least loaded first (empty
    /// when Redis is unavailable). Redis: HGETALL of the registry details.
    pub fn other_servers<A: App>(&self, srv: &mut Server<A>) -> Vec<ServerEntry> {
        let mut others = srv
            .redis_cmd(|c| servers::list(c, &self.keys))
            .unwrap_or_default();
        others.retain(|e| e.member() != self.member && !e.draining);
        others.sort_by_key(|e| e.load);
        others
    }
}
