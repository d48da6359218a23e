//! One connection: its socket, its protocol phase, and the read and write
//! buffers it owns. Buffers are plain `Vec<u8>`s released (capacity freed)
//! whenever they empty, so an idle connection holds no buffer memory.
//!
//! [`Conn::decode_next`] is the protocol step: it consumes bytes from the
//! front of the input and answers what the loop must do next as an
//! [`Inbound`] value (a request for `on_request`, an upgrade for `on_open`,
//! a message for `on_message`, …). Protocol-level answers (101, pong, close
//! echo, 4xx on bad input) are queued into the write buffer right here; the
//! application's answers are queued by the loop after the hook returns, so
//! output keeps request order.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::reactor::deflate::{Codec, Params, PerConn};
use crate::reactor::http::{self, Parsed, Request};
pub use crate::reactor::timer::ConnTimer;
use crate::reactor::websocket::{
    self as ws, ClientHandshake, Decoded, Fragments, Message, Role, WsEvent, WsState,
};
use crate::reactor::Fd;

/// What kind of connection this is, for `connection_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnKind {
    /// Plain HTTP (not upgraded).
    Http,
    /// An accepted WebSocket connection.
    WebSocket,
    /// An outbound WebSocket connection (`ws_connect`).
    Client,
}

/// Where a connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Outbound: the TCP connect is in progress.
    Connecting {
        /// `Host` header to send (the path is the connection's).
        host: Box<str>,
    },
    /// Outbound: the upgrade request is sent; waiting for the 101.
    ClientHandshake {
        /// Our `Sec-WebSocket-Key`.
        key: String,
    },
    /// Inbound HTTP: reading requests.
    Http,
    /// Inbound HTTP: the application answers the last request later
    /// ([`crate::reactor::Response::later`], then `Server::respond`);
    /// requests that arrive meanwhile wait in `rbuf`, so answers keep
    /// their order.
    HttpAnswering {
        /// Keep the connection open after the answer.
        keep: bool,
    },
    /// Upgraded.
    WebSocket(WsState),
    /// Going away: flush output, shut our write side, discard input until
    /// EOF or the linger timer.
    Closing,
}

/// The phase as plain data, for snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PhaseName {
    /// See [`Phase::Connecting`].
    Connecting,
    /// See [`Phase::ClientHandshake`].
    ClientHandshake,
    /// See [`Phase::Http`].
    Http,
    /// See [`Phase::WebSocket`].
    WebSocket,
    /// See [`Phase::Closing`].
    Closing,
}

/// What the application may learn about a connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The connection id.
    pub fd: Fd,
    /// The worker that holds it.
    pub worker_id: usize,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Kind.
    pub kind: ConnKind,
    /// Path of the upgrade request (WebSocket) or of the dial (client).
    pub path: Option<String>,
    /// When it connected, milliseconds since the Unix epoch.
    pub connected_ms: u64,
    /// When it last sent us bytes, milliseconds since the Unix epoch.
    pub last_active_ms: u64,
    /// Accepted on the admin listener (`admin_listen`).
    #[serde(default)]
    pub admin: bool,
}

/// A connection described as data at a frame boundary, so that a later
/// change can move it to another worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnSnapshot {
    /// Connection facts.
    pub info: ConnectionInfo,
    /// Protocol phase.
    pub phase: PhaseName,
    /// WebSocket role, when upgraded.
    pub role: Option<Role>,
    /// A fragmented message being reassembled.
    pub fragments: Option<Fragments>,
    /// We already sent a close frame.
    pub close_sent: bool,
    /// permessage-deflate as agreed, if it was. Only parameters travel:
    /// without context takeover no zlib state outlives a message; with
    /// the server's, the successor starts a fresh compressor (valid: a
    /// peer's inflater accepts a stream that stops referring to earlier
    /// messages); with the client's, the connection does not move (see
    /// [`Conn::movable`]).
    #[serde(default)]
    pub deflate: Option<Params>,
    /// Received bytes not yet consumed (a partial frame or request).
    #[serde(with = "crate::reactor::handover::b64")]
    pub read_buffer: Vec<u8>,
    /// Bytes queued for the peer.
    #[serde(with = "crate::reactor::handover::b64")]
    pub write_buffer: Vec<u8>,
    /// The application's attributes.
    pub attrs: HashMap<String, Value>,
    /// An HTTP connection that has not completed its first request yet
    /// (its `handshake_timeout` runs again where it lands).
    #[serde(default)]
    pub handshake_timer: bool,
}

