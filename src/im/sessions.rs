//! This worker's users: which connection belongs to which uid, admission
//! (uid and token checks at the WebSocket handshake), pushing frames to
//! local users, and the draining server's farewell.
//!
//! [`Sessions`] makes no Redis call: where a user is recorded is the
//! [`crate::im::presence_store::PresenceStore`]'s business.

use std::collections::HashMap;

use serde_json::Value;

use crate::auth;
use crate::cluster::servers::ServerEntry;
use crate::cluster::user::{Delivered, Reconnect, Resume};
use crate::cluster::valid_uid;
use crate::event::App;
use crate::im::stats;
use crate::reactor::{Fd, Message, Request, Server};

/// Connection attribute: the user's uid.
const ATTR_UID: &str = "im.uid";
/// Connection attribute: the fd its presence record names.
const ATTR_PRESENCE_FD: &str = "im.presence_fd";
/// Lifetime of the user tokens a farewell hands out.
const USER_TOKEN_TTL: u64 = 3600;

/// The users connected to this worker.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Verifies user tokens when not empty.
    auth_secret: String,
    /// uid → this worker's connections of that user.
    users: HashMap<String, Vec<Fd>>,
    /// connection → uid.
    uid_of: HashMap<Fd, String>,
}

impl Sessions {
    /// No users yet; tokens are checked against `auth_secret` when set.
    pub fn new(auth_secret: &str) -> Sessions {
        Sessions {
            auth_secret: auth_secret.to_string(),
            ..Sessions::default()
        }
    }

    /// The uid of connection `fd`, if it is a user's.
    pub fn uid(&self, fd: Fd) -> Option<&str> {
        self.uid_of.get(&fd).map(String::as_str)
    }

    /// Every local connection and its uid.
    pub fn all(&self) -> impl Iterator<Item = (Fd, &str)> {
        self.uid_of.iter().map(|(fd, u)| (*fd, u.as_str()))
    }

    /// Whether no user is connected here.
    pub fn is_empty(&self) -> bool {
        self.uid_of.is_empty()
    }

    fn bind<A: App>(&mut self, srv: &Server<A>, fd: Fd, uid: &str) {
        self.users.entry(uid.to_string()).or_default().push(fd);
        self.uid_of.insert(fd, uid.to_string());
        stats::set_users(srv, self.uid_of.len());
    }

