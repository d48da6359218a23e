//! The worker's lifecycle as one state machine: whether it is adopting a
//! predecessor's connections, serving, draining, handing its connections
//! over, or done. This enum is the only place a worker's stop, handover and
//! adoption state lives; the loop asks it questions (`accepts`,
//! `reads_mailbox`, `draining`, `can_end`, …) and moves it with transition
//! methods that refuse an illegal move (an `Err`, never a panic). Each
//! phase change is logged (pingora style), so a worker's log reads as its
//! history.
//!
//! ```text
//!             finish_adoption              begin_handover
//!  Adopting ─────────────────▶ Serving ──────────────────▶ HandingOver
//!     │                          │                 (Gathering → AwaitAck → Finished)
//!     │ begin_drain              │ begin_drain                   │ end
//!     ▼                          ▼                               ▼
//!  Draining{adoption} ──────▶ Draining ──────── end ─────────▶ Done
//!            finish_adoption
//! ```
//!
//! A stop or handover *asked for* (a signal, `Server::stop`, `max_request`)
//! is recorded in `Adopting`/`Serving` first (`ask`) and begun by the loop
//! at the top of its next iteration (`due`), because beginning one runs
//! hooks and only the loop can do that. A [`StopHandle`] asks from another
//! thread.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::Waker;

use crate::reactor::{Fd, WorkerExit};

/// What a worker was asked to do and has not begun yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Asked {
    pub(crate) stop: Option<WorkerExit>, // a stop or handover asked for (the first one wins)
    pub(crate) replacement: bool,        // a replacement was asked of the manager (max_request)
}

/// An adoption under way: the predecessor is sending its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Adoption {
    pub(crate) began: Instant, // when this worker started waiting
    pub(crate) until: Instant, // serve anyway after this
    pub(crate) adopted: usize, // connections adopted so far
}

/// This worker's own handover, once begun.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outgoing {
    pub(crate) began: Instant,       // when the handover began
    pub(crate) boundary_by: Instant, // stragglers get 1012 after this
    pub(crate) send_by: Instant,     // give up sending after this
    pub(crate) candidates: Vec<Fd>,  // connections to move
    pub(crate) stage: Stage,         // how far it got
}

/// How far a handover got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Parking connections at frame boundaries.
    Gathering,
    /// Sent `sent` connections and END; waiting for the ACK until `until`.
    AwaitAck { until: Instant, sent: usize },
    /// Acknowledged, or the wait for the ACK ran out.
    Finished,
}

/// A worker's lifecycle (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Taking connections from the worker this one replaces; accepts
    /// nothing and reads no mailbox message until that is done.
    Adopting { adoption: Adoption, asked: Asked },
    /// Accepting, reading, answering.
    Serving { asked: Asked },
    /// A graceful stop: no listener, idle connections closed, WebSocket
    /// peers told 1001; ends when the last connection is gone (and an
    /// adoption still under way has finished).
    Draining {
        exit: WorkerExit,
        adoption: Option<Adoption>,
    },
    /// Moving the connections to the slot's successor.
    HandingOver(Outgoing),
    /// The loop has ended.
    Done { exit: WorkerExit },
}

/// A transition the current state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Illegal {
    pub(crate) from: &'static str,  // the state's name
    pub(crate) event: &'static str, // the transition tried
}

impl fmt::Display for Illegal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lifecycle: {} is not allowed in {}",
            self.event, self.from
        )
    }
}

impl std::error::Error for Illegal {}

impl Lifecycle {
    /// The initial state: `Adopting` (until `adopt_wait` from `now`) for a
    /// worker that replaces a live one, else `Serving`.
    pub(crate) fn new(expect_predecessor: bool, now: Instant, adopt_wait: Duration) -> Lifecycle {
        let asked = Asked::default();
        if expect_predecessor {
            let adoption = Adoption {
                began: now,
                until: now + adopt_wait,
                adopted: 0,
            };
            Lifecycle::Adopting { adoption, asked }
        } else {
            Lifecycle::Serving { asked }
        }
    }

