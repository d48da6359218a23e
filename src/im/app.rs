//! The IM server application: end users' WebSocket connections, their
//! presence in Redis, and message delivery — local, across this server's
//! workers, and through the Route to other IM servers.
//!
//! A user connects to `ws://ip:port/?uid=U&token=T` (the `url` the Route's
//! `/route` hands out). With `auth_secret` set the token must be a JWT for
//! `aud=user, sub=U`, else the connection is closed with 4001 and a reason.
//! A user's frame `{"to":"U2","data":…}` is delivered to U2's connections on
//! this server (looked up in Redis presence, by worker) and forwarded
//! through the Route for U2's connections elsewhere; each delivered frame is
//! `{"from":"U1","data":…}`.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};

use crate::auth;
use crate::cluster::link::{self, Addressed, ImFrame, RouteFrame};
use crate::cluster::presence::{self, Presence};
use crate::cluster::user::{self, Delivered, Reconnect};
use crate::cluster::{admin, servers, ErrorCode, Keys, ProtocolError};
use crate::event::{App, EventBus, ServerInfo};
use crate::im::registrar::Registrar;
use crate::im::settings::ImSettings;
use crate::im::workers::WorkerMsg;
use crate::reactor::{Fd, Message, Request, Response, Server};

/// Scoreboard app counter: users connected to this worker (a gauge).
pub const USERS: usize = 0;
/// Scoreboard app counter: messages delivered to local users.
pub const DELIVERED: usize = 1;
/// Scoreboard app counter: messages forwarded to the Route.
pub const FORWARDED: usize = 2;
/// Scoreboard app counter: user connections refused (bad or missing token).
pub const REFUSED: usize = 3;

/// The IM server's counters as `/metrics` exports them (summed over workers).
pub const COUNTERS: &[crate::metrics::AppCounter] = &[
    crate::metrics::AppCounter {
        index: DELIVERED,
        name: "swocloud_im_messages_delivered_total",
        help: "Messages pushed to local users' connections.",
        label: None,
    },
    crate::metrics::AppCounter {
        index: FORWARDED,
        name: "swocloud_im_messages_forwarded_total",
        help: "User messages forwarded through the Route to other IM servers.",
        label: None,
    },
    crate::metrics::AppCounter {
        index: REFUSED,
        name: "swocloud_im_connections_refused_total",
        help: "User connections refused for a missing uid or a bad token (close 4001).",
        label: None,
    },
];

/// Connection attribute: the user's uid.
const ATTR_UID: &str = "im.uid";
/// Connection attribute: the fd its presence record names.
const ATTR_PRESENCE_FD: &str = "im.presence_fd";
/// Connection attribute on the Route link: true (worker 0's registrar).
pub(crate) const ATTR_ROUTE_LINK: &str = "im.route_link";
/// Connection attribute on the Route link: the Route acknowledged us.
pub(crate) const ATTR_ROUTE_REGISTERED: &str = "im.route_registered";

/// The IM server.
#[derive(Debug)]
pub struct ImApp {
    pub(crate) cfg: ImSettings,
    /// Advertised address.
    pub(crate) advertise_ip: String,
    pub(crate) advertise_port: u16,
    /// This instance's epoch: new at every server start, shared by all its
    /// workers (made before the fork).
    pub(crate) epoch: String,
    /// Registry member of this server.
    pub(crate) member: String,
    keys: Keys,
    /// uid → this worker's connections of that user.
    users: HashMap<String, Vec<Fd>>,
    /// connection → uid.
    uid_of: HashMap<Fd, String>,
    /// The Route link (worker 0 only).
    pub(crate) registrar: Registrar,
}

impl ImApp {
    /// An IM server for these settings.
    pub fn new(cfg: ImSettings, host: &str, port: u16, redis_prefix: &str) -> ImApp {
        let advertise_ip = if !cfg.advertise_ip.is_empty() {
            cfg.advertise_ip.clone()
        } else if host == "0.0.0.0" || host == "::" {
            "127.0.0.1".to_string()
        } else {
            host.to_string()
        };
        let advertise_port = if cfg.advertise_port != 0 {
            cfg.advertise_port
        } else {
            port
        };
        let member = servers::member(&advertise_ip, advertise_port);
        let epoch = format!(
            "{:x}-{:x}",
            crate::process::scoreboard::now_ms(),
            std::process::id()
        );
        ImApp {
            cfg,
            advertise_ip,
            advertise_port,
            epoch,
            member,
            keys: Keys::new(redis_prefix),
            users: HashMap::new(),
            uid_of: HashMap::new(),
            registrar: Registrar::default(),
        }
    }

