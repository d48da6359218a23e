//! This worker's group members: which local connections belong to which
//! group, each one's [`Feed`] of the group's stream (gseq, replay, gaps),
//! and this server's member counts in Redis (`group:{G}:servers`, the
//! field `<member>|<epoch>`: one per (worker, uid, group) online here),
//! which decide whether the Route sends a group's messages here at all.
//!
//! - At connect: the user's groups (`user_groups:{U}`), each one counted,
//!   its head sent (`{"method":"group",…}`) and replayed from the
//!   client's `gsince` position, or from after its join or ack.
//! - A group message: delivered to the local members' feeds. When it
//!   carries a membership version newer than this worker has seen (a join
//!   or leave this worker may not have heard of yet), the local members
//!   are checked against Redis first (`SMISMEMBER`) and the messages of
//!   that group wait: nobody gets a message sent after its leave
//!   completed.
//! - `group_joined`: the user's local connections become members, live
//!   from the gseq of the join, and are caught up from the stream (a
//!   message may have gone by before the news came).
//! - `group_left` and close: forgotten, and uncounted.
//! - Checks ([`check`]): every group with members here is read again
//!   when the user feeds are checked and in a sweep; a message that
//!   reached no feed here (fanned out while this server was out of the
//!   registry) is caught up, a new group epoch is a `resync`.
//! - Messages that arrive out of gseq order (two Route workers relaying at
//!   once) are put back in order here, once for all local members
//!   ([`Order`]).

use std::collections::HashMap;

use redis::RedisResult;

use crate::cluster::groups::{GroupMessage, Groups, Membership};
use crate::cluster::inbox::{self, Head};
use crate::cluster::user::Resume;
use crate::event::Holds;
use crate::im::feed::{Feed, Live, Step, PAGE};
use crate::reactor::{Fd, Message, Server};

#[path = "groups_check.rs"]
mod check;

/// Connection attribute: its group feeds' positions.
pub const ATTR_GROUPS: &str = "im.groups";

/// One group's local state.
#[derive(Debug, Default)]
struct Local {
    /// Local member connections.
    fds: Vec<Fd>,
    /// Connections per member uid (the count in Redis is per uid).
    uids: HashMap<String, u32>,
    /// The newest membership version this worker has caught up with.
    mver_seen: u64,
    /// Messages waiting for a membership check, in order.
    held: Option<Vec<GroupMessage>>,
    /// Putting the group's messages back in gseq order for all its local
    /// members at once.
    order: Order,
}

/// A group's messages arrive out of order when several Route workers
/// relay them at once: a later one is held here a moment
/// ([`REORDER_MS`]) for the one before it, so that the members' feeds do
/// not each read the gap from the stream (one read per member per gap).
#[derive(Debug, Default)]
struct Order {
    /// The epoch of the messages below.
    epoch: String,
    /// The highest gseq handed to the feeds (0: none yet).
    next: u64,
    /// Messages that came early, by gseq.
    early: std::collections::BTreeMap<u64, GroupMessage>,
    /// Whether a release is scheduled.
    armed: bool,
}

/// How long a group message that came early waits for the ones before it
/// before the feeds read the gap themselves.
const REORDER_MS: u64 = 50;

/// A connection's groups.
#[derive(Debug, Default)]
struct ConnGroups {
    uid: String,
    feeds: HashMap<String, Feed>,
}

/// The group members of this worker.
#[derive(Debug)]
pub struct GroupFeeds {
    groups: Groups,
    /// This server's field in the counts hashes: `<member>|<epoch>`.
    field: String,
    by_group: HashMap<String, Local>,
    conns: HashMap<Fd, ConnGroups>,
    checks: check::Checks,
}

impl GroupFeeds {
    /// Groups under `groups`' keys, counted as this server (`member`,
    /// instance `epoch`).
    pub fn new(groups: Groups, member: &str, epoch: &str) -> GroupFeeds {
        GroupFeeds {
            groups,
            field: format!("{member}|{epoch}"),
            by_group: HashMap::new(),
            conns: HashMap::new(),
            checks: check::Checks::new(0.0, crate::im::feeds::FLUSH_MS),
        }
    }

