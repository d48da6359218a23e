//! Groups: membership per uid in Redis, a bounded stream per group with a
//! per-group sequence `gseq` inside the group's epoch, and per-server
//! member counts that make a group message go once to each IM server that
//! holds at least one online member, and never to the others.
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `P group:{G}` | STREAM | entry `<gseq>-0` → `id`, `from`, `data`; at most `group_max_len` entries, expires `group_ttl` after the last message |
//! | `P group:{G}:meta` | HASH | `epoch`, `seq` (the last gseq given), `mver` (membership version: +1 per join or leave) |
//! | `P group:{G}:members` | SET | member uids |
//! | `P group:{G}:joined` | HASH | uid → the gseq when it joined (it receives what comes after) |
//! | `P group:{G}:acked` | HASH | uid → its cumulative ack |
//! | `P group:{G}:servers` | HASH | `<server member>\|<epoch>` → members online there (per IM worker holding one) |
//! | `P user_groups:{U}` | SET | the groups of `U` (read at connect) |
//!
//! Every script touches one group's keys (tag `{G}`) or one user's (tag
//! `{U}`, the inbox's slot), all passed as KEYS (none is built inside
//! Lua), so each runs on one slot of a Redis Cluster. Joining and leaving
//! touch both a user's set and a group's keys, so each is two steps, in
//! the order that keeps the user's set a superset of the groups whose
//! member the user is (the group's keys are the truth: a send and a
//! connect check the member set; the user's set says where to look): a
//! join writes the user's set first (its limit), then the group's (its
//! limit, undone from the user's set when refused); a leave writes the
//! group's first, then, once that succeeded, the user's set. A step that
//! fails half-way leaves at worst a group in the user's set that the user
//! is not a member of (a connect finds it is not, and ignores it; the
//! next join or leave of it repairs the set), never a member whose server
//! does not know it.

use redis::RedisResult;
use serde::{Deserialize, Serialize};

use crate::reactor::redis::{Request, Script, ScriptCall};

/// Longest group name.
pub const MAX_GROUP: usize = 64;

/// Whether `g` is an acceptable group name: 1..=64 characters of
/// `[A-Za-z0-9_.:-]` (no escaping in a key, a query or a log line).
pub fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= MAX_GROUP
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
}

/// What a group name must look like, for error messages.
pub const GROUP_RULE: &str = "a group name is 1..=64 characters of [A-Za-z0-9_.:-]";

/// The user's side of a join: `1` added, `0` already there, `-1` over the
/// limit (ARGV[2] groups).
const USER_JOIN: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
";

/// The group's side of a join: `[members, gseq, mver, epoch, added]`;
/// added = -1: over the member limit (nothing changed).
const JOIN: &str = r"
local meta, members, joined = KEYS[1], KEYS[2], KEYS[3]
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'mver')
if not m[1] then
  redis.call('HSET', meta, 'epoch', ARGV[3], 'seq', 0, 'mver', 0)
  m = {ARGV[3], '0', '0'}
end
if redis.call('SISMEMBER', members, ARGV[1]) == 1 then
  return {redis.call('SCARD', members), tonumber(m[2]), tonumber(m[3]), m[1], 0}
end
if redis.call('SCARD', members) >= tonumber(ARGV[2]) then
  return {redis.call('SCARD', members), tonumber(m[2]), tonumber(m[3]), m[1], -1}
end
redis.call('SADD', members, ARGV[1])
redis.call('HSET', joined, ARGV[1], m[2])
local v = redis.call('HINCRBY', meta, 'mver', 1)
return {redis.call('SCARD', members), tonumber(m[2]), v, m[1], 1}
";

/// A leave: `[members, gseq, mver, removed]`.
const LEAVE: &str = r"
local meta, members, joined, acked = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('SREM', members, ARGV[1]) == 0 then
  local m = redis.call('HMGET', meta, 'seq', 'mver')
  return {redis.call('SCARD', members), tonumber(m[1] or '0'), tonumber(m[2] or '0'), 0}
end
redis.call('HDEL', joined, ARGV[1])
redis.call('HDEL', acked, ARGV[1])
local v = redis.call('HINCRBY', meta, 'mver', 1)
return {redis.call('SCARD', members), tonumber(redis.call('HGET', meta, 'seq') or '0'), v, 1}
";

