//! The Route's registrations: one [`Peer`] per IM-server connection (its
//! bad-frame count and, once registered, the entry it holds in Redis), and
//! every write this worker makes to the registry.
//!
//! The sweep and the silent → re-admitted / closed life of a peer are in
//! [`crate::route::liveness`] (an `impl Registrations` block there).
//!
//! Nothing here waits for Redis. Each registry write is one request on the
//! worker's non-blocking client, its reply handled by a method of this
//! component (found again through [`Holds`]): `store` → `stored`,
//! `renew` → `renewed`, `rehome` → `rehomed`; removals are durable (kept
//! across an outage and sent first when Redis is back), so a close is
//! never forgotten. A slow Redis delays these replies, never the reading
//! of heartbeats: liveness does not depend on Redis speed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use crate::auth;
use crate::cluster::link::{Registered, Registration, RouteFrame};
use crate::cluster::servers::ServerEntry;
use crate::cluster::{ErrorCode, ProtocolError};
use crate::event::{App, Holds};
use crate::process::scoreboard::now_ms;
use crate::reactor::{Fd, Message, Server};
use crate::route::liveness::Liveness;
use crate::route::registry::{Registry, Renew, Renewal};
use crate::route::settings::{self, RouteSettings};
use crate::route::stats;

/// Connection attribute holding a registration connection's [`Held`], so
/// a worker adopting the connection (handover) restores it.
const ATTR_HELD: &str = "route.held";
/// The field of [`ATTR_HELD`] that carries a silent peer's phase.
const ATTR_SILENT_SINCE: &str = "silent_since_ms";

/// One IM server's registration as this worker holds it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Held {
    pub(super) entry: ServerEntry,
    /// Whether Redis has it (false while Redis is away, or while the peer
    /// is silent).
    pub(super) stored: bool,
    /// A store (or a re-admission's probe) is under way (not moved in a
    /// handover: the successor stores again if it must).
    #[serde(skip)]
    pub(super) storing: bool,
    /// The IM server was sent its `registered` frame: a later store (after
    /// an outage, or a re-admission) does not send another.
    #[serde(default)]
    pub(super) acked: bool,
}

/// Why an entry is being stored: what its success means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Store {
    /// A new registration: acknowledge it, or say Redis is away.
    New,
    /// One kept while Redis was away: acknowledge it now.
    Pending,
    /// Redis lost a stored one (restarted empty), or an acknowledged one
    /// waited out an outage: store it again, quietly.
    Rebuild,
    /// A silent peer spoke again within the grace time: its old entry goes
    /// back (see [`crate::route::liveness`]).
    Readmit,
}

/// What the Route knows of one WebSocket connection.
#[derive(Debug, Default)]
pub(super) struct Peer {
    bad_frames: u32,
    /// The connection's source address (for `max_registrations_per_ip`).
    ip: Option<IpAddr>,
    pub(super) held: Option<Held>,
    /// Live or silent (see [`crate::route::liveness`]).
    pub(super) liveness: Liveness,
    /// Why the sweep closed it, for the removal's cause.
    pub(super) closing_cause: Option<&'static str>,
}

/// The registrations this worker holds, and its registry writes.
#[derive(Debug)]
pub struct Registrations {
    pub(super) cfg: RouteSettings,
    pub(super) registry: Registry,
    /// This Route node's name (`node_id`, or `<host>:<port>`).
    node: String,
    pub(super) peers: HashMap<Fd, Peer>,
    /// Owner tokens of adopted connections (`<node>/<old pid>/<old fd>`)
    /// → their fd here, for messages relayed to the previous worker.
    adopted: HashMap<String, Fd>,
    /// Whether the registry was reachable at the last sweep.
    pub(super) reach: crate::route::liveness::Reach,
}

impl Registrations {
    /// Registrations under `redis_prefix`; [`Self::set_node`] names the node.
    pub fn new(cfg: RouteSettings, redis_prefix: &str) -> Registrations {
        Registrations {
            cfg,
            registry: Registry::new(redis_prefix),
            node: String::new(),
            peers: HashMap::new(),
            adopted: HashMap::new(),
            reach: crate::route::liveness::Reach::Up,
        }
    }

