//! The Redis key schema: every key and channel name the cluster uses,
//! built from `redis_prefix` (empty: the seed's names), and the slot plan
//! that makes each of them safe on a Redis Cluster.
//!
//! The rule: everything one Lua script or one MULTI touches shares one
//! hash tag (the part of a name between the first `{` and the next `}`,
//! [`crate::reactor::redis::slot_of`]). The seed's set keeps its bare name
//! `P im_server`; its companions are tagged with that name, `{P im_server}`,
//! and a tag equal to a bare key's name hashes to that key's slot, so the
//! registry's five names live in one slot and programs reading the seed's
//! set still find it under its old name.
//!
//! | key | type | tag (slot) | owner |
//! |-----|------|------------|-------|
//! | `P im_server` | SET | `P im_server` (the registry's slot) | the seed's set, `{"ip":"…","port":N}` |
//! | `{P im_server}:lease` | ZSET | the registry's slot | member → lease expiry (Unix ms) |
//! | `{P im_server}:details` | HASH | the registry's slot | member → JSON [`crate::cluster::servers::ServerEntry`] |
//! | `{P im_server}:by_name` | HASH | the registry's slot | serviceName → member |
//! | `{P im_server}:events` | channel | the registry's slot | registry changes |
//! | `P im_user:{<uid>}` | HASH | `<uid>` | presence records ([`crate::cluster::presence`]) |
//! | `P im_route:{<uid>}` | STRING | `<uid>` | the server `/route` chose |
//! | `P im_user:events:{<t>}` | channel | one of [`PRESENCE_PARTITIONS`] tags | presence events, by the uid's partition |
//! | `P route:worker:<node>/<pid>` | channel | the whole name | frames for one Route worker's IM servers |
//! | `P route:broadcast` | channel | the whole name | frames for every IM server |
//!
//! A prefix may not contain `{` or `}` (the configuration refuses it): it
//! would become, or break, the tag.

use std::sync::OnceLock;

use crate::reactor::redis::slot::{slot_of, SLOTS};

/// How many channels presence events are spread over (fixed: every IM
/// server and Route worker of a cluster must agree on it). An event for
/// `uid` goes to partition `slot(uid) × P / 16384`; every Route worker
/// subscribes to all of them. On a Redis Cluster each partition is a
/// sharded channel in its own slot range, so the events of every
/// connect and disconnect are spread over the cluster's shards instead of
/// all landing on one.
pub const PRESENCE_PARTITIONS: usize = 16;

/// The hash tag of each presence partition: partition `i`'s is the
/// smallest decimal number whose slot falls in `[i × 16384 / P, (i + 1) ×
/// 16384 / P)`, so the channels are spread evenly over the slot space.
/// Computed once per process; the same everywhere.
pub fn partition_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; PRESENCE_PARTITIONS];
        let mut left = PRESENCE_PARTITIONS;
        let mut n: u64 = 0;
        while left > 0 {
            let tag = n.to_string();
            let i = partition_of_slot(slot_of(tag.as_bytes()));
            if tags[i].is_none() {
                tags[i] = Some(tag);
                left -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(Option::unwrap_or_default).collect()
    })
}

/// The presence partition whose slot range holds `slot`.
fn partition_of_slot(slot: u16) -> usize {
    usize::from(slot) * PRESENCE_PARTITIONS / SLOTS
}

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// The seed's set.
    pub set: String,
    /// Lease ZSET.
    pub lease: String,
    /// Details HASH.
    pub details: String,
    /// serviceName → member HASH.
    pub by_name: String,
    /// Registry change notifications channel (in the registry's slot: the
    /// registry's scripts publish on it).
    pub channel: String,
    presence: Vec<String>, // the presence partitions' channels
}

impl Keys {
    /// Keys under `prefix` (empty: the seed's names).
    pub fn new(prefix: &str) -> Keys {
        let set = format!("{prefix}im_server");
        Keys {
            prefix: prefix.to_string(),
            lease: format!("{{{set}}}:lease"),
            details: format!("{{{set}}}:details"),
            by_name: format!("{{{set}}}:by_name"),
            channel: format!("{{{set}}}:events"),
            presence: partition_tags()
                .iter()
                .map(|t| format!("{prefix}im_user:events:{{{t}}}"))
                .collect(),
            set,
        }
    }

    /// `uid`'s presence records.
    pub fn user(&self, uid: &str) -> String {
        format!("{}im_user:{{{uid}}}", self.prefix)
    }

    /// `uid`'s last routing decision.
    pub fn route(&self, uid: &str) -> String {
        format!("{}im_route:{{{uid}}}", self.prefix)
    }

    /// The channel of Route worker `node_pid` (`<node>/<pid>`).
    pub fn worker_channel(&self, node_pid: &str) -> String {
        format!("{}route:worker:{node_pid}", self.prefix)
    }

    /// The presence partition of `uid`: the one whose slot range holds the
    /// uid's own keys.
    pub fn presence_partition(&self, uid: &str) -> usize {
        partition_of_slot(slot_of(self.user(uid).as_bytes()))
    }

    /// The channel IM servers announce `uid`'s presence changes on (the
    /// payload is the uid): Route workers drop the user's cached location.
    pub fn presence_channel(&self, uid: &str) -> &str {
        &self.presence[self.presence_partition(uid)]
    }