/// A group message: `[epoch, gseq, id, mver, servers…]` (servers: the
/// fields of the counts hash whose count is > 0), or `[0]` when the group
/// has no members, `[-1]` when the sender (ARGV[7], '' for the API) is
/// not one.
const SEND: &str = r"
local stream, meta, members, servers = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('SCARD', members) == 0 then return {0} end
if ARGV[7] ~= '' and redis.call('SISMEMBER', members, ARGV[7]) == 0 then return {-1} end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'mver', 0)
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
redis.call('XADD', stream, 'MAXLEN', ARGV[5], seq .. '-0', 'id', ARGV[2], 'from', ARGV[3], 'data', ARGV[4])
redis.call('PEXPIRE', stream, ARGV[6])
local out = {epoch, seq, ARGV[2], tonumber(redis.call('HGET', meta, 'mver') or '0')}
local s = redis.call('HGETALL', servers)
for i = 1, #s, 2 do
  if tonumber(s[i + 1]) > 0 then out[#out + 1] = s[i] end
end
return out
";

/// A member's head at connect: `[epoch, gseq, from]` (from: where it
/// resumes without a position: after its join or its ack), or `[]` when
/// it is not a member (any more).
const HEAD: &str = r"
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return {} end
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not m[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'seq', 0, 'mver', 0)
  m = {ARGV[2], '0'}
end
local j = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local a = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
return {m[1], tonumber(m[2]), math.max(j, a)}
";

/// Adds ARGV[2] to a server's count; a count that reaches 0 is removed.
const COUNT: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
";

/// Raises a member's ack (never past the group's seq).
const ACK: &str = r"
local top = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local a = math.min(tonumber(ARGV[2]), top)
if a > tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') then
  redis.call('HSET', KEYS[2], ARGV[1], a)
end
return a
";

/// The groups' bounds (settings), shared by the Route and the IM servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Groups one user may be a member of.
    pub per_user: u64,
    /// Members one group may have.
    pub members: u64,
    /// Messages kept per group stream.
    pub max_len: u64,
    /// Seconds a group stream lives after its last message.
    pub ttl: u64,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            per_user: 100,
            members: 100_000,
            max_len: 10_000,
            ttl: 7 * 86_400,
        }
    }
}

/// A group message as [`Groups::send`] stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Stored: its stamp, the membership version, and the count fields of
    /// the servers holding members.
    Stored {
        /// Epoch, gseq and id.
        stamp: crate::cluster::inbox::Stamp,
        /// Membership version when it was stored.
        mver: u64,
        /// `<member>|<epoch>` of the servers with members online.
        servers: Vec<String>,
    },
    /// The group has no members.
    NoGroup,
    /// The sender is not a member.
    NotMember,
}

/// The group keys and scripts under one prefix.
#[derive(Debug, Clone)]
pub struct Groups {
    prefix: String,
    /// The bounds.
    pub limits: GroupLimits,
    scripts: [Script; 7],
}

impl Groups {
    /// Groups under `prefix`.
    pub fn new(prefix: &str, limits: GroupLimits) -> Groups {
        Groups {
            prefix: prefix.to_string(),
            limits,
            scripts: [
                Script::new(USER_JOIN),
                Script::new(JOIN),
                Script::new(LEAVE),
                Script::new(SEND),
                Script::new(HEAD),
                Script::new(COUNT),
                Script::new(ACK),
            ],
        }
    }

    fn key(&self, g: &str, part: &str) -> String {
        format!("{}group:{{{g}}}{part}", self.prefix)
    }

    /// `g`'s stream.
    pub fn stream_key(&self, g: &str) -> String {
        self.key(g, "")
    }

    /// `g`'s stream, meta hash, joined and acked hashes (what an audit of
    /// one of its messages reads and, after a loss, starts over).
    pub fn audit_keys(&self, g: &str) -> [String; 4] {
        [
            self.stream_key(g),
            self.key(g, ":meta"),
            self.key(g, ":joined"),
            self.key(g, ":acked"),
        ]
    }

    /// `g`'s member set.
    pub fn members_key(&self, g: &str) -> String {
        self.key(g, ":members")
    }

    /// `g`'s per-server member counts.
    pub fn counts_key(&self, g: &str) -> String {
        self.key(g, ":servers")
    }

    /// `u`'s groups.
    pub fn user_key(&self, u: &str) -> String {
        format!("{}user_groups:{{{u}}}", self.prefix)
    }

    /// The user's side of a join (answer: 1, 0 or -1).
    pub fn user_join(&self, g: &str, uid: &str) -> ScriptCall {
        self.scripts[0]
            .call()
            .key(self.user_key(uid))
            .arg(g)
            .arg(self.limits.per_user)
    }

