//! Accepting: both listeners drained until `WouldBlock`, admission
//! (`max_conn`, `max_conn_per_ip`), and nginx's back-off when `accept`
//! fails for want of resources (`EMFILE`, `ENFILE`, `ENOBUFS`, …): the
//! connection stays in the kernel's queue, and an edge-triggered listener
//! would raise no new edge for it, so accepting pauses for
//! [`ACCEPT_BACKOFF`] (a timer on the wheel) and then retries until
//! `WouldBlock`, again and again while the shortage lasts. One warning per
//! episode, one line when it ends. Also the other way a connection comes
//! in: an outbound connect (`ws_connect`) completing.

use std::io;
use std::time::{Duration, Instant};

use crate::event::App;
use crate::reactor::conn::{Conn, ConnKind, Phase};
use crate::reactor::event_loop::Reactor;
use crate::reactor::server::TimerTask;
use crate::reactor::timer::TimerId;

use std::sync::atomic::Ordering::Relaxed;

/// How long accepting pauses after `accept` failed for want of fds or
/// memory: long enough not to spin on a full fd table, short enough that
/// a queued peer barely notices (nginx waits its `accept_mutex_delay`,
/// 500 ms; a worker here has no mutex to share, so less will do).
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A worker's accept back-off.
#[derive(Debug, Default)]
pub(crate) struct AcceptPause {
    pub(crate) since: Option<Instant>, // the episode began (first failure)
    pub(crate) retry: Option<TimerId>, // paused until this timer fires
    pub(crate) retries: u32,           // retries that failed again this episode
}

impl<A: App> Reactor<A> {
    /// Accepts until `WouldBlock` on both listeners.
    pub(crate) fn accept_all(&mut self) {
        self.accept_from(false);
        self.accept_from(true);
    }

    /// Accepts until `WouldBlock` on the main or the admin listener. Past
    /// `max_conn`, or past `max_conn_per_ip` for the peer's address, a
    /// connection is answered 503 and closed at once — also when it meant to
    /// upgrade: the answer goes out before its request is read.
    pub(crate) fn accept_from(&mut self, admin: bool) {
        if self.accept_pause.retry.is_some() {
            return; // backing off: the retry timer accepts
        }
        loop {
            let l = if admin {
                &self.admin_listener
            } else {
                &self.listener
            };
            let Some(l) = l else { return };
            let (stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_recovered();
                    return;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue; // a signal, or a peer gone before we took it
                }
                Err(e) => return self.back_off(&e),
            };
            self.accept_recovered();
            let _ = stream.set_nodelay(true);
            let over = self.srv.conns.len() >= self.srv.settings.max_conn;
            let fd = self.srv.conns.next_fd();
            let mut conn = Conn::new(fd, stream, peer, ConnKind::Http, Phase::Http);
            conn.limits.admin = admin;
            if let Err(e) = self.srv.conns.insert(conn) {
                log::warn!(
                    "worker {}: registering connection from {peer}: {e}",
                    self.srv.worker_id
                );
                continue;
            }
            let Some(key) = self.srv.conns.key(fd) else {
                continue;
            };
            let ip_ok = over
                || self
                    .srv
                    .conns
                    .admit_ip(fd, self.srv.settings.max_conn_per_ip);
            self.srv.row.accepted.fetch_add(1, Relaxed);
            if over {
                log::warn!(
                    "worker {}: fd {fd} ({peer}): max_conn {} reached, answering 503",
                    self.srv.worker_id,
                    self.srv.settings.max_conn
                );
                self.srv.conns[key].reject(503, "too many connections");
                self.srv.close_gracefully(fd);
            } else if !ip_ok {
                log::warn!(
                    "worker {}: fd {fd} ({peer}): max_conn_per_ip {} reached, answering 503",
                    self.srv.worker_id,
                    self.srv.settings.max_conn_per_ip
                );
                self.srv.conns[key].reject(503, "too many connections from your address");
                self.srv.close_gracefully(fd);
            } else {
                self.srv.arm_handshake_timer(fd);
            }
        }
    }

    /// `accept` failed (not `WouldBlock`): pause accepting and retry after
    /// [`ACCEPT_BACKOFF`]. Warns once per episode.
    fn back_off(&mut self, e: &io::Error) {
        let p = &mut self.accept_pause;
        if p.since.is_none() {
            p.since = Some(Instant::now());
            log::warn!(
                "worker {}: accept failed: {e}; pausing accepts, retrying every {} ms until it works",
                self.srv.worker_id,
                ACCEPT_BACKOFF.as_millis()
            );
        } else {
            p.retries += 1;
        }
        let id =
            self.srv
                .timers
                .insert(Instant::now(), ACCEPT_BACKOFF, None, TimerTask::AcceptRetry);
        self.accept_pause.retry = Some(id);
    }

    /// The back-off timer fired: accept again (until `WouldBlock`, or the
    /// next failure and pause).
    pub(crate) fn accept_retry(&mut self) {
        self.accept_pause.retry = None;
        self.accept_all();
    }

    /// An accept worked or found the queue empty: a back-off episode, if
    /// any, is over.
    fn accept_recovered(&mut self) {
        let p = &mut self.accept_pause;
        if let Some(since) = p.since.take() {
            log::info!(
                "worker {}: accepting again after {} ms ({} failed retries)",
                self.srv.worker_id,
                since.elapsed().as_millis(),
                std::mem::take(&mut p.retries)
            );
        }
    }

    /// An outbound connect progressed: on success queue the upgrade request.
    pub(crate) fn finish_connect(&mut self, key: usize) {
        let c = &mut self.srv.conns[key];
        let fd = c.fd;
        let failed = match c.stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match c.stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // still in progress
                Err(e) => Some(e),
            },
        };
        if let Some(e) = failed {
            log::warn!(
                "worker {}: fd {fd}: connect to {} failed: {e}",
                self.srv.worker_id,
                c.peer
            );
            self.srv.conns.doom(fd);
            return;
        }
        if let Phase::Connecting { host } = &c.phase {
            let path = c.path().unwrap_or("/");
            let (req, ws_key) = crate::reactor::websocket::client_request(host, path);
            c.wbuf.extend_from_slice(&req);
            c.phase = Phase::ClientHandshake { key: ws_key };
            self.srv.mark_dirty(fd);
        }
    }
}
