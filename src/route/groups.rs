//! The Route's side of groups ([`crate::cluster::groups`]): the group API
//! (`/api/groups/join`, `/leave`, `/send`, `/members`, and `/api/kick`),
//! users' group messages from their IM servers, and the fan-out: a group
//! message is stored once in the group's stream, then handed once to each
//! IM server the counts hash names (servers with at least one member
//! online, registered under the same epoch), never to the others. Each IM
//! server delivers to its local members.
//!
//! A join or leave is complete (answered) once Redis has it; the IM
//! servers holding the user are told afterwards (`group_joined`,
//! `group_left`). A joiner's server that learns of the join after a group
//! message went by catches the member up from the group's stream (from
//! the gseq of its join); a leaver's server that has not heard yet sees a
//! newer membership version on the next message and asks Redis who is
//! still a member before it delivers. So no member misses a message sent
//! after its join completed, and none gets one sent after its leave did.

use redis::RedisResult;
use serde_json::{json, Map, Value};

use crate::cluster::groups::{self, GroupMessage, Membership, Sent, GROUP_RULE};
use crate::cluster::inbox::new_id;
use crate::cluster::link::{GroupEvent, GroupRefused, GroupSend, GroupSent, Kick, RouteFrame};
use crate::cluster::{valid_uid, ErrorCode, ProtocolError};
use crate::reactor::{Fd, Message, Request, Response, Server};
use crate::route::answers::{answer, bad};
use crate::route::cache::Cache;
use crate::route::delivery::{Delivery, DeliveryHost, Waiting};
use crate::route::registrations::Registrations;
use crate::route::settings::RouteSettings;

/// What a members page reads: `SSCAN`'s (cursor, uids), `SCARD`, the counts.
type MembersPage = ((String, Vec<String>), u64, Vec<(String, i64)>);

/// Members per `/api/groups/members` page.
const PAGE: usize = 100;

fn body(req: &Request) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad(400, "bad_request", "the body must be a JSON object")),
        Err(e) => Err(bad(400, "bad_json", &format!("the body is not JSON: {e}"))),
    }
}

fn group_of(v: Option<&Value>) -> Result<String, Response> {
    match v.and_then(Value::as_str) {
        Some(g) if groups::valid_group(g) => Ok(g.to_string()),
        _ => Err(bad(
            400,
            "bad_request",
            &format!("field `group`: {GROUP_RULE}"),
        )),
    }
}

fn uid_of(v: Option<&Value>) -> Result<String, Response> {
    match v.and_then(Value::as_str) {
        Some(u) if valid_uid(u) => Ok(u.to_string()),
        _ => Err(bad(
            400,
            "bad_request",
            "field `uid` (a valid uid string) is required",
        )),
    }
}

fn group_and_uid(req: &Request) -> Result<(String, String), Response> {
    let b = body(req)?;
    Ok((group_of(b.get("group"))?, uid_of(b.get("uid"))?))
}

/// `POST /api/groups/join {"group","uid"}`: the user's set (its limit),
/// then the group's (its limit; refused: undone from the user's set);
/// answers `{"group","uid","members"}`. Two steps in two slots, in the
/// order [`leave`] explains.
pub fn join<A: DeliveryHost>(srv: &mut Server<A>, d: &Delivery, req: &Request) -> Response {
    let (group, uid) = match group_and_uid(req) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let http = req.fd;
    let per_user = d.groups().limits.per_user;
    srv.redis(
        d.groups().user_join(&group, &uid),
        move |app: &mut A, srv, r: RedisResult<i64>| match r {
            Err(e) => {
                srv.respond(http, bad(503, "unavailable", &format!("Redis: {e}")));
            }
            Ok(-1) => {
                let why = format!("{uid} is in {per_user} groups already (group_max_per_user)");
                srv.respond(http, bad(403, "limit", &why));
            }
            Ok(_) => {
                let (d, _, _) = app.delivery_parts();
                let call = d.groups().join(&group, &uid);
                let max = d.groups().limits.members;
                srv.redis(
                    call,
                    move |app: &mut A, srv, r: RedisResult<(u64, u64, u64, String, i64)>| {
                        let (d, cache, regs) = app.delivery_parts();
                        let resp = match r {
                            Err(e) => bad(503, "unavailable", &format!("Redis: {e}")),
                            Ok((_, _, _, _, -1)) => {
                                srv.redis_send(d.groups().user_leave(&group, &uid));
                                bad(
                                    403,
                                    "limit",
                                    &format!(
                                        "{group} has {max} members already (group_max_members)"
                                    ),
                                )
                            }
                            Ok((members, gseq, mver, epoch, added)) => {
                                let m = Membership {
                                    group,
                                    uid,
                                    epoch,
                                    gseq,
                                    mver,
                                };
                                let frame =
                                    (added == 1).then(|| RouteFrame::GroupJoined(m.clone()));
                                changed(srv, d, cache, regs, m, frame, "join", members)
                            }
                        };
                        srv.respond(http, resp);
                    },
                );
            }
        },
    );
    Response::later()
}

