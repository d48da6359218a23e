//! Who is online where: the user → connection records the IM servers write
//! and the Route reads.
//!
//! `P im_user:<uid>` ([`Keys::user`]) is a HASH with one field per connection,
//! `<server member>|<worker id>|<fd>`, whose value is the IM server's
//! instance epoch. A record is valid only while its server is registered
//! with the same epoch: when a server dies or restarts, every record of its
//! old instance is invalid at once (the Route filters them and deletes them
//! lazily); the key's TTL is only a last-resort sweep.

use std::collections::HashMap;

use crate::cluster::keys::Keys;
use crate::reactor::redis::Request;

/// One connection of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The IM server's registry member (`{"ip":…,"port":…}`).
    pub member: String,
    /// The IM worker holding it.
    pub worker: usize,
    /// The connection id within that worker.
    pub fd: u64,
    /// The IM server's instance epoch.
    pub epoch: String,
}

impl Presence {
    /// The record's HASH field, `<member>|<worker>|<fd>`.
    pub fn field(&self) -> String {
        format!("{}|{}|{}", self.member, self.worker, self.fd)
    }

    fn parse(field: &str, epoch: String) -> Option<Presence> {
        let mut it = field.rsplitn(3, '|');
        let fd = it.next()?.parse().ok()?;
        let worker = it.next()?.parse().ok()?;
        let member = it.next()?.to_string();
        Some(Presence {
            member,
            worker,
            fd,
            epoch,
        })
    }
}

/// Appends "record `p` for `uid` and extend the key's TTL" to `pipe`.
fn push_add(pipe: &mut redis::Pipeline, keys: &Keys, uid: &str, p: &Presence, ttl_secs: u64) {
    pipe.cmd("HSET")
        .arg(keys.user(uid))
        .arg(p.field())
        .arg(&p.epoch)
        .cmd("EXPIRE")
        .arg(keys.user(uid))
        .arg(ttl_secs);
}

/// Appends the presence event for `uid`: every Route worker caching the
/// user's location forgets it ([`Keys::presence_channel`]).
fn push_event(pipe: &mut redis::Pipeline, keys: &Keys, uid: &str) {
    pipe.cmd("PUBLISH").arg(keys.presence_channel()).arg(uid);
}

/// Records a connection of `uid` (and extends the key's TTL), then
/// announces it. One MULTI.
pub fn add(keys: &Keys, uid: &str, p: &Presence, ttl_secs: u64) -> Request {
    let mut pipe = redis::pipe();
    push_add(&mut pipe, keys, uid, p, ttl_secs);
    push_event(&mut pipe, keys, uid);
    Request::Atomic(pipe)
}

/// Moves a connection's record to its new worker/fd in one transaction
/// (HDEL + HSET + EXPIRE in MULTI): after a handover the connection has a
/// new id, and there is never a moment where `uid` looks offline.
pub fn rekey(keys: &Keys, uid: &str, old: &Presence, new: &Presence, ttl_secs: u64) -> Request {
    let mut pipe = redis::pipe();
    pipe.cmd("HDEL").arg(keys.user(uid)).arg(old.field());
    push_add(&mut pipe, keys, uid, new, ttl_secs);
    push_event(&mut pipe, keys, uid);
    Request::Atomic(pipe)
}

/// [`add`] for many connections, pipelined, without events (a refresh
/// rewrites what is already announced).
pub fn add_many(keys: &Keys, records: &[(String, Presence)], ttl_secs: u64) -> Request {
    let mut pipe = redis::pipe();
    for (uid, p) in records {
        push_add(&mut pipe, keys, uid, p, ttl_secs);
    }
    Request::Pipe(pipe)
}

/// Forgets a connection of `uid`, and announces it.
pub fn remove(keys: &Keys, uid: &str, p: &Presence) -> Request {
    let mut pipe = redis::pipe();
    pipe.cmd("HDEL").arg(keys.user(uid)).arg(p.field());
    push_event(&mut pipe, keys, uid);
    Request::Pipe(pipe)
}

/// Forgets several records of `uid` (stale ones the Route found).
pub fn remove_fields(keys: &Keys, uid: &str, stale: &[Presence]) -> Request {
    let mut cmd = redis::cmd("HDEL");
    cmd.arg(keys.user(uid));
    for p in stale {
        cmd.arg(p.field());
    }
    Request::Cmd(cmd)
}

/// Reads every record of `uid`, valid or not; parse the reply with
/// [`parse_all`].
pub fn all(keys: &Keys, uid: &str) -> Request {
    let mut c = redis::cmd("HGETALL");
    c.arg(keys.user(uid));
    Request::Cmd(c)
}

/// The records in an [`all`] reply.
pub fn parse_all(map: HashMap<String, String>) -> Vec<Presence> {
    map.into_iter()
        .filter_map(|(f, e)| Presence::parse(&f, e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_with_pipes_in_the_member() {
        let p = Presence {
            member: r#"{"ip":"127.0.0.2","port":9000}"#.into(),
            worker: 1,
            fd: 42,
            epoch: "e".into(),
        };
        assert_eq!(Presence::parse(&p.field(), "e".into()), Some(p));
        assert_eq!(Presence::parse("garbage", "e".into()), None);
    }
}
