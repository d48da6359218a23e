//! The Route's registrations: one [`Peer`] per IM-server connection (its
//! bad-frame count and, once registered, the entry it holds in Redis), and
//! every write this worker makes to the registry.
//!
//! The sweep ([`Registrations::sweep`], every `heartbeat_check_interval`
//! seconds): disconnects silent peers, renews the leases of live ones
//! (re-registering any that Redis lost, so a Redis restarted empty is
//! rebuilt within one sweep), stores registrations that arrived while Redis
//! was away, retries removals, and reaps expired leases left by dead
//! workers or nodes.
//!
//! Each Redis call is one private method (`store`, `remove`, `renew`,
//! `rehome`, `reap`), so the call sites are few and named.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use crate::auth;
use crate::cluster::link::{Registered, Registration, RouteFrame};
use crate::cluster::servers::ServerEntry;
use crate::cluster::{ErrorCode, ProtocolError};
use crate::event::App;
use crate::process::scoreboard::now_ms;
use crate::reactor::{Fd, Message, Server};
use crate::route::registry::{Registry, Renew, Renewal};
use crate::route::settings::{self, RouteSettings};
use crate::route::stats;

/// Connection attribute holding a registration connection's [`Held`], so
/// a worker adopting the connection (handover) restores it.
const ATTR_HELD: &str = "route.held";

/// One IM server's registration as this worker holds it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Held {
    entry: ServerEntry,
    /// Whether Redis has it (false while Redis is away).
    stored: bool,
}

/// What the Route knows of one WebSocket connection.
#[derive(Debug, Default)]
struct Peer {
    bad_frames: u32,
    /// The connection's source address (for `max_registrations_per_ip`).
    ip: Option<IpAddr>,
    held: Option<Held>,
    /// Why the sweep closed it, for the removal's cause.
    closing_cause: Option<&'static str>,
}