    fn presence_of(&self, srv: &Server<Self>, fd: Fd) -> Presence {
        Presence {
            member: self.member.clone(),
            worker: srv.worker_id(),
            fd,
            epoch: self.epoch.clone(),
        }
    }

    fn set_users_gauge(&self, srv: &Server<Self>) {
        srv.row().app[USERS].store(self.uid_of.len() as u64, Relaxed);
    }

    /// Pushes to this worker's connections of `to`; returns how many.
    fn deliver_local(&self, srv: &mut Server<Self>, to: &str, from: &str, data: &Value) -> usize {
        let Some(fds) = self.users.get(to) else {
            return 0;
        };
        let frame = Delivered { from, data }.to_text();
        let n = fds
            .iter()
            .filter(|fd| srv.push(**fd, Message::Text(frame.clone())))
            .count();
        srv.row().app[DELIVERED].fetch_add(n as u64, Relaxed);
        n
    }

    fn broadcast_local(&self, srv: &mut Server<Self>, from: &str, data: &Value) {
        let frame = Delivered { from, data }.to_text();
        let fds: Vec<Fd> = self.uid_of.keys().copied().collect();
        let n = fds
            .into_iter()
            .filter(|fd| srv.push(*fd, Message::Text(frame.clone())))
            .count();
        srv.row().app[DELIVERED].fetch_add(n as u64, Relaxed);
    }

    fn to_worker(&self, srv: &mut Server<Self>, worker: usize, msg: &WorkerMsg) {
        let bytes = msg.to_bytes();
        if let Err(e) = srv.send_message(worker, bytes) {
            log::warn!("im: cannot hand a message to worker {worker}: {e}");
        }
    }

    /// Hands `msg` to every other worker of this server.
    fn to_siblings(&self, srv: &mut Server<Self>, msg: &WorkerMsg) {
        let me = srv.worker_id();
        for w in (0..srv.worker_count()).filter(|w| *w != me) {
            self.to_worker(srv, w, msg);
        }
    }

    fn forward_to_route(&mut self, srv: &mut Server<Self>, to: &str, from: &str, data: &Value) {
        srv.row().app[FORWARDED].fetch_add(1, Relaxed);
        if srv.worker_id() == 0 {
            let frame = ImFrame::Forward(Addressed {
                to: to.into(),
                from: from.into(),
                data: data.clone(),
            });
            self.send_to_route(srv, frame.to_text());
        } else {
            let msg = WorkerMsg::Forward(Addressed {
                to: to.into(),
                from: from.into(),
                data: data.clone(),
            });
            self.to_worker(srv, 0, &msg);
        }
    }

    /// A user's message: this worker, this server's other workers holding
    /// `to` (from Redis presence), and the Route for the rest.
    fn route_message(&mut self, srv: &mut Server<Self>, fd: Fd, from: &str, to: &str, data: Value) {
        let records = srv.redis_cmd(|c| presence::all(c, &self.keys, to));
        let Some(records) = records else {
            // Redis is away: deliver here, ask every sibling, and let the Route try the rest.
            self.deliver_local(srv, to, from, &data);
            self.to_siblings(
                srv,
                &WorkerMsg::Deliver(Addressed {
                    to: to.into(),
                    from: from.into(),
                    data: data.clone(),
                }),
            );
            self.forward_to_route(srv, to, from, &data);
            return;
        };
        let mine: Vec<&Presence> = records
            .iter()
            .filter(|p| p.member == self.member && p.epoch == self.epoch)
            .collect();
        let elsewhere = records.iter().any(|p| p.member != self.member);
        if mine.is_empty() && !elsewhere {
            srv.push(
                fd,
                Message::Text(
                    ProtocolError::new(ErrorCode::Offline, format!("user {to} is not online"))
                        .to_frame(),
                ),
            );
            return;
        }
        let mut workers: Vec<usize> = mine.iter().map(|p| p.worker).collect();
        workers.sort_unstable();
        workers.dedup();
        for w in workers {
            if w == srv.worker_id() {
                self.deliver_local(srv, to, from, &data);
            } else {
                self.to_worker(
                    srv,
                    w,
                    &WorkerMsg::Deliver(Addressed {
                        to: to.into(),
                        from: from.into(),
                        data: data.clone(),
                    }),
                );
            }
        }
        if elsewhere {
            self.forward_to_route(srv, to, from, &data);
        }
    }

