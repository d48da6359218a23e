//! The registry's Redis data model, and every write to it as one atomic Lua
//! script (a half-done registration would leave a lie in Redis).
//!
//! Keys, under the configured prefix `P` (named by [`Keys`]):
//!
//! | key | type | content |
//! |-----|------|---------|
//! | `P im_server` | SET | `{"ip":"…","port":N}` — exactly the seed's encoding, for programs that read it |
//! | `{P im_server}:lease` | ZSET | member → lease expiry (Unix ms), renewed by the holder's sweep |
//! | `{P im_server}:details` | HASH | member → JSON [`ServerEntry`] (the format is `cluster::servers`') |
//! | `{P im_server}:by_name` | HASH | serviceName → member (a re-registration replaces its old entry) |
//! | `{P im_server}:events` | pub/sub channel | `{"event":"register"|"remove"|"update","member":…,"cause":…}` |
//!
//! All five hash to the slot of `P im_server` (the companions' tag is the
//! set's name), so every script runs on one slot of a Redis Cluster. Each
//! script is passed all five as KEYS, the channel included: a cluster then
//! refuses a call whose names do not share a slot before any of it runs
//! (a script that reached another slot half-way would fail after its
//! first writes, and a script's writes are not rolled back). The command
//! that publishes is the last ARGV, `PUBLISH` or, on a cluster, `SPUBLISH`
//! ([`crate::reactor::Server::redis_publish_command`]): a sharded channel
//! in the script's own slot, which a script may publish to.
//!
//! Every entry names its owner (Route node, worker pid, connection): only
//! the owner's close removes it, so a server that re-registered elsewhere is
//! never removed by its old connection's late close. An owner that dies
//! stops renewing; any worker's [`Registry::reap`] then removes the entry
//! once its lease expires.

use crate::cluster::keys::Keys;
use crate::cluster::servers::{self, ServerEntry};
use crate::reactor::redis::{Request, Script, ScriptCall};

/// Prepended to every script. KEYS[1..5] are set, lease, details,
/// by_name and the events channel in each; ARGV[#ARGV] is the publish
/// command. `publish` announces an event; `drop` removes `m` from the set,
/// the lease ZSET and the details, and its name from `by_name` if it still
/// points at `m` (`cur` is its details JSON, or false).
const PRELUDE: &str = r#"
local function publish(event)
  redis.call(ARGV[#ARGV], KEYS[5], cjson.encode(event))
end
local function drop(m, cur)
  redis.call('SREM', KEYS[1], m)
  redis.call('ZREM', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
  if cur then
    local ok, d = pcall(cjson.decode, cur)
    if ok and redis.call('HGET', KEYS[4], d.serviceName) == m then redis.call('HDEL', KEYS[4], d.serviceName) end
  end
end
"#;

const REGISTER: &str = r#"
local old = redis.call('HGET', KEYS[4], ARGV[3])
if old and old ~= ARGV[1] then
  drop(old, false)
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
publish({event='register', member=ARGV[1]})
return 1
"#;

const REMOVE: &str = r#"
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if not cur then return 0 end
local ok, d = pcall(cjson.decode, cur)
if ARGV[2] ~= '' and (not ok or d.owner ~= ARGV[2]) then return 0 end
drop(ARGV[1], cur)
publish({event='remove', member=ARGV[1], cause=ARGV[3]})
return 1
"#;

const RENEW: &str = r#"
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if not cur then return 0 end
local ok, d = pcall(cjson.decode, cur)
if not ok or d.owner ~= ARGV[2] then return -1 end
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
d.last_seen_ms = tonumber(ARGV[5])
local changed = false
if ARGV[4] ~= '' and d.load ~= tonumber(ARGV[4]) then d.load = tonumber(ARGV[4]); changed = true end
if ARGV[6] ~= '' and tostring(d.draining) ~= ARGV[6] then d.draining = (ARGV[6] == 'true'); changed = true end
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(d))
if changed then publish({event='update', member=ARGV[1]}) end
return 1
"#;

const REHOME: &str = r#"
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if not cur then return 0 end
local ok, d = pcall(cjson.decode, cur)
if not ok or d.owner ~= ARGV[2] then return -1 end
d.owner = ARGV[3]
d.worker = tonumber(ARGV[4])
d.last_seen_ms = tonumber(ARGV[5])
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(d))
publish({event='update', member=ARGV[1], cause='rehome'})
return 1
"#;

const REAP: &str = r#"
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 256)
for _, m in ipairs(dead) do
  drop(m, redis.call('HGET', KEYS[3], m))
  publish({event='remove', member=m, cause='lease'})
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

impl Renewal {
    /// The outcome a renew or rehome script returned.
    pub fn from_code(n: i64) -> Renewal {
        match n {
            1 => Renewal::Renewed,
            0 => Renewal::Missing,
            _ => Renewal::Superseded,
        }
    }
}

