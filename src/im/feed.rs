//! One user connection's feed of stored messages: the state machine that
//! makes what the connection receives gap-free, in order and without
//! duplicates, whichever path each message took (this worker, a sibling,
//! the Route, a replay from the inbox).
//!
//! [`Feed`] makes no call itself: each event returns [`Step`]s, which the
//! caller ([`crate::im::feeds::Feeds`]) carries out (push a frame, read a
//! range of the inbox). Its phases:
//!
//! - `Opening`: waiting for the inbox's head (the welcome frame needs it);
//!   live messages wait.
//! - `Catching`: reading the inbox (the replay after welcome, or a gap: a
//!   live message arrived whose predecessors this connection has not
//!   seen); live messages wait.
//! - `Live`: the next seq is pushed at once; an older one is dropped (a
//!   duplicate); a newer one starts a catch-up.
//!
//! A message from another epoch means Redis lost the user's history: the
//! connection is told `resync` and follows the new epoch (never an epoch
//! it left before). Stored messages the connection had not seen that are
//! no longer in the inbox (trimmed by its bounds) are reported with
//! `resync` too (reason `trimmed`): a gap is never silent.

use crate::cluster::inbox::{Entry, Head};
use crate::cluster::user::{Resume, Resync, Welcome};

/// Entries read per inbox read.
pub const PAGE: usize = 500;

/// A stored message on its way to this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// The epoch it was stored in.
    pub epoch: String,
    /// Its seq.
    pub seq: u64,
    /// The frame to push.
    pub frame: String,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Push this control frame (welcome, a group head, resync, an error)
    /// to the connection.
    Push(String),
    /// Push this stored message (its seq is now the feed's last).
    Message(String),
    /// Read the inbox from seq `from` through `to` (at most [`PAGE`]) and
    /// hand the entries to [`Feed::fetched`].
    Fetch {
        /// First seq wanted.
        from: u64,
        /// Last seq wanted.
        to: u64,
    },
    /// Refuse the connection: this error frame, then close.
    Refuse(String),
}

/// Where the feed stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for the head; what the client asked for.
    Opening(Resume),
    /// Reading the inbox through `until`.
    Catching {
        /// The last seq wanted.
        until: u64,
    },
    /// Pushing live messages.
    Live,
}

/// One connection's feed.
#[derive(Debug, Clone)]
pub struct Feed {
    phase: Phase,
    /// The epoch the connection follows.
    epoch: String,
    /// The last seq pushed (or resumed from).
    last: u64,
    /// Live messages that arrived while opening or catching up.
    held: Vec<Live>,
    /// Epochs this connection left: their stragglers are dropped.
    left: Vec<String>,
    /// The group this feed follows (None: the user's own inbox).
    group: Option<String>,
}

impl Feed {
    /// A connection that asked to resume as `resume`.
    pub fn opening(resume: Resume) -> Feed {
        Feed {
            phase: Phase::Opening(resume),
            epoch: String::new(),
            last: 0,
            held: Vec::new(),
            left: Vec::new(),
            group: None,
        }
    }

    /// A member connection's feed of group `group`, asking to resume as
    /// `resume`.
    pub fn opening_group(group: &str, resume: Resume) -> Feed {
        Feed {
            group: Some(group.to_string()),
            ..Feed::opening(resume)
        }
    }

    /// A group feed that starts live in `epoch` after gseq `last` (a join
    /// while connected, a connection moved here).
    pub fn adopted_group(group: &str, epoch: String, last: u64) -> Feed {
        Feed {
            group: Some(group.to_string()),
            ..Feed::adopted(epoch, last)
        }
    }

    /// A connection moved here from the worker this one replaced, in
    /// `epoch` at `last`.
    pub fn adopted(epoch: String, last: u64) -> Feed {
        Feed {
            phase: Phase::Live,
            epoch,
            last,
            held: Vec::new(),
            left: Vec::new(),
            group: None,
        }
    }

    /// The epoch and last seq pushed (for a handover, and acks).
    pub fn position(&self) -> (&str, u64) {
        (&self.epoch, self.last)
    }

    /// Whether the welcome frame is still to come.
    pub fn is_opening(&self) -> bool {
        matches!(self.phase, Phase::Opening(_))
    }

