//! The Redis key schema: every key and channel name the cluster uses,
//! built from `redis_prefix` (empty: the seed's names).
//!
//! | key | type | owner |
//! |-----|------|-------|
//! | `P im_server` | SET | the seed's set, `{"ip":"…","port":N}` |
//! | `P im_server:lease` | ZSET | member → lease expiry (Unix ms) |
//! | `P im_server:details` | HASH | member → JSON [`crate::cluster::servers::ServerEntry`] |
//! | `P im_server:by_name` | HASH | serviceName → member |
//! | `P im_server:events` | channel | registry changes |
//! | `P im_user:<uid>` | HASH | presence records ([`crate::cluster::presence`]) |
//! | `P im_route:<uid>` | STRING | the server `/route` chose |
//! | `P route:worker:<node>/<pid>` | channel | frames for one Route worker's IM servers |
//! | `P route:broadcast` | channel | frames for every IM server |

/// The key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// The seed's set.
    pub set: String,
    /// Lease ZSET.
    pub lease: String,
    /// Details HASH.
    pub details: String,
    /// serviceName → member HASH.
    pub by_name: String,
    /// Registry change notifications channel.
    pub channel: String,
}

impl Keys {
    /// Keys under `prefix` (empty: the seed's names).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            set: format!("{prefix}im_server"),
            lease: format!("{prefix}im_server:lease"),
            details: format!("{prefix}im_server:details"),
            by_name: format!("{prefix}im_server:by_name"),
            channel: format!("{prefix}im_server:events"),
        }
    }

    /// `uid`'s presence records.
    pub fn user(&self, uid: &str) -> String {
        format!("{}im_user:{uid}", self.prefix)
    }

    /// `uid`'s last routing decision.
    pub fn route(&self, uid: &str) -> String {
        format!("{}im_route:{uid}", self.prefix)
    }

    /// The channel of Route worker `node_pid` (`<node>/<pid>`).
    pub fn worker_channel(&self, node_pid: &str) -> String {
        format!("{}route:worker:{node_pid}", self.prefix)
    }

    /// The channel IM servers announce presence changes on (the payload is
    /// the uid): Route workers drop the user's cached location.
    pub fn presence_channel(&self) -> String {
        format!("{}im_user:events", self.prefix)
    }

    /// The channel every Route worker listens to.
    pub fn broadcast_channel(&self) -> String {
        format!("{}route:broadcast", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn todays_names() {
        let k = super::Keys::new("p:");
        assert_eq!(
            [&k.set, &k.lease, &k.details, &k.by_name, &k.channel],
            [
                "p:im_server",
                "p:im_server:lease",
                "p:im_server:details",
                "p:im_server:by_name",
                "p:im_server:events"
            ]
        );
        assert_eq!(k.user("u1"), "p:im_user:u1");
        assert_eq!(k.route("u1"), "p:im_route:u1");
        assert_eq!(k.worker_channel("n/7"), "p:route:worker:n/7");
        assert_eq!(k.broadcast_channel(), "p:route:broadcast");
        assert_eq!(super::Keys::new("").set, "im_server");
    }
}