    fn on_user_open(&mut self, srv: &mut Server<Self>, fd: Fd, req: &Request) {
        let q = |k: &str| {
            req.query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            })
        };
        let uid = q("uid").unwrap_or("").to_string();
        if !crate::cluster::valid_uid(&uid) {
            srv.row().app[REFUSED].fetch_add(1, Relaxed);
            srv.disconnect(fd, 4001, "a valid uid query parameter is required");
            return;
        }
        if !self.cfg.auth_secret.is_empty() {
            if let Err(e) = auth::verify(
                self.cfg.auth_secret.as_bytes(),
                q("token").unwrap_or(""),
                "user",
                Some(&uid),
            ) {
                srv.row().app[REFUSED].fetch_add(1, Relaxed);
                log::info!("im: refused {uid} on fd {fd}: {e}");
                srv.disconnect(fd, 4001, &format!("unauthorized: {e}"));
                return;
            }
        }
        self.users.entry(uid.clone()).or_default().push(fd);
        self.uid_of.insert(fd, uid.clone());
        self.set_users_gauge(srv);
        // What a worker adopting this connection needs (see `on_adopt`).
        srv.set_attr(fd, ATTR_UID, Value::from(uid.as_str()));
        srv.set_attr(fd, ATTR_PRESENCE_FD, Value::from(fd));
        let p = self.presence_of(srv, fd);
        let ttl = self.cfg.presence_ttl;
        if srv
            .redis_cmd(|c| presence::add(c, &self.keys, &uid, &p, ttl))
            .is_none()
        {
            log::warn!("im: could not record {uid} online (Redis unavailable); messages to it may not be routed here");
        }
    }

    /// Rewrites the presence record of every local connection (see
    /// `presence_refresh`): one pipelined round trip. O(local connections).
    fn refresh_presence(&mut self, srv: &mut Server<Self>) {
        if self.uid_of.is_empty() || !srv.redis_ok() {
            return;
        }
        let ttl = self.cfg.presence_ttl;
        let records: Vec<(String, Presence)> = self
            .uid_of
            .iter()
            .map(|(fd, uid)| (uid.clone(), self.presence_of(srv, *fd)))
            .collect();
        let keys = &self.keys;
        let _ = srv.redis_cmd(|c| presence::add_many(c, keys, &records, ttl));
    }

    fn on_user_close(&mut self, srv: &mut Server<Self>, fd: Fd) {
        let Some(uid) = self.uid_of.remove(&fd) else {
            return;
        };
        if let Some(v) = self.users.get_mut(&uid) {
            v.retain(|f| *f != fd);
            if v.is_empty() {
                self.users.remove(&uid);
            }
        }
        self.set_users_gauge(srv);
        let p = self.presence_of(srv, fd);
        let _ = srv.redis_cmd(|c| presence::remove(c, &self.keys, &uid, &p));
    }

    /// A user connection moved here: bind uid ↔ new fd and move its
    /// presence record to the new fd atomically.
    fn adopt_user(&mut self, srv: &mut Server<Self>, fd: Fd, uid: String, old_fd: Fd) {
        self.users.entry(uid.clone()).or_default().push(fd);
        self.uid_of.insert(fd, uid.clone());
        self.set_users_gauge(srv);
        srv.set_attr(fd, ATTR_PRESENCE_FD, Value::from(fd));
        let old = Presence {
            fd: old_fd,
            ..self.presence_of(srv, fd)
        };
        let new = self.presence_of(srv, fd);
        let ttl = self.cfg.presence_ttl;
        if srv
            .redis_cmd(|c| presence::rekey(c, &self.keys, &uid, &old, &new, ttl))
            .is_none()
        {
            log::warn!("im: could not move {uid}'s presence to fd {fd} (Redis unavailable); it keeps fd {old_fd}");
            srv.set_attr(fd, ATTR_PRESENCE_FD, Value::from(old_fd));
        }
    }

    /// Draining: tell each local user where to reconnect (a live server
    /// other than this one, least loaded first), before the framework
    /// closes them with 1001.
    fn say_goodbye(&mut self, srv: &mut Server<Self>) {
        let keys = &self.keys;
        let mut others = srv
            .redis_cmd(|c| servers::list(c, keys))
            .unwrap_or_default();
        others.retain(|e| e.member() != self.member && !e.draining);
        others.sort_by_key(|e| e.load);
        let fds: Vec<(Fd, String)> = self.uid_of.iter().map(|(fd, u)| (*fd, u.clone())).collect();
        for (i, (fd, uid)) in fds.into_iter().enumerate() {
            let frame = match others.get(i % others.len().max(1)) {
                Some(e) => {
                    let mut url = format!("ws://{}:{}/?uid={uid}", e.ip, e.port);
                    if !self.cfg.auth_secret.is_empty() {
                        url.push_str(&format!(
                            "&token={}",
                            auth::mint(self.cfg.auth_secret.as_bytes(), &uid, "user", 3600)
                        ));
                    }
                    Reconnect {
                        ip: Some(e.ip.clone()),
                        port: Some(e.port),
                        url: Some(url),
                    }
                }
                None => Reconnect {
                    ip: None,
                    port: None,
                    url: None,
                },
            };
            srv.push(fd, Message::Text(frame.to_text()));
        }
    }
}