    /// The inbox's head arrived: welcome, maybe resync, then the replay.
    pub fn welcomed(&mut self, uid: &str, head: Head) -> Vec<Step> {
        let Phase::Opening(resume) = std::mem::replace(&mut self.phase, Phase::Live) else {
            return Vec::new();
        };
        let first = match &self.group {
            None => Welcome {
                uid: uid.to_string(),
                epoch: head.epoch.clone(),
                seq: head.seq,
            }
            .to_text(),
            Some(g) => GroupHead {
                method: "group",
                group: g,
                epoch: &head.epoch,
                gseq: head.seq,
            }
            .to_text(),
        };
        let mut out = vec![Step::Push(first)];
        self.epoch = head.epoch.clone();
        self.last = match (resume.since, resume.epoch) {
            (Some(_), Some(e)) if e != head.epoch => {
                self.left.push(e);
                out.push(self.resync(&head.epoch, "epoch"));
                head.acked
            }
            (Some(since), _) if since > head.seq && self.group.is_some() => {
                // A group's position is one of several: refuse it alone.
                let e = crate::cluster::ProtocolError::new(
                    crate::cluster::ErrorCode::BadRequest,
                    format!(
                        "gsince {since} is past the last gseq of {} ({}); resuming after your ack",
                        self.group.as_deref().unwrap_or(""),
                        head.seq
                    ),
                );
                out.push(Step::Push(e.to_frame()));
                head.acked
            }
            (Some(since), _) if since > head.seq => {
                out.push(Step::Refuse(
                    crate::cluster::ProtocolError::new(
                        crate::cluster::ErrorCode::BadRequest,
                        format!(
                            "since={since} is past the last seq stored for {uid} ({}) in epoch {}",
                            head.seq, head.epoch
                        ),
                    )
                    .to_frame(),
                ));
                return out;
            }
            (Some(since), _) => since,
            (None, _) => head.acked,
        };
        self.catch_up(head.seq, &mut out);
        out
    }

    /// A live message for this connection.
    pub fn offer(&mut self, m: Live) -> Vec<Step> {
        let mut out = Vec::new();
        self.take(m, &mut out);
        out
    }

    fn take(&mut self, m: Live, out: &mut Vec<Step>) {
        if self.phase != Phase::Live {
            self.held.push(m);
            return;
        }
        if m.epoch != self.epoch {
            if self.left.contains(&m.epoch) {
                return; // a straggler of an epoch already left
            }
            let old = std::mem::replace(&mut self.epoch, m.epoch.clone());
            self.left.push(old);
            self.last = 0;
            out.push(self.resync(&self.epoch, "epoch"));
        }
        if m.seq <= self.last {
            return; // already pushed
        }
        if m.seq == self.last + 1 {
            self.last = m.seq;
            out.push(Step::Message(m.frame));
            return;
        }
        let until = m.seq - 1;
        self.held.push(m);
        self.catch_up(until, out);
    }

    /// Reads the inbox through `until` if anything is missing, else goes
    /// live and hands over what waited.
    fn catch_up(&mut self, until: u64, out: &mut Vec<Step>) {
        if self.last < until {
            self.phase = Phase::Catching { until };
            out.push(Step::Fetch {
                from: self.last + 1,
                to: until.min(self.last + PAGE as u64),
            });
            return;
        }
        self.phase = Phase::Live;
        let mut held = std::mem::take(&mut self.held);
        held.sort_by_key(|m| m.seq);
        for m in held {
            self.take(m, out);
        }
    }

    /// Entries read for a [`Step::Fetch`] (`to` is the one it asked).
    pub fn fetched(&mut self, entries: &[Entry], to: u64) -> Vec<Step> {
        let mut out = Vec::new();
        let Phase::Catching { until } = self.phase else {
            return out;
        };
        let mut trimmed = false;
        for e in entries {
            if e.seq <= self.last || e.seq > to {
                continue;
            }
            trimmed |= e.seq > self.last + 1;
            self.last = e.seq;
            out.push(Step::Message(match &self.group {
                None => e.frame(),
                Some(g) => e.group_frame(g),
            }));
        }
        if self.last < to {
            trimmed = true; // what it asked for is not there any more
            self.last = to;
        }
        if trimmed {
            // The inbox trims its oldest entries, so the hole is before
            // what this read found: say so first.
            out.insert(0, self.resync(&self.epoch, "trimmed"));
        }
        self.catch_up(until, &mut out);
        out
    }

    /// A read failed: ask again (the caller waits a moment first).
    pub fn retry(&self) -> Option<Step> {
        match self.phase {
            Phase::Catching { until } => Some(Step::Fetch {
                from: self.last + 1,
                to: until.min(self.last + PAGE as u64),
            }),
            _ => None,
        }
    }

    /// The inbox's head, read again later (a check for a message whose
    /// live copy went astray): catch up to it.
    pub fn checked(&mut self, epoch: &str, seq: u64) -> Vec<Step> {
        let mut out = Vec::new();
        if self.phase != Phase::Live {
            return out;
        }
        if epoch != self.epoch {
            if self.left.iter().any(|e| e == epoch) {
                return out;
            }
            let old = std::mem::replace(&mut self.epoch, epoch.to_string());
            self.left.push(old);
            self.last = 0;
            out.push(self.resync(epoch, "epoch"));
        }
        self.catch_up(seq, &mut out);
        out
    }

    fn resync(&self, epoch: &str, reason: &str) -> Step {
        Step::Push(
            Resync {
                epoch: epoch.to_string(),
                reason: reason.to_string(),
                group: self.group.clone(),
            }
            .to_text(),
        )
    }
}

/// A group's head, after the user's welcome: `{"method":"group","group",
/// "epoch","gseq"}`.
#[derive(serde::Serialize)]
struct GroupHead<'a> {
    method: &'static str,
    group: &'a str,
    epoch: &'a str,
    gseq: u64,
}

impl GroupHead<'_> {
    fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
#[path = "feed_tests.rs"]
mod tests;
