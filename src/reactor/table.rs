//! [`ConnTable`]: a worker's connections — the slab indexed by token, the
//! fd serial numbers, the before-sleep lists (connections to flush, to tear
//! down) and the per-address admission counts — with the operations the
//! loop and the [`Server`](crate::reactor::Server) verbs share: insert and
//! remove (registering and deregistering the socket), `mark_dirty`, `doom`,
//! `close_gracefully`. It holds no application state and runs no hook.

use std::io;
use std::ops::{Index, IndexMut};
use std::time::Instant;

use mio::Interest;
use slab::Slab;

use crate::event::App;
use crate::process::scoreboard::Row;
use crate::reactor::conn::Conn;
use crate::reactor::event_loop::token_of;
use crate::reactor::limits::IpCounter;
use crate::reactor::server::{TimerTask, LINGER};
use crate::reactor::timer::TimerWheel;
use crate::reactor::Fd;

use std::sync::atomic::Ordering::Relaxed;

/// Bits of an [`Fd`] holding the slab key; the rest is a serial number, so
/// fds are never reused.
const KEY_BITS: u32 = 24;

/// A worker's connections (see the module doc).
pub(crate) struct ConnTable {
    registry: mio::Registry, // registers the connections' sockets
    slab: Slab<Conn>,        // token = key + FIRST_CONN
    serial: u64,             // fd serial counter
    dirty: Vec<Fd>,          // connections to flush before sleep
    doomed: Vec<Fd>,         // connections to tear down now
    per_ip: IpCounter,       // open connections per address (max_conn_per_ip)
    out_limit: usize,        // buffer_output_size: past it a reader is cut
    row: &'static Row,       // the `connections` gauge
}

impl ConnTable {
    /// An empty table registering sockets with `registry`.
    pub(crate) fn new(registry: mio::Registry, out_limit: usize, row: &'static Row) -> ConnTable {
        ConnTable {
            registry,
            slab: Slab::new(),
            serial: 0,
            dirty: Vec::new(),
            doomed: Vec::new(),
            per_ip: IpCounter::default(),
            out_limit,
            row,
        }
    }

    /// The poll registry the connections' sockets are registered with
    /// (the Redis client registers its own sockets there too).
    pub(crate) fn registry(&self) -> &mio::Registry {
        &self.registry
    }

    /// Number of connections (closing ones included).
    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether no connection is left.
    pub(crate) fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// The fd the next [`ConnTable::insert`] must carry: the slab's vacant
    /// key and a fresh serial number.
    pub(crate) fn next_fd(&mut self) -> Fd {
        self.serial += 1;
        (self.serial << KEY_BITS) | self.slab.vacant_key() as u64
    }

