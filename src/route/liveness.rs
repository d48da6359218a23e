//! Which IM servers are alive (the seed's duties 1 and 4): the Route's
//! periodic sweep, and the silent → re-admitted / closed life of a peer,
//! as an `impl` block of [`Registrations`].
//!
//! A registered peer is [`Liveness::Live`] while it sends frames (pings
//! count). Silent for `heartbeat_idle_time` it becomes
//! [`Liveness::Silent`]: its entry leaves the registry at once (a durable
//! removal: no user is routed to it), but its connection is kept for
//! `heartbeat_grace_time`. If it speaks again within that time it is
//! re-admitted under its old registration (same member, serviceName,
//! epoch, owner, registered_at_ms), with no action from the client: a
//! probe (a renewal, which answers "missing" since the removal went out
//! first, in FIFO order) makes sure nobody registered that address
//! meanwhile, then the old entry is stored again. After the grace time the
//! connection is closed as before. A paused process (GC, VM migration,
//! stopped container) thus comes back by itself. Registered connections
//! get their own idle limit in the reactor (idle + grace + two sweeps), so
//! that this module, not the framework's idle check, decides when they
//! close.
//!
//! The sweep, every `heartbeat_check_interval`: moves peers between those
//! phases, renews the leases of live ones (re-registering any that Redis
//! lost, so a Redis restarted empty is rebuilt within one sweep), stores
//! registrations that arrived while Redis was away, and reaps expired
//! leases left by dead workers or nodes ([`Reach`]: not within one lease
//! after the registry came back, since nobody could renew while it was
//! away). Every renewal, store and the reap
//! are requests sent together: one write, one round trip, whatever the
//! number of peers; nothing waits for Redis.

use std::time::Duration;

use crate::event::{App, Holds};
use crate::process::scoreboard::now_ms;
use crate::reactor::{Fd, Server};
use crate::route::registrations::{Registrations, Store};
use crate::route::registry::{Renew, Renewal};
use crate::route::settings;
use crate::route::stats;

/// Whether this worker reaches the registry's Redis (on a cluster: the
/// registry slot's master; a failover of another master changes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Renewals and the reap go out.
    Up,
    /// Nothing goes out; peers are served from memory.
    Unreachable,
    /// Back since the last sweep: renewals go out, but no lease is reaped
    /// yet, as the other holders could not renew while Redis was away
    /// either.
    Back {
        /// One lease after the return: reaping starts again.
        reap_from_ms: u64,
    },
}

/// A registered peer's liveness phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Liveness {
    /// Speaking: in the registry (or to be stored there).
    #[default]
    Live,
    /// Silent since `since_ms` (Unix ms): out of the registry, connection
    /// kept until `since_ms + heartbeat_grace_time`.
    Silent {
        /// When the sweep found it silent.
        since_ms: u64,
    },
}

impl Registrations {
    /// `heartbeat_grace_time`.
    fn grace(&self) -> Duration {
        self.cfg.grace()
    }

    /// Gives a registered connection its own idle limit for the
    /// framework's idle check (see the module doc).
    pub(super) fn hold_connection<A: App>(&self, srv: &mut Server<A>, fd: Fd) {
        let limit = settings::held_idle_limit(srv.settings(), self.grace());
        srv.set_idle_limit(fd, Some(limit));
    }

    /// Whether `fd` is a registered peer in the silent phase.
    pub fn is_silent(&self, fd: Fd) -> bool {
        self.peers
            .get(&fd)
            .is_some_and(|p| matches!(p.liveness, Liveness::Silent { .. }))
    }

    /// `fd` sent a frame: a silent peer is re-admitted before the frame is
    /// handled. O(1).
    pub fn spoke<A: Holds<Registrations>>(&mut self, srv: &mut Server<A>, fd: Fd) {
        if self.is_silent(fd) {
            self.readmit(srv, fd);
        }
    }

    /// Live → Silent: the entry leaves the registry now, the connection
    /// stays (or closes at once when the grace time is 0).
    fn go_silent<A: App>(&mut self, srv: &mut Server<A>, fd: Fd, now: u64, idle_ms: u64) {
        let grace = self.grace();
        let Some(held) = self.peers.get(&fd).and_then(|p| p.held.clone()) else {
            return;
        };
        if grace.is_zero() {
            log::warn!("route: fd {fd} silent for more than {idle_ms} ms; closing it");
            return self.close_silent(srv, fd);
        }
        log::warn!(
            "route: {} at {} (fd {fd}) silent for more than {idle_ms} ms: out of the registry; its connection is kept {} s for it to come back",
            held.entry.service_name,
            held.entry.member(),
            grace.as_secs_f64()
        );
        // Also when a store is under way: the removal goes out after it.
        if held.stored || held.storing {
            self.remove_entry(srv, &held.entry, "silent");
        }
        if let Some(p) = self.peers.get_mut(&fd) {
            p.liveness = Liveness::Silent { since_ms: now };
            if let Some(h) = p.held.as_mut() {
                h.stored = false;
            }
        }
        self.save_held(srv, fd);
    }

