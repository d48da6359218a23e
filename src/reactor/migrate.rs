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
use crate::reactor::event_loop::{Reactor, HANDOVER_TX, LISTENER};
use crate::reactor::handover::{Assembler, Received, MAX_FDS, MAX_PAYLOAD};
use crate::reactor::lifecycle::{Lifecycle, Outgoing, Stage};
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

/// A worker's handover resources (its state is in [`Lifecycle`]).
#[derive(Default)]
pub(crate) struct Migrate {
    hand: Option<Handover>, // None: no manager link
    asm: Assembler,         // manifest pieces in flight
}

impl Migrate {
    /// The resources of a worker with (or without) a handover link, and its
    /// initial lifecycle: with `expect_predecessor` the worker starts
    /// adopting.
    pub(crate) fn new(hand: Option<Handover>, max_wait: f64) -> (Migrate, Lifecycle) {
        let expect = hand.as_ref().is_some_and(|h| h.expect_predecessor);
        let lifecycle = Lifecycle::new(expect, Instant::now(), wait_of(max_wait) + ADOPT_SLACK);
        let m = Migrate {
            hand,
            asm: Assembler::default(),
        };
        (m, lifecycle)
    }

    /// The successor's socket, to register at start.
    pub(crate) fn rx_fd(&self) -> Option<i32> {
        self.hand.as_ref().map(|h| h.link.rx_fd())
    }

    /// Whether this worker can hand over (it has a link).
    pub(crate) fn can_hand_over(&self) -> bool {
        self.hand.is_some()
    }
}

fn wait_of(max_wait: f64) -> Duration {
    Duration::from_secs_f64(max_wait.max(0.0))
}

impl<A: App> Reactor<A> {
    /// SIGUSR1: the manager's replacement serves; hand over (once).
    pub(crate) fn request_handover(&mut self) {
        if self.migrate.can_hand_over() {
            self.srv.lifecycle.ask(WorkerExit::HandedOver);
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
        if self.srv.lifecycle.ask_replacement() {
            log::info!(
                "worker {}: asking for a replacement; no longer accepting",
                self.srv.worker_id
            );
            (h.request_replacement)();
            if let Some(mut l) = self.listener.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
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
        let out = Outgoing {
            began: now,
            boundary_by: now + wait / 2,
            send_by: now + wait.mul_f64(0.8),
            candidates: Vec::new(),
            stage: Stage::Gathering,
        };
        if let Err(e) = self.srv.lifecycle.begin_handover(out) {
            log::warn!("worker {w}: {e}");
            return;
        }
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
            let _ = self.poll.registry().deregister(&mut l);
        }
        let (inbox, rx, tx) = match &self.migrate.hand {
            Some(h) => (self.srv.postbox.inbox_fd(), h.link.rx_fd(), h.link.tx_fd()),
            None => return,
        };
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut SourceFd(&inbox));
        let _ = reg.deregister(&mut SourceFd(&rx)); // our own messages arrive there
        if let Err(e) = reg.register(&mut SourceFd(&tx), HANDOVER_TX, Interest::READABLE) {
            log::warn!("worker {w}: cannot watch for the successor's ACK: {e}");
        }
        let candidates: Vec<Fd> = self
            .srv
            .conns
            .iter()
            .filter(|c| c.movable())
            .map(|c| c.fd)
            .collect();
        // Open WebSockets that cannot move: their peer's deflate context
        // (zlib state) cannot be handed over.
        let restart: Vec<Fd> = self
            .srv
            .conns
            .iter()
            .filter(|c| !c.movable() && c.is_open_websocket())
            .map(|c| c.fd)
            .collect();
        for fd in restart {
            self.srv.disconnect(fd, SERVICE_RESTART, "service restart");
        }
        self.srv.conns.doom_where(|c| {
            matches!(
                c.phase,
                Phase::Connecting { .. } | Phase::ClientHandshake { .. }
            )
        });
        if let Some(o) = self.srv.lifecycle.outgoing_mut() {
            o.candidates = candidates;
        }
        self.srv
            .timers
            .insert(now, wait, None, TimerTask::StopDeadline);
    }

