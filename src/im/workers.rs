//! Messages between the workers of one IM server, over the framework's
//! worker-to-worker pipe (`send_message` → `on_pipe_message`). Their bodies
//! are the cluster's own [`Addressed`] and [`Broadcast`]: a message a
//! worker hands a sibling is the one it got from a user or the Route.
//! `Joined`, `Left`, `Hello` and `Roster` keep every worker's
//! [`crate::im::directory::Directory`] of the whole server current.

use serde::{Deserialize, Serialize};

use crate::cluster::link::{Addressed, Broadcast};
use crate::event::App;
use crate::reactor::Server;

/// One hand-off between workers (JSON, tagged by `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerMsg {
    /// Deliver to your local connections of `to` (from the Route: never
    /// sent on).
    Deliver(Addressed),
    /// Deliver to all your local users.
    Broadcast(Broadcast),
    /// (to worker 0) Forward through the Route.
    Forward(Addressed),
    /// (from worker 0) `to` is online nowhere: tell connection `fd`.
    Offline {
        /// The uid that is not online.
        to: String,
        /// The sender's connection on the receiving worker.
        fd: u64,
        /// Not sent because the location could not be read.
        #[serde(default)]
        unavailable: bool,
    },
    /// A user connected on the sending worker (one per connection).
    Joined {
        /// Its uid.
        uid: String,
    },
    /// A user's connection on the sending worker closed.
    Left {
        /// Its uid.
        uid: String,
    },
    /// The sending worker (re)started with no users: forget what it held
    /// and send it your roster.
    Hello,
    /// The sending worker's users, one entry per connection (the answer
    /// to [`WorkerMsg::Hello`]).
    Roster {
        /// Uids, repeated per connection.
        uids: Vec<String>,
    },
    /// (from worker 0) Check every connection against its inbox: the Route
    /// link was re-established, or the Route may have dropped relays.
    Check,
    /// A group message for your local members.
    GroupDeliver(crate::cluster::groups::GroupMessage),
    /// A local user joined a group.
    GroupJoined(crate::cluster::groups::Membership),
    /// A local user left a group.
    GroupLeft(crate::cluster::groups::Membership),
    /// A presence event for a group's local members.
    GroupEvent(crate::cluster::link::GroupEvent),
    /// Close a user's local connections (4000).
    Kick(crate::cluster::link::Kick),
    /// (to worker 0) A user's group message for the Route.
    GroupSend(crate::cluster::link::GroupSend),
    /// Push this frame to your connection `fd` (an answer for its sender).
    Push {
        /// The connection.
        fd: u64,
        /// The text frame.
        frame: String,
    },
    /// A kind this build does not know (a newer sibling during a reload).
    #[serde(other, skip_serializing)]
    Unknown,
}

impl WorkerMsg {
    /// The message's bytes on the pipe.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|e| {
            log::error!("im: cannot serialise a worker message: {e}");
            Vec::new()
        })
    }

    /// Parses a pipe message; malformed input is `Err` with the reason.
    pub fn parse(bytes: &[u8]) -> Result<WorkerMsg, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Hands `msg` to worker `worker` of this server.
pub fn send<A: App>(srv: &mut Server<A>, worker: usize, msg: &WorkerMsg) {
    if let Err(e) = srv.send_message(worker, msg.to_bytes()) {
        log::warn!("im: cannot hand a message to worker {worker}: {e}");
    }
}

/// Hands `msg` to every other worker of this server.
pub fn to_siblings<A: App>(srv: &mut Server<A>, msg: &WorkerMsg) {
    let me = srv.worker_id();
    for w in (0..srv.worker_count()).filter(|w| *w != me) {
        send(srv, w, msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipe_format_is_unchanged() {
        let m = WorkerMsg::Deliver(Addressed::new(
            "u2".into(),
            "u1".into(),
            serde_json::json!(1),
        ));
        assert_eq!(
            String::from_utf8(m.to_bytes()).unwrap(),
            r#"{"kind":"deliver","to":"u2","from":"u1","data":1}"#
        );
        assert_eq!(WorkerMsg::parse(&m.to_bytes()).unwrap(), m);
        assert_eq!(
            WorkerMsg::parse(br#"{"kind":"later"}"#).unwrap(),
            WorkerMsg::Unknown
        );
        for m in [
            WorkerMsg::Hello,
            WorkerMsg::Joined { uid: "a".into() },
            WorkerMsg::Roster {
                uids: vec!["a".into(), "a".into()],
            },
            WorkerMsg::Offline {
                to: "b".into(),
                fd: 3,
                unavailable: true,
            },
        ] {
            assert_eq!(WorkerMsg::parse(&m.to_bytes()).unwrap(), m);
        }
    }
}
