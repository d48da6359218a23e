//! The Route application: IM servers register over WebSocket, stay alive by
//! pinging, and are removed from Redis when they close, fall silent, or
//! their Route worker dies (lease expiry).
//!
//! Per connection the app keeps a [`Peer`]: its bad-frame count and, once
//! registered, the entry it holds in Redis. A sweep on the timer wheel every
//! `heartbeat_check_interval` seconds: disconnects silent peers, renews the
//! leases of live ones (re-registering any that Redis lost, so a Redis
//! restarted empty is rebuilt within one sweep), stores registrations that
//! arrived while Redis was away, retries removals, and reaps expired
//! leases left by dead workers or nodes.

use std::collections::HashMap;
use std::time::Duration;

use crate::auth;
use crate::cluster::link::{self, ImFrame, Registered, Registration, RouteFrame};
use crate::cluster::servers::ServerEntry;
use crate::cluster::{ErrorCode, ProtocolError};
use crate::event::{App, ServerInfo};
use crate::process::scoreboard::now_ms;
use crate::reactor::{Fd, Message, Request, Response, Server};
use crate::route::balancer::Picker;
use crate::route::cache::{self, SharedCache};
use crate::route::delivery;
use crate::route::registry::{Registry, Renew, Renewal};
use crate::route::settings::RouteSettings;
use crate::route::stats;

/// Connection attribute holding a registration connection's [`Held`], so
/// a worker adopting the connection (handover) restores it.
const ATTR_HELD: &str = "route.held";

/// One IM server's registration as this worker holds it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Held {
    pub(crate) entry: ServerEntry,
    /// Whether Redis has it (false while Redis is away).
    pub(crate) stored: bool,
}

/// What the app knows of one WebSocket connection.
#[derive(Debug, Default)]
pub(crate) struct Peer {
    bad_frames: u32,
    /// The connection's source address (for `max_registrations_per_ip`).
    ip: Option<std::net::IpAddr>,
    pub(crate) held: Option<Held>,
    /// Why the sweep closed it, for the removal's cause.
    closing_cause: Option<&'static str>,
}

/// The Route.
#[derive(Debug)]
pub struct RouteApp {
    pub(crate) cfg: RouteSettings,
    pub(crate) registry: Registry,
    pub(crate) node: String,
    pub(crate) cache: Option<SharedCache>,
    pub(crate) peers: HashMap<Fd, Peer>,
    pending_removals: Vec<(String, String, &'static str)>,
    /// Owner tokens of adopted connections (`<node>/<old pid>/<old fd>`)
    /// → their fd here, for messages relayed to the previous worker.
    adopted: HashMap<String, Fd>,
    redis_outage_logged: bool,
    pub(crate) picker: Picker,
    /// `/api/servers` serialised for a cache generation (refreshes, connected).
    pub(crate) servers_body: Option<((u64, bool), Vec<u8>)>,
}

impl RouteApp {
    /// A Route with its settings; the Redis prefix comes from the
    /// framework's `redis_prefix`.
    pub fn new(cfg: RouteSettings, redis_prefix: &str) -> RouteApp {
        RouteApp {
            cfg,
            registry: Registry::new(redis_prefix),
            node: String::new(),
            cache: None,
            peers: HashMap::new(),
            pending_removals: Vec::new(),
            adopted: HashMap::new(),
            redis_outage_logged: false,
            picker: Picker::default(),
            servers_body: None,
        }
    }

    /// `<node>/<pid>`: this worker's name in owner tokens and channels.
    pub(crate) fn node_pid(&self) -> String {
        format!("{}/{}", self.node, std::process::id())
    }

    /// This worker's fd for a connection a previous worker of the slot
    /// held under `owner` (`<node>/<pid>/<fd>`).
    pub(crate) fn adopted_fd(&self, owner: &str) -> Option<Fd> {
        self.adopted.get(owner).copied()
    }

