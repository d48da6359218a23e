//! Verifying accepted messages after Redis may have lost them: the part
//! of the inbox that makes a failover's losses visible.
//!
//! Redis replicates asynchronously. A master that acknowledged a store and
//! died before its replica had it leaves a promoted replica whose inbox
//! for that user ends one message early *in the same epoch*; the next
//! store takes the lost message's seq again, and no feed could see a gap.
//! That would be a silent loss, which the delivery contract forbids.
//!
//! So whoever accepts a message (the sender's IM server, the Route for
//! `/api/send`) keeps its stamp for [`WINDOW`]. When its Redis client
//! counts a disruption (a command link broke, a node left, a slot moved,
//! Sentinel named a new master: [`crate::reactor::Server::redis_disruptions`]),
//! every stamp of the window is checked against whoever serves the user's
//! keys now, with the [`AUDIT`] script (a durable request: it waits out
//! the failover):
//!
//! | reply | meaning |
//! |-------|---------|
//! | `1` | kept: the entry at that seq has that id (or was trimmed since) |
//! | `0` | the user is in another epoch already (its feeds say `resync`) |
//! | `2` | **lost**: the seq is past the last one given, or holds another message |
//!
//! On a loss the script starts a new epoch for the user: what the user had
//! not acknowledged is carried into it, renumbered from 1, and every
//! connection is told `resync` (at its next message, or when its IM server
//! checks it: IM servers check all their connections 2 s and 6 s after a
//! disruption of their own). The loss is logged with the message's id and
//! counted (`swocloud_*_audit_lost_total`).
//!
//! Group messages (stored by the Route) are audited the same way with
//! [`GROUP_AUDIT`]; a group that lost one starts a new group epoch, and
//! its members hear `resync` at the next check of their group feeds
//! ([`crate::im::groups`]: 2 s and 6 s after their server's disruption),
//! the group's next message or their next connect.
//!
//! What this does not see: a write acknowledged more than [`WINDOW`]
//! before the disruption that the new master still lacks (a replica that
//! was disconnected that long; Redis's `min-replicas-to-write` bounds it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use redis::RedisResult;

use crate::cluster::groups::Groups;
use crate::cluster::inbox::{new_epoch, Inbox, Stamp};
use crate::event::App;
use crate::reactor::redis::{Script, ScriptCall};
use crate::reactor::Server;

/// How long an accepted message's stamp is kept for an audit.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Stamps kept at most per worker (the oldest go first).
pub const MAX_KEPT: usize = 100_000;
/// Milliseconds between looks at the disruption count.
pub const TICK_MS: u64 = 100;

/// The checks both audits share (KEYS[1]: the stream, KEYS[2]: the meta
/// hash; ARGV: epoch, seq, id): `0` when the meta hash is in another
/// epoch, `1` when the entry at seq has the id or was trimmed since; else
/// the script goes on to its loss (`m` holds the meta hash's epoch, seq
/// and acked).
macro_rules! audit_checks {
    () => {
        r"
local m = redis.call('HMGET', KEYS[2], 'epoch', 'seq', 'acked')
if m[1] ~= ARGV[1] then return 0 end
local seq = tonumber(ARGV[2])
local e = redis.call('XRANGE', KEYS[1], seq .. '-0', seq .. '-0')
if e[1] then
  local f = e[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'id' and f[i + 1] == ARGV[3] then return 1 end
  end
elseif tonumber(m[2]) >= seq then
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if not first[1] or tonumber((string.gsub(first[1][1], '-%d+$', ''))) > seq then
    return 1
  end
end
"
    };
}

/// Checks one accepted message (KEYS: stream, meta, refs; ARGV: epoch,
/// seq, id, a new epoch, the stream's and the meta hash's TTL in ms).
/// Replies as the module's table says.
pub const AUDIT: &str = concat!(
    audit_checks!(),
    r"local from = (tonumber(m[3]) or 0) + 1
local keep = redis.call('XRANGE', KEYS[1], from .. '-0', '+')
redis.call('DEL', KEYS[1], KEYS[3])
for n, r in ipairs(keep) do
  redis.call('XADD', KEYS[1], n .. '-0', unpack(r[2]))
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[4], 'seq', #keep, 'dlv', 0, 'acked', 0)
if #keep > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 2
"
);

/// Checks one accepted group message (KEYS: stream, meta, joined,
/// acked; ARGV: epoch, gseq, id, a new epoch). The checks are
/// [`AUDIT`]'s; after a loss the group starts a new epoch from gseq 0 (its
/// stream, join points and acks start over: its members are told
/// `resync` at the next check of their group feeds).
pub const GROUP_AUDIT: &str = concat!(
    audit_checks!(),
    r"redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[2], 'epoch', ARGV[4], 'seq', 0)
return 2
"
);

/// What an audit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The message is where its stamp says.
    Kept,
    /// The user had moved to another epoch already.
    Moved,
    /// Redis lost it; the user starts a new epoch.
    Lost,
    /// A reply the script does not give.
    Unknown(i64),
}