/// `POST /api/groups/leave {"group","uid"}`: the group's side, then (once
/// that is done) the user's set; answers `{"group","uid","members"}`.
///
/// Two steps in two slots (`group:{G}…`, `user_groups:{U}`), in this order
/// so that a failure between them leaves the group in the user's set, which
/// a connect ignores (not a member) and a repeated leave removes; the other
/// order could leave a member missing from its set, whose server would not
/// count it and so not receive the group's messages (see
/// [`crate::cluster::groups`]).
pub fn leave<A: DeliveryHost>(srv: &mut Server<A>, d: &Delivery, req: &Request) -> Response {
    let (group, uid) = match group_and_uid(req) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let http = req.fd;
    srv.redis(
        d.groups().leave(&group, &uid),
        move |app: &mut A, srv, r: RedisResult<(u64, u64, u64, i64)>| {
            let (d, cache, regs) = app.delivery_parts();
            let resp = match r {
                Err(e) => bad(503, "unavailable", &format!("Redis: {e}")),
                Ok((members, gseq, mver, removed)) => {
                    srv.redis_send(d.groups().user_leave(&group, &uid));
                    let epoch = String::new();
                    let m = Membership {
                        group,
                        uid,
                        epoch,
                        gseq,
                        mver,
                    };
                    let frame = (removed == 1).then(|| RouteFrame::GroupLeft(m.clone()));
                    changed(srv, d, cache, regs, m, frame, "leave", members)
                }
            };
            srv.respond(http, resp);
        },
    );
    Response::later()
}

/// A join or leave is in Redis: when it changed the membership (`frame`
/// is the news for the user's servers), tell them and the members'
/// presence; the answer `{"group","uid","members"}`.
#[allow(clippy::too_many_arguments)]
fn changed<A: DeliveryHost>(
    srv: &mut Server<A>,
    d: &mut Delivery,
    cache: &Cache,
    regs: &Registrations,
    m: Membership,
    frame: Option<RouteFrame>,
    event: &str,
    members: u64,
) -> Response {
    if let Some(f) = frame {
        notify(srv, d, cache, regs, &m.uid, f);
        presence(srv, d, &m.group, event, &m.uid, members);
    }
    answer(
        200,
        &json!({"group": m.group, "uid": m.uid, "members": members}),
    )
}

/// Tells the IM servers holding `uid` (not waited for).
fn notify<A: DeliveryHost>(
    srv: &mut Server<A>,
    d: &mut Delivery,
    cache: &Cache,
    regs: &Registrations,
    uid: &str,
    frame: RouteFrame,
) {
    let w = Waiting::Notify {
        uid: uid.to_string(),
        frame: frame.to_text(),
        http: None,
    };
    d.submit(srv, cache, regs, uid, w);
}

/// A presence event for the group's members, when the settings want one
/// and the group is small enough (`group_presence_max`).
fn presence<A: DeliveryHost>(
    srv: &mut Server<A>,
    d: &Delivery,
    group: &str,
    event: &str,
    uid: &str,
    members: u64,
) {
    let (on, max) = d.group_presence;
    if !on || members > max {
        return;
    }
    let frame = RouteFrame::GroupEvent(GroupEvent {
        group: group.into(),
        event: event.into(),
        uid: uid.into(),
    })
    .to_text();
    let mut c = redis::cmd("HKEYS");
    c.arg(d.groups().counts_key(group));
    let group = group.to_string();
    srv.redis(c, move |app: &mut A, srv, r: RedisResult<Vec<String>>| {
        let (d, cache, regs) = app.delivery_parts();
        if let Ok(fields) = r {
            fan_out(srv, d, cache, regs, &group, &fields, &frame);
        }
    });
}

