//! This worker's side of the inbox: each user connection's [`Feed`], the
//! Redis reads it asks for (the head at connect, ranges to replay or fill
//! a gap, a later check), and the delivered/acked marks, batched per user
//! and written every [`FLUSH_MS`].
//!
//! A live copy can go astray without anyone knowing (a Route worker dies
//! with it in a buffer, a pub/sub relay is dropped while a subscriber
//! reconnects, the location the Route used was a moment old). The next
//! message to the user exposes the gap, and the feed fills it from the
//! inbox; for the last message before a quiet spell, connections are
//! *checked* (their user's head read again, and caught up): 1 s and 5 s
//! after they connect, all of them when the Route link was re-established
//! or the Route says it may have dropped relays (`check`), 2 s and 6 s
//! after a Redis disruption (an audit may have moved a user to a new
//! epoch: [`crate::cluster::audit`]), and every one once per
//! `inbox_check_interval` in a background sweep. This worker's accepted
//! messages are audited here too.
//!
//! Nothing here blocks: every read is a callback on the worker's Redis
//! client. A connection whose head cannot be read (Redis away) is told so
//! and closed with 1013 (try again later): it is never welcomed into a
//! feed that could not be verified.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::RedisResult;

use crate::cluster::audit::{Audit, Streams};
use crate::cluster::error::{ErrorCode, ProtocolError};
use crate::cluster::inbox::{self, Head, Inbox, Stamp};
use crate::cluster::user::{error_frame, Resume};
use crate::event::Holds;
use crate::im::feed::{Feed, Live, Step, PAGE};
use crate::im::stats;
use crate::im::sweep::Sweep;
use crate::reactor::{Fd, Message, Server};

/// Connection attribute: the feed's epoch, for the worker adopting it.
pub const ATTR_EPOCH: &str = "im.epoch";
/// Connection attribute: the last seq the feed pushed.
pub const ATTR_LAST: &str = "im.last";

/// Milliseconds between writes of the delivered/acked marks.
pub const FLUSH_MS: u64 = 100;
/// After a connection goes live, its user's head is read again this many
/// milliseconds later: a live copy routed by a location a moment old (the
/// user had just moved) is caught up from the inbox.
const CHECKS_MS: [u64; 2] = [1_000, 5_000];
/// Every connection is checked this many milliseconds after the last
/// Redis disruption (see [`crate::cluster::audit`]).
const RECHECK_MS: [u64; 2] = [2_000, 6_000];
/// Milliseconds before a failed inbox read is tried again.
const RETRY_MS: u64 = 250;
/// Close code for a connection whose inbox could not be read.
const TRY_AGAIN: u16 = 1013;
/// Close code for a resume the inbox cannot honour (`since` in the future).
pub const BAD_RESUME: u16 = 4003;

/// One connection's feed and its user.
#[derive(Debug)]
struct Conn {
    uid: String,
    feed: Feed,
}

/// The marks waiting to be written for one user.
#[derive(Debug, Default)]
struct Marks {
    epoch: String,
    delivered: u64,
    acked: u64,
}

/// The feeds of this worker's user connections.
#[derive(Debug)]
pub struct Feeds {
    inbox: Inbox,
    conns: HashMap<Fd, Conn>,
    marks: HashMap<String, Marks>,
    /// Connections to check: soon (after a `check`), and the background
    /// sweep's round.
    checks: Sweep<Fd>,
    /// The messages this worker accepted, audited after a disruption.
    audit: Audit,
    /// The Redis disruption count last seen, and the checks of every
    /// connection it scheduled ([`RECHECK_MS`]).
    disrupted: (u64, Vec<Instant>),
}

impl Feeds {
    /// Feeds over `inbox`, sweeping every connection once per
    /// `check_interval` seconds (0: never).
    pub fn new(inbox: Inbox, check_interval: f64) -> Feeds {
        Feeds {
            inbox,
            conns: HashMap::new(),
            marks: HashMap::new(),
            checks: Sweep::new(check_interval, FLUSH_MS),
            audit: Audit::new(stats::AUDITED, stats::AUDIT_LOST),
            disrupted: (0, Vec::new()),
        }
    }