    /// Every presence partition's channel (a Route worker subscribes to
    /// all of them).
    pub fn presence_channels(&self) -> &[String] {
        &self.presence
    }

    /// The channel every Route worker listens to.
    pub fn broadcast_channel(&self) -> String {
        format!("{}route:broadcast", self.prefix)
    }
}

/// Test helpers: the keys a request touches, and the check that they
/// share a slot.
#[cfg(test)]
pub(crate) mod slots {
    use crate::reactor::redis::{slot_of, Request, ScriptCall};

    /// The KEYS of a script call (from its `EVAL` command).
    pub fn script_keys(call: &ScriptCall) -> Vec<Vec<u8>> {
        let args: Vec<Vec<u8>> = call
            .eval_cmd()
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                redis::Arg::Cursor => Vec::new(),
            })
            .collect();
        let n: usize = String::from_utf8_lossy(&args[2]).parse().unwrap();
        args[3..3 + n].to_vec()
    }

    /// The keys a request touches: a script's KEYS, or the first argument
    /// of each command (every command this crate sends in a MULTI is keyed
    /// by its first argument).
    pub fn request_keys(req: &Request) -> Vec<Vec<u8>> {
        let first = |c: &redis::Cmd| match c.args_iter().nth(1) {
            Some(redis::Arg::Simple(b)) => b.to_vec(),
            _ => Vec::new(),
        };
        match req {
            Request::Script(s) => script_keys(s),
            Request::Cmd(c) => vec![first(c)],
            Request::Pipe(p) | Request::Atomic(p) => p.cmd_iter().map(first).collect(),
        }
    }

    /// Panics unless every key of `req` is in one slot; returns the slot.
    #[track_caller]
    pub fn one_slot(req: &Request) -> u16 {
        let keys = request_keys(req);
        assert!(!keys.is_empty(), "{req:?} names no key");
        let slot = slot_of(&keys[0]);
        for k in &keys {
            assert_eq!(
                slot_of(k),
                slot,
                "{} is not in the slot of {}",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(&keys[0])
            );
        }
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let k = Keys::new("p:");
        assert_eq!(
            [&k.set, &k.lease, &k.details, &k.by_name, &k.channel],
            [
                "p:im_server",
                "{p:im_server}:lease",
                "{p:im_server}:details",
                "{p:im_server}:by_name",
                "{p:im_server}:events"
            ]
        );
        assert_eq!(k.user("u1"), "p:im_user:{u1}");
        assert_eq!(k.route("u1"), "p:im_route:{u1}");
        assert_eq!(k.worker_channel("n/7"), "p:route:worker:n/7");
        assert_eq!(k.broadcast_channel(), "p:route:broadcast");
        let seed = Keys::new("");
        assert_eq!(seed.set, "im_server");
        assert_eq!(seed.lease, "{im_server}:lease");
        assert_eq!(seed.channel, "{im_server}:events");
        assert_eq!(seed.presence_channels()[0], "im_user:events:{10}");
    }

    #[test]
    fn the_registry_is_one_slot_and_a_user_is_one_slot() {
        for prefix in ["", "p:", "app1:"] {
            let k = Keys::new(prefix);
            let s = slot_of(k.set.as_bytes());
            for name in [&k.lease, &k.details, &k.by_name, &k.channel] {
                assert_eq!(slot_of(name.as_bytes()), s, "{name}");
            }
            let u = slot_of(k.user("alice").as_bytes());
            assert_eq!(slot_of(k.route("alice").as_bytes()), u);
            assert_eq!(u, slot_of(b"alice"), "the inbox's tag, {{alice}}");
        }
    }

    #[test]
    fn partition_tags_spread_evenly_and_are_fixed() {
        let tags = partition_tags();
        assert_eq!(tags.len(), PRESENCE_PARTITIONS);
        let width = SLOTS / PRESENCE_PARTITIONS;
        for (i, t) in tags.iter().enumerate() {
            let s = usize::from(slot_of(t.as_bytes()));
            assert!(
                (i * width..(i + 1) * width).contains(&s),
                "partition {i}: tag {t} is in slot {s}"
            );
            assert!(t.len() <= 3, "short: {t}");
        }
        // Pinned: IM servers and Route workers of different builds must
        // agree on the channels (the README lists them).
        assert_eq!(tags.join(","), PINNED_TAGS);
    }

    /// The tags as computed (and documented in the README).
    const PINNED_TAGS: &str = "10,3,61,43,11,2,60,42,12,1,63,41,13,0,62,40";

    #[test]
    fn a_uid_goes_to_the_partition_of_its_own_slot() {
        let k = Keys::new("");
        let mut seen = [0usize; PRESENCE_PARTITIONS];
        for n in 0..16_000 {
            let uid = format!("user{n}");
            let p = k.presence_partition(&uid);
            seen[p] += 1;
            let ch = k.presence_channel(&uid);
            assert_eq!(ch, k.presence_channels()[p]);
            // Same slot range as the user's records.
            let width = SLOTS / PRESENCE_PARTITIONS;
            assert_eq!(
                usize::from(slot_of(ch.as_bytes())) / width,
                usize::from(slot_of(k.user(&uid).as_bytes())) / width
            );
        }
        // Every partition carries its share (1000 expected each).
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