    /// Closes a silent peer's connection (its entry is already out, or is
    /// removed now when the grace time is 0).
    fn close_silent<A: App>(&mut self, srv: &mut Server<A>, fd: Fd) {
        if let Some(p) = self.peers.get_mut(&fd) {
            p.closing_cause = Some("silent");
        }
        srv.disconnect(fd, 1001, "heartbeat timeout");
        self.close(srv, fd);
    }

    /// Silent → Live: the peer spoke again within the grace time. Probe
    /// whether the address was registered anew meanwhile
    /// ([`Self::readmit_probed`] stores the old entry again if not). While
    /// Redis is away the entry stays pending and the sweep stores it.
    fn readmit<A: Holds<Registrations>>(&mut self, srv: &mut Server<A>, fd: Fd) {
        let Some(peer) = self.peers.get_mut(&fd) else {
            return;
        };
        let Liveness::Silent { since_ms } = peer.liveness else {
            return;
        };
        peer.liveness = Liveness::Live;
        let Some(h) = peer.held.as_mut() else {
            return;
        };
        let now = now_ms();
        h.entry.last_seen_ms = now;
        h.storing = true; // the sweep leaves it alone until the probe answers
        let (member, owner) = (h.entry.member().to_string(), h.entry.owner.clone());
        let load = h.entry.load;
        stats::count(srv.row(), stats::READMISSIONS);
        log::info!(
            "route: re-admitted {} at {member} (fd {fd}) after {} ms of silence",
            h.entry.service_name,
            now.saturating_sub(since_ms)
        );
        self.save_held(srv, fd);
        let until = now + settings::lease(srv.settings()).as_millis() as u64;
        let probe = Renew {
            lease_until_ms: until,
            load: Some(load),
            draining: None,
            now_ms: now,
        };
        let publish = srv.redis_publish_command();
        let req = self.registry.renew(&member, &owner, &probe, publish);
        srv.redis(req, move |app: &mut A, srv, r: redis::RedisResult<i64>| {
            app.part().readmit_probed(srv, fd, &member, r, until);
        });
    }

