//! Every user's inbox in Redis: what makes a message *accepted*, its
//! identity (`id`, and `seq` within the user's `epoch`), and what a
//! reconnecting user replays. Written by whoever accepts a message (the
//! Route for `/api/send`, the sender's IM server for a user's message),
//! read by the recipient's IM server (welcome, replay, gap fill) and by
//! the Route's `/api/message`.
//!
//! Two keys per user, both tagged `{uid}` so that every script runs on
//! one slot of a Redis Cluster:
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `P inbox:{U}` | STREAM | entry `<seq>-0` → `id`, `from`, `data` (JSON text); at most `inbox_max_len` entries; expires `inbox_ttl` after the last message |
//! | `P inbox:{U}:refs` | ZSET | `<from>\|<ref>` → seq, for the messages still in the stream that were sent with a `ref`: a repeat is not stored twice |
//! | `P inbox:{U}:meta` | HASH | `epoch`, `seq` (the last one given), `dlv` (the highest pushed to a connection), `acked` (the user's cumulative ack); expires [`META_TTL_FACTOR`] × `inbox_ttl` after the last store, connect or ack |
//!
//! The epoch is a random string made when the meta hash does not exist:
//! the first message or connect, or after Redis lost the hash (restarted
//! empty, a failover that lost writes, the hash expired). Sequence
//! numbers restart at 1 in a new epoch, so a client holding an old epoch
//! is told `resync` instead of being handed a silent gap.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use redis::Value;
use serde::Serialize;

use crate::reactor::redis::{slot_of, Request, Script, ScriptCall};

/// Default `inbox_max_len`: entries kept per user.
pub const DEFAULT_MAX_LEN: u64 = 10_000;
/// Default `inbox_ttl`: seconds an inbox lives after its last message.
pub const DEFAULT_TTL: u64 = 7 * 86_400;
/// The meta hash outlives the stream by this factor, so that a user whose
/// stored messages expired unread is told `resync` (reason `trimmed`)
/// rather than silently starting over, and one who had read them all is
/// told nothing.
pub const META_TTL_FACTOR: u64 = 4;

/// Stores one message: `[epoch, seq, id, repeated]`. With a ref key
/// (`<from>|<ref>`, ARGV[8]) a repeat of a message still in the stream
/// is not stored again: its first copy's seq and id come back, with
/// `repeated` = 1.
const STORE: &str = r"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'seq', 0, 'dlv', 0, 'acked', 0)
end
if ARGV[8] ~= '' then
  local s = redis.call('ZSCORE', KEYS[3], ARGV[8])
  if s then
    local e = redis.call('XRANGE', KEYS[1], s .. '-0', s .. '-0')
    if e[1] then
      local f = e[1][2]
      for i = 1, #f, 2 do
        if f[i] == 'id' then return {epoch, tonumber(s), f[i + 1], 1} end
      end
    end
  end
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], seq .. '-0', 'id', ARGV[2], 'from', ARGV[3], 'data', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[3], seq, ARGV[8])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', seq - tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
return {epoch, seq, ARGV[2], 0}
";

/// A connection opens: `[epoch, seq, acked]`, making the epoch if needed.
const HELLO: &str = r"
local m = redis.call('HMGET', KEYS[2], 'epoch', 'seq', 'acked')
if not m[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'seq', 0, 'dlv', 0, 'acked', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {ARGV[1], 0, 0}
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {m[1], tonumber(m[2]), tonumber(m[3])}
";

/// Raises `dlv` and `acked` of each user (KEYS: their meta hashes; ARGV:
/// `epoch, dlv, acked` per key, then the meta TTL), never past `seq`,
/// only within the epoch; an ack also renews the hash's life (a store and
/// a connect do too). One call marks up to [`MARKS_PER_CALL`] users; on a
/// Redis Cluster only users of one slot ([`Inbox::mark_calls`]).
const MARK: &str = r"
local ttl = ARGV[#ARGV]
for i = 1, #KEYS do
  local b = (i - 1) * 3
  local m = redis.call('HMGET', KEYS[i], 'epoch', 'seq', 'dlv', 'acked')
  if m[1] == ARGV[b + 1] then
    local top = tonumber(m[2])
    local a = math.min(tonumber(ARGV[b + 3]), top)
    local d = math.max(math.min(tonumber(ARGV[b + 2]), top), a)
    if d > tonumber(m[3]) then redis.call('HSET', KEYS[i], 'dlv', d) end
    if a > tonumber(m[4]) then redis.call('HSET', KEYS[i], 'acked', a) end
    if ARGV[b + 3] ~= '0' then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
return #KEYS
";

/// Users per [`Inbox::mark`] call.
pub const MARKS_PER_CALL: usize = 256;

/// The bounds of every inbox (the `inbox_max_len` and `inbox_ttl` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries kept per user (older ones are trimmed).
    pub max_len: u64,
    /// Seconds an inbox lives after its last message.
    pub ttl: u64,
}

impl Limits {
    /// Refuses bounds no inbox can work with, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_len == 0 {
            return Err("inbox_max_len = 0: must be at least 1".into());
        }
        if self.ttl == 0 {
            return Err("inbox_ttl = 0: must be at least 1 second".into());
        }
        Ok(())
    }
}

