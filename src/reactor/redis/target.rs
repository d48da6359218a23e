//! Which Redis a worker talks to, from the settings: one server
//! (`redis_url`), a master behind Sentinels (`redis_sentinels` +
//! `redis_sentinel_master`) or a Redis Cluster (`redis_cluster`). The
//! three share every code path above [`super::RedisClient`]; only where a
//! request goes differs.

use redis::IntoConnectionInfo;

use crate::config::Settings;

/// A `host:port` to dial.
pub type Addr = (String, u16);

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One server.
    Single(Addr),
    /// The master the Sentinels name.
    Sentinel {
        /// The Sentinels, tried in turn.
        sentinels: Vec<Addr>,
        /// The master's name.
        master: String,
    },
    /// A Redis Cluster.
    Cluster {
        /// Nodes to read the slot map from first.
        seeds: Vec<Addr>,
        /// Sharded pub/sub (SPUBLISH/SSUBSCRIBE) rather than classic.
        sharded: bool,
    },
}

/// The target and what every data connection sends first.
#[derive(Clone)]
pub struct Plan {
    /// Where requests go.
    pub target: Target,
    /// `AUTH` (from the URLs) and `SELECT` (one server or a Sentinel's
    /// master only: a cluster has database 0 alone).
    pub hello: Vec<redis::Cmd>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The greeting holds the password: only its length is shown.
        f.debug_struct("Plan")
            .field("target", &self.target)
            .field("hello", &self.hello.len())
            .finish()
    }
}

fn parse(url: &str, key: &'static str) -> Result<(Addr, redis::RedisConnectionInfo), String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("bad {key} entry {url:?}: {e}"))?;
    match info.addr {
        redis::ConnectionAddr::Tcp(h, p) => Ok(((h, p), info.redis)),
        other => Err(format!(
            "{key} {url:?}: {other:?} is not supported (tcp only)"
        )),
    }
}

fn hello(info: &redis::RedisConnectionInfo, select: bool) -> Vec<redis::Cmd> {
    let mut out = Vec::new();
    if let Some(pw) = &info.password {
        let mut c = redis::cmd("AUTH");
        if let Some(u) = &info.username {
            c.arg(u);
        }
        c.arg(pw);
        out.push(c);
    }
    if select && info.db != 0 {
        let mut c = redis::cmd("SELECT");
        c.arg(info.db);
        out.push(c);
    }
    out
}

impl Plan {
    /// The plan the settings describe; `None` when no Redis is set.
    /// `redis_cluster` wins over `redis_sentinels`, which wins over
    /// `redis_url` (the daemons' default `redis_url` is then unused).
    pub fn of(s: &Settings) -> Result<Option<Plan>, (&'static str, String)> {
        if !s.redis_cluster.is_empty() {
            if !s.redis_sentinels.is_empty() {
                return Err((
                    "redis_cluster",
                    "set redis_cluster or redis_sentinels, not both".into(),
                ));
            }
            let sharded = match s.redis_cluster_pubsub.as_str() {
                "sharded" => true,
                "classic" => false,
                other => {
                    return Err((
                        "redis_cluster_pubsub",
                        format!("{other:?}: expected \"sharded\" or \"classic\""),
                    ))
                }
            };
            let mut seeds = Vec::new();
            let mut first = None;
            for url in &s.redis_cluster {
                let (addr, info) = parse(url, "redis_cluster").map_err(|e| ("redis_cluster", e))?;
                if info.db != 0 {
                    return Err(("redis_cluster", format!("{url:?}: a cluster has only db 0")));
                }
                first.get_or_insert(info);
                seeds.push(addr);
            }
            let hello = first.map(|i| hello(&i, false)).unwrap_or_default();
            return Ok(Some(Plan {
                target: Target::Cluster { seeds, sharded },
                hello,
            }));
        }
        if !s.redis_sentinels.is_empty() {
            let Some(master) = s.redis_sentinel_master.clone().filter(|m| !m.is_empty()) else {
                return Err((
                    "redis_sentinel_master",
                    "redis_sentinels needs the master's name".into(),
                ));
            };
            let mut sentinels = Vec::new();
            let mut first = None;
            for url in &s.redis_sentinels {
                let (addr, info) =
                    parse(url, "redis_sentinels").map_err(|e| ("redis_sentinels", e))?;
                first.get_or_insert(info);
                sentinels.push(addr);
            }
            let hello = first.map(|i| hello(&i, true)).unwrap_or_default();
            return Ok(Some(Plan {
                target: Target::Sentinel { sentinels, master },
                hello,
            }));
        }
        match &s.redis_url {
            None => Ok(None),
            Some(url) => {
                let (addr, info) = parse(url, "redis_url").map_err(|e| ("redis_url", e))?;
                Ok(Some(Plan {
                    target: Target::Single(addr),
                    hello: hello(&info, true),
                }))
            }
        }
    }

    /// Validation for the settings loader: the URLs, and a prefix that
    /// leaves the key schema's hash tags alone.
    pub fn check(s: &Settings) -> Result<(), (&'static str, String)> {
        if s.redis_prefix.contains(['{', '}']) {
            return Err((
                "redis_prefix",
                "must not contain { or }: the key schema sets the hash tags (README, Key schema and slot plan)".into(),
            ));
        }
        Plan::of(s).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_and_errors() {
        let mut s = Settings {
            redis_url: Some("redis://:pw@127.0.0.1:6380/2".into()),
            ..Settings::default()
        };
        let p = Plan::of(&s).unwrap().unwrap();
        assert_eq!(p.target, Target::Single(("127.0.0.1".into(), 6380)));
        assert_eq!(p.hello.len(), 2); // AUTH, SELECT
        s.redis_sentinels = vec!["redis://127.0.0.1:26379".into()];
        assert_eq!(Plan::check(&s).unwrap_err().0, "redis_sentinel_master");
        s.redis_sentinel_master = Some("mymaster".into());
        assert!(matches!(
            Plan::of(&s).unwrap().unwrap().target,
            Target::Sentinel { ref master, .. } if master == "mymaster"
        ));
        s.redis_cluster = vec!["redis://127.0.0.1:7000".into()];
        assert_eq!(Plan::check(&s).unwrap_err().0, "redis_cluster");
        s.redis_sentinels.clear();
        let p = Plan::of(&s).unwrap().unwrap();
        assert_eq!(
            p.target,
            Target::Cluster {
                seeds: vec![("127.0.0.1".into(), 7000)],
                sharded: true
            }
        );
        s.redis_cluster_pubsub = "broadcast".into();
        assert_eq!(Plan::check(&s).unwrap_err().0, "redis_cluster_pubsub");
        s.redis_cluster_pubsub = "classic".into();
        s.redis_cluster = vec!["redis://127.0.0.1:7000/3".into()];
        assert!(Plan::check(&s).unwrap_err().1.contains("db 0"));
    }
}