    /// A user connection opened: load its groups, then each one's head.
    pub fn open<A: Holds<GroupFeeds>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        uid: &str,
        mut gsince: HashMap<String, Resume>,
    ) {
        self.conns.insert(
            fd,
            ConnGroups {
                uid: uid.to_string(),
                feeds: HashMap::new(),
            },
        );
        srv.redis(
            self.groups.of_user(uid),
            move |app: &mut A, srv, r: RedisResult<Vec<String>>| {
                let me = app.part();
                let mut groups = match r {
                    Ok(g) => g,
                    Err(e) => {
                        // Never followed silently without its groups.
                        log::warn!("im: the groups of fd {fd} could not be read: {e}");
                        srv.disconnect(fd, 1013, "groups unavailable");
                        return;
                    }
                };
                groups.sort();
                for g in groups {
                    let resume = gsince.remove(&g).unwrap_or_default();
                    me.add(srv, fd, &g, Feed::opening_group(&g, resume));
                    me.head(srv, fd, &g);
                }
            },
        );
    }

    /// Makes `fd` a member of `g` here with `feed`, counted in Redis when
    /// it is its user's first connection in `g` on this worker.
    fn add<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, fd: Fd, g: &str, feed: Feed) {
        let Some(c) = self.conns.get_mut(&fd) else {
            return;
        };
        if c.feeds.contains_key(g) {
            return;
        }
        c.feeds.insert(g.to_string(), feed);
        let local = self.by_group.entry(g.to_string()).or_default();
        local.fds.push(fd);
        let n = local.uids.entry(c.uid.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            srv.redis_durable(self.groups.count(g, &self.field, 1));
        }
    }

    /// Forgets `fd`'s membership of `g`, uncounting its user's last one.
    fn remove<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, fd: Fd, g: &str) {
        let Some(c) = self.conns.get_mut(&fd) else {
            return;
        };
        if c.feeds.remove(g).is_none() {
            return;
        }
        let Some(local) = self.by_group.get_mut(g) else {
            return;
        };
        local.fds.retain(|f| *f != fd);
        if let Some(n) = local.uids.get_mut(&c.uid) {
            *n -= 1;
            if *n == 0 {
                local.uids.remove(&c.uid);
                srv.redis_durable(self.groups.count(g, &self.field, -1));
            }
        }
        if local.fds.is_empty() && local.held.is_none() {
            self.by_group.remove(g);
        }
    }

    fn head<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, fd: Fd, g: &str) {
        let Some(c) = self.conns.get(&fd) else {
            return;
        };
        let group = g.to_string();
        srv.redis(
            self.groups.head(g, &c.uid),
            move |app: &mut A, srv, r: RedisResult<Vec<redis::Value>>| {
                let me = app.part();
                let v = match r {
                    Ok(v) => v,
                    Err(e) => {
                        // Never followed silently without this group.
                        log::warn!("im: the head of group {group} for fd {fd}: {e}");
                        srv.disconnect(fd, 1013, "groups unavailable");
                        return;
                    }
                };
                let head = redis::from_redis_value::<(String, u64, u64)>(&redis::Value::Array(v));
                let Ok((epoch, seq, acked)) = head else {
                    // Not a member any more: not followed.
                    me.remove(srv, fd, &group);
                    return;
                };
                let Some(c) = me.conns.get_mut(&fd) else {
                    return;
                };
                let uid = c.uid.clone();
                let Some(feed) = c.feeds.get_mut(&group) else {
                    return;
                };
                let steps = feed.welcomed(&uid, Head { epoch, seq, acked });
                me.run(srv, fd, &group, steps);
            },
        );
    }

    /// Writes `fd`'s group positions into its attributes (for a handover;
    /// see [`crate::im::feeds::Feeds::keep_position`]).
    pub fn keep_positions<A: crate::event::App>(&self, srv: &mut Server<A>, fd: Fd) {
        if self.conns.contains_key(&fd) {
            srv.set_attr(fd, ATTR_GROUPS, self.positions(fd));
        }
    }

    /// Carries out a group feed's steps.
    fn run<A: Holds<GroupFeeds>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        g: &str,
        steps: Vec<Step>,
    ) {
        if !steps.is_empty() && srv.is_handing_over() {
            // After this run, so that the attribute names what it pushed.
            srv.after(0, move |app: &mut A, srv, _| {
                app.part().keep_positions(srv, fd)
            });
        }
        for s in steps {
            match s {
                Step::Push(f) | Step::Message(f) | Step::Refuse(f) => {
                    srv.push(fd, Message::Text(f));
                }
                Step::Fetch { from, to } => {
                    let group = g.to_string();
                    srv.redis(
                        self.groups.range(g, from, to, PAGE),
                        move |app: &mut A, srv, r: RedisResult<redis::Value>| {
                            let me = app.part();
                            let entries = match r {
                                Ok(v) => inbox::parse_entries(v),
                                Err(e) => {
                                    log::warn!("im: reading group {group} failed: {e}");
                                    Vec::new() // reported as trimmed: a gap is never silent
                                }
                            };
                            let Some(feed) =
                                me.conns.get_mut(&fd).and_then(|c| c.feeds.get_mut(&group))
                            else {
                                return;
                            };
                            let steps = feed.fetched(&entries, to);
                            me.run(srv, fd, &group, steps);
                        },
                    );
                }
            }
        }
    }

    /// A group message for this worker's members.
    pub fn deliver<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, m: GroupMessage) {
        let Some(local) = self.by_group.get_mut(&m.group) else {
            return; // no member here
        };
        if let Some(held) = local.held.as_mut() {
            held.push(m);
            return;
        }
        if m.mver > local.mver_seen {
            // Membership changed since this worker last looked: ask who
            // is still a member before delivering.
            let uids: Vec<String> = local.uids.keys().cloned().collect();
            let (g, mver) = (m.group.clone(), m.mver);
            local.held = Some(vec![m]);
            if uids.is_empty() {
                return self.checked(srv, &g, mver, Vec::new(), Vec::new());
            }
            srv.redis(
                self.groups.are_members(&g, &uids),
                move |app: &mut A, srv, r: RedisResult<Vec<u8>>| {
                    let flags = r.unwrap_or_else(|_| vec![1; uids.len()]);
                    app.part().checked(srv, &g, mver, uids, flags);
                },
            );
            return;
        }
        self.pass(srv, m);
    }

    /// Puts `m` in gseq order with the group's other messages, then hands
    /// what is in order to the feeds.
    fn pass<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, m: GroupMessage) {
        let Some(local) = self.by_group.get_mut(&m.group) else {
            return;
        };
        let o = &mut local.order;
        if o.epoch != m.stamp.epoch {
            *o = Order {
                epoch: m.stamp.epoch.clone(),
                ..Order::default()
            };
        }
        let g = m.group.clone();
        let mut ready = Vec::new();
        if o.next == 0 || m.stamp.seq <= o.next + 1 {
            o.next = o.next.max(m.stamp.seq);
            ready.push(m);
            while let Some(m) = o.early.remove(&(o.next + 1)) {
                o.next = m.stamp.seq;
                ready.push(m);
            }
        } else {
            o.early.insert(m.stamp.seq, m);
            if !o.armed {
                o.armed = true;
                srv.after(REORDER_MS, move |app: &mut A, srv, _| {
                    app.part().release(srv, &g);
                });
            }
        }
        for m in ready {
            self.fan(srv, m);
        }
    }

    /// The wait is over: what came early goes to the feeds, in order (they
    /// read what is still missing).
    fn release<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, g: &str) {
        let Some(local) = self.by_group.get_mut(g) else {
            return;
        };
        let o = &mut local.order;
        o.armed = false;
        let early = std::mem::take(&mut o.early);
        if let Some((&last, _)) = early.iter().next_back() {
            o.next = o.next.max(last);
        }
        for (_, m) in early {
            self.fan(srv, m);
        }
    }

    /// Hands `m` to every local member's feed.
    fn fan<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, m: GroupMessage) {
        let Some(local) = self.by_group.get(&m.group) else {
            return;
        };
        let frame = crate::cluster::inbox::Entry {
            seq: m.stamp.seq,
            id: m.stamp.id.clone(),
            from: m.from.clone(),
            data: crate::cluster::encode(&m.data),
        }
        .group_frame(&m.group);
        let live = Live {
            epoch: m.stamp.epoch.clone(),
            seq: m.stamp.seq,
            frame,
        };
        for fd in local.fds.clone() {
            let Some(feed) = self
                .conns
                .get_mut(&fd)
                .and_then(|c| c.feeds.get_mut(&m.group))
            else {
                continue;
            };
            let steps = feed.offer(live.clone());
            self.run(srv, fd, &m.group, steps);
        }
    }

    /// The membership check came back: drop those who left, then deliver
    /// what waited.
    fn checked<A: Holds<GroupFeeds>>(
        &mut self,
        srv: &mut Server<A>,
        g: &str,
        mver: u64,
        uids: Vec<String>,
        flags: Vec<u8>,
    ) {
        let gone: Vec<&String> = uids
            .iter()
            .zip(&flags)
            .filter(|(_, f)| **f == 0)
            .map(|(u, _)| u)
            .collect();
        let fds: Vec<Fd> = self
            .conns
            .iter()
            .filter(|(_, c)| c.feeds.contains_key(g) && gone.contains(&&c.uid))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in fds {
            self.remove(srv, fd, g);
        }
        let Some(local) = self.by_group.get_mut(g) else {
            return;
        };
        local.mver_seen = local.mver_seen.max(mver);
        for m in local.held.take().unwrap_or_default() {
            self.deliver(srv, m);
        }
        if self
            .by_group
            .get(g)
            .is_some_and(|l| l.fds.is_empty() && l.held.is_none())
        {
            self.by_group.remove(g);
        }
    }

    /// `uid` joined `m.group`: its connections `fds` here become members,
    /// live after the join's gseq, and are caught up from the stream.
    pub fn joined<A: Holds<GroupFeeds>>(
        &mut self,
        srv: &mut Server<A>,
        fds: &[Fd],
        m: &Membership,
    ) {
        for fd in fds {
            self.add(
                srv,
                *fd,
                &m.group,
                Feed::adopted_group(&m.group, m.epoch.clone(), m.gseq),
            );
            self.check(srv, &m.group, Some(*fd));
        }
    }

    /// `uid` left `m.group`: its connections `fds` here are no members.
    pub fn left<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, fds: &[Fd], m: &Membership) {
        for fd in fds {
            self.remove(srv, *fd, &m.group);
        }
        if let Some(local) = self.by_group.get_mut(&m.group) {
            local.mver_seen = local.mver_seen.max(m.mver);
        }
    }

    /// A presence event: pushed to the local members of the group.
    pub fn event<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, group: &str, frame: &str) {
        if let Some(local) = self.by_group.get(group) {
            for fd in local.fds.clone() {
                srv.push(fd, Message::Text(frame.to_string()));
            }
        }
    }

    /// `{"ack":N,"group":G[,"epoch":E]}` from `fd`: ignored when E is not
    /// the feed's group epoch (stale: sent before a `resync`), refused
    /// when it does not follow `g` or N is past what it was pushed.
    pub fn ack<A: Holds<GroupFeeds>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        g: &str,
        n: u64,
        of: Option<&str>,
    ) {
        let Some(c) = self.conns.get(&fd) else { return };
        let feed = c.feeds.get(g);
        if let (Some(f), Some(e)) = (feed, of) {
            if f.position().0 != e {
                return;
            }
        }
        let last = feed.map(|f| f.position().1);
        match last {
            Some(last) if n <= last => srv.redis_send(self.groups.ack(g, &c.uid, n)),
            _ => {
                let e = crate::cluster::ProtocolError::new(
                    crate::cluster::ErrorCode::BadRequest,
                    format!("ack {n} of group {g}: you follow it up to {last:?}; nothing was acknowledged"),
                );
                srv.push(fd, Message::Text(e.to_frame()));
            }
        }
    }

    /// A connection closed: forgotten and uncounted in each of its groups.
    pub fn close<A: Holds<GroupFeeds>>(&mut self, srv: &mut Server<A>, fd: Fd) {
        let groups: Vec<String> = self
            .conns
            .get(&fd)
            .map(|c| c.feeds.keys().cloned().collect())
            .unwrap_or_default();
        for g in groups {
            self.remove(srv, fd, &g);
        }
        self.conns.remove(&fd);
    }

    /// Each group feed's position of `fd` (group → [epoch, gseq], or null
    /// while its head is still to come), for a handover.
    pub fn positions(&self, fd: Fd) -> serde_json::Value {
        let Some(c) = self.conns.get(&fd) else {
            return serde_json::Value::Null;
        };
        c.feeds
            .iter()
            .map(|(g, f)| {
                let (e, n) = f.position();
                let pos = if f.is_opening() {
                    serde_json::Value::Null // its head is still to come: read again
                } else {
                    serde_json::json!([e, n])
                };
                (g.clone(), pos)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// A connection moved here with its group positions: members again,
    /// live, not counted again (the worker it left counted them), caught
    /// up from the streams.
    pub fn adopt<A: Holds<GroupFeeds>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        uid: &str,
        positions: &serde_json::Value,
    ) {
        self.conns.insert(
            fd,
            ConnGroups {
                uid: uid.to_string(),
                feeds: HashMap::new(),
            },
        );
        let Some(map) = positions.as_object() else {
            return;
        };
        for (g, pos) in map {
            let feed = match (pos[0].as_str(), pos[1].as_u64()) {
                (Some(e), Some(n)) => Feed::adopted_group(g, e.to_string(), n),
                _ => Feed::opening_group(g, Resume::default()),
            };
            let opening = feed.is_opening();
            if let Some(c) = self.conns.get_mut(&fd) {
                c.feeds.insert(g.clone(), feed);
            }
            let local = self.by_group.entry(g.clone()).or_default();
            local.fds.push(fd);
            *local.uids.entry(uid.to_string()).or_insert(0) += 1;
            if opening {
                self.head(srv, fd, g);
            } else {
                self.check(srv, g, Some(fd));
            }
        }
    }
}
