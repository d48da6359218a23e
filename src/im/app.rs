//! The IM server application: end users' WebSocket connections, their
//! presence in Redis, and message delivery — local, across this server's
//! workers, and through the Route to other IM servers.
//!
//! A user connects to `ws://ip:port/?uid=U&token=T[&since=N&epoch=E]` (the
//! `url` the Route's `/route` hands out). With `auth_secret` set the token
//! must be a JWT for `aud=user, sub=U`, else the connection is closed with
//! 4001 and a reason. Its first frame is `welcome`, then what its inbox
//! holds past `since` (or past its ack), then live messages
//! ([`Feeds`]). A user's frame `{"to":"U2","data":…[,"ref"]}` is first
//! stored in U2's inbox (the sender gets `{"sent":ref,"id","seq"}`), then
//! delivered to U2's connections on this server (the workers holding U2
//! are known from the server-wide [`Directory`], without asking Redis) and
//! forwarded through the Route for U2's connections elsewhere (the Route
//! knows, from its own cache); each delivered frame is
//! `{"from":"U1","data":…,"seq":N,"id":…}`. A user online nowhere finds
//! it at its next connect.
//!
//! [`ImApp`] owns the components and wires the framework's hooks to them:
//!
//! | component | owns |
//! |-----------|------|
//! | [`Sessions`] | this worker's users: admission, uid ↔ connection, pushes, farewell |
//! | [`Directory`] | the whole server's users, by worker (kept by the workers' messages) |
//! | [`PresenceStore`] | presence records, the registry read |
//! | [`Feeds`] | each connection's feed of stored messages: welcome, replay, gaps, acks |
//! | [`RouteLink`] | worker 0's link to the Route: dial, register, queue, heartbeat |
//!
//! The app itself keeps only the routing policy of a user's message
//! ([`ImApp::route_message`]: here, a sibling worker, or the Route) and the
//! timers (components return delays; the app schedules them).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::inbox::{Inbox, Stamp};
use crate::cluster::link::{self, Addressed, Offline, RouteFrame};
use crate::cluster::servers;
use crate::cluster::user::{self, Delivered, UserFrame};
use crate::cluster::{ErrorCode, ProtocolError};
use crate::event::{App, EventBus, Holds, ServerInfo};
use crate::im::directory::Directory;
use crate::im::feed::Live;
use crate::im::feeds::{self, Feeds};
use crate::im::groups::GroupFeeds;

