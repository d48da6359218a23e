//! The loop's side of a handover: a stopping worker moves its live
//! connections to the replacement of its slot instead of closing them.
//!
//! Predecessor (SIGUSR1 from the manager once the replacement serves, or
//! its own `max_request`): stop accepting (the slot's listener stays with
//! the manager and the successor), stop reading the mailbox (the successor
//! takes it over), then bring each movable connection to a frame boundary
//! and *park* it (no more reads: further input waits in the kernel for the
//! successor). When every one is parked — or after half of
//! `max_wait_time` — the stragglers (peers stuck mid-frame) are closed with
//! 1012 "service restart" and the parked ones are sent in one pass, so no
//! local delivery can fall between a moved and a not-yet-moved connection.
//! Then END, and the successor's ACK (bounded wait) before the worker may
//! exit: until then a relay thread of the old process can still hand
//! messages to the slot's mailbox.
//!
//! Successor (spawned with `expect_predecessor`): accepts nothing and reads
//! no mailbox message until the predecessor's END (or a deadline), so
//! nothing addressed to a connection still in transit is handled too
//! early; it adopts each connection under a new fd and runs
//! `App::on_adopt` (never `on_open`).
//!
//! Which connections move: HTTP ones (a partial request moves with them)
//! and open WebSockets of either role. Outbound connections still dialling
//! are closed as in a plain stop.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::Interest;
use serde_json::Value;

use crate::event::App;
use crate::reactor::conn::{Conn, ConnSnapshot, Phase};
use crate::reactor::event_loop::{token_of, Reactor, HANDOVER_TX, LISTENER};
use crate::reactor::handover::{Assembler, Received, MAX_FDS, MAX_PAYLOAD};
use crate::reactor::server::TimerTask;
use crate::reactor::websocket::close;
use crate::reactor::{Fd, Handover, WorkerExit};

use std::sync::atomic::Ordering::Relaxed;

/// How long the predecessor waits for the successor's ACK after END.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// Extra time a successor gives its predecessor beyond `max_wait_time` (the
/// manager signals the predecessor only once the successor serves).
const ADOPT_SLACK: Duration = Duration::from_millis(1000);
/// Close code for a connection that could not move (RFC 6455 1012).
pub(crate) const SERVICE_RESTART: u16 = 1012;

/// Handover state of one worker.
#[derive(Default)]
pub(crate) struct Migrate {
    hand: Option<Handover>,       // None: no manager link
    asm: Assembler,               // manifest pieces in flight
    adopt_until: Option<Instant>, // adopting until END or this
    adopt_began: Option<Instant>, // when we started waiting
    adopted: usize,               // connections adopted so far
    listener_pending: bool,       // listener held back until adopted
    replacement_requested: bool,  // asked the manager (max_request)
    out: Option<Outgoing>,        // our own handover, once begun
}

struct Outgoing {
    began: Instant,
    boundary_by: Instant, // stragglers get 1012 after this
    send_by: Instant,     // give up sending after this
    candidates: Vec<Fd>,  // connections to move
    stage: Stage,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Gathering,
    AwaitAck { until: Instant, sent: usize },
    Done,
}

impl Migrate {
    /// State for a worker with (or without) a handover link. With
    /// `expect_predecessor` the worker starts adopting.
    pub(crate) fn new(hand: Option<Handover>, max_wait: f64) -> Migrate {
        let expect = hand.as_ref().is_some_and(|h| h.expect_predecessor);
        let now = Instant::now();
        Migrate {
            adopt_until: expect.then(|| now + wait_of(max_wait) + ADOPT_SLACK),
            adopt_began: expect.then_some(now),
            listener_pending: expect,
            hand,
            ..Migrate::default()
        }
    }

    /// The successor's socket, to register at start.
    pub(crate) fn rx_fd(&self) -> Option<i32> {
        self.hand.as_ref().map(|h| h.link.rx_fd())
    }

    /// Whether this worker can hand over (it has a link).
    pub(crate) fn can_hand_over(&self) -> bool {
        self.hand.is_some()
    }

    /// Whether the listener must wait for the adoption to finish.
    pub(crate) fn listener_pending(&self) -> bool {
        self.listener_pending
    }

