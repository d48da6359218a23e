//! Who is online where: the user → connection records the IM servers write
//! and the Route reads.
//!
//! `P im_user:<uid>` ([`Keys::user`]) is a HASH with one field per connection,
//! `<server member>|<worker id>|<fd>`, whose value is the IM server's
//! instance epoch. A record is valid only while its server is registered
//! with the same epoch: when a server dies or restarts, every record of its
//! old instance is invalid at once (the Route filters them and deletes them
//! lazily); the key's TTL is only a last-resort sweep.

use redis::{Connection, RedisResult};

use crate::cluster::keys::Keys;

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
        .ignore()
        .cmd("EXPIRE")
        .arg(keys.user(uid))
        .arg(ttl_secs)
        .ignore();
}

/// Records a connection of `uid` (and extends the key's TTL).
pub fn add(
    c: &mut Connection,
    keys: &Keys,
    uid: &str,
    p: &Presence,
    ttl_secs: u64,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    push_add(&mut pipe, keys, uid, p, ttl_secs);
    pipe.query(c)
}

/// Moves a connection's record to its new worker/fd in one transaction
/// (HDEL + HSET + EXPIRE in MULTI): after a handover the connection has a
/// new id, and there is never a moment where `uid` looks offline.
pub fn rekey(
    c: &mut Connection,
    keys: &Keys,
    uid: &str,
    old: &Presence,
    new: &Presence,
    ttl_secs: u64,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("HDEL")
        .arg(keys.user(uid))
        .arg(old.field())
        .ignore();
    push_add(&mut pipe, keys, uid, new, ttl_secs);
    pipe.query(c)
}

/// [`add`] for many connections in one pipelined round trip.
pub fn add_many(
    c: &mut Connection,
    keys: &Keys,
    records: &[(String, Presence)],
    ttl_secs: u64,
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    for (uid, p) in records {
        push_add(&mut pipe, keys, uid, p, ttl_secs);
    }
    pipe.query(c)
}

/// Forgets a connection of `uid`.
pub fn remove(c: &mut Connection, keys: &Keys, uid: &str, p: &Presence) -> RedisResult<()> {
    redis::cmd("HDEL")
        .arg(keys.user(uid))
        .arg(p.field())
        .query(c)
}

/// Forgets several records of `uid` (stale ones the Route found).
pub fn remove_fields(
    c: &mut Connection,
    keys: &Keys,
    uid: &str,
    stale: &[Presence],
) -> RedisResult<()> {
    if stale.is_empty() {
        return Ok(());
    }
    let mut cmd = redis::cmd("HDEL");
    cmd.arg(keys.user(uid));
    for p in stale {
        cmd.arg(p.field());
    }
    cmd.query(c)
}

/// Every record of `uid`, valid or not.
pub fn all(c: &mut Connection, keys: &Keys, uid: &str) -> RedisResult<Vec<Presence>> {
    let map: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(keys.user(uid)).query(c)?;
    Ok(map
        .into_iter()
        .filter_map(|(f, e)| Presence::parse(&f, e))
        .collect())
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