#[path = "app_groups.rs"]
mod app_groups;
#[path = "app_messages.rs"]
mod app_messages;
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
    directory: Directory,
    presence: PresenceStore,
    feeds: Feeds,
    groups: GroupFeeds,
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
            directory: Directory::default(),
            presence: PresenceStore::new(
                redis_prefix,
                member.clone(),
                epoch.clone(),
                cfg.presence_ttl,
            ),
            route: RouteLink::new(&cfg, identity),
            groups: GroupFeeds::new(
                crate::cluster::groups::Groups::new(
                    redis_prefix,
                    crate::cluster::groups::GroupLimits::default(),
                ),
                &member,
                &epoch,
            )
            .with_sweep(cfg.inbox_check_interval),
            feeds: Feeds::new(
                Inbox::new(redis_prefix, cfg.inbox_limits()),
                cfg.inbox_check_interval,
            ),
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

    /// A (stored) user's message: to the workers of this server that hold
    /// `to` (from the directory), and through the Route, which delivers to
    /// the other servers holding `to` (other devices). No Redis call.
    fn send_on(&mut self, srv: &mut Server<Self>, fd: Fd, mut msg: Addressed) {
        let here = self.deliver_here(srv, &msg);
        msg.here = here;
        msg.sender = Some(format!("{}/{fd}", srv.worker_id()));
        self.forward_to_route(srv, msg);
    }

    /// Delivers a user's message to this server's connections of `msg.to`
    /// when the directory says it has some: this worker's, and every
    /// sibling's (each delivers to its own; a mailbox message per sibling,
    /// no Redis); returns whether it did, which tells the Route to skip
    /// this server. When the directory does not know `msg.to` here, the
    /// Route delivers to this server too (to all its workers), so a
    /// directory a moment behind (a reload, a restart, a connect not yet
    /// announced) costs neither a loss nor a duplicate.
    fn deliver_here(&mut self, srv: &mut Server<Self>, msg: &Addressed) -> bool {
        if !self.directory.has(&msg.to) {
            return false;
        }
        self.deliver_local(srv, msg);
        workers::to_siblings(srv, &WorkerMsg::Deliver(msg.clone()));
        true
    }

    /// Pushes a message to this worker's connections of `msg.to`: a stamped
    /// one through each connection's feed (in order, once), an unstamped
    /// one as it is.
    fn deliver_local(&mut self, srv: &mut Server<Self>, msg: &Addressed) {
        let Some(Stamp { epoch, seq, id }) = &msg.stamp else {
            self.sessions.deliver(srv, &msg.to, &msg.from, &msg.data);
            return;
        };
        let fds = self.sessions.fds(&msg.to);
        if fds.is_empty() {
            return;
        }
        let frame = Delivered {
            from: &msg.from,
            data: &msg.data,
            seq: Some(*seq),
            id: Some(id),
        }
        .to_text();
        let live = Live {
            epoch: epoch.clone(),
            seq: *seq,
            frame,
        };
        self.feeds.offer(srv, fds, &live);
    }

    /// A frame on the Route link.
    fn on_route_frame(&mut self, srv: &mut Server<Self>, text: &str) {
        let Some(frame) = self.on_group_frame(srv, link::parse_route(text)) else {
            return;
        };
        match frame {
            RouteFrame::Registered(r) => {
                // (Re-)registered: whatever the Route sent while the link
                // was down is only in the inboxes.
                self.route.registered(srv, &r.node);
                self.check_feeds(srv);
            }
            RouteFrame::Check => self.check_feeds(srv),
            RouteFrame::Deliver(m) => {
                // From the Route, which knows the user is on this server:
                // every worker gets it and delivers to its own connections
                // of `to`. The directory is not asked: it can be a moment
                // behind (a reload, a restart), and this path must not
                // lose a message to it. Never sent on again.
                self.deliver_local(srv, &m);
                workers::to_siblings(srv, &WorkerMsg::Deliver(m));
            }
            RouteFrame::Broadcast(b) => {
                self.sessions.broadcast(srv, &b.from, &b.data);
                workers::to_siblings(srv, &WorkerMsg::Broadcast(b));
            }
            RouteFrame::Offline(o) => self.offline(srv, o),
            RouteFrame::Error(e) => log::warn!("im: the Route refused a frame: {e}"),
            RouteFrame::Unknown => log::warn!("im: ignoring an unknown frame from the Route"),
            // Handled by on_group_frame, which never hands these back.
            RouteFrame::GroupDeliver(_)
            | RouteFrame::GroupJoined(_)
            | RouteFrame::GroupLeft(_)
            | RouteFrame::GroupSent(_)
            | RouteFrame::GroupRefused(_)
            | RouteFrame::GroupEvent(_)
            | RouteFrame::Kick(_) => {}
        }
    }

    /// Every connection of this server is checked against its inbox.
    fn check_feeds(&mut self, srv: &mut Server<Self>) {
        self.feeds.check_all();
        self.groups.check_all();
        workers::to_siblings(srv, &WorkerMsg::Check);
    }

    /// The Route found `o.to` online nowhere: tell the sender.
    fn offline(&mut self, srv: &mut Server<Self>, o: Offline) {
        let parsed = o
            .sender
            .split_once('/')
            .and_then(|(w, fd)| Some((w.parse::<usize>().ok()?, fd.parse::<Fd>().ok()?)));
        match parsed {
            Some((w, fd)) if w == srv.worker_id() => {
                srv.push(fd, Message::Text(undelivered(&o.to, o.unavailable)));
            }
            Some((w, fd)) => workers::send(
                srv,
                w,
                &WorkerMsg::Offline {
                    to: o.to,
                    fd,
                    unavailable: o.unavailable,
                },
            ),
            None => log::debug!("im: an offline answer for an unknown sender {:?}", o.sender),
        }
    }

    /// A user connection of this worker now exists: the directory, its
    /// siblings' directories, and presence in Redis.
    fn joined(&mut self, srv: &mut Server<Self>, uid: &str) {
        self.directory.add(uid, srv.worker_id());
        workers::to_siblings(
            srv,
            &WorkerMsg::Joined {
                uid: uid.to_string(),
            },
        );
    }
}

