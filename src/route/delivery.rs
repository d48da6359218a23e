//! Message forwarding (the seed's duty 6): from any program over HTTP, or
//! from an IM server for a user it does not hold, to the IM servers that
//! hold the user — whichever Route worker or node took the request.
//!
//! A user's valid connections are read from presence ([`crate::cluster::presence`])
//! and checked against the registry in Redis (same server, same instance
//! epoch; anything else is stale and deleted). Each IM server is reached
//! through the Route worker that holds its registration connection: directly
//! when that is this worker, else over Redis pub/sub on that worker's
//! channel `P route:worker:<node>/<pid>`, which a subscriber thread in every
//! worker relays into its own loop (through the worker's inbox, as a pipe
//! message). Broadcasts go to `P route:broadcast`, which every worker relays
//! to every IM server it holds.
//!
//! [`Delivery`] reads the registrations it relays for ([`Registrations`])
//! and owns nothing else; its Redis calls are [`Delivery::locate`]'s three
//! and [`Delivery::publish`].

use std::collections::HashMap;
use std::time::Duration;

use crate::cluster::keys::Keys;
use crate::cluster::link::{Addressed, Broadcast, RouteFrame};
use crate::cluster::presence::{self, Presence};
use crate::cluster::servers::{self, ServerEntry};
use crate::event::App;
use crate::process::ipc::{Envelope, PipeSender};
use crate::reactor::{Fd, Message, Server};
use crate::route::registrations::Registrations;

/// A relayed frame: push `frame` to IM-server connection `fd` (or to all).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Relay {
    /// The registration connection on the receiving worker; None: every one.
    pub fd: Option<Fd>,
    /// The `<node>/<pid>` that `fd` belongs to: a worker that adopted the
    /// connection after a handover translates it to its own fd.
    #[serde(default)]
    pub owner: Option<String>,
    /// The text frame to push.
    pub frame: String,
}

/// Locating users and relaying frames to the IM servers that hold them.
#[derive(Debug)]
pub struct Delivery {
    keys: Keys,
}

impl Delivery {
    /// Delivery under `redis_prefix`.
    pub fn new(redis_prefix: &str) -> Delivery {
        Delivery {
            keys: Keys::new(redis_prefix),
        }
    }

    /// Starts this worker's relay thread (when Redis is configured):
    /// `node_pid`'s channel and the broadcast channel, into the loop.
    pub fn start_relay<A: App>(&self, srv: &Server<A>, node_pid: &str) {
        let Some(url) = srv.settings().redis_url.clone() else {
            return;
        };
        match srv.self_sender() {
            Ok(sender) => {
                let channels = vec![
                    self.keys.worker_channel(node_pid),
                    self.keys.broadcast_channel(),
                ];
                spawn_relay(url, channels, sender, srv.worker_id());
            }
            Err(e) => log::error!(
                "route: no delivery relay for worker {}: {e}",
                srv.worker_id()
            ),
        }
    }