    /// Undoes [`Self::user_join`] (a refused group join), or the user's side
    /// of a leave.
    pub fn user_leave(&self, g: &str, uid: &str) -> Request {
        let mut c = redis::cmd("SREM");
        c.arg(self.user_key(uid)).arg(g);
        c.into()
    }

    /// The group's side of a join: `(members, gseq, mver, epoch, added)`.
    pub fn join(&self, g: &str, uid: &str) -> ScriptCall {
        self.scripts[1]
            .call()
            .key(self.key(g, ":meta"))
            .key(self.members_key(g))
            .key(self.key(g, ":joined"))
            .arg(uid)
            .arg(self.limits.members)
            .arg(crate::cluster::inbox::new_epoch())
    }

    /// A leave: `(members, gseq, mver, removed)`.
    pub fn leave(&self, g: &str, uid: &str) -> ScriptCall {
        self.scripts[2]
            .call()
            .key(self.key(g, ":meta"))
            .key(self.members_key(g))
            .key(self.key(g, ":joined"))
            .key(self.key(g, ":acked"))
            .arg(uid)
    }

    /// Stores a message (the answer parses with [`parse_sent`]); `member`:
    /// the sending user, who must be a member (None: the API).
    pub fn send(
        &self,
        g: &str,
        id: &str,
        from: &str,
        data: &serde_json::Value,
        member: Option<&str>,
    ) -> ScriptCall {
        self.scripts[3]
            .call()
            .key(self.stream_key(g))
            .key(self.key(g, ":meta"))
            .key(self.members_key(g))
            .key(self.key(g, ":servers"))
            .arg(crate::cluster::inbox::new_epoch())
            .arg(id)
            .arg(from)
            .arg(crate::cluster::encode(data))
            .arg(self.limits.max_len)
            .arg(self.limits.ttl.saturating_mul(1000))
            .arg(member.unwrap_or(""))
    }

    /// A member's head at connect: `[epoch, gseq, from]`, empty when not a
    /// member.
    pub fn head(&self, g: &str, uid: &str) -> ScriptCall {
        self.scripts[4]
            .call()
            .key(self.key(g, ":meta"))
            .key(self.members_key(g))
            .key(self.key(g, ":joined"))
            .key(self.key(g, ":acked"))
            .arg(uid)
            .arg(crate::cluster::inbox::new_epoch())
    }

    /// Adds `n` to server `field`'s count for `g`.
    pub fn count(&self, g: &str, field: &str, n: i64) -> ScriptCall {
        self.scripts[5]
            .call()
            .key(self.key(g, ":servers"))
            .arg(field)
            .arg(n)
    }

    /// Raises `uid`'s ack in `g`.
    pub fn ack(&self, g: &str, uid: &str, n: u64) -> ScriptCall {
        self.scripts[6]
            .call()
            .key(self.key(g, ":meta"))
            .key(self.key(g, ":acked"))
            .arg(uid)
            .arg(n)
    }

    /// Up to `count` entries of `g` from gseq `from` through `to`.
    pub fn range(&self, g: &str, from: u64, to: u64, count: usize) -> Request {
        let mut c = redis::cmd("XRANGE");
        c.arg(self.stream_key(g))
            .arg(format!("{from}-0"))
            .arg(format!("{to}-0"))
            .arg("COUNT")
            .arg(count);
        c.into()
    }

    /// `g`'s head: `[epoch, seq, mver]`.
    pub fn meta(&self, g: &str) -> Request {
        let mut c = redis::cmd("HMGET");
        c.arg(self.key(g, ":meta"))
            .arg("epoch")
            .arg("seq")
            .arg("mver");
        c.into()
    }

    /// Which of `uids` are members of `g` (SMISMEMBER).
    pub fn are_members(&self, g: &str, uids: &[String]) -> Request {
        let mut c = redis::cmd("SMISMEMBER");
        c.arg(self.members_key(g)).arg(uids);
        c.into()
    }

    /// A page of `g`'s members from `cursor`, its size, and the counts
    /// hash: `(cursor, uids)`, `SCARD`, `HGETALL`.
    pub fn members_page(&self, g: &str, cursor: &str, count: usize) -> Request {
        let mut p = redis::pipe();
        p.cmd("SSCAN")
            .arg(self.members_key(g))
            .arg(cursor)
            .arg("COUNT")
            .arg(count);
        p.cmd("SCARD").arg(self.members_key(g));
        p.cmd("HGETALL").arg(self.key(g, ":servers"));
        p.into()
    }