/// Hands `frame` to each server of `fields` (`<member>|<epoch>`) that is
/// registered under that epoch; returns how many. Fields of another
/// instance of a registered server are dead (that instance is gone) and
/// deleted, not waited for; those of an unregistered server are skipped
/// (it may be silent inside its grace time).
pub fn fan_out<A: DeliveryHost>(
    srv: &mut Server<A>,
    d: &Delivery,
    cache: &Cache,
    regs: &Registrations,
    group: &str,
    fields: &[String],
    frame: &str,
) -> usize {
    let mut n = 0;
    let mut dead = Vec::new();
    for f in fields {
        let Some((member, epoch)) = f.rsplit_once('|') else {
            continue;
        };
        match cache.entry(member) {
            Some(e) if e.epoch == epoch => n += usize::from(d.relay(srv, regs, e, frame)),
            Some(_) => dead.push(f.clone()),
            None => {}
        }
    }
    if !dead.is_empty() {
        let mut c = redis::cmd("HDEL");
        c.arg(d.groups().counts_key(group)).arg(dead);
        srv.redis_send(c);
    }
    n
}

/// Stores a group message and fans it out; `member`: the sending user
/// (None: the API). The callback gets the outcome and how many servers.
fn store_and_fan_out<A: DeliveryHost>(
    srv: &mut Server<A>,
    d: &Delivery,
    group: String,
    from: String,
    data: Value,
    member: Option<String>,
    done: impl FnOnce(&mut Server<A>, RedisResult<(Sent, usize)>) + 'static,
) {
    let id = new_id();
    let call = d
        .groups()
        .send(&group, &id, &from, &data, member.as_deref());
    srv.redis(
        call,
        move |app: &mut A, srv, r: RedisResult<Vec<redis::Value>>| {
            let (d, cache, regs) = app.delivery_parts();
            let out = groups::parse_sent(r).map(|sent| {
                let n = match &sent {
                    Sent::Stored {
                        stamp,
                        mver,
                        servers,
                    } => {
                        d.accepted_group(&group, stamp);
                        let msg = GroupMessage {
                            group,
                            from,
                            data,
                            stamp: stamp.clone(),
                            mver: *mver,
                        };
                        let group = msg.group.clone();
                        let frame = RouteFrame::GroupDeliver(msg).to_text();
                        fan_out(srv, d, cache, regs, &group, servers, &frame)
                    }
                    _ => 0,
                };
                (sent, n)
            });
            done(srv, out);
        },
    );
}

/// `POST /api/groups/send {"group","data"[,"from"]}`: answers
/// `{"group","gseq","id","servers"}`; 404 when the group has no members.
pub fn send<A: DeliveryHost>(srv: &mut Server<A>, d: &Delivery, req: &Request) -> Response {
    let mut b = match body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let group = match group_of(b.get("group")) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let Some(data) = b.remove("data") else {
        return bad(400, "bad_request", "field `data` is required");
    };
    let from = b
        .get("from")
        .and_then(Value::as_str)
        .unwrap_or("api")
        .to_string();
    let http = req.fd;
    let g = group.clone();
    store_and_fan_out(srv, d, group, from, data, None, move |srv, r| {
        let resp = match r {
            Err(e) => bad(
                503,
                "unavailable",
                &format!("the message could not be stored (Redis: {e}); nothing was sent"),
            ),
            Ok((Sent::Stored { stamp, .. }, n)) => answer(
                200,
                &json!({"group": g, "gseq": stamp.seq, "id": stamp.id, "servers": n}),
            ),
            Ok(_) => bad(404, "no_such_group", &format!("{g} has no members")),
        };
        srv.respond(http, resp);
    });
    Response::later()
}

