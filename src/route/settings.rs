//! The Route's own settings keys (beside the framework's), its defaults
//! for framework keys, and the liveness timings derived from them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Settings;

/// How `/route` picks an IM server for a user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    /// The server with the fewest users (from the reported loads).
    #[default]
    LeastLoaded,
    /// Each server in turn.
    RoundRobin,
    /// A uid always maps to the same server while the set is unchanged.
    ConsistentHash,
}

/// The Route's settings keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteSettings {
    /// Shared secret for IM-server registration tokens (and user tokens);
    /// empty: the cluster runs open (a warning is logged).
    pub auth_secret: String,
    /// Bearer key for the HTTP API; empty: the API is open.
    pub api_key: String,
    /// This Route node's name in the registry (default: `hostname:port`).
    pub node_id: String,
    /// Seconds between full cache refreshes when no change arrives.
    pub cache_refresh: f64,
    /// Bad frames a peer may send before it is disconnected.
    pub max_bad_frames: u32,
    /// User→server selection.
    pub balancer: Balancer,
    /// Live IM-server registrations one source IP may hold on one Route
    /// worker; a register past it is answered `rate_limited` and the
    /// connection closed with 1008. 0 disables.
    pub max_registrations_per_ip: usize,
    /// Seconds a silent IM server's connection is kept after it left the
    /// registry (silent for `heartbeat_idle_time`): if it speaks again
    /// meanwhile it is re-admitted under its old registration; after it,
    /// the connection is closed. 0: closed at once.
    pub heartbeat_grace_time: f64,
    /// Store every `/api/send` message in the user's inbox before
    /// answering (ids, seq, status). false: fire-and-forget, as earlier
    /// versions (`{"delivered":N}`, 404 when offline). Must match the IM
    /// servers'.
    pub inbox: bool,
    /// Messages kept per user's inbox (older ones are trimmed).
    pub inbox_max_len: u64,
    /// Seconds an inbox lives after its last message.
    pub inbox_ttl: u64,
    /// Groups one user may belong to.
    pub group_max_per_user: u64,
    /// Members one group may have.
    pub group_max_members: u64,
    /// Messages kept per group stream.
    pub group_max_len: u64,
    /// Seconds a group stream lives after its last message.
    pub group_ttl: u64,
    /// Whether members may send to their groups over their WebSocket.
    pub user_group_send: bool,
    /// Send `{"method":"join"|"leave","group","uid"}` to a group's members
    /// when its membership changes.
    pub group_presence_events: bool,
    /// Groups with more members than this get no presence events (they
    /// would grow with the square of the size).
    pub group_presence_max: u64,
}

impl Default for RouteSettings {
    fn default() -> Self {
        RouteSettings {
            auth_secret: String::new(),
            api_key: String::new(),
            node_id: String::new(),
            cache_refresh: 5.0,
            max_bad_frames: 5,
            balancer: Balancer::LeastLoaded,
            max_registrations_per_ip: 32,
            heartbeat_grace_time: 60.0,
            inbox: true,
            inbox_max_len: crate::cluster::inbox::DEFAULT_MAX_LEN,
            inbox_ttl: crate::cluster::inbox::DEFAULT_TTL,
            group_max_per_user: 100,
            group_max_members: 100_000,
            group_max_len: 10_000,
            group_ttl: 7 * 86_400,
            user_group_send: true,
            group_presence_events: false,
            group_presence_max: 100,
        }
    }
}

impl RouteSettings {
    /// Refuses values no Route can run with, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        self.inbox_limits().validate()?;
        let g = self.heartbeat_grace_time;
        if !g.is_finite() || g < 0.0 {
            return Err(format!(
                "heartbeat_grace_time = {g}: must be a number of seconds >= 0"
            ));
        }
        Ok(())
    }

    /// The groups' bounds.
    pub fn group_limits(&self) -> crate::cluster::groups::GroupLimits {
        crate::cluster::groups::GroupLimits {
            per_user: self.group_max_per_user,
            members: self.group_max_members,
            max_len: self.group_max_len.max(1),
            ttl: self.group_ttl.max(1),
        }
    }

    /// The inbox's bounds.
    pub fn inbox_limits(&self) -> crate::cluster::inbox::Limits {
        crate::cluster::inbox::Limits {
            max_len: self.inbox_max_len,
            ttl: self.inbox_ttl,
        }
    }

    /// `heartbeat_grace_time` as a duration (0 when invalid; see
    /// [`Self::validate`]).
    pub fn grace(&self) -> Duration {
        Duration::try_from_secs_f64(self.heartbeat_grace_time).unwrap_or(Duration::ZERO)
    }
}

/// The Route daemon's defaults for framework keys.
pub fn framework_defaults() -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("port".into(), toml::Value::Integer(9500));
    t.insert(
        "pid_file".into(),
        toml::Value::String("swocloud.pid".into()),
    );
    t.insert(
        "redis_url".into(),
        toml::Value::String("redis://127.0.0.1:6379".into()),
    );
    t.insert("heartbeat_check_interval".into(), toml::Value::Float(3.0));
    t.insert("heartbeat_idle_time".into(), toml::Value::Float(10.0));
    // Peers are IM servers and API callers: few addresses, busy links.
    t.insert("max_conn_per_ip".into(), toml::Value::Integer(1024));
    t.insert(
        "max_messages_per_second".into(),
        toml::Value::Integer(20_000),
    );
    t
}

/// How often the registrations' sweep runs: `heartbeat_check_interval`
/// (3 s when unset).
pub fn sweep_every(s: &Settings) -> Duration {
    let i = s.heartbeat_check_interval;
    Duration::from_secs_f64(if i > 0.0 { i } else { 3.0 })
}

/// Lease length: a holder renews every sweep; three missed sweeps (or the
/// idle time, whichever is longer) and any worker may reap it.
pub fn lease(s: &Settings) -> Duration {
    let sweep = sweep_every(s);
    Duration::from_secs_f64(s.heartbeat_idle_time.max(2.0 * sweep.as_secs_f64())) + sweep
}

/// How long a registered peer may stay silent: `heartbeat_idle_time`
/// (three sweeps when unset).
pub fn idle(s: &Settings) -> Duration {
    Duration::from_secs_f64(if s.heartbeat_idle_time > 0.0 {
        s.heartbeat_idle_time
    } else {
        3.0 * sweep_every(s).as_secs_f64()
    })
}

/// A registered IM server's own idle limit for the framework's idle check
/// (`Server::set_idle_limit`): idle + grace + two sweeps (the sweep that
/// finds it silent and the one that finds the grace over may each come
/// up to one interval late), so that the Route's sweep, not the
/// framework, decides when a silent IM server's connection closes.
pub fn held_idle_limit(s: &Settings, grace: Duration) -> Duration {
    idle(s) + grace + 2 * sweep_every(s)
}

#[cfg(test)]
mod tests {
    use super::RouteSettings;

    #[test]
    fn a_negative_or_non_finite_grace_time_is_refused_by_name() {
        assert!(RouteSettings::default().validate().is_ok());
        for g in [-1.0, f64::NAN, f64::INFINITY] {
            let s = RouteSettings {
                heartbeat_grace_time: g,
                ..RouteSettings::default()
            };
            let e = s.validate().unwrap_err();
            assert!(e.contains("heartbeat_grace_time"), "{e}");
        }
    }
}
