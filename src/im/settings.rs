//! The IM server's own settings keys and its defaults for framework keys.

use serde::{Deserialize, Serialize};

/// The IM server's settings keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImSettings {
    /// The Route's WebSocket URL, e.g. `ws://127.0.0.1:9500/`.
    pub route_url: String,
    /// This server's `serviceName` in the registry.
    pub service_name: String,
    /// The IP clients are told to connect to (default: `host`, or
    /// 127.0.0.1 when `host` is a wildcard).
    pub advertise_ip: String,
    /// The port clients are told to connect to (default: `port`).
    pub advertise_port: u16,
    /// Shared secret: signs registration tokens, verifies user tokens.
    /// Empty: the cluster runs open (a warning is logged).
    pub auth_secret: String,
    /// Seconds between heartbeats (load reports) to the Route (the seed: 3).
    pub route_heartbeat: f64,
    /// Seconds a user's presence record lives without being refreshed.
    pub presence_ttl: u64,
    /// Seconds between rewrites of every local user's presence record, so
    /// a Redis that restarted empty (or was away when a user connected)
    /// learns again who is here; 0 disables. Costs one pipelined HSET +
    /// EXPIRE per local connection per period.
    pub presence_refresh: f64,
    /// Store every user-to-user message in the recipient's inbox before
    /// delivering it (ids, seq, welcome, replay, acks). false: the
    /// fire-and-forget path of earlier versions (no identity, no replay),
    /// kept to measure what durability costs. Must match the Route's.
    pub inbox: bool,
    /// Messages kept per user's inbox (older ones are trimmed).
    pub inbox_max_len: u64,
    /// Seconds an inbox lives after its last message.
    pub inbox_ttl: u64,
    /// Seconds for one background sweep that reads every local user's
    /// inbox head and catches its connections up (a live copy gone astray
    /// is delivered within this); 0 disables. Costs one HMGET per
    /// connection per period.
    pub inbox_check_interval: f64,
}

impl ImSettings {
    /// The inbox's bounds.
    pub fn inbox_limits(&self) -> crate::cluster::inbox::Limits {
        crate::cluster::inbox::Limits {
            max_len: self.inbox_max_len,
            ttl: self.inbox_ttl,
        }
    }
}

impl Default for ImSettings {
    fn default() -> Self {
        ImSettings {
            route_url: "ws://127.0.0.1:9500/".into(),
            service_name: "IM_1".into(),
            advertise_ip: String::new(),
            advertise_port: 0,
            auth_secret: String::new(),
            route_heartbeat: 3.0,
            presence_ttl: 86_400,
            presence_refresh: 10.0,
            inbox: true,
            inbox_max_len: crate::cluster::inbox::DEFAULT_MAX_LEN,
            inbox_ttl: crate::cluster::inbox::DEFAULT_TTL,
            inbox_check_interval: 30.0,
        }
    }
}

/// The IM daemon's defaults for framework keys.
pub fn framework_defaults() -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("port".into(), toml::Value::Integer(9000));
    t.insert(
        "pid_file".into(),
        toml::Value::String("swocloud-im.pid".into()),
    );
    t.insert(
        "redis_url".into(),
        toml::Value::String("redis://127.0.0.1:6379".into()),
    );
    t.insert("heartbeat_check_interval".into(), toml::Value::Float(10.0));
    t.insert("heartbeat_idle_time".into(), toml::Value::Float(75.0));
    // Peers are end users: many may share an address (NAT), none needs to
    // send more than a chat's worth of messages.
    t.insert("max_conn_per_ip".into(), toml::Value::Integer(4096));
    t.insert("max_messages_per_second".into(), toml::Value::Integer(200));
    t
}