impl Verdict {
    /// The script's reply.
    pub fn from_reply(v: i64) -> Verdict {
        match v {
            1 => Verdict::Kept,
            0 => Verdict::Moved,
            2 => Verdict::Lost,
            other => Verdict::Unknown(other),
        }
    }
}

/// The audit call for the message `stamp` in `uid`'s inbox.
pub fn audit_call(script: &Script, inbox: &Inbox, uid: &str, stamp: &Stamp) -> ScriptCall {
    let limits = inbox.limits();
    script
        .call()
        .key(inbox.stream_key(uid))
        .key(inbox.meta_key(uid))
        .key(inbox.refs_key(uid))
        .arg(&stamp.epoch)
        .arg(stamp.seq)
        .arg(&stamp.id)
        .arg(new_epoch())
        .arg(limits.ttl.saturating_mul(1000))
        .arg(inbox.meta_ttl_ms())
}

/// The group audit call for the message `stamp` of group `g`.
pub fn group_audit_call(script: &Script, groups: &Groups, g: &str, stamp: &Stamp) -> ScriptCall {
    let mut call = script.call();
    for k in groups.audit_keys(g) {
        call = call.key(k);
    }
    call.arg(&stamp.epoch)
        .arg(stamp.seq)
        .arg(&stamp.id)
        .arg(new_epoch())
}

/// Whose stream an accepted message is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A user's inbox.
    User(String),
    /// A group's stream.
    Group(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::User(u) => f.write_str(u),
            Subject::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// Where an audit's keys and scripts come from: the inbox for users'
/// messages, the groups for group messages (None: not accepted here).
#[derive(Debug, Clone, Copy)]
pub struct Streams<'a> {
    /// The inbox.
    pub inbox: Option<&'a Inbox>,
    /// The groups.
    pub groups: Option<&'a Groups>,
}

/// One accepted message, kept for an audit.
#[derive(Debug)]
struct Kept {
    at: Instant,
    subject: Subject,
    stamp: Stamp,
}

/// A worker's accepted messages of the last [`WINDOW`], audited when its
/// Redis client counts a disruption.
#[derive(Debug)]
pub struct Audit {
    script: Script,       // AUDIT
    group_script: Script, // GROUP_AUDIT
    kept: VecDeque<Kept>,
    retry: Vec<Kept>,     // audits whose request failed: sent again
    seen: u64,            // the disruption count last acted on
    counters: [usize; 2], // app counters: audited, lost
    dropped: u64,         // stamps pushed out by MAX_KEPT (logged once per burst)
}

impl Audit {
    /// An audit counting into the worker row's app counters `audited`
    /// and `lost`.
    pub fn new(audited: usize, lost: usize) -> Audit {
        Audit {
            script: Script::new(AUDIT),
            group_script: Script::new(GROUP_AUDIT),
            kept: VecDeque::new(),
            retry: Vec::new(),
            seen: 0,
            counters: [audited, lost],
            dropped: 0,
        }
    }