    /// Whether adopting or handing over is still under way (the loop must
    /// not end yet).
    pub(crate) fn busy(&self) -> bool {
        self.adopt_until.is_some() || self.out.as_ref().is_some_and(|o| o.stage != Stage::Done)
    }

    /// How long the loop may sleep before a handover deadline.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut t = self.adopt_until.map(|d| d.saturating_duration_since(now));
        if let Some(o) = &self.out {
            let mine = match o.stage {
                Stage::Gathering => Some(Duration::from_millis(5)),
                Stage::AwaitAck { until, .. } => Some(until.saturating_duration_since(now)),
                Stage::Done => None,
            };
            t = match (t, mine) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        t
    }
}

fn wait_of(max_wait: f64) -> Duration {
    Duration::from_secs_f64(max_wait.max(0.0))
}

impl<A: App> Reactor<A> {
    /// SIGUSR1: the manager's replacement serves; hand over (once).
    pub(crate) fn request_handover(&mut self) {
        if self.migrate.can_hand_over() {
            self.srv.stop_request.get_or_insert(WorkerExit::HandedOver);
        } else {
            log::debug!(
                "worker {}: no handover link; ignoring SIGUSR1",
                self.srv.worker_id
            );
        }
    }

    /// At `max_request` under a manager: stop accepting and ask for a
    /// replacement, which takes the connections over once it serves.
    /// False when there is no manager link (the loop simply ends).
    pub(crate) fn replace_me(&mut self) -> bool {
        let Some(h) = &self.migrate.hand else {
            return false;
        };
        if !std::mem::replace(&mut self.migrate.replacement_requested, true) {
            log::info!(
                "worker {}: asking for a replacement; no longer accepting",
                self.srv.worker_id
            );
            (h.request_replacement)();
            if let Some(mut l) = self.listener.take() {
                let _ = self.srv.registry.deregister(&mut l);
            }
            self.migrate.listener_pending = false;
        }
        true
    }

    /// Graceful stop by handover, step one (see the module doc). Falls back
    /// to a plain stop when the successor cannot be told.
    pub(crate) fn begin_handover(&mut self, app: &mut A) {
        let now = Instant::now();
        let wait = wait_of(self.srv.settings.max_wait_time);
        let begun = match &self.migrate.hand {
            Some(h) => h.link.send_begin(now + wait / 2),
            None => Err(std::io::Error::other("no handover link")),
        };
        let w = self.srv.worker_id;
        if let Err(e) = begun {
            log::error!("worker {w}: cannot start a handover ({e}); closing connections instead");
            return self.begin_stop(app, WorkerExit::Stopped);
        }
        self.srv.stopping = true;
        self.srv.handing_over = true;
        self.exit = WorkerExit::HandedOver;
        self.srv.row.stopping.store(1, Relaxed);
        log::info!(
            "worker {w}: handing {} connections over to the replacement",
            self.srv.conns.len()
        );
        {
            let srv = &mut self.srv;
            Self::guarded(w, "on_worker_exit", None, || app.on_worker_exit(srv));
        }
        if let Some(mut l) = self.listener.take() {
            let _ = self.srv.registry.deregister(&mut l);
        }
        let (inbox, rx, tx) = match &self.migrate.hand {
            Some(h) => (self.srv.postbox.inbox_fd(), h.link.rx_fd(), h.link.tx_fd()),
            None => return,
        };
        let reg = &self.srv.registry;
        let _ = reg.deregister(&mut SourceFd(&inbox));
        let _ = reg.deregister(&mut SourceFd(&rx)); // our own messages arrive there
        if let Err(e) = reg.register(&mut SourceFd(&tx), HANDOVER_TX, Interest::READABLE) {
            log::warn!("worker {w}: cannot watch for the successor's ACK: {e}");
        }
        let mut candidates = Vec::new();
        let mut restart = Vec::new();
        for (_, c) in self.srv.conns.iter() {
            if c.movable() {
                candidates.push(c.fd);
            } else if matches!(
                c.phase,
                Phase::Connecting { .. } | Phase::ClientHandshake { .. }
            ) {
                self.srv.doomed.push(c.fd);
            } else if c.is_open_websocket() {
                restart.push(c.fd); // its peer's deflate context cannot move
            }
        }
        for fd in restart {
            self.srv.disconnect(fd, SERVICE_RESTART, "service restart");
        }
        self.migrate.out = Some(Outgoing {
            began: now,
            boundary_by: now + wait / 2,
            send_by: now + wait.mul_f64(0.8),
            candidates,
            stage: Stage::Gathering,
        });
        self.srv
            .timers
            .insert(now, wait, None, TimerTask::StopDeadline);
    }