impl App for ImApp {
    fn on_start(&mut self, info: &ServerInfo) {
        if self.cfg.auth_secret.is_empty() {
            log::warn!("auth_secret is not set: users connect without tokens and the Route must run open too");
        }
        log::info!(
            "IM server {} advertises {} (epoch {})",
            self.cfg.service_name,
            self.member,
            self.epoch
        );
        let _ = info;
    }

    fn listeners(&mut self, bus: &mut EventBus<Server<Self>>) {
        // The seed's StareListen: register with the Route when worker 0 starts.
        bus.register("workerStart", |srv: &mut Server<ImApp>, _args| {
            if srv.worker_id() == 0 && !srv.is_task_worker() {
                srv.after(0, |app: &mut ImApp, srv, _| app.dial_route(srv));
            }
        });
    }

    fn on_worker_start(&mut self, srv: &mut Server<Self>) {
        if srv.worker_id() == 0 && !srv.is_task_worker() {
            let ms = (self.cfg.route_heartbeat.max(0.05) * 1000.0) as u64;
            srv.tick(ms, |app: &mut ImApp, srv, _| app.heartbeat(srv));
        }
        if !srv.is_task_worker() && self.cfg.presence_refresh > 0.0 {
            let ms = (self.cfg.presence_refresh.max(0.1) * 1000.0) as u64;
            srv.tick(ms, |app: &mut ImApp, srv, _| app.refresh_presence(srv));
        }
    }

    fn on_worker_exit(&mut self, srv: &mut Server<Self>) {
        if srv.is_handing_over() {
            return; // users and the Route link move to the replacement
        }
        if srv.worker_id() == 0 {
            self.registrar.draining = true;
            if self.registrar.registered {
                self.send_to_route(srv, ImFrame::Draining.to_text());
            }
        }
        self.say_goodbye(srv);
    }

    fn on_connect(&mut self, srv: &mut Server<Self>, fd: Fd) {
        if Some(fd) == self.registrar.fd {
            self.route_connected(srv, fd);
        }
    }

