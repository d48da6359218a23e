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
//!
//! [`ImApp`] owns the components and wires the framework's hooks to them:
//!
//! | component | owns |
//! |-----------|------|
//! | [`Sessions`] | this worker's users: admission, uid ↔ connection, pushes, farewell |
//! | [`PresenceStore`] | every Redis call: presence records, the registry read |
//! | [`RouteLink`] | worker 0's link to the Route: dial, register, queue, heartbeat |
//!
//! The app itself keeps only the routing policy of a user's message
//! ([`ImApp::route_message`]: here, a sibling worker, or the Route) and the
//! timers (components return delays; the app schedules them).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::link::{self, Addressed, RouteFrame};
use crate::cluster::servers;
use crate::cluster::user::{self, UserSend};
use crate::cluster::{ErrorCode, ProtocolError};
use crate::event::{App, EventBus, ServerInfo};
use crate::im::http;
use crate::im::presence_store::PresenceStore;
use crate::im::route_link::{Identity, RouteLink};
use crate::im::sessions::Sessions;
use crate::im::settings::ImSettings;
use crate::im::stats;
use crate::im::workers::{self, WorkerMsg};
use crate::reactor::{Fd, Message, Request, Response, Server};

/// The IM server.
#[derive(Debug)]
pub struct ImApp {
    cfg: ImSettings,
    sessions: Sessions,
    presence: PresenceStore,
    /// The Route link (used on worker 0 only).
    route: RouteLink,
}

impl ImApp {
    /// An IM server for these settings.
    pub fn new(cfg: ImSettings, host: &str, port: u16, redis_prefix: &str) -> ImApp {
        let ip = if !cfg.advertise_ip.is_empty() {
            cfg.advertise_ip.clone()
        } else if host == "0.0.0.0" || host == "::" {
            "127.0.0.1".to_string()
        } else {
            host.to_string()
        };
        let port = if cfg.advertise_port != 0 {
            cfg.advertise_port
        } else {
            port
        };
        // New at every server start, shared by all its workers (made before the fork).
        let epoch = format!(
            "{:x}-{:x}",
            crate::process::scoreboard::now_ms(),
            std::process::id()
        );
        let member = servers::member(&ip, port);
        let identity = Identity {
            service_name: cfg.service_name.clone(),
            ip,
            port,
            epoch: epoch.clone(),
        };
        ImApp {
            sessions: Sessions::new(&cfg.auth_secret),
            presence: PresenceStore::new(redis_prefix, member, epoch, cfg.presence_ttl),
            route: RouteLink::new(&cfg, identity),
            cfg,
        }
    }

    /// Dials the Route (worker 0), again later if the link says so.
    fn dial_route(&mut self, srv: &mut Server<Self>) {
        if let Some(delay) = self.route.dial(srv) {
            Self::redial_after(srv, delay);
        }
    }

    fn redial_after(srv: &mut Server<Self>, delay: Duration) {
        srv.after(delay.as_millis() as u64, |app: &mut ImApp, srv, _| {
            app.dial_route(srv)
        });
    }

    /// Sends `msg` through the Route: directly on worker 0, else through
    /// worker 0.
    fn forward_to_route(&mut self, srv: &mut Server<Self>, msg: Addressed) {
        stats::add(srv, stats::FORWARDED, 1);
        if srv.worker_id() == 0 {
            self.route.forward(srv, msg);
        } else {
            workers::send(srv, 0, &WorkerMsg::Forward(msg));
        }
    }

    /// A user's message: this worker, this server's other workers holding
    /// `to` (from Redis presence), and the Route for the rest.
    fn route_message(&mut self, srv: &mut Server<Self>, fd: Fd, from: String, msg: UserSend) {
        let UserSend { to, data } = msg;
        let Some(records) = self.presence.lookup(srv, &to) else {
            // Redis is away: deliver here, ask every sibling, and let the Route try the rest.
            self.sessions.deliver(srv, &to, &from, &data);
            let msg = Addressed { to, from, data };
            workers::to_siblings(srv, &WorkerMsg::Deliver(msg.clone()));
            self.forward_to_route(srv, msg);
            return;
        };
        let mut workers: Vec<usize> = records
            .iter()
            .filter(|p| self.presence.is_mine(p))
            .map(|p| p.worker)
            .collect();
        let elsewhere = records.iter().any(|p| p.member != self.presence.member());
        if workers.is_empty() && !elsewhere {
            let offline =
                ProtocolError::new(ErrorCode::Offline, format!("user {to} is not online"));
            srv.push(fd, Message::Text(offline.to_frame()));
            return;
        }
        workers.sort_unstable();
        workers.dedup();
        let msg = Addressed { to, from, data };
        for w in workers {
            if w == srv.worker_id() {
                self.sessions.deliver(srv, &msg.to, &msg.from, &msg.data);
            } else {
                workers::send(srv, w, &WorkerMsg::Deliver(msg.clone()));
            }
        }
        if elsewhere {
            self.forward_to_route(srv, msg);
        }
    }

