//! [`ImApp`]'s path of a user's message: stored in the recipient's inbox,
//! the sender told (`sent`, or an error with its ref), then sent on.
//!
//! A message with a `ref` is *pending* on its connection (the attribute
//! `im.pending`) from the moment its store is sent until its answer is
//! pushed. When the connection is handed to a replacement worker in the
//! meantime (a reload), the pending sends go along with it and the new
//! worker stores them again: the store is idempotent by ref, so the
//! message is stored once and the sender gets its `sent` all the same.
//! (A message without a ref is stored once, by the worker it reached; if
//! that worker was replaced before the answer, its live copy is left to
//! the recipient's replay, gap fill or sweep.)

use serde_json::{json, Value};

use super::ImApp;
use crate::cluster::inbox;
use crate::cluster::link::Addressed;
use crate::cluster::user::{error_frame, Sent, UserSend};
use crate::cluster::{ErrorCode, ProtocolError};
use crate::im::stats;
use crate::reactor::{Fd, Message, Server};

/// Connection attribute: the sends still waiting for their store.
const ATTR_PENDING: &str = "im.pending";

impl ImApp {
    /// A user's message: stored in `to`'s inbox (the sender is told it is,
    /// or why not), then sent on ([`Self::send_on`]). With `inbox = false`,
    /// sent on at once, unstamped.
    pub(super) fn route_message(
        &mut self,
        srv: &mut Server<Self>,
        fd: Fd,
        from: String,
        msg: UserSend,
    ) {
        let UserSend {
            to,
            data,
            reference,
        } = msg;
        let msg = Addressed::new(to, from, data);
        if !self.cfg.inbox {
            return self.send_on(srv, fd, msg);
        }
        if let Some(r) = &reference {
            pending_add(srv, fd, &msg.to, &msg.data, r);
        }
        let id = inbox::new_id();
        let store =
            self.feeds
                .inbox()
                .store(&msg.to, &id, &msg.from, &msg.data, reference.as_deref());
        srv.redis(
            store,
            move |app: &mut ImApp, srv, r: redis::RedisResult<inbox::StoredReply>| {
                if let Some(r) = &reference {
                    pending_remove(srv, fd, r);
                }
                match r {
                    Ok(v) => {
                        // A repeat (same ref) is confirmed with its first copy's
                        // seq and sent on again: each feed drops what it has.
                        let (stamp, _repeated) = inbox::parse_stored(v);
                        app.feeds.accepted(&msg.to, &stamp);
                        if let Some(r) = reference {
                            let sent = Sent {
                                sent: r,
                                id: stamp.id.clone(),
                                seq: stamp.seq,
                                epoch: stamp.epoch.clone(),
                            };
                            srv.push(fd, Message::Text(sent.to_text()));
                        }
                        stats::add(srv, stats::STORED, 1);
                        app.send_on(
                            srv,
                            fd,
                            Addressed {
                                stamp: Some(stamp),
                                ..msg
                            },
                        );
                    }
                    Err(e) => {
                        log::warn!("im: a message for {} was not stored: {e}", msg.to);
                        let err = ProtocolError::new(
                            ErrorCode::Unavailable,
                            format!(
                                "the message to {} was not stored ({e}); nothing was sent",
                                msg.to
                            ),
                        );
                        srv.push(fd, Message::Text(error_frame(&err, reference.as_deref())));
                    }
                }
            },
        );
    }

    /// A connection moved here: the sends it had pending on the worker it
    /// left are stored (again: idempotent by ref) and answered here.
    pub(super) fn resend_pending(
        &mut self,
        srv: &mut Server<Self>,
        fd: Fd,
        uid: &str,
        attrs: &std::collections::HashMap<String, Value>,
    ) {
        let Some(Value::Array(list)) = attrs.get(ATTR_PENDING) else {
            return;
        };
        for p in list.clone() {
            let (Some(to), Some(r)) = (p["to"].as_str(), p["ref"].as_str()) else {
                continue;
            };
            let m = UserSend {
                to: to.to_string(),
                data: p["data"].clone(),
                reference: Some(r.to_string()),
            };
            self.route_message(srv, fd, uid.to_string(), m);
        }
    }
}

fn pending_add<A: crate::event::App>(srv: &mut Server<A>, fd: Fd, to: &str, data: &Value, r: &str) {
    let mut list = match srv.remove_attr(fd, ATTR_PENDING) {
        Some(Value::Array(l)) => l,
        _ => Vec::new(),
    };
    list.push(json!({"to": to, "data": data, "ref": r}));
    srv.set_attr(fd, ATTR_PENDING, Value::Array(list));
}

fn pending_remove<A: crate::event::App>(srv: &mut Server<A>, fd: Fd, r: &str) {
    let Some(Value::Array(mut list)) = srv.remove_attr(fd, ATTR_PENDING) else {
        return;
    };
    if let Some(i) = list.iter().position(|p| p["ref"] == r) {
        list.remove(i);
    }
    if !list.is_empty() {
        srv.set_attr(fd, ATTR_PENDING, Value::Array(list));
    }
}