    /// A user's valid connections grouped by IM server, after deleting
    /// stale records. `None`: Redis is unavailable. Redis: HGETALL, HMGET,
    /// and HDEL when some records are stale.
    pub fn locate<A: App>(
        &self,
        srv: &mut Server<A>,
        uid: &str,
    ) -> Option<Vec<(ServerEntry, usize)>> {
        let keys = &self.keys;
        let records = srv.redis_cmd(|c| presence::all(c, keys, uid))?;
        if records.is_empty() {
            return Some(Vec::new());
        }
        let mut members: Vec<String> = records.iter().map(|p| p.member.clone()).collect();
        members.sort();
        members.dedup();
        let entries = srv.redis_cmd(|c| servers::details(c, keys, &members))?;
        let (valid, stale): (Vec<Presence>, Vec<Presence>) = records
            .into_iter()
            .partition(|p| entries.get(&p.member).is_some_and(|e| e.epoch == p.epoch));
        if !stale.is_empty() {
            let _ = srv.redis_cmd(|c| presence::remove_fields(c, keys, uid, &stale));
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for p in &valid {
            *counts.entry(p.member.clone()).or_default() += 1;
        }
        let mut out: Vec<(ServerEntry, usize)> = counts
            .into_iter()
            .filter_map(|(m, n)| Some((entries.get(&m)?.clone(), n)))
            .collect();
        out.sort_by(|a, b| a.0.service_name.cmp(&b.0.service_name));
        Some(out)
    }

    /// Delivers `msg` to every valid connection of `msg.to`, except on the
    /// IM server `exclude` (the one that already delivered locally).
    /// Returns the number of user connections the message was handed to,
    /// or `None` when Redis is unavailable.
    pub fn deliver<A: App>(
        &self,
        regs: &Registrations,
        srv: &mut Server<A>,
        msg: Addressed,
        exclude: Option<&str>,
    ) -> Option<usize> {
        let targets = self.locate(srv, &msg.to)?;
        let frame = RouteFrame::Deliver(msg).to_text();
        let mut delivered = 0;
        for (entry, devices) in targets {
            if exclude == Some(entry.member().as_str()) {
                continue;
            }
            if self.relay(regs, srv, &entry, &frame) {
                delivered += devices;
            }
        }
        Some(delivered)
    }

    /// Hands `frame` to the Route worker holding `entry`'s connection.
    fn relay<A: App>(
        &self,
        regs: &Registrations,
        srv: &mut Server<A>,
        entry: &ServerEntry,
        frame: &str,
    ) -> bool {
        let Some((owner_worker, fd)) = entry.owner.rsplit_once('/') else {
            return false;
        };
        let Ok(fd) = fd.parse::<Fd>() else {
            return false;
        };
        if owner_worker == regs.node_pid() {
            return srv.push(fd, Message::Text(frame.to_string()));
        }
        let relay = Relay {
            fd: Some(fd),
            owner: Some(owner_worker.to_string()),
            frame: frame.to_string(),
        };
        self.publish(srv, &self.keys.worker_channel(owner_worker), &relay)
            .unwrap_or(0)
            > 0
    }

    /// Sends `msg` to every user of every IM server; returns how many Route
    /// workers took it.
    pub fn broadcast<A: App>(&self, srv: &mut Server<A>, msg: Broadcast) -> Option<i64> {
        let relay = Relay {
            fd: None,
            owner: None,
            frame: RouteFrame::Broadcast(msg).to_text(),
        };
        self.publish(srv, &self.keys.broadcast_channel(), &relay)
    }

    /// PUBLISHes `relay` on `channel`; returns the number of receivers.
    /// Redis: one PUBLISH.
    fn publish<A: App>(&self, srv: &mut Server<A>, channel: &str, relay: &Relay) -> Option<i64> {
        let payload = serde_json::to_string(relay).unwrap_or_default();
        srv.redis_cmd(|c| {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(&payload)
                .query::<i64>(c)
        })
    }

    /// A relayed frame arrived from the relay thread: push it.
    pub fn on_relay<A: App>(&self, regs: &Registrations, srv: &mut Server<A>, bytes: &[u8]) {
        let Ok(r) = serde_json::from_slice::<Relay>(bytes) else {
            log::warn!("route: dropping a malformed relayed message");
            return;
        };
        let Some(fd) = r.fd else {
            for fd in regs.registered_fds() {
                srv.push(fd, Message::Text(r.frame.clone()));
            }
            return;
        };
        // Addressed to the worker this one replaced: translate its fd.
        let target = match r.owner {
            Some(o) if o != regs.node_pid() => regs.adopted_fd(&format!("{o}/{fd}")),
            _ => Some(fd),
        };
        match target {
            Some(fd) if srv.push(fd, Message::Text(r.frame)) => {}
            _ => log::info!(
                "route: IM server connection {fd} is gone; a relayed message was not delivered"
            ),
        }
    }
}

/// Starts the relay thread: SUBSCRIBE to this worker's channel and the
/// broadcast channel, hand each message to the loop. Reconnects with
/// backoff while Redis is away.
fn spawn_relay(url: String, channels: Vec<String>, sender: PipeSender, worker_id: usize) {
    let spawned = std::thread::Builder::new()
        .name(format!("route-relay-{worker_id}"))
        .spawn(move || {
            let mut backoff = Duration::from_millis(100);
            loop {
                let res: redis::RedisResult<()> = (|| {
                    let client = redis::Client::open(url.as_str())?;
                    let mut conn =
                        client.get_connection_with_timeout(Duration::from_millis(500))?;
                    let mut ps = conn.as_pubsub();
                    for c in &channels {
                        ps.subscribe(c)?;
                    }
                    backoff = Duration::from_millis(100);
                    loop {
                        let msg = ps.get_message()?;
                        let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                        if let Err(e) = sender.send(&Envelope::Pipe {
                            from: worker_id as u32,
                            data: payload,
                        }) {
                            log::warn!("route relay: cannot hand a message to the loop: {e}");
                        }
                    }
                })();
                if let Err(e) = res {
                    log::debug!("route relay: {e}; resubscribing");
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the delivery relay thread: {e}");
    }
}
