//! Outbound WebSocket connections on the worker's loop: [`Server::ws_connect`]
//! dials (the connect and the handshake run in the loop, under the
//! handshake timer), and [`Server::ping`] lets the dialler find out whether
//! the peer still answers (its pong, like any input, refreshes the
//! connection's `last_active_ms`).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::event::App;
use crate::reactor::conn::{Conn, ConnKind, Phase};
use crate::reactor::server::{Server, TimerTask};
use crate::reactor::Fd;

/// Largest ping payload (RFC 6455: control frames carry at most 125 bytes).
const MAX_PING: usize = 125;

impl<A: App> Server<A> {
    /// Opens an outbound WebSocket connection to `addr`, sending `host` and
    /// `path` in the upgrade. The connect and handshake run in the loop;
    /// `on_connect(fd)` follows on success, `on_close(fd)` on failure or
    /// when it later closes. Messages and `push` work as for accepted
    /// connections.
    pub fn ws_connect(&mut self, addr: SocketAddr, host: &str, path: &str) -> io::Result<Fd> {
        let stream = mio::net::TcpStream::connect(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("ws_connect to {addr}: {e}")))?;
        // As for accepted connections: small frames (an IM server's forwards
        // to the Route) must not wait for the peer's delayed ACK (Nagle).
        let _ = stream.set_nodelay(true);
        let fd = self.conns.next_fd();
        let phase = Phase::Connecting { host: host.into() };
        let mut conn = Conn::new(fd, stream, addr, ConnKind::Client, phase);
        conn.set_path(path);
        conn.opened = true; // on_close is due even if the dial fails
        self.conns.insert(conn).map_err(|e| {
            io::Error::new(e.kind(), format!("ws_connect to {addr}: register: {e}"))
        })?;
        self.arm_handshake_timer(fd);
        Ok(fd)
    }

    pub(crate) fn arm_handshake_timer(&mut self, fd: Fd) {
        let secs = self.settings.handshake_timeout;
        if secs <= 0.0 {
            return;
        }
        let id = self.timers.insert(
            Instant::now(),
            Duration::from_secs_f64(secs),
            None,
            TimerTask::Handshake(fd),
        );
        if let Some(c) = self.conns.conn_mut(fd) {
            c.timer.set(id);
        }
    }

    /// Sends a WebSocket ping (`payload` cut to 125 bytes) on `fd`; the
    /// peer's reactor answers with a pong, which counts as input. False if
    /// `fd` is gone or is not an open WebSocket. O(payload).
    pub fn ping(&mut self, fd: Fd, payload: &[u8]) -> bool {
        let Some(c) = self.conns.conn_mut(fd) else {
            return false;
        };
        if !c.queue_ping(&payload[..payload.len().min(MAX_PING)]) {
            return false;
        }
        self.mark_dirty(fd);
        true
    }
}