    /// Every connection may have missed a live copy: check them all, a few
    /// hundred per tick.
    pub fn check_all(&mut self) {
        self.checks.all(self.conns.keys().copied());
    }

    /// Every [`FLUSH_MS`]: writes the marks, and checks the next
    /// connections due (after a `check`, and the sweep's share).
    ///
    /// Returns true when it just scheduled the checks that follow a Redis
    /// disruption (2 s and 6 s after it): the caller rewrites presence
    /// then too, as a master that came back empty lost it.
    pub fn tick<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>) -> bool {
        self.flush(srv);
        let streams = Streams {
            inbox: Some(&self.inbox),
            groups: None,
        };
        self.audit
            .tick(srv, streams, |app: &mut A| &mut app.part().audit);
        let recheck = self.after_disruption(srv);
        let conns = &self.conns;
        let due = self
            .checks
            .due(conns.len(), || conns.keys().copied().collect::<Vec<_>>());
        for fd in due {
            self.check(srv, fd);
        }
        recheck
    }

    /// A message this worker stored was accepted: kept for an audit.
    pub fn accepted(&mut self, uid: &str, stamp: &Stamp) {
        self.audit.accepted(uid, stamp);
    }

    /// After a Redis disruption of this worker's own client, every
    /// connection is checked [`RECHECK_MS`] later: an audit elsewhere may
    /// have moved its user to a new epoch (a loss), which it must hear.
    fn after_disruption<A: Holds<Feeds>>(&mut self, srv: &Server<A>) -> bool {
        let now = Instant::now();
        let d = srv.redis_disruptions();
        if d != self.disrupted.0 {
            self.disrupted = (
                d,
                RECHECK_MS
                    .map(|ms| now + Duration::from_millis(ms))
                    .to_vec(),
            );
        }
        if self.disrupted.1.first().is_some_and(|t| *t <= now) {
            self.disrupted.1.remove(0);
            self.check_all();
            return true;
        }
        false
    }

    /// The inbox (its keys and scripts).
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// A user connection opened, asking to resume as `resume`: read the
    /// head, then welcome it.
    pub fn open<A: Holds<Feeds>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        uid: &str,
        resume: Resume,
    ) {
        self.conns.insert(
            fd,
            Conn {
                uid: uid.to_string(),
                feed: Feed::opening(resume),
            },
        );
        srv.redis(
            self.inbox.hello(uid),
            move |app: &mut A, srv, r: RedisResult<(String, u64, u64)>| {
                app.part().welcomed(srv, fd, r.map(inbox::parse_head));
            },
        );
    }

    fn welcomed<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>, fd: Fd, r: RedisResult<Head>) {
        let Some(c) = self.conns.get_mut(&fd) else {
            return; // closed meanwhile
        };
        match r {
            Ok(head) => {
                let steps = c.feed.welcomed(&c.uid, head);
                self.run(srv, fd, steps);
                for ms in CHECKS_MS {
                    Self::check_after(srv, fd, ms);
                }
            }
            Err(e) => {
                log::warn!("im: the inbox of {} could not be read: {e}", c.uid);
                let err = ProtocolError::new(
                    ErrorCode::Unavailable,
                    format!("your stored messages could not be read ({e}); connect again later"),
                );
                srv.push(fd, Message::Text(error_frame(&err, None)));
                srv.disconnect(fd, TRY_AGAIN, "inbox unavailable");
            }
        }
    }

    /// A connection moved here from the worker this one replaced, at
    /// `epoch`/`last`: live at once, and checked against the inbox (what
    /// reached the old worker after it stopped reading is read again).
    pub fn adopt<A: Holds<Feeds>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        uid: &str,
        epoch: String,
        last: u64,
    ) {
        self.conns.insert(
            fd,
            Conn {
                uid: uid.to_string(),
                feed: Feed::adopted(epoch, last),
            },
        );
        Self::check_after(srv, fd, 0);
        for ms in CHECKS_MS {
            Self::check_after(srv, fd, ms);
        }
    }

    /// Where a connection stands (epoch, last seq pushed), for a handover.
    pub fn position(&self, fd: Fd) -> Option<(&str, u64)> {
        let c = self.conns.get(&fd)?;
        (!c.feed.is_opening()).then(|| c.feed.position())
    }

    /// Writes `fd`'s position into its attributes, which go along with it
    /// when a reload hands it over (called at the handover's start, and
    /// after every push until the connection has moved).
    pub fn keep_position<A: crate::event::App>(&self, srv: &mut Server<A>, fd: Fd) {
        if let Some((epoch, last)) = self.position(fd) {
            srv.set_attr(fd, ATTR_EPOCH, serde_json::Value::from(epoch));
            srv.set_attr(fd, ATTR_LAST, serde_json::Value::from(last));
        }
    }

    /// A connection closed.
    pub fn close(&mut self, fd: Fd) {
        self.conns.remove(&fd);
    }

    /// A stored message for `fds` (connections of one user on this worker).
    pub fn offer<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>, fds: &[Fd], m: &Live) {
        for fd in fds {
            let Some(c) = self.conns.get_mut(fd) else {
                continue;
            };
            let steps = c.feed.offer(m.clone());
            self.run(srv, *fd, steps);
        }
    }

    /// `{"ack":n[,"epoch":e]}` on connection `fd`: ignored when `e` is
    /// not the connection's epoch (sent before the client read a
    /// `resync`: its seq counts in the epoch left), refused past what it
    /// was pushed, else remembered for the next flush.
    pub fn ack<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>, fd: Fd, n: u64, of: Option<&str>) {
        let Some(c) = self.conns.get(&fd) else {
            return;
        };
        let (epoch, last) = c.feed.position();
        if of.is_some_and(|e| e != epoch) {
            return;
        }
        if c.feed.is_opening() || n > last {
            let e = ProtocolError::new(
                ErrorCode::BadRequest,
                format!(
                    "ack {n} is past the last seq this connection received ({last}); nothing was acknowledged"
                ),
            );
            srv.push(fd, Message::Text(e.to_frame()));
            return;
        }
        raise(&mut self.marks, &c.uid, epoch, 0, n);
    }

    /// Writes the marks gathered since the last flush (one script call per
    /// [`inbox::MARKS_PER_CALL`] users, on a Redis Cluster per slot too:
    /// [`Inbox::mark_calls`]), not waited for.
    pub fn flush<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>) {
        if self.marks.is_empty() {
            return;
        }
        let marks: Vec<(String, Marks)> = self.marks.drain().collect();
        let calls = self.inbox.mark_calls(
            marks
                .iter()
                .map(|(u, m)| (u.as_str(), m.epoch.as_str(), m.delivered, m.acked)),
            srv.redis_cluster(),
        );
        for call in calls {
            srv.redis_send(call);
        }
    }

    /// Carries out a feed's steps for connection `fd`.
    fn run<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>, fd: Fd, steps: Vec<Step>) {
        let mut pushed = 0;
        for s in steps {
            match s {
                Step::Push(frame) => {
                    srv.push(fd, Message::Text(frame));
                }
                Step::Message(frame) => {
                    pushed += 1;
                    srv.push(fd, Message::Text(frame));
                }
                Step::Fetch { from, to } => self.fetch(srv, fd, from, to),
                Step::Refuse(frame) => {
                    srv.push(fd, Message::Text(frame));
                    srv.disconnect(fd, BAD_RESUME, "bad resume");
                    self.conns.remove(&fd);
                    return;
                }
            }
        }
        stats::add(srv, stats::DELIVERED, pushed);
        if srv.is_handing_over() {
            self.keep_position(srv, fd);
        }
        if let Some(c) = self.conns.get(&fd) {
            let (epoch, last) = c.feed.position();
            if pushed > 0 && last > 0 {
                raise(&mut self.marks, &c.uid, epoch, last, 0);
            }
        }
    }

    fn fetch<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>, fd: Fd, from: u64, to: u64) {
        let Some(c) = self.conns.get(&fd) else {
            return;
        };
        srv.redis(
            self.inbox.range(&c.uid, from, Some(to), PAGE),
            move |app: &mut A, srv, r: RedisResult<redis::Value>| {
                app.part().fetched(srv, fd, to, r);
            },
        );
    }

    fn fetched<A: Holds<Feeds>>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        to: u64,
        r: RedisResult<redis::Value>,
    ) {
        let Some(c) = self.conns.get_mut(&fd) else {
            return;
        };
        match r {
            Ok(v) => {
                let steps = c.feed.fetched(&inbox::parse_entries(v), to);
                self.run(srv, fd, steps);
            }
            Err(e) => {
                log::warn!("im: reading the inbox of {} failed: {e}; retrying", c.uid);
                srv.after(RETRY_MS, move |app: &mut A, srv, _| {
                    let me = app.part();
                    let step = me.conns.get(&fd).and_then(|c| c.feed.retry());
                    if let Some(s) = step {
                        me.run(srv, fd, vec![s]);
                    }
                });
            }
        }
    }

    fn check_after<A: Holds<Feeds>>(srv: &mut Server<A>, fd: Fd, ms: u64) {
        srv.after(ms, move |app: &mut A, srv, _| app.part().check(srv, fd));
    }

    /// Reads the user's head again and catches the connection up to it.
    fn check<A: Holds<Feeds>>(&mut self, srv: &mut Server<A>, fd: Fd) {
        let Some(c) = self.conns.get(&fd) else {
            return;
        };
        srv.redis(
            self.inbox.meta(&c.uid),
            move |app: &mut A, srv, r: RedisResult<Vec<Option<String>>>| {
                let me = app.part();
                let Some(c) = me.conns.get_mut(&fd) else {
                    return;
                };
                let Ok(v) = r else {
                    return; // the next check, or the next message, will tell
                };
                let (Some(Some(epoch)), Some(Some(seq))) = (v.first(), v.get(1)) else {
                    // The inbox this connection follows is gone (Redis lost
                    // it, or it expired): start the new epoch, and say so.
                    let uid = c.uid.clone();
                    let hello = me.inbox.hello(&uid);
                    srv.redis(
                        hello,
                        move |app: &mut A, srv, r: RedisResult<(String, u64, u64)>| {
                            let me = app.part();
                            if let (Ok(h), Some(c)) = (r, me.conns.get_mut(&fd)) {
                                let head = inbox::parse_head(h);
                                let steps = c.feed.checked(&head.epoch, head.seq);
                                me.run(srv, fd, steps);
                            }
                        },
                    );
                    return;
                };
                let seq = seq.parse().unwrap_or(0);
                let steps = c.feed.checked(epoch, seq);
                me.run(srv, fd, steps);
            },
        );
    }
}

/// Raises `uid`'s marks waiting for the next flush (a mark of another
/// epoch replaces them); allocates the uid only for its first mark.
fn raise(marks: &mut HashMap<String, Marks>, uid: &str, epoch: &str, delivered: u64, acked: u64) {
    match marks.get_mut(uid) {
        Some(m) if m.epoch == epoch => {
            m.delivered = m.delivered.max(delivered);
            m.acked = m.acked.max(acked);
        }
        Some(m) => {
            *m = Marks {
                epoch: epoch.to_string(),
                delivered,
                acked,
            }
        }
        None => {
            let m = Marks {
                epoch: epoch.to_string(),
                delivered,
                acked,
            };
            marks.insert(uid.to_string(), m);
        }
    }
}