    /// The re-admission probe's answer.
    fn readmit_probed<A: Holds<Registrations>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        member: &str,
        r: redis::RedisResult<i64>,
        until: u64,
    ) {
        let live = !self.is_silent(fd);
        let Some(h) = self.held_mut(fd, member) else {
            return; // closed or re-registered meanwhile
        };
        h.storing = false;
        let entry = h.entry.clone();
        match r.map(Renewal::from_code) {
            // The removal did not go out first (it always does: FIFO).
            Ok(Renewal::Renewed) => h.stored = live,
            Ok(Renewal::Missing) if live => self.store(srv, fd, &entry, until, Store::Readmit),
            Ok(Renewal::Missing) => {}
            Ok(Renewal::Superseded) => {
                log::info!(
                    "route: {} at {member} (fd {fd}) spoke again, but the address was registered anew meanwhile; fd {fd} no longer holds it",
                    entry.service_name
                );
                self.let_go(srv, fd);
            }
            Err(e) => {
                log::debug!("route: re-admitting {member}: {e}");
                self.note_outage();
            }
        }
    }

    /// Moves peers between the liveness phases (see the module doc).
    /// O(peers).
    fn check_liveness<A: Holds<Registrations>>(&mut self, srv: &mut Server<A>, now: u64) {
        let idle_ms = settings::idle(srv.settings()).as_millis() as u64;
        let grace_ms = self.grace().as_millis() as u64;
        let (mut silent, mut spoke, mut expired) = (Vec::new(), Vec::new(), Vec::new());
        for (fd, p) in &self.peers {
            if p.held.is_none() {
                continue;
            }
            let Some(last) = srv.connection_info(*fd).map(|i| i.last_active_ms) else {
                continue;
            };
            match p.liveness {
                Liveness::Live if now.saturating_sub(last) > idle_ms => silent.push(*fd),
                Liveness::Live => {}
                Liveness::Silent { since_ms } if last > since_ms => spoke.push(*fd),
                Liveness::Silent { since_ms } if now.saturating_sub(since_ms) > grace_ms => {
                    expired.push(*fd)
                }
                Liveness::Silent { .. } => {}
            }
        }
        for fd in silent {
            self.go_silent(srv, fd, now, idle_ms);
        }
        for fd in spoke {
            self.readmit(srv, fd);
        }
        for fd in expired {
            log::warn!(
                "route: fd {fd} still silent {} s after it left the registry; closing it",
                self.grace().as_secs_f64()
            );
            self.close_silent(srv, fd);
        }
    }

    /// The periodic sweep (see the module doc).
    pub fn sweep<A: Holds<Registrations>>(&mut self, srv: &mut Server<A>) {
        if srv.is_handing_over() {
            return; // the registrations are moving to the replacement
        }
        let now = now_ms();
        self.check_liveness(srv, now);
        if !srv.redis_ok_for(&self.registry.keys().set) {
            self.note_outage();
            return;
        }
        let lease_ms = settings::lease(srv.settings()).as_millis() as u64;
        self.reach = match self.reach {
            Reach::Unreachable => {
                log::info!("route: Redis is back");
                Reach::Back {
                    reap_from_ms: now + lease_ms,
                }
            }
            Reach::Back { reap_from_ms } if now < reap_from_ms => self.reach,
            Reach::Back { .. } | Reach::Up => Reach::Up,
        };
        let until = now + lease_ms;
        let fds: Vec<Fd> = self.peers.keys().copied().collect();
        for fd in fds {
            self.renew_peer(srv, fd, now, until);
        }
        if self.reach != Reach::Up {
            return; // the other holders' renewals may not have landed yet
        }
        srv.redis(
            self.registry.reap(now, srv.redis_publish_command()),
            |_: &mut A, srv, r: redis::RedisResult<Vec<String>>| {
                for m in r.unwrap_or_default() {
                    stats::removed(srv.row(), "lease");
                    log::warn!(
                        "route: reaped {m}: its lease expired (its Route worker or node is gone)"
                    );
                }
            },
        );
    }

    /// The registry could not be reached (logged once per outage).
    pub(super) fn note_outage(&mut self) {
        if self.reach != Reach::Unreachable {
            self.reach = Reach::Unreachable;
            log::warn!("route: Redis is unreachable; serving from memory and retrying");
        }
    }

    /// One live peer's part of the sweep: renew its lease, or store it
    /// when Redis does not have it (yet). Silent peers are left out.
    fn renew_peer<A: Holds<Registrations>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        now: u64,
        until: u64,
    ) {
        let Some(peer) = self.peers.get(&fd) else {
            return;
        };
        if peer.liveness != Liveness::Live {
            return; // out of the registry until it speaks again
        }
        let Some(held) = peer.held.clone() else {
            return;
        };
        if held.storing {
            return;
        }
        if !held.stored {
            let mut entry = held.entry;
            entry.last_seen_ms = now;
            let why = if held.acked {
                Store::Rebuild
            } else {
                Store::Pending
            };
            return self.store(srv, fd, &entry, until, why);
        }
        let r = Renew {
            lease_until_ms: until,
            load: Some(held.entry.load),
            draining: None,
            now_ms: now,
        };
        let (member, owner) = (held.entry.member().to_string(), held.entry.owner.clone());
        let publish = srv.redis_publish_command();
        let req = self.registry.renew(&member, &owner, &r, publish);
        srv.redis(req, move |app: &mut A, srv, r: redis::RedisResult<i64>| {
            app.part().renewed(srv, fd, &member, r, until);
        });
    }

    /// A renewal's answer: store again what Redis lost; let go of what
    /// someone else owns now.
    fn renewed<A: Holds<Registrations>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        member: &str,
        r: redis::RedisResult<i64>,
        until: u64,
    ) {
        if self.is_silent(fd) {
            return; // it fell silent meanwhile: its removal follows
        }
        let Some(held) = self.held_mut(fd, member).map(|h| h.clone()) else {
            return;
        };
        match r.map(Renewal::from_code) {
            Ok(Renewal::Renewed) => {}
            Ok(Renewal::Missing) => {
                let mut entry = held.entry;
                entry.last_seen_ms = now_ms();
                self.store(srv, fd, &entry, until, Store::Rebuild);
            }
            Ok(Renewal::Superseded) => {
                log::info!(
                    "route: {} re-registered elsewhere; fd {fd} no longer holds it",
                    held.entry.service_name
                );
                self.let_go(srv, fd);
            }
            Err(e) => {
                log::debug!("route: renewing {member}: {e}");
                self.note_outage();
            }
        }
    }
}
