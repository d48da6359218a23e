//! Who is online where: the user → connection records the IM servers write
//! and the Route reads.
//!
//! `P im_user:{<uid>}` ([`Keys::user`], the uid's slot) is a HASH with one
//! field per connection, `<server member>|<worker id>|<fd>`, whose value is
//! the IM server's instance epoch. A record is valid only while its server
//! is registered with the same epoch: when a server dies or restarts, every
//! record of its old instance is invalid at once (the Route filters them
//! and deletes them lazily); the key's TTL is only a last-resort sweep.
//! Every write is announced on the uid's presence partition
//! ([`Keys::presence_channel`]; see [`Announced`] for how the two are sent).

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

/// A presence write of one user and the event that announces it
/// ([`Keys::presence_channel`]: every Route worker caching the user's
/// location forgets it).
///
/// The write and the event are in different slots (the user's, and the
/// user's presence partition), so on a Redis Cluster they cannot be one
/// MULTI (CROSSSLOT), and sent side by side they go to different nodes,
/// where the event could overtake the write: a Route reading the user
/// again on the event would cache what the write was about to change. So
/// on a cluster the event is sent once the write's reply is in
/// ([`Announced::split`]); on a single server both stay one MULTI
/// ([`Announced::together`]), atomic, with no round trip in between, and
/// not lost when a stopping worker ends before the reply arrives.
#[derive(Clone)]
pub struct Announced {
    write: Vec<redis::Cmd>, // commands on the user's key, in order
    event: redis::Cmd,      // the PUBLISH
}

impl std::fmt::Debug for Announced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Announced({} commands + PUBLISH)", self.write.len())
    }
}

impl Announced {
    fn new(keys: &Keys, uid: &str) -> Announced {
        let mut event = redis::cmd("PUBLISH");
        event.arg(keys.presence_channel(uid)).arg(uid);
        Announced {
            write: Vec::new(),
            event,
        }
    }

    /// Appends "record `p` for `uid` and extend the key's TTL".
    fn add(mut self, keys: &Keys, uid: &str, p: &Presence, ttl_secs: u64) -> Announced {
        let key = keys.user(uid);
        let mut hset = redis::cmd("HSET");
        hset.arg(&key).arg(p.field()).arg(&p.epoch);
        let mut expire = redis::cmd("EXPIRE");
        expire.arg(key).arg(ttl_secs);
        self.write.extend([hset, expire]);
        self
    }

    /// Appends "forget record `p` of `uid`".
    fn del(mut self, keys: &Keys, uid: &str, p: &Presence) -> Announced {
        let mut c = redis::cmd("HDEL");
        c.arg(keys.user(uid)).arg(p.field());
        self.write.push(c);
        self
    }

    /// The write and the event as one MULTI (a single Redis server).
    pub fn together(self) -> Request {
        let mut pipe = redis::pipe();
        for c in self.write {
            pipe.add_command(c);
        }
        pipe.add_command(self.event);
        Request::Atomic(pipe)
    }

    /// The write (one MULTI on the user's slot, or its only command) and
    /// the event to send after its reply (a Redis Cluster).
    pub fn split(mut self) -> (Request, Request) {
        let write = if self.write.len() == 1 {
            Request::Cmd(self.write.remove(0))
        } else {
            let mut pipe = redis::pipe();
            for c in self.write {
                pipe.add_command(c);
            }
            Request::Atomic(pipe)
        };
        (write, Request::Cmd(self.event))
    }
}

/// Records a connection of `uid` (and extends the key's TTL), announced.
pub fn add(keys: &Keys, uid: &str, p: &Presence, ttl_secs: u64) -> Announced {
    Announced::new(keys, uid).add(keys, uid, p, ttl_secs)
}

/// Moves a connection's record to its new worker/fd in one transaction
/// (HDEL + HSET + EXPIRE in MULTI), announced: after a handover the
/// connection has a new id, and there is never a moment where `uid` looks
/// offline.
pub fn rekey(keys: &Keys, uid: &str, old: &Presence, new: &Presence, ttl_secs: u64) -> Announced {
    Announced::new(keys, uid)
        .del(keys, uid, old)
        .add(keys, uid, new, ttl_secs)
}

/// [`add`] for many connections, pipelined, without events (a refresh
/// rewrites what is already announced). On a cluster each command goes to
/// its own user's slot.
pub fn add_many(keys: &Keys, records: &[(String, Presence)], ttl_secs: u64) -> Request {
    let mut pipe = redis::pipe();
    for (uid, p) in records {
        for c in Announced::new(keys, uid).add(keys, uid, p, ttl_secs).write {
            pipe.add_command(c);
        }
    }
    Request::Pipe(pipe)
}

/// Forgets a connection of `uid`, announced.
pub fn remove(keys: &Keys, uid: &str, p: &Presence) -> Announced {
    Announced::new(keys, uid).del(keys, uid, p)
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

    #[test]
    fn writes_are_one_slot_and_events_go_to_the_uids_partition() {
        use crate::cluster::keys::slots::{one_slot, request_keys};
        use crate::reactor::redis::slot_of;
        let keys = Keys::new("p:");
        let p = |fd| Presence {
            member: r#"{"ip":"127.0.0.2","port":9000}"#.into(),
            worker: 1,
            fd,
            epoch: "e".into(),
        };
        let user = slot_of(keys.user("u1").as_bytes());
        for a in [
            add(&keys, "u1", &p(1), 60),
            rekey(&keys, "u1", &p(1), &p(2), 60),
            remove(&keys, "u1", &p(1)),
        ] {
            let (write, event) = a.clone().split();
            assert_eq!(one_slot(&write), user, "{write:?}");
            assert_eq!(
                request_keys(&event),
                vec![keys.presence_channel("u1").as_bytes().to_vec()]
            );
            let Request::Atomic(together) = a.together() else {
                panic!("one MULTI on a single server")
            };
            let last = together.cmd_iter().last().map(|c| c.get_packed_command());
            assert_eq!(last, event_packed(&event));
        }
        assert!(matches!(
            remove(&keys, "u1", &p(1)).split().0,
            Request::Cmd(_)
        ));
        let many = add_many(&keys, &[("u1".into(), p(1)), ("u2".into(), p(2))], 60);
        assert_eq!(request_keys(&many).len(), 4);
    }

    fn event_packed(r: &Request) -> Option<Vec<u8>> {
        match r {
            Request::Cmd(c) => Some(c.get_packed_command()),
            _ => None,
        }
    }
}