/// What the loop must do after [`Conn::decode_next`].
#[derive(Debug)]
pub enum Inbound {
    /// The input holds no complete unit: keep it and read more.
    NeedMore,
    /// Bytes used with nothing for the application (pong, fragment…).
    Consumed,
    /// An HTTP request for `on_request`.
    Request(Request),
    /// An accepted upgrade for `on_open` (the 101 is queued).
    Open(Request),
    /// Our outbound handshake completed: `on_connect`.
    Connected,
    /// A WebSocket message for `on_message`.
    Message(Message),
    /// The connection is now closing; ignore further input.
    Closing,
}

/// One connection of the worker.
#[derive(Debug)]
pub struct Conn {
    /// Public id.
    pub fd: Fd,
    /// The socket.
    pub stream: TcpStream,
    /// The peer.
    pub peer: SocketAddr,
    /// Kind (changes from Http to WebSocket on upgrade).
    pub kind: ConnKind,
    /// Phase.
    pub phase: Phase,
    /// Unconsumed input (empty and capacity-free when idle).
    pub rbuf: Vec<u8>,
    /// Pending output from `wpos` on.
    pub wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    pub wpos: usize,
    /// Connect time, ms since the epoch.
    pub connected_ms: u64,
    /// Last time the peer sent bytes.
    pub last_active: Instant,
    /// Upgrade or dial path, see [`Conn::path`] ("/" is stored as "",
    /// which allocates nothing).
    path: Option<Box<str>>,
    /// Application attributes (boxed: most connections have none).
    pub attrs: Option<Box<HashMap<String, Value>>>,
    /// Handshake-deadline or linger timer.
    pub timer: ConnTimer,
    /// `on_open`/`on_connect` ran, so `on_close` is due at the end.
    pub opened: bool,
    /// Queued in the loop's flush list.
    pub dirty: bool,
    /// Our write side is shut down (lingering close).
    pub write_shut: bool,
    /// Once output is flushed, shut the write side and drain input until
    /// EOF (true), or close at once (false: the WebSocket close handshake
    /// is complete, nothing more can come).
    pub linger: bool,
    /// Handover: at a frame boundary and no longer read, waiting to move
    /// (its input stays in the kernel for the successor).
    pub parked: bool,
    /// Per-peer limits: IP accounting, admin listener, message budget.
    pub limits: crate::reactor::limits::ConnLimits,
}

impl Conn {
    /// A connection in `phase`.
    pub fn new(fd: Fd, stream: TcpStream, peer: SocketAddr, kind: ConnKind, phase: Phase) -> Conn {
        Conn {
            fd,
            stream,
            peer,
            kind,
            phase,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            connected_ms: crate::process::scoreboard::now_ms(),
            last_active: Instant::now(),
            path: None,
            attrs: None,
            timer: ConnTimer::default(),
            opened: false,
            dirty: false,
            write_shut: false,
            linger: true,
            parked: false,
            limits: Default::default(),
        }
    }