/// A stored message's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Stamp {
    /// The recipient's epoch it was stored in.
    pub epoch: String,
    /// Its sequence number within the epoch (1, 2, 3, …).
    pub seq: u64,
    /// Its id (unique).
    pub id: String,
}

/// The state a connection starts from ([`Inbox::hello`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The user's epoch.
    pub epoch: String,
    /// The last seq given.
    pub seq: u64,
    /// The user's cumulative ack.
    pub acked: u64,
}

/// One stored entry, as replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its seq.
    pub seq: u64,
    /// Its id.
    pub id: String,
    /// The sender.
    pub from: String,
    /// The payload's JSON text, as stored.
    pub data: String,
}

impl Entry {
    /// The frame the user receives: `{"from","data","seq","id"}`, built
    /// from the stored JSON text without parsing it again.
    pub fn frame(&self) -> String {
        let mut f = String::with_capacity(self.data.len() + self.from.len() + 64);
        f.push_str("{\"from\":");
        f.push_str(&crate::cluster::encode(&self.from));
        f.push_str(",\"data\":");
        f.push_str(&self.data);
        f.push_str(&format!(",\"seq\":{},\"id\":", self.seq));
        f.push_str(&crate::cluster::encode(&self.id));
        f.push('}');
        f
    }
}

impl Entry {
    /// The frame a member receives for a group message:
    /// `{"group","from","data","gseq","id"}`.
    pub fn group_frame(&self, group: &str) -> String {
        let mut f = String::with_capacity(self.data.len() + self.from.len() + group.len() + 72);
        f.push_str("{\"group\":");
        f.push_str(&crate::cluster::encode(&group));
        f.push_str(",\"from\":");
        f.push_str(&crate::cluster::encode(&self.from));
        f.push_str(",\"data\":");
        f.push_str(&self.data);
        f.push_str(&format!(",\"gseq\":{},\"id\":", self.seq));
        f.push_str(&crate::cluster::encode(&self.id));
        f.push('}');
        f
    }
}

/// The inbox's keys and scripts under one prefix.
#[derive(Debug, Clone)]
pub struct Inbox {
    prefix: String,
    limits: Limits,
    store: Script,
    hello: Script,
    mark: Script,
}

impl Inbox {
    /// The inbox under `prefix`, bounded by `limits`.
    pub fn new(prefix: &str, limits: Limits) -> Inbox {
        Inbox {
            prefix: prefix.to_string(),
            limits,
            store: Script::new(STORE),
            hello: Script::new(HELLO),
            mark: Script::new(MARK),
        }
    }

    /// `uid`'s stream.
    pub fn stream_key(&self, uid: &str) -> String {
        format!("{}inbox:{{{uid}}}", self.prefix)
    }

    /// `uid`'s refs (idempotent sends).
    pub fn refs_key(&self, uid: &str) -> String {
        format!("{}inbox:{{{uid}}}:refs", self.prefix)
    }

    /// `uid`'s meta hash.
    pub fn meta_key(&self, uid: &str) -> String {
        format!("{}inbox:{{{uid}}}:meta", self.prefix)
    }

    /// Its bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Milliseconds the meta hash lives after its last store, connect or ack.
    pub fn meta_ttl_ms(&self) -> u64 {
        self.limits.ttl.saturating_mul(1000 * META_TTL_FACTOR)
    }