use crate::im::feeds::{ATTR_EPOCH, ATTR_LAST};
use crate::im::groups::ATTR_GROUPS;

impl Holds<GroupFeeds> for ImApp {
    fn part(&mut self) -> &mut GroupFeeds {
        &mut self.groups
    }
}

impl Holds<Feeds> for ImApp {
    fn part(&mut self) -> &mut Feeds {
        &mut self.feeds
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
        if !srv.is_task_worker() {
            // Siblings forget what this slot held before and send theirs.
            workers::to_siblings(srv, &WorkerMsg::Hello);
            if srv.redis_configured() {
                PresenceStore::watch_servers(srv, |app: &mut ImApp| &mut app.presence);
            }
        }
        if srv.worker_id() == 0 && !srv.is_task_worker() {
            let ms = (self.cfg.route_heartbeat.max(0.05) * 1000.0) as u64;
            srv.tick(ms, |app: &mut ImApp, srv, _| {
                let load = stats::load(srv);
                if let Some(delay) = app.route.heartbeat(srv, load) {
                    Self::redial_after(srv, delay);
                }
            });
        }
        if !srv.is_task_worker() && self.cfg.presence_refresh > 0.0 {
            let ms = (self.cfg.presence_refresh.max(0.1) * 1000.0) as u64;
            srv.tick(ms, |app: &mut ImApp, srv, _| {
                app.presence.refresh(srv, app.sessions.all());
            });
        }
        if !srv.is_task_worker() {
            // Also without the inbox (no feeds then): the disruption
            // schedule below rewrites presence and checks the groups.
            srv.tick(feeds::FLUSH_MS, |app: &mut ImApp, srv, _| {
                if app.feeds.tick(srv) {
                    // After a Redis disruption: a master that came back
                    // empty lost these users' presence too, and an audit
                    // may have started a group over.
                    app.presence.refresh(srv, app.sessions.all());
                    app.groups.check_all();
                }
                app.groups.tick(srv);
            });
        }
    }

    fn on_worker_exit(&mut self, srv: &mut Server<Self>) {
        if srv.is_handing_over() {
            // Users and the Route link move to the replacement; each feed's
            // position goes along with its connection.
            // (What they push from now until a connection has moved
            // keeps its attributes current: see Feeds::run.)
            self.feeds.flush(srv);
            let fds: Vec<Fd> = self.sessions.all().map(|(fd, _)| fd).collect();
            for fd in fds {
                self.feeds.keep_position(srv, fd);
                self.groups.keep_positions(srv, fd);
            }
            return;
        }
        if srv.worker_id() == 0 {
            self.route.drain(srv);
        }
        let others = self.presence.other_servers();
        self.sessions.say_goodbye(srv, &others);
    }

    fn on_connect(&mut self, srv: &mut Server<Self>, fd: Fd) {
        if self.route.is_link(fd) {
            let load = stats::load(srv);
            self.route.connected(srv, fd, load);
        }
    }

    fn on_open(&mut self, srv: &mut Server<Self>, fd: Fd, req: &Request) {
        let Some((uid, resume, gsince)) = self.sessions.open(srv, fd, req) else {
            return;
        };
        self.joined(srv, &uid);
        self.presence.record(srv, &uid, fd);
        if self.cfg.inbox {
            // After the presence record on the same connection: a message
            // stored after this read is routed here.
            self.feeds.open(srv, fd, &uid, resume);
        }
        self.groups.open(srv, fd, &uid, gsince);
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
            Ok(UserFrame::Send(m)) => self.route_message(srv, fd, from, m),
            Ok(UserFrame::Ack { seq, epoch }) if self.cfg.inbox => {
                self.feeds.ack(srv, fd, seq, epoch.as_deref());
            }
            Ok(UserFrame::Ack { .. }) => {} // nothing is stored, nothing to ack
            Ok(UserFrame::GroupSend {
                group,
                data,
                reference,
            }) => self.group_send(srv, fd, from, group, data, reference),
            Ok(UserFrame::GroupAck { group, gseq, epoch }) => {
                self.groups.ack(srv, fd, &group, gseq, epoch.as_deref());
            }
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
        self.joined(srv, &uid);
        self.presence.rekey(srv, &uid, old_fd, fd);
        self.resend_pending(srv, fd, &uid, attrs);
        if self.cfg.inbox {
            let epoch = attrs.get(ATTR_EPOCH).and_then(Value::as_str);
            match (epoch, attrs.get(ATTR_LAST).and_then(Value::as_u64)) {
                (Some(e), Some(last)) => {
                    self.feeds.adopt(srv, fd, &uid, e.to_string(), last);
                    let none = Value::Null;
                    let groups = attrs.get(ATTR_GROUPS).unwrap_or(&none);
                    self.groups.adopt(srv, fd, &uid, groups);
                }
                // Handed over before its welcome: welcomed here.
                _ => {
                    self.feeds.open(srv, fd, &uid, user::Resume::default());
                    self.groups.open(srv, fd, &uid, Default::default());
                }
            }
        }
    }