    /// Names this Route node (once per worker, after the fork).
    pub fn set_node(&mut self, node: String) {
        self.node = node;
    }

    /// This Route node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the node is named yet.
    pub fn has_node(&self) -> bool {
        !self.node.is_empty()
    }

    /// `<node>/<pid>`: this worker's name in owner tokens and channels.
    pub fn node_pid(&self) -> String {
        format!("{}/{}", self.node, std::process::id())
    }

    /// This worker's fd for a connection a previous worker of the slot
    /// held under `owner` (`<node>/<pid>/<fd>`).
    pub fn adopted_fd(&self, owner: &str) -> Option<Fd> {
        self.adopted.get(owner).copied()
    }

    /// The connections of the IM servers this worker holds. O(peers).
    pub fn registered_fds(&self) -> Vec<Fd> {
        self.peers
            .iter()
            .filter(|(_, p)| p.held.is_some())
            .map(|(fd, _)| *fd)
            .collect()
    }

    /// The entries this worker holds (silent peers' are out), sorted by
    /// serviceName. O(peers).
    pub fn held_entries(&self) -> Vec<ServerEntry> {
        let mut own: Vec<ServerEntry> = self
            .peers
            .values()
            .filter(|p| p.liveness == Liveness::Live)
            .filter_map(|p| p.held.as_ref().map(|h| h.entry.clone()))
            .collect();
        own.sort_by(|a, b| a.service_name.cmp(&b.service_name));
        own
    }

    /// How many IM servers this worker holds. O(peers).
    pub fn held_count(&self) -> usize {
        self.peers.values().filter(|p| p.held.is_some()).count()
    }

    /// The registry member `fd` holds, if it registered.
    pub fn member_of(&self, fd: Fd) -> Option<String> {
        let held = self.peers.get(&fd)?.held.as_ref()?;
        Some(held.entry.member().to_string())
    }

    /// A connection opened.
    pub fn open<A: App>(&mut self, srv: &Server<A>, fd: Fd) {
        let ip = srv.connection_info(fd).map(|i| i.peer.ip());
        self.peers.insert(
            fd,
            Peer {
                ip,
                ..Peer::default()
            },
        );
    }