impl Registry {
    /// A registry under `prefix`.
    pub fn new(prefix: &str) -> Registry {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Registry {
            keys: Keys::new(prefix),
            register: script(REGISTER),
            remove: script(REMOVE),
            renew: script(RENEW),
            rehome: script(REHOME),
            reap: script(REAP),
        }
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A call of `script` with the registry's five names as KEYS (see the
    /// module doc).
    fn call(&self, script: &Script) -> ScriptCall {
        let k = &self.keys;
        script
            .call()
            .key(&k.set)
            .key(&k.lease)
            .key(&k.details)
            .key(&k.by_name)
            .key(&k.channel)
    }

    /// Stores (or replaces) an entry with a lease until `lease_until_ms`;
    /// `publish` is [`crate::reactor::Server::redis_publish_command`].
    /// Reply: 1.
    pub fn register(&self, e: &ServerEntry, lease_until_ms: u64, publish: &str) -> Request {
        let json = serde_json::to_string(e).unwrap_or_default();
        self.call(&self.register)
            .arg(e.member())
            .arg(json)
            .arg(&e.service_name)
            .arg(lease_until_ms)
            .arg(publish)
            .into()
    }

    /// Removes `member` if `owner` still owns it (empty owner: always).
    /// Reply: 1 when something was removed, else 0.
    pub fn remove(&self, member: &str, owner: &str, cause: &str, publish: &str) -> Request {
        self.call(&self.remove)
            .arg(member)
            .arg(owner)
            .arg(cause)
            .arg(publish)
            .into()
    }

    /// Renews an owned entry's lease, updating its load and draining flag.
    /// Reply: a code for [`Renewal::from_code`].
    pub fn renew(&self, member: &str, owner: &str, r: &Renew, publish: &str) -> Request {
        self.call(&self.renew)
            .arg(member)
            .arg(owner)
            .arg(r.lease_until_ms)
            .arg(r.load.map_or(String::new(), |l| l.to_string()))
            .arg(r.now_ms)
            .arg(r.draining.map_or(String::new(), |d| d.to_string()))
            .arg(publish)
            .into()
    }

    /// A Route worker adopted the connection of `member` (handover): if
    /// `old_owner` still owns the entry, rewrite its owner and worker in
    /// place — no removal, no re-registration, `registered_at_ms` kept — and
    /// publish an `update` event. Reply: a code for [`Renewal::from_code`]
    /// (`Renewed` when done, `Missing` when gone, `Superseded` when someone
    /// else owns it).
    pub fn rehome(
        &self,
        member: &str,
        old_owner: &str,
        new_owner: &str,
        worker: u32,
        now_ms: u64,
        publish: &str,
    ) -> Request {
        self.call(&self.rehome)
            .arg(member)
            .arg(old_owner)
            .arg(new_owner)
            .arg(worker)
            .arg(now_ms)
            .arg(publish)
            .into()
    }

    /// Removes every entry whose lease expired before `now_ms` (at most
    /// 256 per call). Reply: the removed members.
    pub fn reap(&self, now_ms: u64, publish: &str) -> Request {
        self.call(&self.reap).arg(now_ms).arg(publish).into()
    }

    /// Every entry with details: reply parsed by [`servers::parse_list`].
    pub fn list(&self) -> Request {
        servers::list(&self.keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::keys::slots::{one_slot, script_keys};
    use crate::reactor::redis::slot_of;

    #[test]
    fn every_script_call_is_one_slot_with_its_channel_and_publish_command() {
        for prefix in ["", "p:"] {
            let r = Registry::new(prefix);
            let e = ServerEntry::new(
                &crate::cluster::link::Registration {
                    service_name: "IM_1".into(),
                    ip: "127.0.0.2".into(),
                    port: 9000,
                    token: None,
                    load: None,
                    epoch: None,
                },
                "n",
                0,
                "n/1/2",
                1,
            );
            let renew = Renew {
                lease_until_ms: 1,
                load: None,
                draining: None,
                now_ms: 1,
            };
            let set_slot = slot_of(r.keys().set.as_bytes());
            for publish in ["PUBLISH", "SPUBLISH"] {
                for req in [
                    r.register(&e, 1, publish),
                    r.remove(e.member(), "o", "closed", publish),
                    r.renew(e.member(), "o", &renew, publish),
                    r.rehome(e.member(), "o", "p", 1, 1, publish),
                    r.reap(1, publish),
                ] {
                    assert_eq!(one_slot(&req), set_slot, "{req:?}");
                    let Request::Script(call) = &req else {
                        panic!("{req:?} is not a script")
                    };
                    let keys = script_keys(call);
                    assert_eq!(keys.len(), 5);
                    assert_eq!(keys[4], r.keys().channel.as_bytes());
                    let last = call.eval_cmd().args_iter().last().map(|a| match a {
                        redis::Arg::Simple(b) => b.to_vec(),
                        redis::Arg::Cursor => Vec::new(),
                    });
                    assert_eq!(last.as_deref(), Some(publish.as_bytes()));
                }
            }
        }
    }
}