    /// `uid`'s message `stamp` was accepted (its sender told so).
    pub fn accepted(&mut self, uid: &str, stamp: &Stamp) {
        self.keep(Subject::User(uid.to_string()), stamp);
    }

    /// Group `g`'s message `stamp` was accepted.
    pub fn accepted_group(&mut self, g: &str, stamp: &Stamp) {
        self.keep(Subject::Group(g.to_string()), stamp);
    }

    fn keep(&mut self, subject: Subject, stamp: &Stamp) {
        let now = Instant::now();
        while let Some(k) = self.kept.front() {
            let young = now.duration_since(k.at) <= WINDOW;
            if young && self.kept.len() < MAX_KEPT {
                break;
            }
            self.dropped += u64::from(young);
            self.kept.pop_front();
        }
        self.kept.push_back(Kept {
            at: now,
            subject,
            stamp: stamp.clone(),
        });
    }

    /// Every [`TICK_MS`]: after a disruption, audits every stamp of the
    /// window against `streams`; `part` finds this audit in the app (for
    /// the replies).
    pub fn tick<A: App>(
        &mut self,
        srv: &mut Server<A>,
        streams: Streams<'_>,
        part: fn(&mut A) -> &mut Audit,
    ) {
        for k in std::mem::take(&mut self.retry) {
            self.submit(srv, streams, part, k);
        }
        let d = srv.redis_disruptions();
        if d == self.seen {
            return;
        }
        self.seen = d;
        if self.dropped > 0 {
            log::warn!(
                "audit: {} accepted messages of the last {WINDOW:?} were not kept for audit (more than {MAX_KEPT})",
                self.dropped
            );
            self.dropped = 0;
        }
        let now = Instant::now();
        let due: Vec<Kept> = self.kept.drain(..).collect();
        if !due.is_empty() {
            log::info!(
                "audit: Redis was disrupted; verifying {} messages accepted in the last {WINDOW:?}",
                due.len()
            );
        }
        for k in due
            .into_iter()
            .filter(|k| now.duration_since(k.at) <= WINDOW)
        {
            self.submit(srv, streams, part, k);
        }
    }

    fn submit<A: App>(
        &self,
        srv: &mut Server<A>,
        streams: Streams<'_>,
        part: fn(&mut A) -> &mut Audit,
        k: Kept,
    ) {
        let call = match (&k.subject, streams.inbox, streams.groups) {
            (Subject::User(u), Some(inbox), _) => audit_call(&self.script, inbox, u, &k.stamp),
            (Subject::Group(g), _, Some(groups)) => {
                group_audit_call(&self.group_script, groups, g, &k.stamp)
            }
            _ => return,
        };
        srv.redis_durable_then(call, move |app: &mut A, srv, r: RedisResult<i64>| {
            part(app).audited(srv, k, r);
        });
    }

    fn audited<A: App>(&mut self, srv: &Server<A>, k: Kept, r: RedisResult<i64>) {
        let (who, s) = (&k.subject, &k.stamp);
        let row = srv.row();
        let count = |i: usize| {
            if let Some(c) = row.app.get(i) {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        if r.is_ok() {
            count(self.counters[0]);
        }
        match r.map(Verdict::from_reply) {
            Ok(Verdict::Kept | Verdict::Moved) => {}
            Ok(Verdict::Lost) => {
                count(self.counters[1]);
                log::warn!(
                    "audit: Redis lost message {} to {who} (epoch {} seq {}) in a failover; {who} starts a new epoch and is told resync",
                    s.id,
                    s.epoch,
                    s.seq
                );
            }
            Ok(Verdict::Unknown(v)) => {
                log::error!("audit: the audit of message {} to {who} replied {v}", s.id);
            }
            Err(e) => {
                log::warn!(
                    "audit: message {} to {who} (epoch {} seq {}) could not be verified yet: {e}",
                    s.id,
                    s.epoch,
                    s.seq
                );
                self.retry.push(k);
            }
        }
    }
}