    /// `uid`'s groups.
    pub fn of_user(&self, uid: &str) -> Request {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(self.user_key(uid));
        c.into()
    }
}

/// Parses [`Groups::send`]'s answer.
pub fn parse_sent(v: RedisResult<Vec<redis::Value>>) -> RedisResult<Sent> {
    let v = v?;
    let int = |x: &redis::Value| redis::from_redis_value::<i64>(x).unwrap_or(0);
    let text = |x: &redis::Value| redis::from_redis_value::<String>(x).unwrap_or_default();
    match v.as_slice() {
        [code] if int(code) == 0 => Ok(Sent::NoGroup),
        [_] => Ok(Sent::NotMember),
        [epoch, seq, id, mver, servers @ ..] => Ok(Sent::Stored {
            stamp: crate::cluster::inbox::Stamp {
                epoch: text(epoch),
                seq: int(seq).max(0) as u64,
                id: text(id),
            },
            mver: int(mver).max(0) as u64,
            servers: servers.iter().map(text).collect(),
        }),
        _ => Err(redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "unexpected answer of the group send script",
        ))),
    }
}

/// A group message, on the Route → IM link and between IM workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMessage {
    /// The group.
    pub group: String,
    /// The sender (a uid, or the API caller's label).
    pub from: String,
    /// Payload.
    pub data: serde_json::Value,
    /// Epoch, gseq and id in the group's stream.
    pub stamp: crate::cluster::inbox::Stamp,
    /// The membership version it was stored under.
    pub mver: u64,
}

/// A membership change for a user online on the receiving server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The group.
    pub group: String,
    /// The user.
    pub uid: String,
    /// The group's epoch.
    #[serde(default)]
    pub epoch: String,
    /// The gseq at the change (a joiner receives what comes after).
    #[serde(default)]
    pub gseq: u64,
    /// The membership version after the change.
    #[serde(default)]
    pub mver: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys() {
        assert!(valid_group("room-1.a:b_c"));
        assert!(!valid_group(""));
        assert!(!valid_group("a b"));
        assert!(!valid_group("a{b}"));
        assert!(!valid_group(&"g".repeat(MAX_GROUP + 1)));
        let g = Groups::new("p:", GroupLimits::default());
        assert_eq!(g.stream_key("r"), "p:group:{r}");
        assert_eq!(g.members_key("r"), "p:group:{r}:members");
        assert_eq!(g.user_key("u"), "p:user_groups:{u}");
    }

    #[test]
    fn every_script_call_is_one_slot() {
        use crate::cluster::keys::slots::one_slot;
        use crate::reactor::redis::slot_of;
        let g = Groups::new("p:", GroupLimits::default());
        let (gs, us) = (slot_of(b"room"), slot_of(b"u1"));
        let data = serde_json::json!(1);
        for req in [
            g.join("room", "u1").into(),
            g.leave("room", "u1").into(),
            g.send("room", "id", "u1", &data, Some("u1")).into(),
            g.head("room", "u1").into(),
            g.count("room", "f", 1).into(),
            g.ack("room", "u1", 3).into(),
            g.range("room", 1, 2, 10),
            g.meta("room"),
            g.are_members("room", &["u1".into()]),
            g.members_page("room", "0", 10),
        ] {
            assert_eq!(one_slot(&req), gs, "{req:?}");
        }
        assert_eq!(one_slot(&g.user_join("room", "u1").into()), us);
        assert_eq!(one_slot(&g.user_leave("room", "u1")), us);
        assert_eq!(one_slot(&g.of_user("u1")), us);
    }

    #[test]
    fn send_answers() {
        use redis::Value as V;
        let s = |x: &str| V::BulkString(x.as_bytes().to_vec());
        assert_eq!(parse_sent(Ok(vec![V::Int(0)])).unwrap(), Sent::NoGroup);
        assert_eq!(parse_sent(Ok(vec![V::Int(-1)])).unwrap(), Sent::NotMember);
        let Sent::Stored {
            stamp,
            mver,
            servers,
        } = parse_sent(Ok(vec![s("e"), V::Int(3), s("id"), V::Int(7), s("m|x")])).unwrap()
        else {
            panic!()
        };
        assert_eq!((stamp.seq, mver, servers), (3, 7, vec!["m|x".to_string()]));
    }
}