    /// Stores a message for `to` (the answer parses with [`parse_stored`]);
    /// with a `reference`, a repeat from the same sender is not stored again.
    pub fn store(
        &self,
        to: &str,
        id: &str,
        from: &str,
        data: &serde_json::Value,
        reference: Option<&str>,
    ) -> ScriptCall {
        self.store
            .call()
            .key(self.stream_key(to))
            .key(self.meta_key(to))
            .key(self.refs_key(to))
            .arg(new_epoch())
            .arg(id)
            .arg(from)
            .arg(crate::cluster::encode(data))
            .arg(self.limits.max_len)
            .arg(self.limits.ttl.saturating_mul(1000))
            .arg(self.meta_ttl_ms())
            .arg(reference.map_or_else(String::new, |r| format!("{from}|{r}")))
    }

    /// A connection of `uid` opens (the answer parses with [`parse_head`]).
    pub fn hello(&self, uid: &str) -> ScriptCall {
        self.hello
            .call()
            .key(self.stream_key(uid))
            .key(self.meta_key(uid))
            .arg(new_epoch())
            .arg(self.meta_ttl_ms())
    }

    /// Raises the delivered and acked marks of each `(uid, epoch,
    /// delivered, acked)` (at most [`MARKS_PER_CALL`] per call).
    pub fn mark<'a>(
        &self,
        marks: impl IntoIterator<Item = (&'a str, &'a str, u64, u64)>,
    ) -> ScriptCall {
        let mut call = self.mark.call();
        for (uid, epoch, delivered, acked) in marks {
            call = call
                .key(self.meta_key(uid))
                .arg(epoch)
                .arg(delivered)
                .arg(acked);
        }
        call.arg(self.meta_ttl_ms())
    }

    /// The calls that write a flush's `marks` (as [`Self::mark`]): up to
    /// [`MARKS_PER_CALL`] users each, and with `by_slot` (a Redis Cluster,
    /// where a script's keys must share a slot) only users whose meta
    /// hashes share a slot. On a cluster that is about one call per user
    /// (the users of a flush rarely share one of 16384 slots); none is
    /// waited for.
    pub fn mark_calls<'a>(
        &self,
        marks: impl IntoIterator<Item = (&'a str, &'a str, u64, u64)>,
        by_slot: bool,
    ) -> Vec<ScriptCall> {
        let mut batches: BTreeMap<u16, Vec<(&str, &str, u64, u64)>> = BTreeMap::new();
        for m in marks {
            let slot = if by_slot {
                slot_of(self.meta_key(m.0).as_bytes())
            } else {
                0
            };
            batches.entry(slot).or_default().push(m);
        }
        batches
            .values()
            .flat_map(|b| b.chunks(MARKS_PER_CALL))
            .map(|chunk| self.mark(chunk.iter().copied()))
            .collect()
    }

    /// Up to `count` entries of `uid` from seq `from` through `to` (None:
    /// the newest); parses with [`parse_entries`].
    pub fn range(&self, uid: &str, from: u64, to: Option<u64>, count: usize) -> Request {
        let mut c = redis::cmd("XRANGE");
        c.arg(self.stream_key(uid)).arg(format!("{from}-0"));
        match to {
            Some(t) => c.arg(format!("{t}-0")),
            None => c.arg("+"),
        };
        c.arg("COUNT").arg(count);
        c.into()
    }

    /// `uid`'s meta hash: `[epoch, seq, dlv, acked]` (all nil when gone).
    pub fn meta(&self, uid: &str) -> Request {
        let mut c = redis::cmd("HMGET");
        c.arg(self.meta_key(uid))
            .arg("epoch")
            .arg("seq")
            .arg("dlv")
            .arg("acked");
        c.into()
    }
}

/// A fresh random id: 128 bits in hex, from the process's hasher keys
/// (seeded by the OS) and a counter, so ids differ across processes and
/// restarts without a syscall per message.
pub fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut a = RandomState::new().build_hasher();
    a.write_u64(n);
    let mut b = RandomState::new().build_hasher();
    b.write_u64(!n);
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

/// A fresh random epoch (12 hex digits).
pub fn new_epoch() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(crate::process::scoreboard::now_ms());
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// What [`Inbox::store`] answers.
pub type StoredReply = (String, u64, String, u8);

/// The stamp, and whether the message was a repeat (stored before).
pub fn parse_stored(v: StoredReply) -> (Stamp, bool) {
    (
        Stamp {
            epoch: v.0,
            seq: v.1,
            id: v.2,
        },
        v.3 == 1,
    )
}

/// `[epoch, seq, acked]` from [`Inbox::hello`].
pub fn parse_head(v: (String, u64, u64)) -> Head {
    Head {
        epoch: v.0,
        seq: v.1,
        acked: v.2,
    }
}