/// A removal Redis could not take yet: (member, owner, cause).
type PendingRemoval = (String, String, &'static str);

/// The registrations this worker holds, and its registry writes.
#[derive(Debug)]
pub struct Registrations {
    cfg: RouteSettings,
    registry: Registry,
    /// This Route node's name (`node_id`, or `<host>:<port>`).
    node: String,
    peers: HashMap<Fd, Peer>,
    pending_removals: Vec<PendingRemoval>,
    /// Owner tokens of adopted connections (`<node>/<old pid>/<old fd>`)
    /// → their fd here, for messages relayed to the previous worker.
    adopted: HashMap<String, Fd>,
    redis_outage_logged: bool,
}

impl Registrations {
    /// Registrations under `redis_prefix`; [`Self::set_node`] names the node.
    pub fn new(cfg: RouteSettings, redis_prefix: &str) -> Registrations {
        Registrations {
            cfg,
            registry: Registry::new(redis_prefix),
            node: String::new(),
            peers: HashMap::new(),
            pending_removals: Vec::new(),
            adopted: HashMap::new(),
            redis_outage_logged: false,
        }
    }

    /// Names this Route node (once per worker, after the fork).
    pub fn set_node(&mut self, node: String) {
        self.node = node;
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

    /// The entries this worker holds, sorted by serviceName. O(peers).
    pub fn held_entries(&self) -> Vec<ServerEntry> {
        let mut own: Vec<ServerEntry> = self
            .peers
            .values()
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
        Some(held.entry.member())
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
    pub fn adopt<A: App>(&mut self, srv: &mut Server<A>, fd: Fd, attrs: &HashMap<String, Value>) {
        let held = attrs
            .get(ATTR_HELD)
            .and_then(|v| serde_json::from_value::<Held>(v.clone()).ok());
        match held {
            Some(h) => self.adopt_held(srv, fd, h),
            None => {
                self.peers.insert(fd, Peer::default());
            }
        }
    }

    /// A registration connection moved here: take ownership of its entry in
    /// Redis in place (`rehome`).
    fn adopt_held<A: App>(&mut self, srv: &mut Server<A>, fd: Fd, mut held: Held) {
        let old_owner = held.entry.owner.clone();
        let new_owner = format!("{}/{fd}", self.node_pid());
        let member = held.entry.member();
        let worker = srv.worker_id() as u32;
        held.entry.owner = new_owner.clone();
        held.entry.worker = worker;
        if held.stored {
            match self.rehome(srv, &member, &old_owner, &new_owner, worker) {
                Some(Renewal::Renewed) => {
                    log::info!(
                        "route: took over {} at {member} (fd {fd})",
                        held.entry.service_name
                    )
                }
                Some(Renewal::Superseded) => {
                    log::info!("route: {member} re-registered elsewhere meanwhile; fd {fd} does not hold it");
                    self.peers.insert(fd, Peer::default());
                    self.save_held(srv, fd);
                    return;
                }
                // Gone, or Redis away: the sweep stores it again.
                Some(Renewal::Missing) | None => held.stored = false,
            }
        }
        self.adopted.insert(old_owner, fd);
        self.peers.insert(
            fd,
            Peer {
                held: Some(held),
                ..Peer::default()
            },
        );
        self.save_held(srv, fd);
    }

    /// Mirrors a peer's registration into its connection attributes.
    fn save_held<A: App>(&self, srv: &mut Server<A>, fd: Fd) {
        let held = self.peers.get(&fd).and_then(|p| p.held.as_ref());
        match held.map(serde_json::to_value) {
            Some(Ok(v)) => {
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
    pub fn register<A: App>(&mut self, srv: &mut Server<A>, fd: Fd, reg: Registration) {
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
        let owner = format!("{}/{fd}", self.node_pid());
        let entry = ServerEntry::new(&reg, &self.node, srv.worker_id() as u32, &owner, now_ms());
        // A connection that registers again under another address drops its old entry.
        let old = self.peers.get(&fd).and_then(|p| p.held.clone());
        if let Some(old) = old.filter(|o| o.stored && o.entry.member() != entry.member()) {
            self.remove_entry(srv, &old.entry, "replaced");
        }
        let lease = settings::lease(srv.settings());
        let stored = self.store(srv, &entry, now_ms() + lease.as_millis() as u64);
        if stored {
            stats::count(srv.row(), stats::REGISTRATIONS);
            log::info!(
                "route: registered {} at {} (fd {fd})",
                entry.service_name,
                entry.member()
            );
            srv.push(fd, Message::Text(registered_frame(&entry, lease)));
        } else {
            self.note_outage();
            let refusal = ProtocolError::new(ErrorCode::Unavailable, "Redis is unreachable: the registration is kept and will be stored and acknowledged when it returns");
            srv.push(fd, Message::Text(refusal.to_frame()));
        }
        if let Some(p) = self.peers.get_mut(&fd) {
            p.held = Some(Held { entry, stored });
        }
        self.save_held(srv, fd);
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
        let (member, owner) = (h.entry.member(), h.entry.owner.clone());
        log::info!("route: {} is draining; no new users go there", member);
        let r = Renew {
            lease_until_ms: now_ms() + settings::lease(srv.settings()).as_millis() as u64,
            load: None,
            draining: Some(true),
            now_ms: now_ms(),
        };
        let _ = self.renew(srv, &member, &owner, &r);
        self.save_held(srv, fd);
    }

    /// A connection closed: remove its entry if it held one.
    pub fn close<A: App>(&mut self, srv: &mut Server<A>, fd: Fd) {
        let Some(peer) = self.peers.remove(&fd) else {
            return;
        };
        if let Some(held) = peer.held.filter(|h| h.stored) {
            self.remove_entry(srv, &held.entry, peer.closing_cause.unwrap_or("closed"));
        }
    }

    fn note_outage(&mut self) {
        if !self.redis_outage_logged {
            self.redis_outage_logged = true;
            log::warn!("route: Redis is unreachable; serving from memory and retrying");
        }
    }

    fn remove_entry<A: App>(&mut self, srv: &mut Server<A>, e: &ServerEntry, cause: &'static str) {
        let (member, owner) = (e.member(), e.owner.clone());
        match self.remove(srv, &member, &owner, cause) {
            Some(removed) => {
                if removed {
                    stats::removed(srv.row(), cause);
                    log::info!("route: removed {} at {member} ({cause})", e.service_name);
                }
            }
            None => {
                self.note_outage();
                self.pending_removals.push((member, owner, cause));
            }
        }
    }

    /// The periodic sweep (see the module doc).
    pub fn sweep<A: App>(&mut self, srv: &mut Server<A>) {
        if srv.is_handing_over() {
            return; // the registrations are moving to the replacement
        }
        let now = now_ms();
        let idle_ms = settings::idle(srv.settings()).as_millis() as u64;
        let silent: Vec<Fd> = self
            .peers
            .iter()
            .filter(|(fd, p)| {
                p.held.is_some()
                    && srv
                        .connection_info(**fd)
                        .is_some_and(|i| now.saturating_sub(i.last_active_ms) > idle_ms)
            })
            .map(|(fd, _)| *fd)
            .collect();
        for fd in silent {
            log::warn!("route: fd {fd} silent for more than {idle_ms} ms; closing it");
            if let Some(p) = self.peers.get_mut(&fd) {
                p.closing_cause = Some("silent");
            }
            srv.disconnect(fd, 1001, "heartbeat timeout");
            self.close(srv, fd);
        }
        if !srv.redis_ok() {
            self.note_outage();
            return;
        }
        if std::mem::take(&mut self.redis_outage_logged) {
            log::info!("route: Redis is back");
        }
        for (member, owner, cause) in std::mem::take(&mut self.pending_removals) {
            match self.remove(srv, &member, &owner, cause) {
                Some(true) => stats::removed(srv.row(), cause),
                Some(false) => {}
                None => self.pending_removals.push((member, owner, cause)),
            }
        }
        let lease = settings::lease(srv.settings());
        let until = now + lease.as_millis() as u64;
        let fds: Vec<Fd> = self.peers.keys().copied().collect();
        for fd in fds {
            if !self.renew_peer(srv, fd, now, until, lease) {
                return; // Redis went away mid-sweep
            }
        }
        if let Some(reaped) = self.reap(srv, now) {
            for m in reaped {
                stats::removed(srv.row(), "lease");
                log::warn!(
                    "route: reaped {m}: its lease expired (its Route worker or node is gone)"
                );
            }
        }
    }

    /// One peer's part of the sweep: renew its lease, or store it again
    /// when Redis lost it (or never had it). False when Redis failed.
    fn renew_peer<A: App>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        now: u64,
        until: u64,
        lease: Duration,
    ) -> bool {
        let Some(held) = self.peers.get(&fd).and_then(|p| p.held.clone()) else {
            return true;
        };
        let outcome = if held.stored {
            let r = Renew {
                lease_until_ms: until,
                load: Some(held.entry.load),
                draining: None,
                now_ms: now,
            };
            self.renew(srv, &held.entry.member(), &held.entry.owner, &r)
        } else {
            Some(Renewal::Missing)
        };
        match outcome {
            Some(Renewal::Renewed) => {}
            Some(Renewal::Missing) => {
                let mut entry = held.entry.clone();
                entry.last_seen_ms = now;
                if self.store(srv, &entry, until) {
                    if held.stored {
                        stats::count(srv.row(), stats::REBUILT);
                        log::info!(
                            "route: re-registered {} (Redis had lost it)",
                            entry.service_name
                        );
                    } else {
                        stats::count(srv.row(), stats::REGISTRATIONS);
                        log::info!(
                            "route: stored the pending registration of {}",
                            entry.service_name
                        );
                        srv.push(fd, Message::Text(registered_frame(&entry, lease)));
                    }
                    if let Some(p) = self.peers.get_mut(&fd) {
                        p.held = Some(Held {
                            entry,
                            stored: true,
                        });
                    }
                    self.save_held(srv, fd);
                }
            }
            Some(Renewal::Superseded) => {
                log::info!(
                    "route: {} re-registered elsewhere; fd {fd} no longer holds it",
                    held.entry.service_name
                );
                if let Some(p) = self.peers.get_mut(&fd) {
                    p.held = None;
                }
                self.save_held(srv, fd);
            }
            None => return false,
        }
        true
    }

    // The registry writes: one Redis call each.

    /// Stores `entry` with a lease until `until`. Redis: one script.
    fn store<A: App>(&self, srv: &mut Server<A>, entry: &ServerEntry, until: u64) -> bool {
        srv.redis_cmd(|c| self.registry.register(c, entry, until))
            .is_some()
    }

    /// Removes `member` if `owner` owns it. Redis: one script.
    fn remove<A: App>(
        &self,
        srv: &mut Server<A>,
        member: &str,
        owner: &str,
        cause: &str,
    ) -> Option<bool> {
        srv.redis_cmd(|c| self.registry.remove(c, member, owner, cause))
    }

    /// Renews `member`'s lease. Redis: one script.
    fn renew<A: App>(
        &self,
        srv: &mut Server<A>,
        member: &str,
        owner: &str,
        r: &Renew,
    ) -> Option<Renewal> {
        srv.redis_cmd(|c| self.registry.renew(c, member, owner, r))
    }

    /// Moves `member`'s ownership to this worker. Redis: one script.
    fn rehome<A: App>(
        &self,
        srv: &mut Server<A>,
        member: &str,
        old_owner: &str,
        new_owner: &str,
        worker: u32,
    ) -> Option<Renewal> {
        srv.redis_cmd(|c| {
            self.registry
                .rehome(c, member, old_owner, new_owner, worker, now_ms())
        })
    }

    /// Removes every expired lease. Redis: one script.
    fn reap<A: App>(&self, srv: &mut Server<A>, now: u64) -> Option<Vec<String>> {
        srv.redis_cmd(|c| self.registry.reap(c, now))
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