    /// Moves a handover forward: parks connections at frame boundaries,
    /// sends them when all are parked (or the boundary deadline passed),
    /// times out the ACK wait and the adoption. Called once per iteration.
    pub(crate) fn handover_step(&mut self, app: &mut A) {
        let now = Instant::now();
        if self.migrate.adopt_until.is_some_and(|t| now >= t) {
            log::warn!(
                "worker {}: the predecessor did not finish its handover in time; serving anyway",
                self.srv.worker_id
            );
            self.finish_adoption(app);
        }
        let Some(mut out) = self.migrate.out.take() else {
            return;
        };
        match out.stage {
            Stage::Gathering => {
                let srv = &mut self.srv;
                out.candidates.retain(|&fd| {
                    let Some(k) = srv.key(fd) else { return false };
                    let keep = srv.conns[k].movable() && !srv.doomed.contains(&fd);
                    srv.conns[k].parked &= keep; // a closing one reads again, to its EOF
                    keep
                });
                let mut waiting = 0;
                for &fd in &out.candidates {
                    if let Some(k) = srv.key(fd) {
                        let c = &mut srv.conns[k];
                        c.parked |= c.at_boundary();
                        waiting += usize::from(!c.parked);
                    }
                }
                if waiting == 0 || now >= out.boundary_by {
                    let (parked, stuck): (Vec<Fd>, Vec<Fd>) = out
                        .candidates
                        .iter()
                        .partition(|&&fd| srv.key(fd).is_some_and(|k| srv.conns[k].parked));
                    for fd in stuck {
                        log::info!(
                            "worker {}: fd {fd} still mid-frame after {} ms; closing it with 1012",
                            srv.worker_id,
                            now.duration_since(out.began).as_millis()
                        );
                        srv.disconnect(fd, SERVICE_RESTART, "service restart");
                    }
                    let sent = self.send_parked(parked, out.send_by);
                    out.stage = Stage::AwaitAck {
                        until: Instant::now() + ACK_WAIT,
                        sent,
                    };
                }
            }
            Stage::AwaitAck { until, sent } if now >= until => {
                log::warn!(
                    "worker {}: sent {sent} connections but the successor did not acknowledge within {} ms",
                    self.srv.worker_id,
                    ACK_WAIT.as_millis()
                );
                out.stage = Stage::Done;
            }
            _ => {}
        }
        self.migrate.out = Some(out);
    }