    fn on_open(&mut self, srv: &mut Server<Self>, fd: Fd, req: &Request) {
        self.on_user_open(srv, fd, req);
    }

    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        let Message::Text(text) = msg else {
            srv.push(
                fd,
                Message::Text(
                    ProtocolError::new(
                        ErrorCode::BadFrame,
                        "binary frames are not part of the protocol",
                    )
                    .to_frame(),
                ),
            );
            return;
        };
        if Some(fd) == self.registrar.fd {
            match link::parse_route(&text) {
                RouteFrame::Registered(_) => self.route_registered(srv),
                RouteFrame::Deliver(m) => {
                    self.deliver_local(srv, &m.to, &m.from, &m.data);
                    self.to_siblings(srv, &WorkerMsg::Deliver(m));
                }
                RouteFrame::Broadcast(b) => {
                    self.broadcast_local(srv, &b.from, &b.data);
                    self.to_siblings(srv, &WorkerMsg::Broadcast(b));
                }
                RouteFrame::Error(e) => log::warn!("im: the Route refused a frame: {e}"),
                RouteFrame::Unknown => log::warn!("im: ignoring an unknown frame from the Route"),
            }
            return;
        }
        let Some(from) = self.uid_of.get(&fd).cloned() else {
            return;
        };
        match user::parse_user(&text) {
            Ok(m) => self.route_message(srv, fd, &from, &m.to, m.data),
            Err(e) => {
                srv.push(fd, Message::Text(e.to_frame()));
            }
        }
    }

    fn on_adopt(&mut self, srv: &mut Server<Self>, fd: Fd, attrs: &HashMap<String, Value>) {
        if attrs.get(ATTR_ROUTE_LINK) == Some(&Value::Bool(true)) {
            let registered = attrs.get(ATTR_ROUTE_REGISTERED) == Some(&Value::Bool(true));
            log::info!("im: took over the Route link (fd {fd}, registered: {registered})");
            self.registrar.fd = Some(fd);
            if registered {
                self.route_registered(srv);
            }
            return;
        }
        let uid = attrs.get(ATTR_UID).and_then(Value::as_str);
        let old = attrs.get(ATTR_PRESENCE_FD).and_then(Value::as_u64);
        match (uid, old) {
            (Some(uid), Some(old)) => self.adopt_user(srv, fd, uid.to_string(), old),
            // Refused before it was bound (its close frame was in flight).
            _ => log::debug!("im: adopted fd {fd} without a user"),
        }
    }

    fn on_close(&mut self, srv: &mut Server<Self>, fd: Fd) {
        if Some(fd) == self.registrar.fd {
            self.route_closed(srv);
        } else {
            self.on_user_close(srv, fd);
        }
    }

    fn on_pipe_message(&mut self, srv: &mut Server<Self>, _from: usize, data: Vec<u8>) {
        match WorkerMsg::parse(&data) {
            Ok(WorkerMsg::Deliver(m)) => {
                self.deliver_local(srv, &m.to, &m.from, &m.data);
            }
            Ok(WorkerMsg::Broadcast(b)) => self.broadcast_local(srv, &b.from, &b.data),
            Ok(WorkerMsg::Forward(m)) => {
                self.send_to_route(srv, ImFrame::Forward(m).to_text());
            }
            Ok(WorkerMsg::Unknown) => log::warn!("im: ignoring an unknown worker message"),
            Err(e) => log::warn!("im: bad worker message: {e}"),
        }
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        if !admin::allowed(srv, req, req.path_only()) {
            return Response::json(404, &json!({"error": "not_found"}));
        }
        match (req.method.as_str(), req.path_only()) {
            ("GET", "/health") => Response::json(
                200,
                &json!({"status": "ok", "worker_id": srv.worker_id(), "pid": std::process::id()}),
            ),
            ("GET", "/ready") => {
                let route_ok = srv.worker_id() != 0 || self.registrar.registered;
                let mut reasons = Vec::new();
                if !srv.redis_ok() {
                    reasons.push("redis unreachable");
                }
                if !route_ok {
                    reasons.push("not registered with the Route");
                }
                if srv.is_stopping() {
                    reasons.push("draining");
                }
                if reasons.is_empty() {
                    Response::json(200, &json!({"ready": true}))
                } else {
                    Response::json(503, &json!({"ready": false, "reasons": reasons}))
                }
            }
            ("GET", "/metrics") => {
                let sb = srv.scoreboard();
                let mut m = crate::metrics::Exposition::new();
                m.framework(&sb);
                m.app_counters(&sb, COUNTERS);
                m.gauge(
                    "swocloud_im_users",
                    "Users connected to this IM server, over all its workers.",
                    &[],
                    self.load(srv),
                );
                crate::metrics::response(m.finish())
            }
            _ => Response::json(404, &json!({"error": "not_found"})),
        }
    }
}
