//! The Route's side of the inbox ([`crate::cluster::inbox`]): accepting
//! `POST /api/send` (the message is stored first, then handed to
//! [`crate::route::delivery`], and the answer names its `id` and `seq`),
//! and `GET /api/message`, a message's delivery status.
//!
//! | status | meaning |
//! |--------|---------|
//! | `queued` | stored; no connection of the user has been pushed it |
//! | `delivered` | pushed to at least one connection of the user |
//! | `acked` | the user acknowledged it (cumulatively) |
//!
//! 404: the message is unknown, or trimmed by the inbox's bounds, or
//! belongs to an epoch Redis no longer holds.

use redis::RedisResult;

use crate::cluster::inbox::{self, Inbox};
use crate::cluster::link::Addressed;
use crate::cluster::valid_uid;
use crate::reactor::{Fd, Request, Response, Server};
use crate::route::answers::{answer, bad, MessageStatus, Refusal};
use crate::route::delivery::{DeliveryHost, Waiting};

/// Stores `msg` in `inbox` (once per `reference` of its sender), then
/// hands it to the delivery, which answers `http`; 503 when it could not
/// be stored (nothing was sent).
pub fn send<A: DeliveryHost>(
    srv: &mut Server<A>,
    inbox: &Inbox,
    msg: Addressed,
    reference: Option<&str>,
    http: Fd,
) {
    let id = inbox::new_id();
    srv.redis(
        inbox.store(&msg.to, &id, &msg.from, &msg.data, reference),
        move |app: &mut A, srv, r: RedisResult<inbox::StoredReply>| match r {
            Ok(v) => {
                let uid = msg.to.clone();
                let (stamp, repeated) = inbox::parse_stored(v);
                let msg = Addressed {
                    stamp: Some(stamp),
                    ..msg
                };
                if !repeated {
                    crate::route::stats::count(srv.row(), crate::route::stats::STORED);
                }
                let (d, cache, regs) = app.delivery_parts();
                if let Some(stamp) = &msg.stamp {
                    d.accepted(&uid, stamp);
                }
                d.submit(srv, cache, regs, &uid, Waiting::Send { msg, http });
            }
            Err(e) => {
                log::warn!("route: a message for {} was not stored: {e}", msg.to);
                let why = format!("the message could not be stored (Redis: {e}); nothing was sent");
                srv.respond(http, bad(503, "unavailable", &why));
            }
        },
    );
}

/// `GET /api/message?uid=U&seq=N`.
pub fn status<A: DeliveryHost>(srv: &mut Server<A>, inbox: &Inbox, req: &Request) -> Response {
    let Some(uid) = req.query_param("uid").filter(|u| valid_uid(u)) else {
        return bad(
            400,
            "bad_request",
            "a valid uid query parameter is required",
        );
    };
    let Some(seq) = req
        .query_param("seq")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
    else {
        return bad(
            400,
            "bad_request",
            "a seq query parameter (a positive integer) is required",
        );
    };
    let mut p = redis::pipe();
    p.cmd("XRANGE")
        .arg(inbox.stream_key(&uid))
        .arg(format!("{seq}-0"))
        .arg(format!("{seq}-0"));
    p.cmd("HMGET")
        .arg(inbox.meta_key(&uid))
        .arg("epoch")
        .arg("dlv")
        .arg("acked");
    let (uid, http) = (uid.to_string(), req.fd);
    srv.redis(
        p,
        move |_: &mut A, srv, r: RedisResult<(redis::Value, Vec<Option<String>>)>| {
            srv.respond(http, answer_status(&uid, seq, r));
        },
    );
    Response::later()
}

/// The answer from the entry and the user's marks.
fn answer_status(
    uid: &str,
    seq: u64,
    r: RedisResult<(redis::Value, Vec<Option<String>>)>,
) -> Response {
    let (entry, meta) = match r {
        Ok(v) => v,
        Err(e) => return bad(503, "unavailable", &format!("Redis: {e}")),
    };
    let Some(e) = inbox::parse_entries(entry)
        .into_iter()
        .find(|e| e.seq == seq)
    else {
        return not_found(uid);
    };
    let field = |i: usize| meta.get(i).cloned().flatten();
    let Some(epoch) = field(0) else {
        return not_found(uid);
    };
    let mark = |i: usize| field(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = if seq <= mark(2) {
        "acked"
    } else if seq <= mark(1) {
        "delivered"
    } else {
        "queued"
    };
    answer(
        200,
        &MessageStatus {
            uid,
            seq,
            id: &e.id,
            epoch: &epoch,
            status,
        },
    )
}

/// No such message.
fn not_found(uid: &str) -> Response {
    answer(
        404,
        &Refusal {
            uid: Some(uid),
            message: Some("no such message: unknown, trimmed, or lost with its epoch"),
            ..Refusal::new("not_found")
        },
    )
}