    /// Sends the parked connections in manifests of at most [`MAX_FDS`]
    /// connections and (where possible) [`MAX_PAYLOAD`] bytes, then END;
    /// returns how many moved. A connection whose manifest could not be
    /// sent stays here and is closed (1012 for a WebSocket). O(n).
    fn send_parked(&mut self, fds: Vec<Fd>, send_by: Instant) -> usize {
        let mut sent = 0;
        let mut batch: Vec<(Fd, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        for fd in fds {
            let Some(k) = self.srv.key(fd) else { continue };
            let json = match serde_json::to_vec(&self.srv.conns[k].snapshot(self.srv.worker_id)) {
                Ok(j) => j,
                Err(e) => {
                    log::warn!("fd {fd}: cannot describe the connection ({e}); closing it");
                    self.fail_move(fd);
                    continue;
                }
            };
            if !batch.is_empty() && (batch.len() == MAX_FDS || bytes + json.len() > MAX_PAYLOAD) {
                sent += self.send_batch(std::mem::take(&mut batch), send_by);
                bytes = 0;
            }
            bytes += json.len() + 1;
            batch.push((fd, json));
        }
        if !batch.is_empty() {
            sent += self.send_batch(batch, send_by);
        }
        if let Some(h) = &self.migrate.hand {
            if let Err(e) = h
                .link
                .send_end(sent as u32, send_by.max(Instant::now() + ACK_WAIT))
            {
                log::warn!("worker {}: handover END: {e}", self.srv.worker_id);
            }
        }
        sent
    }

    /// Sends one manifest; on success the connections leave this worker
    /// (no `on_close`: they live on). Returns how many moved.
    fn send_batch(&mut self, batch: Vec<(Fd, Vec<u8>)>, send_by: Instant) -> usize {
        let mut json =
            Vec::with_capacity(batch.iter().map(|(_, j)| j.len() + 1).sum::<usize>() + 2);
        json.push(b'[');
        for (i, (_, j)) in batch.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(j);
        }
        json.push(b']');
        let result = {
            let fds: Vec<BorrowedFd<'_>> = batch
                .iter()
                .filter_map(|(fd, _)| self.srv.key(*fd).map(|k| self.srv.conns[k].stream.as_fd()))
                .collect();
            match &self.migrate.hand {
                Some(h) if fds.len() == batch.len() => h.link.send_manifest(&json, &fds, send_by),
                _ => Err(std::io::Error::other(
                    "a connection vanished while batching",
                )),
            }
        };
        if let Err(e) = result {
            log::warn!(
                "worker {}: could not hand over {} connections: {e}; closing them",
                self.srv.worker_id,
                batch.len()
            );
            for (fd, _) in batch {
                self.fail_move(fd);
            }
            return 0;
        }
        for (fd, _) in &batch {
            let Some(k) = self.srv.key(*fd) else { continue };
            let mut c = self.srv.conns.remove(k);
            // Deregister before our copy closes: the socket lives on in the
            // successor, and epoll keys registrations by open file.
            let _ = self.srv.registry.deregister(&mut c.stream);
            if let Some(t) = c.timer.take() {
                self.srv.timers.cancel(t);
            }
        }
        self.srv
            .row
            .connections
            .store(self.srv.conns.len() as u64, Relaxed);
        batch.len()
    }

    /// A connection that could not move: closed properly, never reset.
    fn fail_move(&mut self, fd: Fd) {
        if let Some(k) = self.srv.key(fd) {
            self.srv.conns[k].parked = false;
        }
        if !self.srv.disconnect(fd, SERVICE_RESTART, "service restart") {
            self.srv.close_gracefully(fd);
        }
    }

    /// The predecessor's side socket is readable: the successor's ACK.
    pub(crate) fn on_handover_tx(&mut self) {
        let me = std::process::id();
        let Some(h) = &self.migrate.hand else { return };
        loop {
            match h.link.recv_tx(&mut self.migrate.asm) {
                Ok(Some(Received::Ack { pid })) if pid == me => {
                    if let Some(o) = &mut self.migrate.out {
                        if let Stage::AwaitAck { sent, .. } = o.stage {
                            log::info!(
                                "worker {}: handed {sent} connections over in {} ms",
                                self.srv.worker_id,
                                o.began.elapsed().as_millis()
                            );
                            o.stage = Stage::Done;
                        }
                    }
                }
                Ok(Some(other)) => log::debug!("handover: ignoring {other:?} on the sending side"),
                Ok(None) => return,
                Err(e) => {
                    log::warn!("worker {}: {e}", self.srv.worker_id);
                    return;
                }
            }
        }
    }

    /// The successor's socket is readable: BEGIN, manifests, END.
    pub(crate) fn on_handover_rx(&mut self, app: &mut A) {
        let w = self.srv.worker_id;
        loop {
            let Some(h) = &self.migrate.hand else { return };
            let got = h.link.recv_rx(&mut self.migrate.asm);
            match got {
                Ok(Some(Received::Begin { from })) => {
                    log::info!("worker {w}: pid {from} is handing its connections over");
                    if let Some(t) = &mut self.migrate.adopt_until {
                        *t =
                            Instant::now() + wait_of(self.srv.settings.max_wait_time) + ADOPT_SLACK;
                    }
                }
                Ok(Some(Received::Conns { conns, .. })) => {
                    for (snap, fd) in conns {
                        self.adopt(app, snap, fd);
                    }
                }
                Ok(Some(Received::End { from, count })) => {
                    let ack_by = Instant::now() + ACK_WAIT;
                    if let Err(e) = h.link.send_ack(from, ack_by) {
                        log::warn!("worker {w}: cannot acknowledge pid {from}: {e}");
                    }
                    log::debug!("worker {w}: pid {from} sent {count} connections");
                    self.finish_adoption(app);
                }
                Ok(Some(Received::Ack { .. })) => {}
                Ok(None) => return,
                Err(e) => {
                    log::warn!("worker {w}: {e}");
                    return;
                }
            }
        }
    }

