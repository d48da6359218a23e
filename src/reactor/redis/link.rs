//! One non-blocking TCP connection to Redis, driven by the worker's mio
//! loop: its phase ([`LinkState`]), its output and input buffers, the
//! reconnect backoff, and the address it dials. It knows nothing of
//! commands or callbacks; [`super::client`] and [`super::pubsub`] put
//! requests in and take whole replies out.
//!
//! As in hiredis's ae adapter, write interest is registered only while
//! output is pending and dropped once it has drained, so an idle link
//! costs nothing; the connect itself is non-blocking (`EINPROGRESS`, then
//! writable), so nothing on the loop waits for Redis.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::{Interest, Registry, Token};

use super::resp;
use crate::backoff::Backoff;
use crate::reactor::resolve::Resolver;

/// How long a TCP connect may take before the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// First retry delay after an outage begins.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: a restarted Redis is found within this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Read chunk: replies larger than this arrive in several reads.
const READ_CHUNK: usize = 16 * 1024;

/// The phase of a link.
#[derive(Debug)]
pub enum LinkState {
    /// Down.
    Down {
        /// When the next attempt is due.
        retry_at: Instant,
    },
    /// A TCP connect is under way.
    Connecting {
        /// The socket.
        stream: mio::net::TcpStream,
        /// When the connect began.
        since: Instant,
    },
    /// Connected.
    Up {
        /// The socket.
        stream: mio::net::TcpStream,
    },
}

/// What a read produced.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Nothing more for now.
    Idle,
    /// The peer closed, or the bytes were not RESP: the link is down.
    Broken(String),
}

/// A non-blocking connection with its buffers.
#[derive(Debug)]
pub struct Link {
    name: &'static str,          // "redis" or "redis pub/sub", for logs
    token: Token,                // its token in the worker's poll
    resolver: Resolver,          // where to dial (refreshed off the loop)
    pub(crate) state: LinkState, // see LinkState
    out: Vec<u8>,                // bytes not yet written
    inbuf: Vec<u8>,              // bytes read, not yet a whole reply
    writable_armed: bool,        // write interest registered
    backoff: Backoff,            // reconnect delay
    next_addr: usize,            // round-robin over resolved addresses
}

impl Link {
    /// A link that will dial `resolver`'s address, registered under `token`.
    pub fn new(name: &'static str, token: Token, resolver: Resolver) -> Link {
        Link {
            name,
            token,
            resolver,
            state: LinkState::Down {
                retry_at: Instant::now(),
            },
            out: Vec::new(),
            inbuf: Vec::new(),
            writable_armed: false,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            next_addr: 0,
        }
    }

    /// Whether the connection is established.
    pub fn is_up(&self) -> bool {
        matches!(self.state, LinkState::Up { .. })
    }

    /// The address being dialled (for logs).
    pub fn target(&self) -> String {
        self.resolver.describe()
    }

    /// Starts a non-blocking connect when one is due. Returns an error
    /// text when the attempt could not even start (it is then retried
    /// after the backoff).
    pub fn dial_if_due(&mut self, registry: &Registry, now: Instant) -> Result<bool, String> {
        let LinkState::Down { retry_at } = self.state else {
            return Ok(false);
        };
        if now < retry_at {
            return Ok(false);
        }
        let addrs = self.resolver.current();
        if addrs.is_empty() {
            self.fail(now);
            return Err(format!(
                "{}: {} does not resolve (yet)",
                self.name,
                self.target()
            ));
        }
        let addr: SocketAddr = addrs[self.next_addr % addrs.len()];
        self.next_addr = self.next_addr.wrapping_add(1);
        match mio::net::TcpStream::connect(addr) {
            Ok(mut stream) => {
                let _ = stream.set_nodelay(true);
                if let Err(e) = registry.register(
                    &mut stream,
                    self.token,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail(now);
                    return Err(format!("{}: register {addr}: {e}", self.name));
                }
                self.writable_armed = true;
                self.state = LinkState::Connecting { stream, since: now };
                Ok(true)
            }
            Err(e) => {
                self.fail(now);
                Err(format!("{}: connect {addr}: {e}", self.name))
            }
        }
    }

