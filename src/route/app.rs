//! The Route application: IM servers register over WebSocket, stay alive by
//! pinging, and are removed from Redis when they close, fall silent, or
//! their Route worker dies (lease expiry).
//!
//! [`RouteApp`] owns the components and only wires the framework's hooks
//! to them:
//!
//! | component | owns |
//! |-----------|------|
//! | [`Registrations`] | one peer per IM-server connection, the registry writes, the sweep and the grace time (`liveness.rs`) |
//! | [`Delivery`] | locating users, relaying frames to the Route worker holding an IM server |
//! | [`Directory`] | the live-server list (cache, balancer, `/api/servers` body) |
//! | [`Api`] | the HTTP endpoints, borrowing the three above per request |

use std::collections::HashMap;

use serde_json::Value;

use crate::cluster::link::{self, ImFrame};
use crate::cluster::{ErrorCode, ProtocolError};
use crate::event::{App, Holds, ServerInfo};
use crate::reactor::{Fd, Message, Request, Response, Server};
use crate::route::api::Api;
use crate::route::cache::Cache;
use crate::route::delivery::{Delivery, DeliveryHost, Waiting};
use crate::route::directory::Directory;
use crate::route::registrations::Registrations;
use crate::route::settings::{self, RouteSettings};

/// The Route.
#[derive(Debug)]
pub struct RouteApp {
    cfg: RouteSettings,
    regs: Registrations,
    delivery: Delivery,
    directory: Directory,
}

impl RouteApp {
    /// A Route with its settings; the Redis prefix comes from the
    /// framework's `redis_prefix`.
    pub fn new(cfg: RouteSettings, redis_prefix: &str) -> RouteApp {
        RouteApp {
            regs: Registrations::new(cfg.clone(), redis_prefix),
            delivery: Delivery::new(
                redis_prefix,
                cfg.inbox
                    .then(|| crate::cluster::inbox::Inbox::new(redis_prefix, cfg.inbox_limits())),
                crate::cluster::groups::Groups::new(redis_prefix, cfg.group_limits()),
            )
            .with_group_presence(cfg.group_presence_events, cfg.group_presence_max),
            directory: Directory::new(&cfg, redis_prefix),
            cfg,
        }
    }

    /// This Route node's name: `node_id`, or `<hostname>:<port>`.
    fn node_name(&self, srv: &Server<Self>) -> String {
        if !self.cfg.node_id.is_empty() {
            return self.cfg.node_id.clone();
        }
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "route".into());
        format!("{host}:{}", srv.settings().port)
    }

    /// A frame from an IM server, parsed and dispatched to a component.
    fn on_frame(&mut self, srv: &mut Server<Self>, fd: Fd, text: &str) {
        match link::parse_im(text) {
            Err(e) => self.regs.refuse(srv, fd, &e),
            Ok(ImFrame::Register(reg)) => self.regs.register(srv, fd, reg),
            Ok(ImFrame::Heartbeat { load }) => self.regs.heartbeat(srv, fd, load),
            Ok(ImFrame::Forward(msg)) => {
                let Some(member) = self.regs.member_of(fd) else {
                    let e = ProtocolError::new(ErrorCode::NotRegistered, "register first");
                    self.regs.refuse(srv, fd, &e);
                    return;
                };
                let to = msg.to.clone();
                let w = Waiting::Forward {
                    msg,
                    origin: member,
                    link: fd,
                };
                self.delivery
                    .submit(srv, self.directory.cache(), &self.regs, &to, w);
            }
            Ok(ImFrame::Draining) => self.regs.draining(srv, fd),
            Ok(ImFrame::GroupSend(m)) => {
                if self.regs.member_of(fd).is_none() {
                    let e = ProtocolError::new(ErrorCode::NotRegistered, "register first");
                    self.regs.refuse(srv, fd, &e);
                    return;
                }
                crate::route::groups::from_user(srv, &self.delivery, &self.cfg, fd, m);
            }
            // parse_im refuses unknown methods by name; this is the backstop.
            Ok(ImFrame::Unknown) => self.regs.refuse(
                srv,
                fd,
                &ProtocolError::new(ErrorCode::UnknownMethod, "unknown method"),
            ),
        }
    }
}

impl Holds<Registrations> for RouteApp {
    fn part(&mut self) -> &mut Registrations {
        &mut self.regs
    }
}

impl Holds<Directory> for RouteApp {
    fn part(&mut self) -> &mut Directory {
        &mut self.directory
    }
}

impl DeliveryHost for RouteApp {
    fn delivery_parts(&mut self) -> (&mut Delivery, &Cache, &Registrations) {
        (&mut self.delivery, self.directory.cache(), &self.regs)
    }
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
        if !self.regs.has_node() {
            let node = self.node_name(srv);
            self.regs.set_node(node);
        }
        self.directory
            .start(srv, |app: &mut RouteApp| app.directory.cache_mut());
        self.delivery.start(srv, &self.regs.node_pid());
        let every = settings::sweep_every(srv.settings()).as_millis() as u64;
        srv.tick(every, |app: &mut RouteApp, srv, _| {
            app.regs.sweep(srv);
            app.delivery.watch_relays(srv, &app.regs);
        });
        // The audit of accepted messages (`/api/send`, group sends).
        srv.tick(
            crate::cluster::audit::TICK_MS,
            |app: &mut RouteApp, srv, _| {
                app.delivery.audit_tick(srv);
            },
        );
    }

    fn on_open(&mut self, srv: &mut Server<Self>, fd: Fd, _req: &Request) {
        self.regs.open(srv, fd);
    }

    fn on_adopt(&mut self, srv: &mut Server<Self>, fd: Fd, attrs: &HashMap<String, Value>) {
        self.regs.adopt(srv, fd, attrs);
    }

    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        self.regs.spoke(srv, fd); // a silent peer is re-admitted first
        match msg {
            Message::Text(t) => self.on_frame(srv, fd, &t),
            Message::Binary(_) => self.regs.refuse(
                srv,
                fd,
                &ProtocolError::new(
                    ErrorCode::BadFrame,
                    "binary frames are not part of the protocol",
                ),
            ),
        }
    }

    fn on_close(&mut self, srv: &mut Server<Self>, fd: Fd) {
        self.regs.close(srv, fd);
    }

    fn on_worker_stop(&mut self, srv: &mut Server<Self>) {
        self.directory.flush_records(srv);
    }

    fn on_pipe_message(&mut self, srv: &mut Server<Self>, _from: usize, data: Vec<u8>) {
        self.delivery.on_relay(&self.regs, srv, &data);
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        Api {
            cfg: &self.cfg,
            regs: &self.regs,
            delivery: &mut self.delivery,
            directory: &mut self.directory,
        }
        .handle(srv, req)
    }
}