    fn on_close(&mut self, srv: &mut Server<Self>, fd: Fd) {
        if self.route.is_link(fd) {
            if let Some(delay) = self.route.closed(srv) {
                Self::redial_after(srv, delay);
            }
        } else if let Some(uid) = self.sessions.close(srv, fd) {
            self.feeds.close(fd);
            self.groups.close(srv, fd);
            self.directory.remove(&uid, srv.worker_id());
            workers::to_siblings(srv, &WorkerMsg::Left { uid: uid.clone() });
            self.presence.forget(srv, &uid, fd);
        }
    }

    fn on_pipe_message(&mut self, srv: &mut Server<Self>, from: usize, data: Vec<u8>) {
        match WorkerMsg::parse(&data) {
            Ok(WorkerMsg::Deliver(m)) => self.deliver_local(srv, &m),
            Ok(WorkerMsg::Check) => {
                self.feeds.check_all();
                self.groups.check_all();
            }
            Ok(WorkerMsg::GroupDeliver(m)) => self.group_deliver(srv, m),
            Ok(WorkerMsg::GroupJoined(m)) => self.group_joined(srv, &m),
            Ok(WorkerMsg::GroupLeft(m)) => self.group_left(srv, &m),
            Ok(WorkerMsg::GroupEvent(e)) => self.group_event(srv, &e),
            Ok(WorkerMsg::Kick(k)) => self.kick(srv, &k),
            Ok(WorkerMsg::GroupSend(m)) => {
                self.route
                    .send(srv, &crate::cluster::link::ImFrame::GroupSend(m));
            }
            Ok(WorkerMsg::Push { fd, frame }) => {
                srv.push(fd, Message::Text(frame));
            }
            Ok(WorkerMsg::Broadcast(b)) => self.sessions.broadcast(srv, &b.from, &b.data),
            Ok(WorkerMsg::Forward(m)) => self.route.forward(srv, m),
            Ok(WorkerMsg::Offline {
                to,
                fd,
                unavailable,
            }) => {
                srv.push(fd, Message::Text(undelivered(&to, unavailable)));
            }
            Ok(WorkerMsg::Joined { uid }) => self.directory.add(&uid, from),
            Ok(WorkerMsg::Left { uid }) => self.directory.remove(&uid, from),
            Ok(WorkerMsg::Hello) => {
                self.directory.drop_worker(from);
                let uids = self.sessions.all().map(|(_, u)| u.to_string()).collect();
                workers::send(srv, from, &WorkerMsg::Roster { uids });
            }
            Ok(WorkerMsg::Roster { uids }) => {
                self.directory.drop_worker(from);
                for u in uids {
                    self.directory.add(&u, from);
                }
            }
            Ok(WorkerMsg::Unknown) => log::warn!("im: ignoring an unknown worker message"),
            Err(e) => log::warn!("im: bad worker message: {e}"),
        }
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        http::handle(srv, req, self.route.is_registered())
    }
}

/// The error frame a sender gets for a message the Route could not deliver.
fn undelivered(to: &str, unavailable: bool) -> String {
    let e = if unavailable {
        ProtocolError::new(
            ErrorCode::Unavailable,
            format!("the message to {to} was not sent: its location could not be read (Redis unavailable)"),
        )
    } else {
        ProtocolError::new(ErrorCode::Offline, format!("user {to} is not online"))
    };
    e.to_frame()
}
