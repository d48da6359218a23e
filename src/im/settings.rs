//! The IM server's own settings keys and its defaults for framework keys.

use serde::{Deserialize, Serialize};

/// The IM server's settings keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImSettings {
    /// One Route node's WebSocket URL, e.g. `ws://127.0.0.1:9500/`: the
    /// same as `route_urls = [it]`. Setting both is refused at start.
    pub route_url: String,
    /// Route nodes' WebSocket URLs, in order of preference: the link is to
    /// one of them at a time and fails over to the next (cyclically) when
    /// that one closes, falls silent or cannot be dialled. Neither key
    /// set: `ws://127.0.0.1:9500/`.
    pub route_urls: Vec<String>,
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
    /// Each also sends a WebSocket ping, which the Route answers.
    pub route_heartbeat: f64,
    /// Seconds the Route link may stay silent (not even a pong) before it
    /// is given up and the next Route node is dialled; 0: three
    /// heartbeats. Must be more than `route_heartbeat`.
    pub route_timeout: f64,
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

/// The Route node dialled when neither `route_url` nor `route_urls` is set.
pub const DEFAULT_ROUTE_URL: &str = "ws://127.0.0.1:9500/";

impl ImSettings {
    /// The Route nodes to dial, in order: `route_urls`, or `[route_url]`,
    /// or [`DEFAULT_ROUTE_URL`]. Both keys set is an error naming them
    /// (two lists that could disagree are not merged silently).
    pub fn route_list(&self) -> Result<Vec<String>, String> {
        match (self.route_url.is_empty(), self.route_urls.is_empty()) {
            (false, false) => Err(format!(
                "route_url ({:?}) and route_urls are both set: list every Route node in route_urls and drop route_url",
                self.route_url
            )),
            (true, false) => Ok(self.route_urls.clone()),
            (false, true) => Ok(vec![self.route_url.clone()]),
            (true, true) => Ok(vec![DEFAULT_ROUTE_URL.to_string()]),
        }
    }

    /// How long the Route link may be silent: `route_timeout`, or three
    /// heartbeats when it is 0.
    pub fn route_silence(&self) -> std::time::Duration {
        let secs = if self.route_timeout > 0.0 {
            self.route_timeout
        } else {
            3.0 * self.route_heartbeat.max(0.05)
        };
        std::time::Duration::try_from_secs_f64(secs).unwrap_or(std::time::Duration::from_secs(9))
    }

    /// Refuses settings no IM server can run with, naming the key: every
    /// Route URL is parsed (no lookup: this runs in the master, before the
    /// fork), the timings and the inbox bounds are checked.
    pub fn validate(&self) -> Result<(), String> {
        for url in self.route_list()? {
            crate::im::route_link::check_ws_url(&url)?;
        }
        let (hb, t) = (self.route_heartbeat, self.route_timeout);
        if !hb.is_finite() || hb <= 0.0 {
            return Err(format!(
                "route_heartbeat = {hb}: must be a number of seconds > 0"
            ));
        }
        if !t.is_finite() || t < 0.0 || (t > 0.0 && t <= hb) {
            return Err(format!(
                "route_timeout = {t}: must be 0 (three heartbeats) or more than route_heartbeat ({hb} s)"
            ));
        }
        self.inbox_limits().validate()
    }

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
            route_url: String::new(),
            route_urls: Vec::new(),
            service_name: "IM_1".into(),
            advertise_ip: String::new(),
            advertise_port: 0,
            auth_secret: String::new(),
            route_heartbeat: 3.0,
            route_timeout: 0.0,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(url: &str, urls: &[&str]) -> ImSettings {
        ImSettings {
            route_url: url.into(),
            route_urls: urls.iter().map(|u| u.to_string()).collect(),
            ..ImSettings::default()
        }
    }

    #[test]
    fn route_url_and_route_urls() {
        assert_eq!(with("", &[]).route_list().unwrap(), [DEFAULT_ROUTE_URL]);
        assert_eq!(with("ws://a:1/", &[]).route_list().unwrap(), ["ws://a:1/"]);
        let two = with("", &["ws://a:1/", "ws://b:2/"]);
        assert_eq!(two.route_list().unwrap(), ["ws://a:1/", "ws://b:2/"]);
        assert!(two.validate().is_ok());
        let e = with("ws://a:1/", &["ws://b:2/"]).validate().unwrap_err();
        assert!(e.contains("route_url") && e.contains("route_urls"), "{e}");
        let e = with("", &["ws://a:1/", "http://b:2/"])
            .validate()
            .unwrap_err();
        assert!(e.contains("http://b:2/"), "every URL is checked: {e}");
    }

    #[test]
    fn route_timeout_must_exceed_the_heartbeat() {
        let s = |hb: f64, t: f64| ImSettings {
            route_heartbeat: hb,
            route_timeout: t,
            ..ImSettings::default()
        };
        assert_eq!(s(0.3, 0.0).route_silence().as_millis(), 900);
        assert_eq!(s(3.0, 5.0).route_silence().as_secs(), 5);
        for (hb, t) in [
            (3.0, 2.0),
            (3.0, 3.0),
            (3.0, -1.0),
            (0.0, 0.0),
            (3.0, f64::NAN),
        ] {
            assert!(s(hb, t).validate().is_err(), "{hb} {t}");
        }
    }
}