    /// Rebuilds a connection moved from another worker (see
    /// [`ConnSnapshot`]) under the new id `fd`. Only an upgraded WebSocket
    /// (either role) or an HTTP connection can move; anything else, or
    /// buffers over `max_buf`, is refused with the reason.
    pub fn from_snapshot(
        fd: Fd,
        stream: TcpStream,
        snap: ConnSnapshot,
        max_buf: usize,
    ) -> Result<Conn, String> {
        if snap.read_buffer.len() > max_buf || snap.write_buffer.len() > max_buf {
            return Err(format!(
                "buffers of {} / {} bytes exceed {max_buf}",
                snap.read_buffer.len(),
                snap.write_buffer.len()
            ));
        }
        let phase = match (snap.phase, snap.role) {
            (PhaseName::Http, _) => Phase::Http,
            (PhaseName::WebSocket, Some(role)) if !snap.close_sent => Phase::WebSocket(WsState {
                role,
                frag: snap.fragments.map(Box::new),
                close_sent: false,
                body: None,
                deflate: snap.deflate.map(|p| Box::new(PerConn::new(p))),
            }),
            (p, r) => return Err(format!("phase {p:?} (role {r:?}) cannot move")),
        };
        let mut c = Conn::new(fd, stream, snap.info.peer, snap.info.kind, phase);
        c.opened = matches!(c.phase, Phase::WebSocket(_));
        if let Some(p) = &snap.info.path {
            c.set_path(p);
        }
        c.connected_ms = snap.info.connected_ms;
        let idle = crate::process::scoreboard::now_ms().saturating_sub(snap.info.last_active_ms);
        c.last_active = Instant::now()
            .checked_sub(std::time::Duration::from_millis(idle))
            .unwrap_or_else(Instant::now);
        c.rbuf = snap.read_buffer;
        c.wbuf = snap.write_buffer;
        if !snap.attrs.is_empty() {
            c.attrs = Some(Box::new(snap.attrs));
        }
        Ok(c)
    }

    /// Whether a handover can move this connection now: an HTTP connection
    /// (a partial request moves with it), or an open WebSocket with no
    /// partially received frame.
    pub fn at_boundary(&self) -> bool {
        match &self.phase {
            Phase::Http => true,
            Phase::WebSocket(st) => !st.close_sent && self.rbuf.is_empty() && st.body.is_none(),
            _ => false,
        }
    }

    /// Whether this connection is of a kind a handover moves (possibly
    /// after waiting for a frame boundary).
    /// A WebSocket whose peer compresses with context takeover cannot move:
    /// its inflater's window (the peer's earlier messages) is zlib state.
    pub fn movable(&self) -> bool {
        match &self.phase {
            Phase::Http | Phase::HttpAnswering { .. } => true,
            Phase::WebSocket(st) => {
                !st.close_sent
                    && !matches!(st.deflate_params(), Some(p) if !p.client_no_context_takeover)
            }
            _ => false,
        }
    }

    /// The upgrade or dial path.
    pub fn path(&self) -> Option<&str> {
        self.path
            .as_deref()
            .map(|p| if p.is_empty() { "/" } else { p })
    }

    /// Sets the path (the common "/" without an allocation).
    pub fn set_path(&mut self, p: &str) {
        self.path = Some(if p == "/" { "".into() } else { p.into() });
    }