    /// Mirrors a peer's registration into its connection attributes.
    fn save_held(&self, srv: &mut Server<Self>, fd: Fd) {
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

    /// A registration connection moved here from the worker this one
    /// replaced: take ownership of its entry in Redis in place (`rehome`).
    fn adopt_peer(&mut self, srv: &mut Server<Self>, fd: Fd, mut held: Held) {
        let old_owner = held.entry.owner.clone();
        let new_owner = format!("{}/{fd}", self.node_pid());
        let member = held.entry.member();
        let worker = srv.worker_id() as u32;
        held.entry.owner = new_owner.clone();
        held.entry.worker = worker;
        if held.stored {
            let r = srv.redis_cmd(|c| {
                self.registry
                    .rehome(c, &member, &old_owner, &new_owner, worker, now_ms())
            });
            match r {
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

    /// The connections of the IM servers this worker holds.
    pub(crate) fn registered_fds(&self) -> Vec<Fd> {
        self.peers
            .iter()
            .filter(|(_, p)| p.held.is_some())
            .map(|(fd, _)| *fd)
            .collect()
    }

    /// Lease length: a holder renews every sweep; three missed sweeps (or
    /// the idle time, whichever is longer) and any worker may reap it.
    pub(crate) fn lease(srv: &Server<Self>) -> Duration {
        let s = srv.settings();
        let sweep = Self::sweep_every(srv);
        Duration::from_secs_f64(s.heartbeat_idle_time.max(2.0 * sweep.as_secs_f64())) + sweep
    }

    fn sweep_every(srv: &Server<Self>) -> Duration {
        let i = srv.settings().heartbeat_check_interval;
        Duration::from_secs_f64(if i > 0.0 { i } else { 3.0 })
    }

    fn idle(srv: &Server<Self>) -> Duration {
        let s = srv.settings();
        Duration::from_secs_f64(if s.heartbeat_idle_time > 0.0 {
            s.heartbeat_idle_time
        } else {
            3.0 * Self::sweep_every(srv).as_secs_f64()
        })
    }

    fn reply_error(&mut self, srv: &mut Server<Self>, fd: Fd, e: &ProtocolError) {
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

    fn register(&mut self, srv: &mut Server<Self>, fd: Fd, reg: Registration) {
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
                srv.push(
                    fd,
                    Message::Text(
                        ProtocolError::new(ErrorCode::Unauthorized, e.to_string()).to_frame(),
                    ),
                );
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
        let lease_until = now_ms() + Self::lease(srv).as_millis() as u64;
        let stored = srv
            .redis_cmd(|c| self.registry.register(c, &entry, lease_until))
            .is_some();
        if stored {
            stats::count(srv.row(), stats::REGISTRATIONS);
            log::info!(
                "route: registered {} at {} (fd {fd})",
                entry.service_name,
                entry.member()
            );
            srv.push(
                fd,
                Message::Text(registered_frame(&entry, Self::lease(srv))),
            );
        } else {
            self.note_outage();
            srv.push(
                fd,
                Message::Text(
                    ProtocolError::new(ErrorCode::Unavailable, "Redis is unreachable: the registration is kept and will be stored and acknowledged when it returns")
                        .to_frame(),
                ),
            );
        }
        if let Some(p) = self.peers.get_mut(&fd) {
            p.held = Some(Held { entry, stored });
        }
        self.save_held(srv, fd);
    }

    /// `max_registrations_per_ip`: a connection that holds no registration
    /// yet may register only while its address holds fewer than the limit
    /// on this worker; else `rate_limited` and close 1008. O(peers).
    fn registration_allowed(&mut self, srv: &mut Server<Self>, fd: Fd) -> bool {
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
        srv.push(
            fd,
            Message::Text(
                ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!("at most {max} registrations per address"),
                )
                .to_frame(),
            ),
        );
        srv.disconnect(fd, 1008, "rate limited");
        false
    }

    fn note_outage(&mut self) {
        if !self.redis_outage_logged {
            self.redis_outage_logged = true;
            log::warn!("route: Redis is unreachable; serving from memory and retrying");
        }
    }

    fn remove_entry(&mut self, srv: &mut Server<Self>, e: &ServerEntry, cause: &'static str) {
        let (member, owner) = (e.member(), e.owner.clone());
        match srv.redis_cmd(|c| self.registry.remove(c, &member, &owner, cause)) {
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
    fn sweep(&mut self, srv: &mut Server<Self>) {
        if srv.is_handing_over() {
            return; // the registrations are moving to the replacement
        }
        let now = now_ms();
        let idle_ms = Self::idle(srv).as_millis() as u64;
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
            self.on_close(srv, fd);
        }
        if !srv.redis_ok() {
            self.note_outage();
            return;
        }
        if std::mem::take(&mut self.redis_outage_logged) {
            log::info!("route: Redis is back");
        }
        for (member, owner, cause) in std::mem::take(&mut self.pending_removals) {
            match srv.redis_cmd(|c| self.registry.remove(c, &member, &owner, cause)) {
                Some(true) => stats::removed(srv.row(), cause),
                Some(false) => {}
                None => self.pending_removals.push((member, owner, cause)),
            }
        }
        let lease = Self::lease(srv);
        let until = now + lease.as_millis() as u64;
        let fds: Vec<Fd> = self.peers.keys().copied().collect();
        for fd in fds {
            let Some(held) = self.peers.get(&fd).and_then(|p| p.held.clone()) else {
                continue;
            };
            let load = held.entry.load;
            let outcome = if held.stored {
                let r = Renew {
                    lease_until_ms: until,
                    load: Some(load),
                    draining: None,
                    now_ms: now,
                };
                srv.redis_cmd(|c| {
                    self.registry
                        .renew(c, &held.entry.member(), &held.entry.owner, &r)
                })
            } else {
                Some(Renewal::Missing)
            };
            match outcome {
                Some(Renewal::Renewed) => {}
                Some(Renewal::Missing) => {
                    let mut entry = held.entry.clone();
                    entry.last_seen_ms = now;
                    if srv
                        .redis_cmd(|c| self.registry.register(c, &entry, until))
                        .is_some()
                    {
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
                None => return,
            }
        }
        if let Some(reaped) = srv.redis_cmd(|c| self.registry.reap(c, now)) {
            for m in reaped {
                stats::removed(srv.row(), "lease");
                log::warn!(
                    "route: reaped {m}: its lease expired (its Route worker or node is gone)"
                );
            }
        }
    }

    /// The live servers: from the cache when warm, else from Redis, else
    /// from this worker's own connections.
    pub(crate) fn servers(
        &mut self,
        srv: &mut Server<Self>,
        fresh: bool,
    ) -> (Vec<ServerEntry>, &'static str) {
        if !fresh {
            if let Some(c) = &self.cache {
                let g = c.lock().unwrap_or_else(|p| p.into_inner());
                if g.refreshed_at.is_some() {
                    return (
                        g.entries.clone(),
                        if g.connected { "cache" } else { "stale-cache" },
                    );
                }
            }
        }
        if let Some(list) = srv.redis_cmd(|c| self.registry.list(c)) {
            return (list, "redis");
        }
        let mut own: Vec<ServerEntry> = self
            .peers
            .values()
            .filter_map(|p| p.held.as_ref().map(|h| h.entry.clone()))
            .collect();
        own.sort_by(|a, b| a.service_name.cmp(&b.service_name));
        (own, "local")
    }
}

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

impl App for RouteApp {
    fn on_start(&mut self, info: &ServerInfo) {
        if self.cfg.auth_secret.is_empty() {
            log::warn!(
                "auth_secret is not set: any program that reaches {} can register an IM server",
                info.settings.listen_addr()
            );
        }
        if self.cfg.api_key.is_empty() {
            log::warn!("api_key is not set: the HTTP API is open to anyone who reaches it");
        }
    }

    fn on_worker_start(&mut self, srv: &mut Server<Self>) {
        if srv.is_task_worker() {
            return;
        }
        if self.node.is_empty() {
            self.node = if self.cfg.node_id.is_empty() {
                let host = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "route".into());
                format!("{host}:{}", srv.settings().port)
            } else {
                self.cfg.node_id.clone()
            };
        }
        if let Some(url) = srv.settings().redis_url.clone() {
            let prefix = srv.settings().redis_prefix.clone();
            let refresh = Duration::from_secs_f64(self.cfg.cache_refresh.max(0.1));
            self.cache = Some(cache::spawn(
                url.clone(),
                prefix.clone(),
                refresh,
                srv.worker_id(),
            ));
            match srv.self_sender() {
                Ok(sender) => {
                    let keys = self.registry.keys();
                    let channels = vec![
                        keys.worker_channel(&self.node_pid()),
                        keys.broadcast_channel(),
                    ];
                    delivery::spawn_relay(url, channels, sender, srv.worker_id());
                }
                Err(e) => log::error!(
                    "route: no delivery relay for worker {}: {e}",
                    srv.worker_id()
                ),
            }
        }
        let every = Self::sweep_every(srv).as_millis() as u64;
        srv.tick(every, |app: &mut RouteApp, srv, _| app.sweep(srv));
    }

    fn on_open(&mut self, srv: &mut Server<Self>, fd: Fd, _req: &Request) {
        let ip = srv.connection_info(fd).map(|i| i.peer.ip());
        self.peers.insert(
            fd,
            Peer {
                ip,
                ..Peer::default()
            },
        );
    }

    fn on_adopt(
        &mut self,
        srv: &mut Server<Self>,
        fd: Fd,
        attrs: &HashMap<String, serde_json::Value>,
    ) {
        let held = attrs
            .get(ATTR_HELD)
            .and_then(|v| serde_json::from_value::<Held>(v.clone()).ok());
        match held {
            Some(h) => self.adopt_peer(srv, fd, h),
            None => {
                self.peers.insert(fd, Peer::default());
            }
        }
    }

    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                self.reply_error(
                    srv,
                    fd,
                    &ProtocolError::new(
                        ErrorCode::BadFrame,
                        "binary frames are not part of the protocol",
                    ),
                );
                return;
            }
        };
        match link::parse_im(&text) {
            Err(e) => self.reply_error(srv, fd, &e),
            Ok(ImFrame::Register(reg)) => self.register(srv, fd, reg),
            Ok(ImFrame::Heartbeat { load }) => {
                match self.peers.get_mut(&fd).and_then(|p| p.held.as_mut()) {
                    Some(h) => {
                        if let Some(l) = load {
                            h.entry.load = l;
                        }
                    }
                    None => self.reply_error(
                        srv,
                        fd,
                        &ProtocolError::new(ErrorCode::NotRegistered, "register first"),
                    ),
                }
            }
            Ok(ImFrame::Forward(link::Addressed { to, from, data })) => {
                let Some(member) = self
                    .peers
                    .get(&fd)
                    .and_then(|p| p.held.as_ref())
                    .map(|h| h.entry.member())
                else {
                    self.reply_error(
                        srv,
                        fd,
                        &ProtocolError::new(ErrorCode::NotRegistered, "register first"),
                    );
                    return;
                };
                if delivery::deliver(self, srv, &to, &from, &data, Some(&member)).is_none() {
                    log::warn!("route: could not forward a message to {to}: Redis unavailable");
                }
            }
            Ok(ImFrame::Draining) => {
                let held = self.peers.get_mut(&fd).and_then(|p| p.held.as_mut());
                let Some(h) = held else { return };
                h.entry.draining = true;
                let (member, owner) = (h.entry.member(), h.entry.owner.clone());
                let until = now_ms() + Self::lease(srv).as_millis() as u64;
                log::info!("route: {} is draining; no new users go there", member);
                let r = Renew {
                    lease_until_ms: until,
                    load: None,
                    draining: Some(true),
                    now_ms: now_ms(),
                };
                let _ = srv.redis_cmd(|c| self.registry.renew(c, &member, &owner, &r));
                self.save_held(srv, fd);
            }
            Ok(ImFrame::Unknown) => self.reply_error(
                srv,
                fd,
                &ProtocolError::new(ErrorCode::UnknownMethod, "unknown method"),
            ),
        }
    }

    fn on_close(&mut self, srv: &mut Server<Self>, fd: Fd) {
        let Some(peer) = self.peers.remove(&fd) else {
            return;
        };
        if let Some(held) = peer.held.filter(|h| h.stored) {
            self.remove_entry(srv, &held.entry, peer.closing_cause.unwrap_or("closed"));
        }
    }

    fn on_pipe_message(&mut self, srv: &mut Server<Self>, _from: usize, data: Vec<u8>) {
        delivery::on_relay(self, srv, &data);
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        crate::route::api::handle(self, srv, req)
    }
}