    /// A WebSocket handshake completed: admit the user named by the query
    /// (`?uid=U&token=T[&since=N&epoch=E]`) or close with 4001 (bad uid or
    /// token) or 4003 (a malformed resume). Returns the admitted uid and
    /// where it resumes.
    pub fn open<A: App>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        req: &Request,
    ) -> Option<(String, Resume, HashMap<String, Resume>)> {
        let uid = req.query_param("uid").unwrap_or_default().into_owned();
        if !valid_uid(&uid) {
            stats::add(srv, stats::REFUSED, 1);
            srv.disconnect(fd, 4001, "a valid uid query parameter is required");
            return None;
        }
        if !self.auth_secret.is_empty() {
            let token = req.query_param("token").unwrap_or_default();
            let token: &str = &token;
            if let Err(e) = auth::verify(self.auth_secret.as_bytes(), token, "user", Some(&uid)) {
                stats::add(srv, stats::REFUSED, 1);
                log::info!("im: refused {uid} on fd {fd}: {e}");
                srv.disconnect(fd, 4001, &format!("unauthorized: {e}"));
                return None;
            }
        }
        let parsed = Resume::parse(
            req.query_param("since").as_deref(),
            req.query_param("epoch").as_deref(),
        )
        .and_then(|r| {
            Ok((
                r,
                crate::cluster::user::parse_gsince(req.query_param("gsince").as_deref())?,
            ))
        });
        let (resume, gsince) = match parsed {
            Ok(r) => r,
            Err(why) => {
                stats::add(srv, stats::REFUSED, 1);
                let e = crate::cluster::ProtocolError::new(
                    crate::cluster::ErrorCode::BadRequest,
                    why.clone(),
                );
                srv.push(fd, Message::Text(e.to_frame()));
                srv.disconnect(fd, crate::im::feeds::BAD_RESUME, &why);
                return None;
            }
        };
        self.bind(srv, fd, &uid);
        // What a worker adopting this connection needs (see `adopt`).
        srv.set_attr(fd, ATTR_UID, Value::from(uid.as_str()));
        srv.set_attr(fd, ATTR_PRESENCE_FD, Value::from(fd));
        Some((uid, resume, gsince))
    }

    /// This worker's connections of `uid`.
    pub fn fds(&self, uid: &str) -> &[Fd] {
        self.users.get(uid).map_or(&[], Vec::as_slice)
    }

    /// A user connection moved here from the worker this one replaced:
    /// bind it under its new fd. Returns (uid, the fd its presence record
    /// names), or None for a connection refused before it was bound.
    pub fn adopt<A: App>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        attrs: &HashMap<String, Value>,
    ) -> Option<(String, Fd)> {
        let uid = attrs.get(ATTR_UID).and_then(Value::as_str)?.to_string();
        let old = attrs.get(ATTR_PRESENCE_FD).and_then(Value::as_u64)?;
        self.bind(srv, fd, &uid);
        srv.set_attr(fd, ATTR_PRESENCE_FD, Value::from(fd));
        Some((uid, old))
    }

    /// A connection closed: forget it; returns its uid if it was a user's.
    pub fn close<A: App>(&mut self, srv: &Server<A>, fd: Fd) -> Option<String> {
        let uid = self.uid_of.remove(&fd)?;
        if let Some(v) = self.users.get_mut(&uid) {
            v.retain(|f| *f != fd);
            if v.is_empty() {
                self.users.remove(&uid);
            }
        }
        stats::set_users(srv, self.uid_of.len());
        Some(uid)
    }

    /// Pushes a message to this worker's connections of `to`; returns how
    /// many took it.
    pub fn deliver<A: App>(
        &self,
        srv: &mut Server<A>,
        to: &str,
        from: &str,
        data: &Value,
    ) -> usize {
        let Some(fds) = self.users.get(to) else {
            return 0;
        };
        let frame = unstored(from, data);
        let n = fds
            .iter()
            .filter(|fd| srv.push(**fd, Message::Text(frame.clone())))
            .count();
        stats::add(srv, stats::DELIVERED, n as u64);
        n
    }

    /// Pushes a message to every local user.
    pub fn broadcast<A: App>(&self, srv: &mut Server<A>, from: &str, data: &Value) {
        let frame = unstored(from, data);
        let fds: Vec<Fd> = self.uid_of.keys().copied().collect();
        let n = fds
            .into_iter()
            .filter(|fd| srv.push(*fd, Message::Text(frame.clone())))
            .count();
        stats::add(srv, stats::DELIVERED, n as u64);
    }

    /// Draining: tell each local user where to reconnect, spreading them
    /// over `others` (live servers, least loaded first), before the
    /// framework closes them with 1001.
    pub fn say_goodbye<A: App>(&self, srv: &mut Server<A>, others: &[ServerEntry]) {
        let fds: Vec<(Fd, String)> = self.uid_of.iter().map(|(fd, u)| (*fd, u.clone())).collect();
        for (i, (fd, uid)) in fds.into_iter().enumerate() {
            let frame = match others.get(i % others.len().max(1)) {
                Some(e) => {
                    let mut url = format!("ws://{}:{}/?uid={uid}", e.ip, e.port);
                    if !self.auth_secret.is_empty() {
                        let token =
                            auth::mint(self.auth_secret.as_bytes(), &uid, "user", USER_TOKEN_TTL);
                        url.push_str(&format!("&token={token}"));
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

/// The frame of a message that is not stored (a broadcast, or any message
/// with `inbox = false`): `{"from","data"}`, no seq.
fn unstored(from: &str, data: &Value) -> String {
    Delivered {
        from,
        data,
        seq: None,
        id: None,
    }
    .to_text()
}
