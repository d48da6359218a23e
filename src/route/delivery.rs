//! Message forwarding (the seed's duty 6): from any program over HTTP, or
//! from an IM server for a user on another one, to the IM servers that
//! hold the user, whichever Route worker or node took the request.
//!
//! Where a user is comes from this worker's [`Locations`] cache, so the
//! common message costs no Redis command: the cache is filled by one
//! HGETALL of the user's presence ([`crate::cluster::presence`]) on a miss,
//! kept current by the presence events IM servers publish, and cleared
//! when the registry's topology changes (a server comes, goes, restarts or
//! moves) or the subscriber reconnects. Records are checked against the
//! registry (same server, same instance epoch); stale ones are deleted.
//! Messages that wait for a lookup keep their order.
//!
//! Each IM server is reached through the Route worker that holds its
//! registration connection: directly when that is this worker; through the
//! worker mailbox when it is another worker of this node; over Redis
//! pub/sub on that worker's channel `P route:worker:<node>/<pid>` when it
//! is on another node. Broadcasts go to `P route:broadcast`, which every
//! worker relays to every IM server it holds.

use std::collections::HashMap;

use crate::cluster::audit::{Audit, Streams};
use crate::cluster::groups::Groups;
use crate::cluster::inbox::{Inbox, Stamp};
use crate::cluster::keys::Keys;
use crate::cluster::link::{Addressed, Broadcast, Offline, RouteFrame};
use crate::cluster::presence::{self, Presence};
use crate::cluster::servers::{self, ServerEntry};
use crate::event::App;
use crate::reactor::{Fd, Message, Server};
use crate::route::answers::{answer, bad, Accepted, Online, Refusal, Sent};
use crate::route::cache::Cache;
use crate::route::locations::{Locations, Route};
use crate::route::registrations::Registrations;
use crate::route::stats;

/// A relayed frame: push `frame` to IM-server connection `fd` (or to all).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Relay {
    /// The registration connection on the receiving worker; None: every one.
    pub fd: Option<Fd>,
    /// The `<node>/<pid>` that `fd` belongs to: a worker that adopted the
    /// connection after a handover translates it to its own fd.
    #[serde(default)]
    pub owner: Option<String>,
    /// The text frame to push.
    pub frame: String,
}

/// A user's connection, resolved: its record and its server's entry.
pub type Target = (Presence, ServerEntry);

/// Something that needs to know where a user is.
#[derive(Debug)]
pub enum Waiting {
    /// An IM server's `forward` (from its link `link`, registered as
    /// `origin`).
    Forward {
        /// The message.
        msg: Addressed,
        /// The forwarding server's member.
        origin: String,
        /// Its link.
        link: Fd,
    },
    /// `POST /api/send`, answered on `http`.
    Send {
        /// The message.
        msg: Addressed,
        /// The HTTP connection waiting for the answer.
        http: Fd,
    },
    /// A control frame for every IM server holding `uid` (a membership
    /// change, a kick); `http`, when set, is answered `{"uid","servers"}`.
    Notify {
        /// The uid.
        uid: String,
        /// The frame.
        frame: String,
        /// The HTTP connection waiting for the answer.
        http: Option<Fd>,
    },
    /// `GET /api/online`, answered on `http`.
    Online {
        /// The uid asked about.
        uid: String,
        /// The HTTP connection waiting for the answer.
        http: Fd,
    },
}

/// What the delivery's callbacks need from the application.
pub trait DeliveryHost: App {
    /// The delivery, with read access to the registry cache and this
    /// worker's registrations.
    fn delivery_parts(&mut self) -> (&mut Delivery, &Cache, &Registrations);
}

/// Locating users and relaying frames to the IM servers that hold them.
#[derive(Debug)]
pub struct Delivery {
    keys: Keys,
    inbox: Option<Inbox>, // where /api/send stores (None: inbox = false)
    groups: Groups,       // group keys and scripts
    /// `group_presence_events` and `group_presence_max`.
    pub group_presence: (bool, u64),
    locations: Locations<Target, Waiting>, // where users are; what waits
    topology: u64,                         // the registry cache's topology the locations hold for
    sub_generation: u64,                   // the subscriber connection they hold for
    relay_generation: u64,                 // the subscriber connection relays were last checked for
    audit: Audit, // /api/send and group messages accepted, audited after a disruption
}