    /// Moves a handover forward: parks connections at frame boundaries,
    /// sends them when all are parked (or the boundary deadline passed),
    /// times out the ACK wait and the adoption. Called once per iteration.
    pub(crate) fn handover_step(&mut self, app: &mut A) {
        let now = Instant::now();
        if self
            .srv
            .lifecycle
            .adoption()
            .is_some_and(|a| now >= a.until)
        {
            log::warn!(
                "worker {}: the predecessor did not finish its handover in time; serving anyway",
                self.srv.worker_id
            );
            self.finish_adoption(app, "the predecessor's deadline passed");
        }
        let Some(out) = self.srv.lifecycle.outgoing_mut() else {
            return;
        };
        let (stage, began, boundary_by, send_by) =
            (out.stage, out.began, out.boundary_by, out.send_by);
        // Lent out while the connections are looked at; put back below.
        let mut candidates = std::mem::take(&mut out.candidates);
        let moved = match stage {
            Stage::Gathering => {
                let srv = &mut self.srv;
                candidates.retain(|&fd| {
                    let Some(k) = srv.conns.key(fd) else {
                        return false;
                    };
                    let keep = srv.conns[k].movable() && !srv.conns.is_doomed(fd);
                    srv.conns[k].parked &= keep; // a closing one reads again, to its EOF
                    keep
                });
                let mut waiting = 0;
                for &fd in &candidates {
                    if let Some(k) = srv.conns.key(fd) {
                        let c = &mut srv.conns[k];
                        c.parked |= c.at_boundary();
                        waiting += usize::from(!c.parked);
                    }
                }
                if waiting == 0 || now >= boundary_by {
                    let (parked, stuck): (Vec<Fd>, Vec<Fd>) = candidates
                        .iter()
                        .partition(|&&fd| srv.conns.key(fd).is_some_and(|k| srv.conns[k].parked));
                    for fd in stuck {
                        log::info!(
                            "worker {}: fd {fd} still mid-frame after {} ms; closing it with 1012",
                            srv.worker_id,
                            now.duration_since(began).as_millis()
                        );
                        srv.disconnect(fd, SERVICE_RESTART, "service restart");
                    }
                    let sent = self.send_parked(parked, send_by);
                    self.srv.lifecycle.sent(sent, Instant::now() + ACK_WAIT)
                } else {
                    Ok(())
                }
            }
            Stage::AwaitAck { until, sent } if now >= until => {
                log::warn!(
                    "worker {}: sent {sent} connections but the successor did not acknowledge within {} ms",
                    self.srv.worker_id,
                    ACK_WAIT.as_millis()
                );
                self.srv.lifecycle.ack_over(false).map(|_| ())
            }
            _ => Ok(()),
        };
        if let Some(o) = self.srv.lifecycle.outgoing_mut() {
            o.candidates = candidates;
        }
        if let Err(e) = moved {
            log::warn!("worker {}: {e}", self.srv.worker_id);
        }
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
            let Some(k) = self.srv.conns.key(fd) else {
                continue;
            };
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
                .filter_map(|(fd, _)| {
                    self.srv
                        .conns
                        .key(*fd)
                        .map(|k| self.srv.conns[k].stream.as_fd())
                })
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
            // Deregistered before our copy closes: the socket lives on in
            // the successor.
            let Some(mut c) = self.srv.conns.remove(*fd) else {
                continue;
            };
            if let Some(t) = c.timer.take() {
                self.srv.timers.cancel(t);
            }
        }
        batch.len()
    }

    /// A connection that could not move: closed properly, never reset.
    fn fail_move(&mut self, fd: Fd) {
        if let Some(k) = self.srv.conns.key(fd) {
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
                    // A late or repeated ACK is refused by the lifecycle: ignored.
                    if let Ok((sent, began)) = self.srv.lifecycle.ack_over(true) {
                        log::info!(
                            "worker {}: handed {sent} connections over in {} ms",
                            self.srv.worker_id,
                            began.elapsed().as_millis()
                        );
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
                    let until =
                        Instant::now() + wait_of(self.srv.settings.max_wait_time) + ADOPT_SLACK;
                    if self.srv.lifecycle.extend_adoption(until).is_err() {
                        log::warn!("worker {w}: a handover BEGIN while not adopting; ignored");
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
                    self.finish_adoption(app, "the predecessor's END");
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
        let fd = self.srv.conns.next_fd();
        let handshake = snap.handshake_timer;
        let s = &self.srv.settings;
        let max_buf = 2 * s.package_max_length.max(s.buffer_output_size) + MAX_PAYLOAD;
        let stream = mio::net::TcpStream::from_std(std);
        let conn = match Conn::from_snapshot(fd, stream, snap, max_buf) {
            Ok(c) => c,
            Err(why) => {
                log::warn!("worker {w}: cannot adopt fd {old} ({peer}): {why}; closing it");
                return;
            }
        };
        let attrs: Option<HashMap<String, Value>> = conn
            .opened
            .then(|| conn.attrs.as_deref().cloned().unwrap_or_default());
        let pending = conn.pending_out() > 0;
        if let Err(e) = self.srv.conns.insert(conn) {
            log::warn!("worker {w}: registering adopted fd {old} ({peer}): {e}; closing it");
            return;
        }
        // Adopted connections count toward `max_conn_per_ip` here as they
        // did on the predecessor (always admitted: they are already open).
        self.srv.conns.admit_ip(fd, 0);
        self.srv.lifecycle.count_adopted();
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
        if self.srv.lifecycle.draining()
            && self.srv.exist(fd)
            && !self.srv.disconnect(fd, close::GOING_AWAY, "going away")
        {
            self.srv.close_gracefully(fd);
        }
    }

    /// Adoption over (END or deadline): start accepting and reading the
    /// mailbox.
    fn finish_adoption(&mut self, app: &mut A, why: &str) {
        let Ok(adoption) = self.srv.lifecycle.finish_adoption(why) else {
            return; // not adopting (a second END, say)
        };
        log::info!(
            "worker {}: adopted {} connections in {} ms",
            self.srv.worker_id,
            adoption.adopted,
            adoption.began.elapsed().as_millis()
        );
        // The listener was held back while adopting; a drain or a
        // `max_request` replacement took it away since.
        if let Some(l) = &mut self.listener {
            if let Err(e) = self
                .poll
                .registry()
                .register(l, LISTENER, Interest::READABLE)
            {
                log::error!(
                    "worker {}: registering the listener: {e}",
                    self.srv.worker_id
                );
            }
            self.accept_all();
        }
        // The inbox stayed registered; we only held off reading it.
        self.drain_inbox(app);
    }
}