    /// Takes one connection into this loop under a new fd; `on_adopt` for
    /// an upgraded one. A connection that cannot be adopted is closed.
    fn adopt(&mut self, app: &mut A, snap: ConnSnapshot, owned: OwnedFd) {
        let w = self.srv.worker_id;
        let (old, peer) = (snap.info.fd, snap.info.peer);
        let std = std::net::TcpStream::from(owned);
        if let Err(e) = std.set_nonblocking(true) {
            log::warn!("worker {w}: adopting fd {old} ({peer}): {e}; closing it");
            return;
        }
        let key = self.srv.conns.vacant_key();
        let fd = self.srv.fd_for(key);
        let handshake = snap.handshake_timer;
        let s = &self.srv.settings;
        let max_buf = 2 * s.package_max_length.max(s.buffer_output_size) + MAX_PAYLOAD;
        let stream = mio::net::TcpStream::from_std(std);
        let mut conn = match Conn::from_snapshot(fd, stream, snap, max_buf) {
            Ok(c) => c,
            Err(why) => {
                log::warn!("worker {w}: cannot adopt fd {old} ({peer}): {why}; closing it");
                return;
            }
        };
        if let Err(e) = self.srv.registry.register(
            &mut conn.stream,
            token_of(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("worker {w}: registering adopted fd {old} ({peer}): {e}; closing it");
            return;
        }
        let attrs: Option<HashMap<String, Value>> = conn
            .opened
            .then(|| conn.attrs.as_deref().cloned().unwrap_or_default());
        let pending = conn.pending_out() > 0;
        // Adopted connections count toward `max_conn_per_ip` here as they
        // did on the predecessor (always admitted: they are already open).
        conn.limits.ip_counted = self.srv.per_ip.admit(conn.peer.ip(), 0);
        self.srv.conns.insert(conn);
        self.migrate.adopted += 1;
        self.srv
            .row
            .connections
            .store(self.srv.conns.len() as u64, Relaxed);
        log::trace!("worker {w}: adopted fd {old} ({peer}) as fd {fd}");
        if handshake {
            self.srv.arm_handshake_timer(fd);
        }
        if let Some(attrs) = attrs {
            let srv = &mut self.srv;
            if Self::guarded(w, "on_adopt", Some(fd), || app.on_adopt(srv, fd, &attrs)).is_none() {
                self.close_after_panic(fd);
            }
        }
        if pending {
            self.srv.mark_dirty(fd);
        }
        if self.srv.stopping
            && !self.srv.handing_over
            && self.srv.exist(fd)
            && !self.srv.disconnect(fd, close::GOING_AWAY, "going away")
        {
            self.srv.close_gracefully(fd);
        }
    }

    /// Adoption over (END or deadline): start accepting and reading the
    /// mailbox.
    fn finish_adoption(&mut self, app: &mut A) {
        if self.migrate.adopt_until.take().is_none() {
            return;
        }
        self.srv.adopting = false;
        log::info!(
            "worker {}: adopted {} connections in {} ms",
            self.srv.worker_id,
            self.migrate.adopted,
            self.migrate
                .adopt_began
                .map_or(0, |t| t.elapsed().as_millis())
        );
        if std::mem::take(&mut self.migrate.listener_pending) {
            if let Some(l) = &mut self.listener {
                if let Err(e) = self.srv.registry.register(l, LISTENER, Interest::READABLE) {
                    log::error!(
                        "worker {}: registering the listener: {e}",
                        self.srv.worker_id
                    );
                }
            }
            self.accept_all();
        }
        // The inbox stayed registered; we only held off reading it.
        self.drain_inbox(app);
    }
}
