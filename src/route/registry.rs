//! The registry's Redis data model, and every write to it as one atomic Lua
//! script (a half-done registration would leave a lie in Redis).
//!
//! Keys, under the configured prefix `P` (named by [`Keys`]):
//!
//! | key | type | content |
//! |-----|------|---------|
//! | `P im_server` | SET | `{"ip":"…","port":N}` — exactly the seed's encoding, for programs that read it |
//! | `P im_server:lease` | ZSET | member → lease expiry (Unix ms), renewed by the holder's sweep |
//! | `P im_server:details` | HASH | member → JSON [`ServerEntry`] (the format is `cluster::servers`') |
//! | `P im_server:by_name` | HASH | serviceName → member (a re-registration replaces its old entry) |
//! | `P im_server:events` | pub/sub channel | `{"event":"register"|"remove"|"update","member":…,"cause":…}` |
//!
//! Every entry names its owner (Route node, worker pid, connection): only
//! the owner's close removes it, so a server that re-registered elsewhere is
//! never removed by its old connection's late close. An owner that dies
//! stops renewing; any worker's [`reap`] then removes the entry once its
//! lease expires.

use redis::{Connection, RedisResult, Script};

use crate::cluster::keys::Keys;
use crate::cluster::servers::{self, ServerEntry};

const REGISTER: &str = r#"
local old = redis.call('HGET', KEYS[4], ARGV[3])
if old and old ~= ARGV[1] then
  redis.call('SREM', KEYS[1], old)
  redis.call('ZREM', KEYS[2], old)
  redis.call('HDEL', KEYS[3], old)
end
local prev = redis.call('HGET', KEYS[3], ARGV[1])
if prev then
  local ok, d = pcall(cjson.decode, prev)
  if ok and d.serviceName ~= ARGV[3] and redis.call('HGET', KEYS[4], d.serviceName) == ARGV[1] then
    redis.call('HDEL', KEYS[4], d.serviceName)
  end
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[4], ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({event='register', member=ARGV[1]}))
return 1
"#;

const REMOVE: &str = r#"
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if not cur then return 0 end
local ok, d = pcall(cjson.decode, cur)
if ARGV[2] ~= '' and (not ok or d.owner ~= ARGV[2]) then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if ok and redis.call('HGET', KEYS[4], d.serviceName) == ARGV[1] then
  redis.call('HDEL', KEYS[4], d.serviceName)
end
redis.call('PUBLISH', ARGV[4], cjson.encode({event='remove', member=ARGV[1], cause=ARGV[3]}))
return 1
"#;

const RENEW: &str = r#"
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur then return 0 end
local ok, d = pcall(cjson.decode, cur)
if not ok or d.owner ~= ARGV[2] then return -1 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
d.last_seen_ms = tonumber(ARGV[5])
local changed = false
if ARGV[4] ~= '' and d.load ~= tonumber(ARGV[4]) then d.load = tonumber(ARGV[4]); changed = true end
if ARGV[6] ~= '' and tostring(d.draining) ~= ARGV[6] then d.draining = (ARGV[6] == 'true'); changed = true end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(d))
if changed then redis.call('PUBLISH', ARGV[7], cjson.encode({event='update', member=ARGV[1]})) end
return 1
"#;

const REHOME: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local ok, d = pcall(cjson.decode, cur)
if not ok or d.owner ~= ARGV[2] then return -1 end
d.owner = ARGV[3]
d.worker = tonumber(ARGV[4])
d.last_seen_ms = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(d))
redis.call('PUBLISH', ARGV[6], cjson.encode({event='update', member=ARGV[1], cause='rehome'}))
return 1
"#;

const REAP: &str = r#"
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 256)
for _, m in ipairs(dead) do
  local cur = redis.call('HGET', KEYS[3], m)
  redis.call('SREM', KEYS[1], m)
  redis.call('ZREM', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
  if cur then
    local ok, d = pcall(cjson.decode, cur)
    if ok and redis.call('HGET', KEYS[4], d.serviceName) == m then redis.call('HDEL', KEYS[4], d.serviceName) end
  end
  redis.call('PUBLISH', ARGV[2], cjson.encode({event='remove', member=m, cause='lease'}))
end
return dead
"#;

/// The registry's scripts, loaded once per worker.
#[derive(Debug)]
pub struct Registry {
    keys: Keys,
    register: Script,
    remove: Script,
    renew: Script,
    rehome: Script,
    reap: Script,
}

/// What a renewal sets.
#[derive(Debug, Clone, Copy)]
pub struct Renew {
    /// New lease expiry (Unix ms).
    pub lease_until_ms: u64,
    /// New load, if reported.
    pub load: Option<u64>,
    /// New draining flag, if changed.
    pub draining: Option<bool>,
    /// Now (Unix ms), stored as last-seen.
    pub now_ms: u64,
}

/// Outcome of a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed.
    Renewed,
    /// The entry is gone (Redis restarted empty, or reaped): register again.
    Missing,
    /// Someone else owns it now (the server re-registered elsewhere).
    Superseded,
}