    /// The state's name, for logs and errors.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Lifecycle::Adopting { .. } => "Adopting",
            Lifecycle::Serving { .. } => "Serving",
            Lifecycle::Draining {
                adoption: Some(_), ..
            } => "Draining (still adopting)",
            Lifecycle::Draining { .. } => "Draining",
            Lifecycle::HandingOver(o) => match o.stage {
                Stage::Gathering => "HandingOver (gathering)",
                Stage::AwaitAck { .. } => "HandingOver (awaiting the ACK)",
                Stage::Finished => "HandingOver (finished)",
            },
            Lifecycle::Done { .. } => "Done",
        }
    }

    fn illegal<T>(&self, event: &'static str) -> Result<T, Illegal> {
        Err(Illegal {
            from: self.name(),
            event,
        })
    }

    /// Moves to `next`, logging the change.
    fn set(&mut self, next: Lifecycle, why: &str) {
        let from = self.name();
        *self = next;
        log::info!("lifecycle: {from} -> {} ({why})", self.name());
    }

    // ---- queries ----------------------------------------------------------

    /// Whether the listeners may be registered (not while adopting).
    pub(crate) fn accepts(&self) -> bool {
        matches!(self, Lifecycle::Serving { .. })
    }

    /// Whether mailbox messages are read now.
    pub(crate) fn reads_mailbox(&self) -> bool {
        matches!(
            self,
            Lifecycle::Serving { .. } | Lifecycle::Draining { adoption: None, .. }
        )
    }

    /// Whether the worker is stopping (draining, handing over, or done).
    pub(crate) fn is_stopping(&self) -> bool {
        matches!(
            self,
            Lifecycle::Draining { .. } | Lifecycle::HandingOver(_) | Lifecycle::Done { .. }
        )
    }

    /// Whether the worker stops by handing its connections over.
    pub(crate) fn is_handing_over(&self) -> bool {
        matches!(
            self,
            Lifecycle::HandingOver(_)
                | Lifecycle::Done {
                    exit: WorkerExit::HandedOver
                }
        )
    }

    /// Whether an adoption is under way.
    pub(crate) fn is_adopting(&self) -> bool {
        self.adoption().is_some()
    }

    /// Whether connections are being closed rather than moved: new upgrades
    /// are refused, keep-alive ends, adopted ones are told 1001.
    pub(crate) fn draining(&self) -> bool {
        matches!(self, Lifecycle::Draining { .. })
    }

    /// Whether a stop or handover was asked for or is under way (so
    /// `max_request` asks for nothing more).
    pub(crate) fn stop_asked(&self) -> bool {
        match self {
            Lifecycle::Adopting { asked, .. } | Lifecycle::Serving { asked } => {
                asked.stop.is_some()
            }
            _ => true,
        }
    }

    /// The stop or handover to begin now, if any: a handover asked for
    /// while adopting waits until the adoption is over.
    pub(crate) fn due(&self) -> Option<WorkerExit> {
        match self {
            Lifecycle::Serving { asked } => asked.stop,
            Lifecycle::Adopting { asked, .. } => {
                asked.stop.filter(|e| *e != WorkerExit::HandedOver)
            }
            _ => None,
        }
    }

    /// Whether the loop may end once no connection is left.
    pub(crate) fn can_end(&self) -> bool {
        match self {
            Lifecycle::Draining { adoption, .. } => adoption.is_none(),
            Lifecycle::HandingOver(o) => o.stage == Stage::Finished,
            _ => false,
        }
    }

    /// The adoption under way, if any.
    pub(crate) fn adoption(&self) -> Option<&Adoption> {
        match self {
            Lifecycle::Adopting { adoption, .. } => Some(adoption),
            Lifecycle::Draining { adoption, .. } => adoption.as_ref(),
            _ => None,
        }
    }

    fn adoption_mut(&mut self) -> Option<&mut Adoption> {
        match self {
            Lifecycle::Adopting { adoption, .. } => Some(adoption),
            Lifecycle::Draining { adoption, .. } => adoption.as_mut(),
            _ => None,
        }
    }

    /// This worker's own handover, while under way.
    pub(crate) fn outgoing_mut(&mut self) -> Option<&mut Outgoing> {
        match self {
            Lifecycle::HandingOver(o) => Some(o),
            _ => None,
        }
    }

    /// How long the loop may sleep before one of the lifecycle's deadlines.
    pub(crate) fn timeout(&self, now: Instant) -> Option<Duration> {
        let adopt = self
            .adoption()
            .map(|a| a.until.saturating_duration_since(now));
        let out = match self {
            Lifecycle::HandingOver(o) => match o.stage {
                Stage::Gathering => Some(Duration::from_millis(5)), // poll the boundaries
                Stage::AwaitAck { until, .. } => Some(until.saturating_duration_since(now)),
                Stage::Finished => None,
            },
            _ => None,
        };
        match (adopt, out) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- transitions --------------------------------------------------------

    /// Records a stop (or, with `HandedOver`, a handover) to begin at the
    /// loop's next iteration. False when one is already asked for or under
    /// way (the first one wins) or the loop is done.
    pub(crate) fn ask(&mut self, exit: WorkerExit) -> bool {
        match self {
            Lifecycle::Adopting { asked, .. } | Lifecycle::Serving { asked }
                if asked.stop.is_none() =>
            {
                asked.stop = Some(exit);
                log::debug!("lifecycle: {exit:?} asked for");
                true
            }
            _ => false,
        }
    }

    /// Records that a replacement was asked of the manager; true only the
    /// first time (and only while adopting or serving).
    pub(crate) fn ask_replacement(&mut self) -> bool {
        match self {
            Lifecycle::Adopting { asked, .. } | Lifecycle::Serving { asked }
                if !asked.replacement =>
            {
                asked.replacement = true;
                true
            }
            _ => false,
        }
    }

    /// Counts one adopted connection.
    pub(crate) fn count_adopted(&mut self) {
        if let Some(a) = self.adoption_mut() {
            a.adopted += 1;
        }
    }

    /// The predecessor began its handover: wait for it until `until`.
    pub(crate) fn extend_adoption(&mut self, until: Instant) -> Result<(), Illegal> {
        match self.adoption_mut() {
            Some(a) => {
                a.until = until;
                Ok(())
            }
            None => self.illegal("extend_adoption"),
        }
    }

    /// The adoption is over (END, or its deadline): `Adopting` → `Serving`,
    /// or a drain no longer waits for it. Returns the finished adoption.
    pub(crate) fn finish_adoption(&mut self, why: &str) -> Result<Adoption, Illegal> {
        match *self {
            Lifecycle::Adopting { adoption, asked } => {
                self.set(Lifecycle::Serving { asked }, why);
                Ok(adoption)
            }
            Lifecycle::Draining {
                exit,
                adoption: Some(adoption),
            } => {
                self.set(
                    Lifecycle::Draining {
                        exit,
                        adoption: None,
                    },
                    why,
                );
                Ok(adoption)
            }
            _ => self.illegal("finish_adoption"),
        }
    }

    /// Begins a graceful stop: `Adopting`/`Serving` → `Draining` (an
    /// adoption under way goes on).
    pub(crate) fn begin_drain(&mut self, exit: WorkerExit) -> Result<(), Illegal> {
        let adoption = match self {
            Lifecycle::Adopting { adoption, .. } => Some(*adoption),
            Lifecycle::Serving { .. } => None,
            _ => return self.illegal("begin_drain"),
        };
        self.set(Lifecycle::Draining { exit, adoption }, "stopping");
        Ok(())
    }

    /// Begins a handover: `Serving` → `HandingOver` (a worker still
    /// adopting must finish first).
    pub(crate) fn begin_handover(&mut self, out: Outgoing) -> Result<(), Illegal> {
        match self {
            Lifecycle::Serving { .. } => {
                self.set(Lifecycle::HandingOver(out), "replacement serves");
                Ok(())
            }
            _ => self.illegal("begin_handover"),
        }
    }

    /// The parked connections and END went out: wait for the ACK.
    pub(crate) fn sent(&mut self, sent: usize, until: Instant) -> Result<(), Illegal> {
        match self {
            Lifecycle::HandingOver(o) if o.stage == Stage::Gathering => {
                o.stage = Stage::AwaitAck { until, sent };
                log::debug!("lifecycle: {} ({sent} connections sent)", self.name());
                Ok(())
            }
            _ => self.illegal("sent"),
        }
    }

    /// The successor acknowledged, or (`acked` false) the wait ran out.
    /// Returns how many connections were sent and when the handover began.
    pub(crate) fn ack_over(&mut self, acked: bool) -> Result<(usize, Instant), Illegal> {
        match self {
            Lifecycle::HandingOver(o) => match o.stage {
                Stage::AwaitAck { sent, .. } => {
                    o.stage = Stage::Finished;
                    let began = o.began;
                    let why = if acked { "acknowledged" } else { "no ACK" };
                    log::debug!("lifecycle: {} ({why})", self.name());
                    Ok((sent, began))
                }
                _ => self.illegal("ack_over"),
            },
            _ => self.illegal("ack_over"),
        }
    }

    /// The loop ends: → `Done`. Legal only when [`Lifecycle::can_end`].
    pub(crate) fn end(&mut self) -> Result<WorkerExit, Illegal> {
        let exit = match self {
            Lifecycle::Draining {
                exit,
                adoption: None,
            } => *exit,
            Lifecycle::HandingOver(o) if o.stage == Stage::Finished => WorkerExit::HandedOver,
            _ => return self.illegal("end"),
        };
        self.set(Lifecycle::Done { exit }, "no connection left");
        Ok(exit)
    }

    /// Why the loop ended (`Stopped` until it has).
    pub(crate) fn exit(&self) -> WorkerExit {
        match self {
            Lifecycle::Done { exit } => *exit,
            _ => WorkerExit::Stopped,
        }
    }
}

/// Stops a reactor from another thread (tests, or an application thread):
/// sets a flag and wakes the loop.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    flag: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Arc<Waker>>>>,
}

impl StopHandle {
    /// A handle not yet bound to a loop (bound by `run_worker_until`).
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// Asks the loop to stop gracefully; works before the loop starts, too.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = w.wake();
        }
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub(crate) fn bind(&self, waker: Arc<Waker>) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }
}

#[cfg(test)]
mod tests;