impl Delivery {
    /// Delivery under `redis_prefix`, storing `/api/send` messages in
    /// `inbox` (None: fire and forget).
    pub fn new(redis_prefix: &str, inbox: Option<Inbox>, groups: Groups) -> Delivery {
        Delivery {
            keys: Keys::new(redis_prefix),
            inbox,
            groups,
            group_presence: (false, 0),
            locations: Locations::default(),
            topology: 0,
            sub_generation: 0,
            relay_generation: 0,
            audit: Audit::new(stats::AUDITED, stats::AUDIT_LOST),
        }
    }

    /// An `/api/send` message was accepted: kept for an audit.
    pub fn accepted(&mut self, uid: &str, stamp: &Stamp) {
        self.audit.accepted(uid, stamp);
    }

    /// A group message was accepted: kept for an audit.
    pub fn accepted_group(&mut self, g: &str, stamp: &Stamp) {
        self.audit.accepted_group(g, stamp);
    }

    /// Every [`crate::cluster::audit::TICK_MS`]: audits the accepted
    /// messages (`/api/send`, group sends) after a Redis disruption.
    pub fn audit_tick<A: DeliveryHost>(&mut self, srv: &mut Server<A>) {
        let streams = Streams {
            inbox: self.inbox.as_ref(),
            groups: Some(&self.groups),
        };
        self.audit.tick(srv, streams, |app: &mut A| {
            &mut app.delivery_parts().0.audit
        });
    }

    /// Subscribes this worker to its relay channel, the broadcast channel
    /// and the presence events (all [`crate::cluster::keys::PRESENCE_PARTITIONS`]
    /// of their channels).
    pub fn start<A: DeliveryHost>(&self, srv: &mut Server<A>, node_pid: &str) {
        for ch in [
            self.keys.worker_channel(node_pid),
            self.keys.broadcast_channel(),
        ] {
            srv.redis_subscribe(ch, |app: &mut A, srv, payload| {
                let (d, _, regs) = app.delivery_parts();
                d.on_relay(regs, srv, payload);
            });
        }
        // Every presence partition (an event is on its uid's partition).
        for ch in self.keys.presence_channels() {
            srv.redis_subscribe(ch.as_str(), |app: &mut A, _srv, uid| {
                let (d, _, _) = app.delivery_parts();
                d.locations.invalidate(&String::from_utf8_lossy(uid));
            });
        }
    }

    /// Called now and then: when this worker's subscriber connection was
    /// re-established, relays published meanwhile are lost; its IM servers
    /// are told to `check` their users' inboxes (stored messages are
    /// caught up from there).
    pub fn watch_relays<A: App>(&mut self, srv: &mut Server<A>, regs: &Registrations) {
        let g = srv.redis_sub_generation();
        if g == self.relay_generation {
            return;
        }
        if self.relay_generation != 0 && self.inbox.is_some() {
            log::info!("route: the relay subscription was re-established; asking IM servers to check their users' inboxes");
            let frame = RouteFrame::Check.to_text();
            for fd in regs.registered_fds() {
                srv.push(fd, Message::Text(frame.clone()));
            }
        }
        self.relay_generation = g;
    }

    /// With presence events for groups of up to `max` members when `on`.
    pub fn with_group_presence(mut self, on: bool, max: u64) -> Delivery {
        self.group_presence = (on, max);
        self
    }

    /// The group keys and scripts.
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// The inbox `/api/send` stores in (None: `inbox = false`).
    pub fn inbox(&self) -> Option<&Inbox> {
        self.inbox.as_ref()
    }