impl Registry {
    /// A registry under `prefix`.
    pub fn new(prefix: &str) -> Registry {
        Registry {
            keys: Keys::new(prefix),
            register: Script::new(REGISTER),
            remove: Script::new(REMOVE),
            renew: Script::new(RENEW),
            rehome: Script::new(REHOME),
            reap: Script::new(REAP),
        }
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Stores (or replaces) an entry with a lease until `lease_until_ms`.
    pub fn register(
        &self,
        c: &mut Connection,
        e: &ServerEntry,
        lease_until_ms: u64,
    ) -> RedisResult<()> {
        let k = &self.keys;
        let json = serde_json::to_string(e).unwrap_or_default();
        self.register
            .key(&k.set)
            .key(&k.lease)
            .key(&k.details)
            .key(&k.by_name)
            .arg(e.member())
            .arg(json)
            .arg(&e.service_name)
            .arg(lease_until_ms)
            .arg(&k.channel)
            .invoke::<i64>(c)
            .map(drop)
    }

    /// Removes `member` if `owner` still owns it (empty owner: always).
    /// Returns whether something was removed.
    pub fn remove(
        &self,
        c: &mut Connection,
        member: &str,
        owner: &str,
        cause: &str,
    ) -> RedisResult<bool> {
        let k = &self.keys;
        self.remove
            .key(&k.set)
            .key(&k.lease)
            .key(&k.details)
            .key(&k.by_name)
            .arg(member)
            .arg(owner)
            .arg(cause)
            .arg(&k.channel)
            .invoke::<i64>(c)
            .map(|n| n == 1)
    }

    /// Renews an owned entry's lease, updating its load and draining flag.
    #[allow(clippy::too_many_arguments)] // one Lua script call: each argument is a script input
    pub fn renew(
        &self,
        c: &mut Connection,
        member: &str,
        owner: &str,
        r: &Renew,
    ) -> RedisResult<Renewal> {
        let k = &self.keys;
        let n: i64 = self
            .renew
            .key(&k.lease)
            .key(&k.details)
            .arg(member)
            .arg(owner)
            .arg(r.lease_until_ms)
            .arg(r.load.map_or(String::new(), |l| l.to_string()))
            .arg(r.now_ms)
            .arg(r.draining.map_or(String::new(), |d| d.to_string()))
            .arg(&k.channel)
            .invoke(c)?;
        Ok(match n {
            1 => Renewal::Renewed,
            0 => Renewal::Missing,
            _ => Renewal::Superseded,
        })
    }

    /// A Route worker adopted the connection of `member` (handover): if
    /// `old_owner` still owns the entry, rewrite its owner and worker in
    /// place — no removal, no re-registration, `registered_at_ms` kept — and
    /// publish an `update` event. `Renewed` when done, `Missing` when the
    /// entry is gone, `Superseded` when someone else owns it.
    pub fn rehome(
        &self,
        c: &mut Connection,
        member: &str,
        old_owner: &str,
        new_owner: &str,
        worker: u32,
        now_ms: u64,
    ) -> RedisResult<Renewal> {
        let k = &self.keys;
        let n: i64 = self
            .rehome
            .key(&k.details)
            .arg(member)
            .arg(old_owner)
            .arg(new_owner)
            .arg(worker)
            .arg(now_ms)
            .arg(&k.channel)
            .invoke(c)?;
        Ok(match n {
            1 => Renewal::Renewed,
            0 => Renewal::Missing,
            _ => Renewal::Superseded,
        })
    }

    /// Removes every entry whose lease expired before `now_ms`; returns the
    /// removed members.
    pub fn reap(&self, c: &mut Connection, now_ms: u64) -> RedisResult<Vec<String>> {
        let k = &self.keys;
        self.reap
            .key(&k.set)
            .key(&k.lease)
            .key(&k.details)
            .key(&k.by_name)
            .arg(now_ms)
            .arg(&k.channel)
            .invoke(c)
    }

    /// Every entry with details, sorted by serviceName.
    pub fn list(&self, c: &mut Connection) -> RedisResult<Vec<ServerEntry>> {
        servers::list(c, &self.keys)
    }
}
