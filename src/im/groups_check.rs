//! Checking this worker's group feeds against their groups' heads (a
//! child module of [`super`], as an `impl` block of [`GroupFeeds`]).
//!
//! A group message can reach no feed here without anyone knowing: the
//! Route fanned it out while this server was out of the registry (its
//! lease lapsed in a Redis outage, it was silent a while), or a relay was
//! dropped on the way. And an audit that found a group's writes lost in a
//! failover starts a new group epoch ([`crate::cluster::audit`]) that the
//! members must hear as `resync`. Both are found by reading the group's
//! head again: one read per group for all its local members, each feed
//! then catching up from the stream (or resyncing) as after a gap.
//!
//! Groups are checked when the user feeds are ([`crate::im::feeds`]: the
//! Route's `check`, a re-registration, 2 s and 6 s after a Redis
//! disruption), and every one once per `inbox_check_interval` in a
//! background sweep, a share of them per tick.

use redis::RedisResult;

use super::GroupFeeds;
use crate::event::Holds;
use crate::im::feeds::FLUSH_MS;
use crate::im::sweep::Sweep;
use crate::reactor::{Fd, Server};

/// The groups waiting for a check.
pub(super) type Checks = Sweep<String>;

impl GroupFeeds {
    /// Sweeps every group once per `secs` seconds (0: never).
    pub fn with_sweep(mut self, secs: f64) -> GroupFeeds {
        self.checks = Sweep::new(secs, FLUSH_MS);
        self
    }

    /// Every group with members here may have missed a message: check
    /// them all, a few hundred per tick.
    pub fn check_all(&mut self) {
        self.checks.all(self.by_group.keys().cloned());
    }

    /// Every [`FLUSH_MS`]: checks the next groups due.
    pub fn tick<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>) {
        let groups = &self.by_group;
        let due = self
            .checks
            .due(groups.len(), || groups.keys().cloned().collect::<Vec<_>>());
        for g in due {
            self.check(srv, &g, None);
        }
    }

    /// Reads `g`'s head and catches up the feed of `only`, or of every
    /// local member (those still members when the answer comes). A failed
    /// read is left to the next check: the sweep, or a disruption's.
    pub(super) fn check<A: Holds<GroupFeeds>>(
        &mut self,
        srv: &mut Server<A>,
        g: &str,
        only: Option<Fd>,
    ) {
        if !self.by_group.contains_key(g) {
            return; // no member here any more
        }
        let group = g.to_string();
        srv.redis(
            self.groups.meta(g),
            move |app: &mut A, srv, r: RedisResult<Vec<Option<String>>>| {
                let me = app.part();
                let v = match r {
                    Ok(v) => v,
                    Err(e) => {
                        log::debug!("im: checking group {group}: {e}");
                        return;
                    }
                };
                let (Some(Some(epoch)), Some(Some(seq))) = (v.first(), v.get(1)) else {
                    return; // no head yet: nothing was sent
                };
                let seq = seq.parse().unwrap_or(0);
                let fds = match only {
                    Some(fd) => vec![fd],
                    None => me
                        .by_group
                        .get(&group)
                        .map(|l| l.fds.clone())
                        .unwrap_or_default(),
                };
                for fd in fds {
                    let Some(feed) = me.conns.get_mut(&fd).and_then(|c| c.feeds.get_mut(&group))
                    else {
                        continue;
                    };
                    let steps = feed.checked(epoch, seq);
                    me.run(srv, fd, &group, steps);
                }
            },
        );
    }
}