    /// Called on a writable event while connecting: true once connected.
    pub fn finish_connect(&mut self) -> Result<bool, String> {
        let LinkState::Connecting { stream, .. } = &self.state else {
            return Ok(self.is_up());
        };
        match stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Err(format!("{}: connect: {e}", self.name)),
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
            Err(e) => return Err(format!("{}: connect: {e}", self.name)),
        }
        let old = std::mem::replace(
            &mut self.state,
            LinkState::Down {
                retry_at: Instant::now(),
            },
        );
        if let LinkState::Connecting { stream, .. } = old {
            self.state = LinkState::Up { stream };
        }
        self.backoff.reset();
        Ok(true)
    }

    /// Whether a connect has taken longer than [`CONNECT_TIMEOUT`].
    pub fn connect_overdue(&self, now: Instant) -> bool {
        matches!(self.state, LinkState::Connecting { since, .. } if now.duration_since(since) > CONNECT_TIMEOUT)
    }

    /// Takes the link down: drops the socket and buffers, schedules the
    /// next attempt after the backoff.
    pub fn fail(&mut self, now: Instant) {
        if let LinkState::Up { stream } | LinkState::Connecting { stream, .. } = &mut self.state {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        self.state = LinkState::Down {
            retry_at: now + self.backoff.next(),
        };
        self.out = Vec::new();
        self.inbuf = Vec::new();
        self.writable_armed = false;
    }

    /// Appends bytes to the output buffer (written by [`Link::flush`]).
    pub fn queue(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Bytes waiting to be written.
    pub fn pending_out(&self) -> usize {
        self.out.len()
    }

    /// Writes what it can; arms write interest while output remains and
    /// drops it once drained. An error means the link is broken.
    pub fn flush(&mut self, registry: &Registry) -> Result<(), String> {
        let LinkState::Up { stream } = &mut self.state else {
            return Ok(());
        };
        let mut written = 0;
        while written < self.out.len() {
            match stream.write(&self.out[written..]) {
                Ok(0) => return Err(format!("{}: write returned 0", self.name)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("{}: write: {e}", self.name)),
            }
        }
        self.out.drain(..written);
        if self.out.capacity() > 64 * 1024 && self.out.is_empty() {
            self.out = Vec::new();
        }
        let want = !self.out.is_empty();
        if want != self.writable_armed {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry
                .reregister(stream, self.token, interest)
                .map_err(|e| format!("{}: reregister: {e}", self.name))?;
            self.writable_armed = want;
        }
        Ok(())
    }

    /// Reads until `WouldBlock`, handing every whole reply to `each`.
    pub fn read_replies(&mut self, mut each: impl FnMut(redis::Value)) -> ReadOutcome {
        let LinkState::Up { stream } = &mut self.state else {
            return ReadOutcome::Idle;
        };
        let mut closed = None;
        loop {
            let len = self.inbuf.len();
            self.inbuf.resize(len + READ_CHUNK, 0);
            match stream.read(&mut self.inbuf[len..]) {
                Ok(0) => {
                    self.inbuf.truncate(len);
                    closed = Some(format!(
                        "{}: connection closed by {}",
                        self.name,
                        self.resolver.describe()
                    ));
                    break;
                }
                Ok(n) => {
                    self.inbuf.truncate(len + n);
                    if n < READ_CHUNK {
                        break;
                    }
                }
                Err(e) => {
                    self.inbuf.truncate(len);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            closed = Some(format!("{}: read: {e}", self.name));
                            break;
                        }
                    }
                }
            }
        }
        let mut pos = 0;
        while pos < self.inbuf.len() {
            match resp::complete_len(&self.inbuf[pos..]) {
                Ok(Some(n)) => {
                    match redis::parse_redis_value(&self.inbuf[pos..pos + n]) {
                        Ok(v) => each(v),
                        Err(e) => {
                            return ReadOutcome::Broken(format!("{}: bad reply: {e}", self.name))
                        }
                    }
                    pos += n;
                }
                Ok(None) => break,
                Err(resp::Garbage(why)) => {
                    return ReadOutcome::Broken(format!("{}: not a Redis reply ({why})", self.name))
                }
            }
        }
        self.inbuf.drain(..pos);
        if self.inbuf.is_empty() && self.inbuf.capacity() > 64 * 1024 {
            self.inbuf = Vec::new();
        }
        match closed {
            Some(why) => ReadOutcome::Broken(why),
            None => ReadOutcome::Idle,
        }
    }
}