    /// Registers `conn`'s socket (readable and writable, edge-triggered)
    /// and inserts it. `conn.fd` must come from [`ConnTable::next_fd`] with
    /// nothing inserted since; on error the connection is dropped (closed).
    pub(crate) fn insert(&mut self, mut conn: Conn) -> io::Result<()> {
        let key = self.slab.vacant_key();
        if (conn.fd & ((1 << KEY_BITS) - 1)) as usize != key {
            return Err(io::Error::other(
                "connection fd does not match the vacant slot",
            ));
        }
        self.registry.register(
            &mut conn.stream,
            token_of(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.slab.insert(conn);
        self.row.connections.store(self.slab.len() as u64, Relaxed);
        Ok(())
    }

    /// Removes a connection, deregisters its socket (before our copy
    /// closes: epoll keys registrations by open file, and a moved socket
    /// lives on elsewhere) and releases its address count. The caller
    /// cancels its timer.
    pub(crate) fn remove(&mut self, fd: Fd) -> Option<Conn> {
        let key = self.key(fd)?;
        let mut c = self.slab.remove(key);
        let _ = self.registry.deregister(&mut c.stream);
        if std::mem::take(&mut c.limits.ip_counted) {
            self.per_ip.release(c.peer.ip());
        }
        self.row.connections.store(self.slab.len() as u64, Relaxed);
        Some(c)
    }

    /// Counts `fd` toward its address's `max_conn_per_ip` (0: no limit);
    /// false, and not counted, when the address is at the limit.
    pub(crate) fn admit_ip(&mut self, fd: Fd, max: usize) -> bool {
        let Some(key) = self.key(fd) else {
            return false;
        };
        let c = &mut self.slab[key];
        let ok = self.per_ip.admit(c.peer.ip(), max);
        c.limits.ip_counted = ok;
        ok
    }

    /// The slab key of a live fd. O(1).
    pub(crate) fn key(&self, fd: Fd) -> Option<usize> {
        let key = (fd & ((1 << KEY_BITS) - 1)) as usize;
        self.slab.get(key).filter(|c| c.fd == fd).map(|_| key)
    }

    /// The connection at slab `key`.
    pub(crate) fn get(&self, key: usize) -> Option<&Conn> {
        self.slab.get(key)
    }

    /// The connection at slab `key`, mutably.
    pub(crate) fn get_mut(&mut self, key: usize) -> Option<&mut Conn> {
        self.slab.get_mut(key)
    }

    /// The connection `fd`, mutably.
    pub(crate) fn conn_mut(&mut self, fd: Fd) -> Option<&mut Conn> {
        let key = self.key(fd)?;
        self.slab.get_mut(key)
    }

    /// Every connection, closing ones included.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.slab.iter().map(|(_, c)| c)
    }

    /// Every connection's fd. O(n).
    pub(crate) fn fds(&self) -> Vec<Fd> {
        self.iter().map(|c| c.fd).collect()
    }

    /// Queues `fd` for teardown in the before-sleep step (`on_close` runs
    /// there, outside any hook).
    pub(crate) fn doom(&mut self, fd: Fd) {
        self.doomed.push(fd);
    }

    /// Dooms every connection `pred` picks. O(n).
    pub(crate) fn doom_where(&mut self, mut pred: impl FnMut(&Conn) -> bool) {
        let picked: Vec<Fd> = self.iter().filter(|c| pred(c)).map(|c| c.fd).collect();
        self.doomed.extend(picked);
    }

    /// Whether `fd` waits for teardown.
    pub(crate) fn is_doomed(&self, fd: Fd) -> bool {
        self.doomed.contains(&fd)
    }

    /// The next connection to tear down.
    pub(crate) fn pop_doomed(&mut self) -> Option<Fd> {
        self.doomed.pop()
    }

    /// The connections queued for the before-sleep flush (the queue empties).
    pub(crate) fn take_dirty(&mut self) -> Vec<Fd> {
        std::mem::take(&mut self.dirty)
    }

    /// Whether nothing waits for teardown or a flush.
    pub(crate) fn settled(&self) -> bool {
        self.doomed.is_empty() && self.dirty.is_empty()
    }

    /// Queues a connection for the before-sleep flush; a connection past
    /// `buffer_output_size` is cut instead (a slow reader).
    pub(crate) fn mark_dirty(&mut self, fd: Fd) {
        let limit = self.out_limit;
        let Some(c) = self.conn_mut(fd) else { return };
        if c.pending_out() > limit {
            log::warn!(
                "fd {fd} ({}): {} bytes of output pending exceed buffer_output_size {limit}; disconnecting the slow reader",
                c.peer,
                c.pending_out()
            );
            c.wbuf = Vec::new();
            c.wpos = 0;
            self.doomed.push(fd);
            return;
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(fd);
        }
    }

    /// Starts a graceful close of `fd`: flush, shut down, linger.
    pub(crate) fn close_gracefully<A: App>(
        &mut self,
        fd: Fd,
        timers: &mut TimerWheel<TimerTask<A>>,
    ) {
        let Some(c) = self.conn_mut(fd) else { return };
        if !c.is_closing() {
            c.begin_close();
        }
        self.arm_linger(fd, timers);
        self.mark_dirty(fd);
    }

    /// (Re)arms the linger timer of a connection on its way out.
    pub(crate) fn arm_linger<A: App>(&mut self, fd: Fd, timers: &mut TimerWheel<TimerTask<A>>) {
        let Some(c) = self.conn_mut(fd) else { return };
        if let Some(old) = c.timer.take() {
            timers.cancel(old);
        }
        c.timer
            .set(timers.insert(Instant::now(), LINGER, None, TimerTask::Linger(fd)));
    }
}

impl Index<usize> for ConnTable {
    type Output = Conn;

    /// The connection at a slab key known to be live (panics otherwise, as
    /// a slab does: callers index only keys they just looked up).
    fn index(&self, key: usize) -> &Conn {
        &self.slab[key]
    }
}

impl IndexMut<usize> for ConnTable {
    fn index_mut(&mut self, key: usize) -> &mut Conn {
        &mut self.slab[key]
    }
}
