//! The registry's record format, which the Route writes and both apps read:
//! the seed's set member `{"ip":"…","port":N}` and the JSON details of each
//! live IM server ([`ServerEntry`]), with the two reads of them. The writes
//! (atomic Lua scripts) belong to the Route (`route::registry`).

use std::collections::HashMap;

use crate::reactor::redis::Request;
use serde::{Deserialize, Serialize};

use crate::cluster::keys::Keys;
use crate::cluster::link::Registration;

/// The seed's set member for an address. Its bytes are the seed's PHP
/// `json_encode(['ip' => …, 'port' => …])`: programs match on them.
pub fn member(ip: &str, port: u16) -> String {
    #[derive(Serialize)]
    struct Member<'a> {
        ip: &'a str,
        port: u16,
    }
    super::encode(&Member { ip, port })
}

/// What the Route knows of one IM server (`{im_server}:details`).
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
    /// The seed-encoded member, computed on first use (see
    /// [`ServerEntry::member`]); `ip` and `port` never change after an
    /// entry is built, so the cache cannot go stale.
    #[serde(skip)]
    pub member_cache: MemberCache,
}

/// [`ServerEntry::member`]'s cache. Not part of an entry's value: two
/// entries compare equal whether or not either has computed it.
#[derive(Debug, Clone, Default)]
pub struct MemberCache(std::sync::OnceLock<String>);

impl PartialEq for MemberCache {
    fn eq(&self, _: &MemberCache) -> bool {
        true
    }
}

impl Eq for MemberCache {}

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
            member_cache: MemberCache::default(),
        }
    }

    /// The seed-encoded set member, `{"ip":"…","port":N}`. Serialised once
    /// per entry and cached: later calls cost a pointer read.
    pub fn member(&self) -> &str {
        self.member_cache
            .0
            .get_or_init(|| member(&self.ip, self.port))
    }
}

/// Reads every entry (one HGETALL); parse the reply with [`parse_list`].
pub fn list(keys: &Keys) -> Request {
    let mut c = redis::cmd("HGETALL");
    c.arg(&keys.details);
    Request::Cmd(c)
}

/// The entries of a [`list`] reply, sorted by serviceName then port;
/// unreadable ones are skipped.
pub fn parse_list(map: HashMap<String, String>) -> Vec<ServerEntry> {
    let mut v: Vec<ServerEntry> = map
        .values()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    v.sort_by(|a, b| {
        a.service_name
            .cmp(&b.service_name)
            .then(a.port.cmp(&b.port))
    });
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_member_is_the_seeds_encoding() {
        assert_eq!(
            super::member("192.168.100.153", 9000),
            r#"{"ip":"192.168.100.153","port":9000}"#
        );
        assert_eq!(super::member("::1", 1), r#"{"ip":"::1","port":1}"#);
    }
}