    /// A frame on the Route link.
    fn on_route_frame(&mut self, srv: &mut Server<Self>, text: &str) {
        match link::parse_route(text) {
            RouteFrame::Registered(_) => self.route.registered(srv),
            RouteFrame::Deliver(m) => {
                self.sessions.deliver(srv, &m.to, &m.from, &m.data);
                workers::to_siblings(srv, &WorkerMsg::Deliver(m));
            }
            RouteFrame::Broadcast(b) => {
                self.sessions.broadcast(srv, &b.from, &b.data);
                workers::to_siblings(srv, &WorkerMsg::Broadcast(b));
            }
            RouteFrame::Error(e) => log::warn!("im: the Route refused a frame: {e}"),
            RouteFrame::Unknown => log::warn!("im: ignoring an unknown frame from the Route"),
        }
    }
}

impl App for ImApp {
    fn on_start(&mut self, _info: &ServerInfo) {
        if self.cfg.auth_secret.is_empty() {
            log::warn!("auth_secret is not set: users connect without tokens and the Route must run open too");
        }
        log::info!(
            "IM server {} advertises {} (epoch {})",
            self.cfg.service_name,
            self.presence.member(),
            self.presence.epoch()
        );
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
            srv.tick(ms, |app: &mut ImApp, srv, _| {
                let load = stats::load(srv);
                app.route.heartbeat(srv, load);
            });
        }
        if !srv.is_task_worker() && self.cfg.presence_refresh > 0.0 {
            let ms = (self.cfg.presence_refresh.max(0.1) * 1000.0) as u64;
            srv.tick(ms, |app: &mut ImApp, srv, _| {
                app.presence.refresh(srv, app.sessions.all());
            });
        }
    }

    fn on_worker_exit(&mut self, srv: &mut Server<Self>) {
        if srv.is_handing_over() {
            return; // users and the Route link move to the replacement
        }
        if srv.worker_id() == 0 {
            self.route.drain(srv);
        }
        let others = self.presence.other_servers(srv);
        self.sessions.say_goodbye(srv, &others);
    }

    fn on_connect(&mut self, srv: &mut Server<Self>, fd: Fd) {
        if self.route.is_link(fd) {
            let load = stats::load(srv);
            self.route.connected(srv, fd, load);
        }
    }

    fn on_open(&mut self, srv: &mut Server<Self>, fd: Fd, req: &Request) {
        let Some(uid) = self.sessions.open(srv, fd, req) else {
            return;
        };
        if !self.presence.record(srv, &uid, fd) {
            log::warn!("im: could not record {uid} online (Redis unavailable); messages to it may not be routed here");
        }
    }

    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        let Message::Text(text) = msg else {
            let e = ProtocolError::new(
                ErrorCode::BadFrame,
                "binary frames are not part of the protocol",
            );
            srv.push(fd, Message::Text(e.to_frame()));
            return;
        };
        if self.route.is_link(fd) {
            self.on_route_frame(srv, &text);
            return;
        }
        let Some(from) = self.sessions.uid(fd).map(str::to_string) else {
            return;
        };
        match user::parse_user(&text) {
            Ok(m) => self.route_message(srv, fd, from, m),
            Err(e) => {
                srv.push(fd, Message::Text(e.to_frame()));
            }
        }
    }

    fn on_adopt(&mut self, srv: &mut Server<Self>, fd: Fd, attrs: &HashMap<String, Value>) {
        if self.route.adopt(srv, fd, attrs) {
            return;
        }
        let Some((uid, old_fd)) = self.sessions.adopt(srv, fd, attrs) else {
            // Refused before it was bound (its close frame was in flight).
            log::debug!("im: adopted fd {fd} without a user");
            return;
        };
        if !self.presence.rekey(srv, &uid, old_fd, fd) {
            log::warn!("im: could not move {uid}'s presence to fd {fd} (Redis unavailable); it keeps fd {old_fd}");
            self.sessions.keep_presence_fd(srv, fd, old_fd);
        }
    }

    fn on_close(&mut self, srv: &mut Server<Self>, fd: Fd) {
        if self.route.is_link(fd) {
            if let Some(delay) = self.route.closed(srv) {
                Self::redial_after(srv, delay);
            }
        } else if let Some(uid) = self.sessions.close(srv, fd) {
            self.presence.forget(srv, &uid, fd);
        }
    }

    fn on_pipe_message(&mut self, srv: &mut Server<Self>, _from: usize, data: Vec<u8>) {
        match WorkerMsg::parse(&data) {
            Ok(WorkerMsg::Deliver(m)) => {
                self.sessions.deliver(srv, &m.to, &m.from, &m.data);
            }
            Ok(WorkerMsg::Broadcast(b)) => self.sessions.broadcast(srv, &b.from, &b.data),
            Ok(WorkerMsg::Forward(m)) => self.route.forward(srv, m),
            Ok(WorkerMsg::Unknown) => log::warn!("im: ignoring an unknown worker message"),
            Err(e) => log::warn!("im: bad worker message: {e}"),
        }
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        http::handle(srv, req, self.route.is_registered())
    }
}