    /// (hits, misses, cached uids, lookups under way).
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        self.locations.stats()
    }

    /// Delivers or answers `w` once `uid`'s location is known: at once
    /// from the cache, else after one lookup (messages to `uid` queue
    /// behind it, in order).
    pub fn submit<A: DeliveryHost>(
        &mut self,
        srv: &mut Server<A>,
        cache: &Cache,
        regs: &Registrations,
        uid: &str,
        w: Waiting,
    ) {
        let generation = srv.redis_sub_generation();
        if cache.topology != self.topology || generation != self.sub_generation {
            self.locations.clear();
            self.topology = cache.topology;
            self.sub_generation = generation;
        }
        match self.locations.route(uid, w) {
            (Route::Known(targets), Some(w)) => {
                let targets = targets.to_vec();
                self.complete(srv, regs, w, Ok(&targets));
            }
            (Route::Lookup, _) => {
                let who = uid.to_string();
                srv.redis(
                    presence::all(&self.keys, uid),
                    move |app: &mut A, srv, r: redis::RedisResult<HashMap<String, String>>| {
                        let (d, cache, regs) = app.delivery_parts();
                        d.located(srv, cache, regs, &who, r.map(presence::parse_all));
                    },
                );
            }
            _ => {}
        }
    }

    /// A presence lookup's answer: check the records against the registry
    /// (asking Redis only for servers the cache does not know yet), then
    /// serve what waited.
    fn located<A: DeliveryHost>(
        &mut self,
        srv: &mut Server<A>,
        cache: &Cache,
        regs: &Registrations,
        uid: &str,
        r: redis::RedisResult<Vec<Presence>>,
    ) {
        let records = match r {
            Ok(v) => v,
            Err(e) => return self.finish(srv, regs, uid, Err(e.to_string())),
        };
        let unknown: Vec<String> = {
            let mut u: Vec<String> = records
                .iter()
                .filter(|p| cache.entry(&p.member).is_none())
                .map(|p| p.member.clone())
                .collect();
            u.sort();
            u.dedup();
            u
        };
        if unknown.is_empty() {
            let targets = self.resolve(srv, uid, records, |m| cache.entry(m).cloned());
            return self.finish(srv, regs, uid, Ok(targets));
        }
        let mut c = redis::cmd("HMGET");
        c.arg(&self.keys.details).arg(&unknown);
        let who = uid.to_string();
        srv.redis(
            c,
            move |app: &mut A, srv, r: redis::RedisResult<Vec<Option<String>>>| {
                let (d, cache, regs) = app.delivery_parts();
                let found: HashMap<String, ServerEntry> = match r {
                    Ok(v) => unknown
                        .into_iter()
                        .zip(v)
                        .filter_map(|(m, j)| Some((m, serde_json::from_str(&j?).ok()?)))
                        .collect(),
                    Err(e) => return d.finish(srv, regs, &who, Err(e.to_string())),
                };
                let targets = d.resolve(srv, &who, records, |m| {
                    cache.entry(m).cloned().or_else(|| found.get(m).cloned())
                });
                d.finish(srv, regs, &who, Ok(targets));
            },
        );
    }

    /// Keeps the records whose server is registered with the same epoch;
    /// deletes those of another instance of their server from Redis (not
    /// waited for).
    fn resolve<A: App>(
        &self,
        srv: &mut Server<A>,
        uid: &str,
        records: Vec<Presence>,
        entry: impl Fn(&str) -> Option<ServerEntry>,
    ) -> Vec<Target> {
        let mut valid = Vec::new();
        let mut stale = Vec::new();
        for p in records {
            match entry(&p.member) {
                Some(e) if e.epoch == p.epoch => valid.push((p, e)),
                // Another instance of that server: this record is dead.
                Some(_) => stale.push(p),
                // Not registered now: dead, or silent and inside its grace
                // time (it may come back with its users): not used, not
                // deleted (its server's own removal, or the key's TTL, clears it).
                None => {}
            }
        }
        if !stale.is_empty() {
            srv.redis_send(presence::remove_fields(&self.keys, uid, &stale));
        }
        valid
    }

    fn finish<A: App>(
        &mut self,
        srv: &mut Server<A>,
        regs: &Registrations,
        uid: &str,
        r: Result<Vec<Target>, String>,
    ) {
        let (waiting, targets) = self.locations.finish(uid, r.as_ref().ok().cloned());
        let why = r.as_ref().err().map_or("", String::as_str);
        for w in waiting {
            match &targets {
                Some(t) => self.complete(srv, regs, w, Ok(t.as_slice())),
                None => self.complete(srv, regs, w, Err(why)),
            }
        }
    }

    /// Serves one waiting request with the user's connections (or the
    /// lookup's error).
    fn complete<A: App>(
        &self,
        srv: &mut Server<A>,
        regs: &Registrations,
        w: Waiting,
        targets: Result<&[Target], &str>,
    ) {
        match w {
            Waiting::Forward { msg, origin, link } => {
                let (here, to) = (msg.here, msg.to.clone());
                let stored = msg.stamp.is_some();
                let sender = msg.sender.clone();
                let exclude = here.then_some(origin.as_str());
                let (delivered, unavailable) = match targets {
                    Ok(t) => (self.deliver(srv, regs, t, msg, exclude), false),
                    Err(e) => {
                        log::warn!("route: could not locate {to}: {e}");
                        (0, true)
                    }
                };
                // A stored message waits in the inbox: no `offline`.
                if delivered == 0 && (!here || unavailable) && !stored {
                    if let Some(sender) = sender {
                        let f = RouteFrame::Offline(Offline {
                            to,
                            sender,
                            unavailable,
                        });
                        srv.push(link, Message::Text(f.to_text()));
                    }
                }
            }
            Waiting::Send { msg, http } if msg.stamp.is_some() => {
                let uid = msg.to.clone();
                let stamp = msg.stamp.clone().unwrap_or_default();
                let n = match targets {
                    Ok(t) => self.deliver(srv, regs, t, msg, None),
                    Err(e) => {
                        log::info!(
                            "route: could not locate {uid}: {e}; the message waits in its inbox"
                        );
                        0
                    }
                };
                let status = if n > 0 { "delivered" } else { "queued" };
                let body = Accepted {
                    uid: &uid,
                    id: &stamp.id,
                    seq: stamp.seq,
                    epoch: &stamp.epoch,
                    status,
                };
                srv.respond(http, answer(200, &body));
            }
            Waiting::Send { msg, http } => {
                let uid = msg.to.clone();
                let resp = match targets {
                    Err(e) => bad(503, "unavailable", &format!("Redis: {e}; nothing was sent")),
                    Ok(t) => match self.deliver(srv, regs, t, msg, None) {
                        0 => answer(
                            404,
                            &Refusal {
                                uid: Some(&uid),
                                ..Refusal::new("offline")
                            },
                        ),
                        n => answer(200, &Sent { delivered: n }),
                    },
                };
                srv.respond(http, resp);
            }
            Waiting::Notify { uid, frame, http } => {
                let mut servers: Vec<&ServerEntry> = Vec::new();
                if let Ok(t) = targets {
                    for (_, e) in t {
                        if !servers.iter().any(|x| x.owner == e.owner) {
                            servers.push(e);
                        }
                    }
                }
                let n = servers
                    .into_iter()
                    .filter(|e| self.relay(srv, regs, e, &frame))
                    .count();
                if let Some(http) = http {
                    let body = serde_json::json!({"uid": uid, "servers": n});
                    srv.respond(http, answer(200, &body));
                }
            }
            Waiting::Online { uid, http } => {
                let resp = match targets {
                    Err(e) => bad(503, "unavailable", &format!("Redis: {e}")),
                    Ok(t) => {
                        let mut servers: Vec<&str> =
                            t.iter().map(|(_, e)| e.service_name.as_str()).collect();
                        servers.sort_unstable();
                        servers.dedup();
                        answer(
                            200,
                            &Online {
                                uid: &uid,
                                online: !t.is_empty(),
                                connections: t.len(),
                                servers,
                            },
                        )
                    }
                };
                srv.respond(http, resp);
            }
        }
    }

    /// Hands `msg` to every server of `targets` except `exclude`; returns
    /// the user connections it went to.
    fn deliver<A: App>(
        &self,
        srv: &mut Server<A>,
        regs: &Registrations,
        targets: &[Target],
        msg: Addressed,
        exclude: Option<&str>,
    ) -> usize {
        let mut per_server: Vec<(&ServerEntry, usize)> = Vec::new();
        for (p, e) in targets {
            if exclude == Some(p.member.as_str()) {
                continue;
            }
            match per_server.iter_mut().find(|(x, _)| x.owner == e.owner) {
                Some((_, n)) => *n += 1,
                None => per_server.push((e, 1)),
            }
        }
        if per_server.is_empty() {
            return 0;
        }
        let frame = RouteFrame::Deliver(Addressed {
            sender: None,
            here: false,
            ..msg
        })
        .to_text();
        per_server
            .into_iter()
            .filter(|(e, _)| self.relay(srv, regs, e, &frame))
            .map(|(_, n)| n)
            .sum()
    }

    /// Hands `frame` to the Route worker holding `entry`'s connection:
    /// this one, a sibling (mailbox) or one on another node (pub/sub);
    /// false when it could not.
    pub fn relay<A: App>(
        &self,
        srv: &mut Server<A>,
        regs: &Registrations,
        entry: &ServerEntry,
        frame: &str,
    ) -> bool {
        let Some((owner_worker, fd)) = entry.owner.rsplit_once('/') else {
            return false;
        };
        let Ok(fd) = fd.parse::<Fd>() else {
            return false;
        };
        if owner_worker == regs.node_pid() {
            return srv.push(fd, Message::Text(frame.to_string()));
        }
        let relay = Relay {
            fd: Some(fd),
            owner: Some(owner_worker.to_string()),
            frame: frame.to_string(),
        };
        let payload = serde_json::to_vec(&relay).unwrap_or_default();
        if entry.node == regs.node() && (entry.worker as usize) < srv.worker_count() {
            return match srv.send_message(entry.worker as usize, payload) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!(
                        "route: cannot hand a message to worker {}: {e}",
                        entry.worker
                    );
                    false
                }
            };
        }
        let mut c = redis::cmd("PUBLISH");
        c.arg(self.keys.worker_channel(owner_worker)).arg(payload);
        srv.redis_send(c);
        true
    }

    /// Sends `msg` to every user of every IM server (every Route worker
    /// relays it to the servers it holds). Redis: one PUBLISH, not waited
    /// for; false when Redis is down.
    pub fn broadcast<A: App>(&self, srv: &mut Server<A>, msg: Broadcast) -> bool {
        if !srv.redis_ok() {
            return false;
        }
        let relay = Relay {
            fd: None,
            owner: None,
            frame: RouteFrame::Broadcast(msg).to_text(),
        };
        let mut c = redis::cmd("PUBLISH");
        c.arg(self.keys.broadcast_channel())
            .arg(serde_json::to_vec(&relay).unwrap_or_default());
        srv.redis_send(c);
        true
    }

    /// A relayed frame arrived (pub/sub or a sibling's mailbox): push it.
    pub fn on_relay<A: App>(&self, regs: &Registrations, srv: &mut Server<A>, bytes: &[u8]) {
        let Ok(r) = serde_json::from_slice::<Relay>(bytes) else {
            log::warn!("route: dropping a malformed relayed message");
            return;
        };
        let Some(fd) = r.fd else {
            for fd in regs.registered_fds() {
                srv.push(fd, Message::Text(r.frame.clone()));
            }
            return;
        };
        // Addressed to the worker this one replaced: translate its fd.
        let target = match r.owner {
            Some(o) if o != regs.node_pid() => regs.adopted_fd(&format!("{o}/{fd}")),
            _ => Some(fd),
        };
        match target {
            Some(fd) if srv.push(fd, Message::Text(r.frame)) => {}
            _ => log::info!(
                "route: IM server connection {fd} is gone; a relayed message was not delivered"
            ),
        }
    }

    /// Every entry of the registry from Redis (for `/api/servers?fresh=1`).
    pub fn list_request(&self) -> crate::reactor::redis::Request {
        servers::list(&self.keys)
    }
}