    /// Bytes waiting to be written.
    pub fn pending_out(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Whether the connection is on its way out.
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing)
    }

    /// Whether application messages may be pushed to it.
    pub fn is_open_websocket(&self) -> bool {
        matches!(&self.phase, Phase::WebSocket(st) if !st.close_sent)
    }

    /// Enters the closing phase (output already queued still goes out).
    pub fn begin_close(&mut self) {
        self.phase = Phase::Closing;
        self.rbuf = Vec::new();
    }

    /// Queues a WebSocket message; false if not an open WebSocket.
    pub fn queue_message(&mut self, msg: &Message) -> bool {
        match &self.phase {
            Phase::WebSocket(st) if !st.close_sent => {
                let role = st.role;
                self.compact_output();
                ws::encode_message(&mut self.wbuf, role, msg);
                true
            }
            _ => false,
        }
    }

    /// Queues a ping; false if not an open WebSocket.
    pub fn queue_ping(&mut self, payload: &[u8]) -> bool {
        match &self.phase {
            Phase::WebSocket(st) if !st.close_sent => {
                let role = st.role;
                self.compact_output();
                ws::encode_frame(&mut self.wbuf, role, ws_ping(), payload);
                true
            }
            _ => false,
        }
    }

    /// Queues a close frame and marks it sent; false if not an open
    /// WebSocket.
    pub fn queue_close(&mut self, code: u16, reason: &str) -> bool {
        match &mut self.phase {
            Phase::WebSocket(st) if !st.close_sent => {
                st.close_sent = true;
                ws::encode_close(&mut self.wbuf, st.role, code, reason);
                true
            }
            _ => false,
        }
    }

    /// Writes pending output until done or the socket is full. Ok(true):
    /// everything written (and the buffer released); Ok(false): blocked.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                // No compaction here: it happens when more is appended.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf = Vec::new();
        self.wpos = 0;
        Ok(true)
    }

    /// Consumes at most one unit (request, frame, handshake response) from
    /// the front of `input`, which may be unmasked in place. Returns what
    /// the loop must do and how many bytes were used. Never panics on bad
    /// input; `stopping` refuses new upgrades with 503. `codec` holds the
    /// worker's compression settings and shared (de)compressors.
    pub fn decode_next(
        &mut self,
        input: &mut [u8],
        max_len: usize,
        stopping: bool,
        codec: &mut Codec,
    ) -> (Inbound, usize) {
        match &mut self.phase {
            Phase::Http => self.decode_http(input, max_len, stopping, codec),
            Phase::HttpAnswering { .. } => (Inbound::NeedMore, 0),
            Phase::WebSocket(st) => {
                let decoded = ws::decode_frame(st, input, max_len, codec);
                let role = st.role;
                let close_sent = st.close_sent;
                match decoded {
                    Decoded::NeedMore => (Inbound::NeedMore, 0),
                    Decoded::Absorbed(n) => (Inbound::Consumed, n),
                    Decoded::Event(WsEvent::Message(_), n) if close_sent => (Inbound::Consumed, n),
                    Decoded::Event(WsEvent::Message(m), n) => (Inbound::Message(m), n),
                    Decoded::Event(WsEvent::Ping(p), n) => {
                        if !close_sent {
                            ws::encode_frame(&mut self.wbuf, role, ws_pong(), &p);
                        }
                        (Inbound::Consumed, n)
                    }
                    Decoded::Event(WsEvent::Pong, n) => (Inbound::Consumed, n),
                    Decoded::Event(WsEvent::Close(code, reason), n) => {
                        log::debug!(
                            "fd {} ({}): peer closed with {:?} {reason:?}",
                            self.fd,
                            self.peer,
                            code
                        );
                        // Echo the peer's code (1000 when it sent none).
                        self.queue_close(code.unwrap_or(ws::close::NORMAL), "");
                        self.begin_close();
                        self.linger = false;
                        (Inbound::Closing, n)
                    }
                    Decoded::Fail(code, why) => {
                        log::info!(
                            "fd {} ({}): websocket protocol error, closing with {code}: {why}",
                            self.fd,
                            self.peer
                        );
                        self.queue_close(code, why);
                        self.begin_close();
                        (Inbound::Closing, input.len())
                    }
                }
            }
            Phase::ClientHandshake { key } => match ws::check_response(input, key) {
                ClientHandshake::Partial => (Inbound::NeedMore, 0),
                ClientHandshake::Done(n) => {
                    self.phase = Phase::WebSocket(WsState::new(Role::Client));
                    self.opened = true;
                    (Inbound::Connected, n)
                }
                ClientHandshake::Fail(why) => {
                    log::warn!(
                        "fd {} ({}): websocket client handshake failed: {why}",
                        self.fd,
                        self.peer
                    );
                    self.begin_close();
                    (Inbound::Closing, input.len())
                }
            },
            Phase::Connecting { .. } => (Inbound::NeedMore, 0),
            Phase::Closing => (Inbound::Closing, input.len()),
        }
    }

    fn decode_http(
        &mut self,
        input: &[u8],
        max_len: usize,
        stopping: bool,
        codec: &Codec,
    ) -> (Inbound, usize) {
        match http::parse_request(input, max_len) {
            Parsed::Partial => (Inbound::NeedMore, 0),
            Parsed::Reject(status, why) => {
                log::info!("fd {} ({}): HTTP {status}: {why}", self.fd, self.peer);
                self.reject(status, why);
                (Inbound::Closing, input.len())
            }
            Parsed::Complete(mut req, n) => {
                req.fd = self.fd;
                req.peer = Some(self.peer);
                if !ws::wants_upgrade(&req) {
                    return (Inbound::Request(req), n);
                }
                if stopping {
                    self.reject(503, "server is stopping");
                    return (Inbound::Closing, input.len());
                }
                match ws::accept_upgrade_with(&req, Some(&codec.cfg)) {
                    Ok((resp, agreed)) => {
                        self.wbuf.extend_from_slice(&resp);
                        let mut st = WsState::new(Role::Server);
                        st.deflate = agreed.map(|p| Box::new(PerConn::new(p)));
                        self.phase = Phase::WebSocket(st);
                        self.kind = ConnKind::WebSocket;
                        self.set_path(&req.path);
                        self.opened = true;
                        (Inbound::Open(req), n)
                    }
                    Err(why) => {
                        log::info!("fd {} ({}): upgrade refused: {why}", self.fd, self.peer);
                        self.reject(400, why);
                        (Inbound::Closing, input.len())
                    }
                }
            }
        }
    }

    /// Queues an HTTP error answer and starts closing.
    pub fn reject(&mut self, status: u16, why: &str) {
        self.wbuf
            .extend_from_slice(&http::error_response(status, why));
        self.begin_close();
    }

    /// The connection's public facts.
    pub fn info(&self, worker_id: usize) -> ConnectionInfo {
        let idle_ms = self.last_active.elapsed().as_millis() as u64;
        ConnectionInfo {
            fd: self.fd,
            worker_id,
            peer: self.peer,
            kind: self.kind,
            path: self.path().map(str::to_string),
            connected_ms: self.connected_ms,
            last_active_ms: crate::process::scoreboard::now_ms().saturating_sub(idle_ms),
            admin: self.limits.admin,
        }
    }

    /// The connection as data (see [`ConnSnapshot`]).
    pub fn snapshot(&self, worker_id: usize) -> ConnSnapshot {
        let (phase, role, fragments, close_sent) = match &self.phase {
            Phase::Connecting { .. } => (PhaseName::Connecting, Some(Role::Client), None, false),
            Phase::ClientHandshake { .. } => {
                (PhaseName::ClientHandshake, Some(Role::Client), None, false)
            }
            Phase::Http | Phase::HttpAnswering { .. } => (PhaseName::Http, None, None, false),
            Phase::WebSocket(st) => (
                PhaseName::WebSocket,
                Some(st.role),
                st.frag.as_deref().cloned(),
                st.close_sent,
            ),
            Phase::Closing => (PhaseName::Closing, None, None, true),
        };
        let deflate = match &self.phase {
            Phase::WebSocket(st) => st.deflate_params(),
            _ => None,
        };
        ConnSnapshot {
            info: self.info(worker_id),
            phase,
            role,
            fragments,
            close_sent,
            deflate,
            read_buffer: self.rbuf.clone(),
            write_buffer: self.wbuf[self.wpos..].to_vec(),
            attrs: self.attrs.as_deref().cloned().unwrap_or_default(),
            handshake_timer: matches!(self.phase, Phase::Http) && self.timer.is_some(),
        }
    }
}

fn ws_pong() -> tungstenite::protocol::frame::coding::OpCode {
    use tungstenite::protocol::frame::coding::{Control, OpCode};
    OpCode::Control(Control::Pong)
}

fn ws_ping() -> tungstenite::protocol::frame::coding::OpCode {
    use tungstenite::protocol::frame::coding::{Control, OpCode};
    OpCode::Control(Control::Ping)
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