    /// A connection moved here from the worker this one replaced: restore
    /// its registration, if it had one, and take ownership of its entry.
    pub fn adopt<A: Holds<Registrations>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        attrs: &HashMap<String, Value>,
    ) {
        let attr = attrs.get(ATTR_HELD);
        let held = attr.and_then(|v| serde_json::from_value::<Held>(v.clone()).ok());
        // A silent peer stays silent (and out of the registry) here.
        let liveness = attr
            .and_then(|v| v.get(ATTR_SILENT_SINCE)?.as_u64())
            .map_or(Liveness::Live, |since_ms| Liveness::Silent { since_ms });
        match held {
            Some(h) => self.adopt_held(srv, fd, h, liveness),
            None => {
                self.peers.insert(fd, Peer::default());
            }
        }
    }

    /// A registration connection moved here: take ownership of its entry in
    /// Redis in place (`rehome`).
    fn adopt_held<A: Holds<Registrations>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        mut held: Held,
        liveness: Liveness,
    ) {
        let old_owner = held.entry.owner.clone();
        let new_owner = format!("{}/{fd}", self.node_pid());
        let member = held.entry.member().to_string();
        let worker = srv.worker_id() as u32;
        held.entry.owner = new_owner.clone();
        held.entry.worker = worker;
        let stored = held.stored;
        let name = held.entry.service_name.clone();
        self.adopted.insert(old_owner.clone(), fd);
        if !self.cfg.auth_secret.is_empty() {
            srv.exempt_from_rate_limit(fd);
        }
        self.peers.insert(
            fd,
            Peer {
                held: Some(held),
                liveness,
                ..Peer::default()
            },
        );
        self.save_held(srv, fd);
        self.hold_connection(srv, fd);
        if stored {
            let (publish, now) = (srv.redis_publish_command(), now_ms());
            let req = self
                .registry
                .rehome(&member, &old_owner, &new_owner, worker, now, publish);
            srv.redis(req, move |app: &mut A, srv, r: redis::RedisResult<i64>| {
                app.part().rehomed(srv, fd, &member, &name, r);
            });
        }
    }

    /// The rehome's answer.
    fn rehomed<A: App>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        member: &str,
        name: &str,
        r: redis::RedisResult<i64>,
    ) {
        match r.map(Renewal::from_code) {
            Ok(Renewal::Renewed) => log::info!("route: took over {name} at {member} (fd {fd})"),
            Ok(Renewal::Superseded) => {
                log::info!(
                    "route: {member} re-registered elsewhere meanwhile; fd {fd} does not hold it"
                );
                self.let_go(srv, fd);
            }
            // Gone, or Redis away: the sweep stores it again.
            Ok(Renewal::Missing) | Err(_) => {
                if let Some(h) = self.held_mut(fd, member) {
                    h.stored = false;
                }
                self.save_held(srv, fd);
            }
        }
    }

    /// The peer's registration, if it still is of `member`.
    pub(super) fn held_mut(&mut self, fd: Fd, member: &str) -> Option<&mut Held> {
        self.peers
            .get_mut(&fd)?
            .held
            .as_mut()
            .filter(|h| h.entry.member() == member)
    }

    /// `fd` no longer holds its entry (someone else registered that
    /// address): forget it, and give the connection the usual idle limit.
    pub(super) fn let_go<A: App>(&mut self, srv: &mut Server<A>, fd: Fd) {
        if let Some(p) = self.peers.get_mut(&fd) {
            p.held = None;
            p.liveness = Liveness::Live;
        }
        srv.set_idle_limit(fd, None);
        self.save_held(srv, fd);
    }

    /// Mirrors a peer's registration into its connection attributes.
    /// A silent peer's phase goes along (`silent_since_ms`).
    pub(super) fn save_held<A: App>(&self, srv: &mut Server<A>, fd: Fd) {
        let peer = self.peers.get(&fd);
        let held = peer.and_then(|p| p.held.as_ref());
        match held.map(serde_json::to_value) {
            Some(Ok(mut v)) => {
                if let (Some(Liveness::Silent { since_ms }), Some(o)) =
                    (peer.map(|p| p.liveness), v.as_object_mut())
                {
                    o.insert(ATTR_SILENT_SINCE.into(), since_ms.into());
                }
                srv.set_attr(fd, ATTR_HELD, v);
            }
            _ => {
                srv.remove_attr(fd, ATTR_HELD);
            }
        }
    }

    /// Answers a refused frame; past `max_bad_frames` closes with 1008.
    pub fn refuse<A: App>(&mut self, srv: &mut Server<A>, fd: Fd, e: &ProtocolError) {
        stats::count(srv.row(), stats::PROTOCOL_ERRORS);
        log::warn!(
            "route: refused a frame from fd {fd} ({:?}): {} {}",
            srv.connection_info(fd).map(|i| i.peer),
            e.code,
            e.message
        );
        srv.push(fd, Message::Text(e.to_frame()));
        let Some(p) = self.peers.get_mut(&fd) else {
            return;
        };
        p.bad_frames += 1;
        if p.bad_frames >= self.cfg.max_bad_frames {
            log::warn!("route: closing fd {fd} after {} bad frames", p.bad_frames);
            srv.disconnect(fd, 1008, "too many bad frames");
        }
    }

    /// `register`: check the token and the per-address limit, store the
    /// entry (or keep it until Redis returns), acknowledge.
    pub fn register<A: Holds<Registrations>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        reg: Registration,
    ) {
        if !self.cfg.auth_secret.is_empty() {
            let token = reg.token.as_deref().unwrap_or("");
            if let Err(e) = auth::verify(
                self.cfg.auth_secret.as_bytes(),
                token,
                "register",
                Some(&reg.service_name),
            ) {
                stats::count(srv.row(), stats::AUTH_FAILURES);
                log::warn!(
                    "route: unauthorized register of {} from fd {fd}: {e}",
                    reg.service_name
                );
                let refusal = ProtocolError::new(ErrorCode::Unauthorized, e.to_string());
                srv.push(fd, Message::Text(refusal.to_frame()));
                srv.disconnect(fd, 1008, "unauthorized");
                return;
            }
        }
        if !self.registration_allowed(srv, fd) {
            return;
        }
        // An authenticated IM server carries all its users' messages: the
        // per-connection message budget (meant for one client) would cut
        // it off at load and lose what it forwards. Without auth_secret
        // anyone may register, so the budget stays.
        if !self.cfg.auth_secret.is_empty() {
            srv.exempt_from_rate_limit(fd);
        }
        let owner = format!("{}/{fd}", self.node_pid());
        let entry = ServerEntry::new(&reg, &self.node, srv.worker_id() as u32, &owner, now_ms());
        // A connection that registers again under another address drops its old entry.
        let old = self.peers.get(&fd).and_then(|p| p.held.clone());
        if let Some(old) = old.filter(|o| o.stored && o.entry.member() != entry.member()) {
            self.remove_entry(srv, &old.entry, "replaced");
        }
        let until = now_ms() + settings::lease(srv.settings()).as_millis() as u64;
        if let Some(p) = self.peers.get_mut(&fd) {
            let acked = p.held.as_ref().is_some_and(|h| h.acked);
            p.held = Some(Held {
                entry: entry.clone(),
                stored: false,
                storing: false,
                acked,
            });
            p.liveness = Liveness::Live;
        }
        self.save_held(srv, fd);
        self.hold_connection(srv, fd);
        self.store(srv, fd, &entry, until, Store::New);
    }

    /// `max_registrations_per_ip`: a connection that holds no registration
    /// yet may register only while its address holds fewer than the limit
    /// on this worker; else `rate_limited` and close 1008. O(peers).
    fn registration_allowed<A: App>(&mut self, srv: &mut Server<A>, fd: Fd) -> bool {
        let max = self.cfg.max_registrations_per_ip;
        let Some(me) = self.peers.get(&fd) else {
            return true;
        };
        if max == 0 || me.held.is_some() {
            return true;
        }
        let ip = me.ip;
        let held = self
            .peers
            .values()
            .filter(|p| p.held.is_some() && p.ip == ip)
            .count();
        if held < max {
            return true;
        }
        stats::count(srv.row(), stats::PROTOCOL_ERRORS);
        log::warn!(
            "route: fd {fd} ({ip:?}): {held} registrations from this address already; max_registrations_per_ip {max} reached"
        );
        let refusal = ProtocolError::new(
            ErrorCode::RateLimited,
            format!("at most {max} registrations per address"),
        );
        srv.push(fd, Message::Text(refusal.to_frame()));
        srv.disconnect(fd, 1008, "rate limited");
        false
    }

    /// `heartbeat`: note the load (the next sweep stores it).
    pub fn heartbeat<A: App>(&mut self, srv: &mut Server<A>, fd: Fd, load: Option<u64>) {
        match self.peers.get_mut(&fd).and_then(|p| p.held.as_mut()) {
            Some(h) => {
                if let Some(l) = load {
                    h.entry.load = l;
                }
            }
            None => self.refuse(
                srv,
                fd,
                &ProtocolError::new(ErrorCode::NotRegistered, "register first"),
            ),
        }
    }

    /// `draining`: mark the entry so no new users go there.
    pub fn draining<A: App>(&mut self, srv: &mut Server<A>, fd: Fd) {
        let held = self.peers.get_mut(&fd).and_then(|p| p.held.as_mut());
        let Some(h) = held else { return };
        h.entry.draining = true;
        let (member, owner) = (h.entry.member().to_string(), h.entry.owner.clone());
        log::info!("route: {} is draining; no new users go there", member);
        let r = Renew {
            lease_until_ms: now_ms() + settings::lease(srv.settings()).as_millis() as u64,
            load: None,
            draining: Some(true),
            now_ms: now_ms(),
        };
        let publish = srv.redis_publish_command();
        srv.redis_durable(self.registry.renew(&member, &owner, &r, publish));
        self.save_held(srv, fd);
    }

    /// A connection closed: remove its entry if it held one.
    pub fn close<A: App>(&mut self, srv: &mut Server<A>, fd: Fd) {
        let Some(peer) = self.peers.remove(&fd) else {
            return;
        };
        // Also when a store is under way: the removal goes out after it.
        if let Some(held) = peer.held.filter(|h| h.stored || h.storing) {
            self.remove_entry(srv, &held.entry, peer.closing_cause.unwrap_or("closed"));
        }
    }

    /// Removes `e` from the registry if this connection still owns it:
    /// durable, so an outage delays it but never loses it.
    pub(super) fn remove_entry<A: App>(
        &mut self,
        srv: &mut Server<A>,
        e: &ServerEntry,
        cause: &'static str,
    ) {
        let (member, name) = (e.member().to_string(), e.service_name.clone());
        let publish = srv.redis_publish_command();
        let req = self.registry.remove(&member, &e.owner, cause, publish);
        srv.redis_durable_then(req, move |_: &mut A, srv, r: redis::RedisResult<i64>| {
            if r == Ok(1) {
                stats::removed(srv.row(), cause);
                log::info!("route: removed {name} at {member} ({cause})");
            }
        });
    }

    /// Stores `entry` (held by `fd`) with a lease until `until`: one script;
    /// [`Registrations::stored`] handles the answer.
    pub(super) fn store<A: Holds<Registrations>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        entry: &ServerEntry,
        until: u64,
        why: Store,
    ) {
        let member = entry.member().to_string();
        if let Some(h) = self.held_mut(fd, &member) {
            h.storing = true;
            h.entry = entry.clone();
        }
        let publish = srv.redis_publish_command();
        let req = self.registry.register(entry, until, publish);
        srv.redis(req, move |app: &mut A, srv, r: redis::RedisResult<i64>| {
            app.part().stored(srv, fd, &member, why, r.map(drop));
        });
    }

    /// A store's answer.
    fn stored<A: App>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        member: &str,
        why: Store,
        r: redis::RedisResult<()>,
    ) {
        // A peer that fell silent meanwhile: its removal follows this store
        // (FIFO), so Redis will not have it.
        let silent = self
            .peers
            .get(&fd)
            .is_some_and(|p| p.liveness != Liveness::Live);
        let Some(h) = self.held_mut(fd, member) else {
            return; // closed or re-registered meanwhile (its removal follows)
        };
        h.storing = false;
        let entry = h.entry.clone();
        match r {
            Ok(()) => {
                h.stored = !silent;
                let ack = why == Store::New || !h.acked;
                h.acked |= ack;
                match why {
                    Store::New | Store::Pending => {
                        stats::count(srv.row(), stats::REGISTRATIONS);
                        log::info!(
                            "route: registered {} at {member} (fd {fd})",
                            entry.service_name
                        );
                    }
                    Store::Rebuild => {
                        stats::count(srv.row(), stats::REBUILT);
                        log::info!(
                            "route: re-registered {} (Redis did not have it)",
                            entry.service_name
                        );
                    }
                    Store::Readmit => log::info!(
                        "route: {} at {member} (fd {fd}) is back in the registry",
                        entry.service_name
                    ),
                }
                if ack {
                    let lease = settings::lease(srv.settings());
                    srv.push(fd, Message::Text(registered_frame(&entry, lease)));
                }
                if matches!(why, Store::Rebuild | Store::Readmit) && !entry.epoch.is_empty() {
                    // A swocloud IM server out of the registry a while: group
                    // messages skipped it; its feeds must look for themselves.
                    srv.push(fd, Message::Text(RouteFrame::Check.to_text()));
                }
                self.save_held(srv, fd);
            }
            Err(e) => {
                log::debug!("route: storing {member}: {e}");
                if why == Store::New {
                    self.note_outage();
                    let refusal = ProtocolError::new(ErrorCode::Unavailable, "Redis is unreachable: the registration is kept and will be stored and acknowledged when it returns");
                    srv.push(fd, Message::Text(refusal.to_frame()));
                }
                if why == Store::Rebuild || why == Store::Readmit {
                    if let Some(h) = self.held_mut(fd, member) {
                        h.stored = false;
                    }
                }
            }
        }
    }
}

/// The `registered` acknowledgement.
fn registered_frame(e: &ServerEntry, lease: Duration) -> String {
    RouteFrame::Registered(Registered {
        service_name: e.service_name.clone(),
        ip: e.ip.clone(),
        port: e.port,
        node: e.node.clone(),
        lease_ms: lease.as_millis() as u64,
    })
    .to_text()
}
