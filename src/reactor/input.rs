//! The loop's input side: reading a connection until `WouldBlock`,
//! decoding and dispatching what arrived (straight from the scratch buffer
//! when nothing was left over), frames whose payload is still arriving,
//! requests that wait behind a deferred HTTP answer, and the peer's close.

use std::io::{self, Read};
use std::time::Instant;

use crate::event::App;
use crate::reactor::conn::{Conn, Phase};
use crate::reactor::event_loop::Reactor;

impl<A: App> Reactor<A> {
    /// Reads until `WouldBlock`, processing each chunk straight from the
    /// scratch buffer when nothing was left over; only leftovers (a partial
    /// frame or request) are copied into the connection.
    pub(crate) fn read(&mut self, app: &mut A, key: usize, fd: crate::reactor::Fd) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while !self.srv.conns.is_doomed(fd) {
            let Some(c) = self.srv.conns.get_mut(key).filter(|c| c.fd == fd) else {
                break;
            };
            if matches!(c.phase, Phase::Connecting { .. }) {
                break;
            }
            // A frame whose payload is still arriving is read into its own
            // buffer (frame.rs); everything else through the scratch buffer.
            let body = c.body_need() > 0;
            let res = if body {
                c.read_body()
            } else {
                c.stream.read(&mut scratch).map(|n| (n, scratch.len()))
            };
            let (n, asked) = match res {
                Ok((0, _)) => {
                    self.peer_closed(fd);
                    break;
                }
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!(
                        "worker {}: fd {fd} ({}): read: {e}",
                        self.srv.worker_id,
                        c.peer
                    );
                    self.srv.conns.doom(fd);
                    break;
                }
            };
            c.last_active = Instant::now();
            // A short read emptied the socket's receive queue: anything that
            // arrives later raises a new edge, so the read that would only
            // return WouldBlock is skipped (one syscall less per message).
            let drained = n < asked;
            if c.is_closing() {
                if drained {
                    break;
                }
                continue; // lingering: discard input until EOF
            }
            if matches!(c.phase, Phase::HttpAnswering { .. }) {
                // Pipelined requests wait for the deferred answer, bounded.
                c.rbuf.extend_from_slice(&scratch[..n]);
                if c.rbuf.len() > self.srv.settings.package_max_length.saturating_mul(2) {
                    log::info!(
                        "worker {}: fd {fd} ({}): too much pipelined input while an answer is pending; closing",
                        self.srv.worker_id,
                        c.peer
                    );
                    self.srv.conns.doom(fd);
                    break;
                }
            } else if body {
                self.process(app, key, fd, &mut []); // completes the frame?
            } else if c.rbuf.is_empty() {
                let used = self.process(app, key, fd, &mut scratch[..n]);
                if let Some(c) = self.live(key, fd) {
                    c.rbuf.extend_from_slice(&scratch[used..n]);
                }
            } else {
                let mut buf = std::mem::take(&mut c.rbuf);
                buf.extend_from_slice(&scratch[..n]);
                let used = self.process(app, key, fd, &mut buf);
                if let Some(c) = self.live(key, fd) {
                    buf.drain(..used);
                    if !buf.is_empty() {
                        c.rbuf = buf;
                    }
                }
            }
            if drained {
                break;
            }
        }
        self.scratch = scratch;
        if let Some(c) = self.srv.conns.get(key).filter(|c| c.fd == fd) {
            if c.pending_out() > 0 || c.is_closing() {
                self.srv.mark_dirty(fd);
            }
        }
    }

    /// Decodes what waited in `rbuf` behind a deferred HTTP answer, now
    /// that it has been given.
    pub(crate) fn resume(&mut self, app: &mut A, fd: crate::reactor::Fd) {
        let Some(key) = self.srv.conns.key(fd) else {
            return;
        };
        let Some(c) = self.live(key, fd) else { return };
        if c.rbuf.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut c.rbuf);
        let used = self.process(app, key, fd, &mut buf);
        if let Some(c) = self.live(key, fd) {
            buf.drain(..used);
            if !buf.is_empty() {
                c.rbuf = buf;
            }
        }
    }

    /// The connection if it is still there and not closing.
    pub(crate) fn live(&mut self, key: usize, fd: crate::reactor::Fd) -> Option<&mut Conn> {
        self.srv
            .conns
            .get_mut(key)
            .filter(|c| c.fd == fd && !c.is_closing())
    }

    /// Decodes and dispatches every complete unit of `input`; returns the
    /// bytes used (all of them once the connection closes).
    pub(crate) fn process(
        &mut self,
        app: &mut A,
        key: usize,
        fd: crate::reactor::Fd,
        input: &mut [u8],
    ) -> usize {
        let max = self.srv.settings.package_max_length;
        let mut pos = 0;
        while pos <= input.len() {
            // A worker handing over still takes upgrades: they move too.
            let stopping = self.srv.lifecycle.draining();
            if self.srv.conns.is_doomed(fd) {
                return input.len();
            }
            let srv = &mut self.srv;
            let Some(c) = srv
                .conns
                .get_mut(key)
                .filter(|c| c.fd == fd && !c.is_closing())
            else {
                return input.len();
            };
            let (inbound, used) = c.decode_next(&mut input[pos..], max, stopping, &mut srv.codec);
            pos += used;
            if !self.dispatch(app, fd, inbound) {
                return pos;
            }
        }
        pos
    }

    /// The peer closed its side.
    pub(crate) fn peer_closed(&mut self, fd: crate::reactor::Fd) {
        let Some(key) = self.srv.conns.key(fd) else {
            return;
        };
        let c = &self.srv.conns[key];
        if c.is_closing() || c.pending_out() == 0 {
            self.srv.conns.doom(fd);
        } else {
            self.srv.close_gracefully(fd); // flush what it asked for, then go
        }
    }
}