/// A user's group message from its IM server (link `link`): stored and
/// fanned out, or refused; the sender is told either way.
pub fn from_user<A: DeliveryHost>(
    srv: &mut Server<A>,
    d: &Delivery,
    cfg: &RouteSettings,
    link: Fd,
    m: GroupSend,
) {
    let GroupSend {
        group,
        from,
        data,
        reference,
        sender,
    } = m;
    let refuse = |srv: &mut Server<A>,
                  code: ErrorCode,
                  why: String,
                  reference: Option<String>,
                  sender: String| {
        let f = RouteFrame::GroupRefused(GroupRefused {
            sender,
            reference,
            error: ProtocolError::new(code, why),
        });
        srv.push(link, Message::Text(f.to_text()));
    };
    if !cfg.user_group_send {
        return refuse(
            srv,
            ErrorCode::Unauthorized,
            "users may not send to groups here (user_group_send = false)".into(),
            reference,
            sender,
        );
    }
    if !groups::valid_group(&group) {
        return refuse(
            srv,
            ErrorCode::BadRequest,
            GROUP_RULE.into(),
            reference,
            sender,
        );
    }
    let g = group.clone();
    store_and_fan_out(
        srv,
        d,
        group,
        from.clone(),
        data,
        Some(from),
        move |srv, r| {
            let frame = match r {
                Ok((Sent::Stored { stamp, .. }, _)) => RouteFrame::GroupSent(GroupSent {
                    sender,
                    reference,
                    group: g,
                    gseq: stamp.seq,
                    id: stamp.id,
                }),
                Ok((Sent::NotMember | Sent::NoGroup, _)) => {
                    RouteFrame::GroupRefused(GroupRefused {
                        sender,
                        reference,
                        error: ProtocolError::new(
                            ErrorCode::NotMember,
                            format!("you are not a member of {g}"),
                        ),
                    })
                }
                Err(e) => RouteFrame::GroupRefused(GroupRefused {
                    sender,
                    reference,
                    error: ProtocolError::new(
                        ErrorCode::Unavailable,
                        format!("the message to {g} was not stored ({e}); nothing was sent"),
                    ),
                }),
            };
            srv.push(link, Message::Text(frame.to_text()));
        },
    );
}

/// `GET /api/groups/members?group=G[&cursor=C]`.
pub fn members<A: DeliveryHost>(srv: &mut Server<A>, d: &Delivery, req: &Request) -> Response {
    let group = match group_of(req.query_param("group").map(|g| Value::from(&*g)).as_ref()) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let cursor = req.query_param("cursor").unwrap_or("0".into());
    if cursor.parse::<u64>().is_err() {
        return bad(
            400,
            "bad_request",
            "cursor must be the `cursor` of the previous page",
        );
    }
    let http = req.fd;
    srv.redis(
        d.groups().members_page(&group, &cursor, PAGE),
        move |app: &mut A, srv, r: RedisResult<MembersPage>| {
            let (_, cache, _) = app.delivery_parts();
            let resp = match r {
                Err(e) => bad(503, "unavailable", &format!("Redis: {e}")),
                Ok(((next, uids), count, counts)) => {
                    // Online: members counted by the live servers (one per
                    // IM worker holding a member: a user connected to two
                    // workers counts twice).
                    let online: i64 = counts
                        .iter()
                        .filter(|(f, _)| {
                            f.rsplit_once('|').is_some_and(|(m, e)| cache.entry(m).is_some_and(|x| x.epoch == e))
                        })
                        .map(|(_, n)| (*n).max(0))
                        .sum();
                    let cursor = (next != "0").then_some(next);
                    answer(200, &json!({"group": group, "count": count, "online": online, "members": uids, "cursor": cursor}))
                }
            };
            srv.respond(http, resp);
        },
    );
    Response::later()
}

/// `POST /api/kick {"uid"[,"reason"]}`: closes every connection of the
/// user with 4000 and the reason; answers `{"uid","servers"}`.
pub fn kick<A: DeliveryHost>(
    srv: &mut Server<A>,
    d: &mut Delivery,
    cache: &Cache,
    regs: &Registrations,
    req: &Request,
) -> Response {
    let b = match body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let uid = match uid_of(b.get("uid")) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let reason: String = b
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("kicked")
        .chars()
        .take(100)
        .collect();
    let frame = RouteFrame::Kick(Kick {
        uid: uid.clone(),
        reason,
    })
    .to_text();
    d.submit(
        srv,
        cache,
        regs,
        &uid,
        Waiting::Notify {
            uid: uid.clone(),
            frame,
            http: Some(req.fd),
        },
    );
    Response::later()
}
