//! The registry's Redis data model, and every write to it as one atomic Lua
//! script (a half-done registration would leave a lie in Redis).
//!
//! Keys, under the configured prefix `P`:
//!
//! | key | type | content |
//! |-----|------|---------|
//! | `P im_server` | SET | `{"ip":"…","port":N}` — exactly the seed's encoding, for programs that read it |
//! | `P im_server:lease` | ZSET | member → lease expiry (Unix ms), renewed by the holder's sweep |
//! | `P im_server:details` | HASH | member → JSON [`ServerEntry`] |
//! | `P im_server:by_name` | HASH | serviceName → member (a re-registration replaces its old entry) |
//! | `P im_server:events` | pub/sub channel | `{"event":"register"|"remove"|"update","member":…,"cause":…}` |
//!
//! Every entry names its owner (Route node, worker pid, connection): only
//! the owner's close removes it, so a server that re-registered elsewhere is
//! never removed by its old connection's late close. An owner that dies
//! stops renewing; any worker's [`reap`] then removes the entry once its
//! lease expires.

use redis::{Connection, RedisResult, Script};
use serde::{Deserialize, Serialize};

use crate::route::protocol::Registration;

/// The key names for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The seed's set.
    pub set: String,
    /// Lease ZSET.
    pub lease: String,
    /// Details HASH.
    pub details: String,
    /// serviceName → member HASH.
    pub by_name: String,
    /// Change notifications channel.
    pub channel: String,
}

impl Keys {
    /// Keys under `prefix` (empty: the seed's names).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            set: format!("{prefix}im_server"),
            lease: format!("{prefix}im_server:lease"),
            details: format!("{prefix}im_server:details"),
            by_name: format!("{prefix}im_server:by_name"),
            channel: format!("{prefix}im_server:events"),
        }
    }
}

/// What the Route knows of one IM server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// The seed's `serviceName`.
    #[serde(rename = "serviceName")]
    pub service_name: String,
    /// Advertised IP.
    pub ip: String,
    /// Advertised port.
    pub port: u16,
    /// Connected users, as last reported.
    pub load: u64,
    /// Instance epoch (new at each IM server start; empty if not sent).
    #[serde(default)]
    pub epoch: String,
    /// When it registered (Unix ms).
    pub registered_at_ms: u64,
    /// Last renewal (Unix ms).
    pub last_seen_ms: u64,
    /// Route node holding its connection.
    pub node: String,
    /// Route worker id holding its connection.
    pub worker: u32,
    /// Owner token: node/pid/connection.
    pub owner: String,
    /// Whether it is draining (no new users).
    #[serde(default)]
    pub draining: bool,
}

impl ServerEntry {
    /// Builds the entry for a registration.
    pub fn new(
        reg: &Registration,
        node: &str,
        worker: u32,
        owner: &str,
        now_ms: u64,
    ) -> ServerEntry {
        ServerEntry {
            service_name: reg.service_name.clone(),
            ip: reg.ip.clone(),
            port: reg.port,
            load: reg.load.unwrap_or(0),
            epoch: reg.epoch.clone().unwrap_or_default(),
            registered_at_ms: now_ms,
            last_seen_ms: now_ms,
            node: node.to_string(),
            worker,
            owner: owner.to_string(),
            draining: false,
        }
    }

    /// The seed-encoded set member.
    pub fn member(&self) -> String {
        serde_json::json!({"ip": self.ip, "port": self.port}).to_string()
    }
}

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
        let map: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg(&self.keys.details).query(c)?;
        let mut v: Vec<ServerEntry> = map
            .values()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        v.sort_by(|a, b| {
            a.service_name
                .cmp(&b.service_name)
                .then(a.port.cmp(&b.port))
        });
        Ok(v)
    }
}