/// The entries of an `XRANGE` answer; entries that are not the inbox's
/// own (a malformed id) are skipped with a log line.
pub fn parse_entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Ok((sid, fields)) = redis::from_redis_value::<(String, Vec<(String, String)>)>(&item)
        else {
            log::warn!("inbox: skipping a malformed stream entry");
            continue;
        };
        let Some(seq) = sid.split('-').next().and_then(|s| s.parse().ok()) else {
            log::warn!("inbox: skipping stream entry {sid}: not <seq>-0");
            continue;
        };
        let mut e = Entry {
            seq,
            id: String::new(),
            from: String::new(),
            data: "null".into(),
        };
        for (k, val) in fields {
            match k.as_str() {
                "id" => e.id = val,
                "from" => e.from = val,
                "data" => e.data = val,
                _ => {}
            }
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_uid_tag() {
        let i = Inbox::new(
            "p:",
            Limits {
                max_len: 5,
                ttl: 60,
            },
        );
        assert_eq!(i.stream_key("u1"), "p:inbox:{u1}");
        assert_eq!(i.meta_key("u1"), "p:inbox:{u1}:meta");
        assert_eq!(i.meta_ttl_ms(), 60_000 * META_TTL_FACTOR);
    }

    #[test]
    fn every_script_call_is_one_slot() {
        use crate::cluster::keys::slots::one_slot;
        let i = Inbox::new(
            "p:",
            Limits {
                max_len: 5,
                ttl: 60,
            },
        );
        let u = slot_of(b"u1");
        let data = serde_json::json!({"x": 1});
        assert_eq!(
            one_slot(&i.store("u1", "id", "u2", &data, Some("r")).into()),
            u
        );
        assert_eq!(one_slot(&i.hello("u1").into()), u);
        assert_eq!(one_slot(&i.range("u1", 1, None, 10)), u);
        assert_eq!(one_slot(&i.meta("u1")), u);
        assert_eq!(one_slot(&i.mark([("u1", "e", 1, 1)]).into()), u);
    }

    #[test]
    fn marks_are_split_by_slot_on_a_cluster_only() {
        use crate::cluster::keys::slots::{one_slot, script_keys};
        let i = Inbox::new(
            "",
            Limits {
                max_len: 5,
                ttl: 60,
            },
        );
        let uids: Vec<String> = (0..600).map(|n| format!("user{n}")).collect();
        let marks = || uids.iter().map(|u| (u.as_str(), "e", 2, 1));
        // A single server: today's batches of MARKS_PER_CALL.
        let calls = i.mark_calls(marks(), false);
        let sizes: Vec<usize> = calls.iter().map(|c| script_keys(c).len()).collect();
        assert_eq!(sizes, vec![256, 256, 88]);
        // A cluster: every call one slot, every user once.
        let calls = i.mark_calls(marks(), true);
        let mut seen = 0;
        for c in &calls {
            one_slot(&c.clone().into());
            seen += script_keys(c).len();
        }
        assert_eq!(seen, uids.len());
        // Users of one slot share a call, still at most MARKS_PER_CALL
        // (names no uid may have, all tagged `{t`).
        let same: Vec<String> = (0..300).map(|n| format!("{{t}}{n}")).collect();
        let calls = i.mark_calls(same.iter().map(|u| (u.as_str(), "e", 2, 1)), true);
        let sizes: Vec<usize> = calls.iter().map(|c| script_keys(c).len()).collect();
        assert_eq!(sizes, vec![256, 44]);
    }

    #[test]
    fn ids_and_epochs_differ() {
        let a = new_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_id());
        assert_eq!(new_epoch().len(), 12);
    }

    #[test]
    fn an_entry_becomes_the_users_frame() {
        let e = Entry {
            seq: 7,
            id: "abc".into(),
            from: "u\"1".into(),
            data: r#"{"x":[1,2]}"#.into(),
        };
        let f: serde_json::Value = serde_json::from_str(&e.frame()).unwrap();
        assert_eq!(
            f,
            serde_json::json!({"from":"u\"1","data":{"x":[1,2]},"seq":7,"id":"abc"})
        );
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limits { max_len: 0, ttl: 1 }.validate().is_err());
        assert!(Limits { max_len: 1, ttl: 0 }.validate().is_err());
        assert!(Limits { max_len: 1, ttl: 1 }.validate().is_ok());
    }
}
