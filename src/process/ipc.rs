//! Mailboxes between the processes of one server: worker ↔ worker messages
//! (Swoole's `send_message` / `on_pipe_message`) and worker ↔ task worker
//! jobs (`task` / `on_task` / `on_finish`).
//!
//! The manager creates one `SOCK_SEQPACKET` socket pair per worker slot and
//! per task-worker slot before it forks anyone, and keeps them for the life
//! of the server. Every child inherits all of them: it reads its own slot's
//! inbox end and sends to any slot's outbox end. Because the pairs belong to
//! slots, not processes, a respawned or reloaded worker receives what was
//! addressed to its slot. SEQPACKET keeps message boundaries and each send is
//! atomic, so many senders can share one outbox end.
//!
//! Wire format of one message: `kind: u8, from: u32 LE, id: u64 LE, payload`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};

/// Largest payload one message may carry. Sends above it are refused with
/// an error rather than truncated.
pub const MAX_MESSAGE: usize = 192 * 1024;
const HEADER: usize = 1 + 4 + 8;
/// Messages queued for one destination before `send` reports it full.
const MAX_QUEUED: usize = 10_000;

/// One message between processes of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// A worker-to-worker message (`on_pipe_message`).
    Pipe {
        /// Sending worker id.
        from: u32,
        /// Application bytes.
        data: Vec<u8>,
    },
    /// A job for a task worker (`on_task`).
    Task {
        /// Task id, unique within the sending worker.
        id: u64,
        /// Sending worker id, where the result goes back.
        from: u32,
        /// Application bytes.
        data: Vec<u8>,
    },
    /// A task's result, back to the worker that asked (`on_finish`).
    Finish {
        /// The task id the sender chose.
        id: u64,
        /// Task worker id that ran it.
        from: u32,
        /// Result bytes.
        data: Vec<u8>,
    },
    /// A kind this build does not know (never dispatched).
    Unknown(u8),
}

impl Envelope {
    fn encode(&self) -> Vec<u8> {
        let (kind, from, id, data): (u8, u32, u64, &[u8]) = match self {
            Envelope::Pipe { from, data } => (1, *from, 0, data),
            Envelope::Task { id, from, data } => (2, *from, *id, data),
            Envelope::Finish { id, from, data } => (3, *from, *id, data),
            Envelope::Unknown(k) => (*k, 0, 0, &[]),
        };
        let mut out = Vec::with_capacity(HEADER + data.len());
        out.push(kind);
        out.extend_from_slice(&from.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    fn decode(buf: &[u8]) -> Option<Envelope> {
        if buf.len() < HEADER {
            return None;
        }
        let from = u32::from_le_bytes(buf[1..5].try_into().ok()?);
        let id = u64::from_le_bytes(buf[5..13].try_into().ok()?);
        let data = buf[HEADER..].to_vec();
        Some(match buf[0] {
            1 => Envelope::Pipe { from, data },
            2 => Envelope::Task { id, from, data },
            3 => Envelope::Finish { id, from, data },
            k => Envelope::Unknown(k),
        })
    }
}

/// Who a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// An event worker by id.
    Worker(usize),
    /// A task worker by id.
    TaskWorker(usize),
}

/// One slot's socket pair: `inbox` is read by the slot's process, `outbox`
/// is written by everyone else.
#[derive(Debug)]
pub struct SlotPair {
    inbox: OwnedFd,
    outbox: OwnedFd,
}

/// All mailboxes of a server, created by the manager before forking.
#[derive(Debug)]
pub struct Mailboxes {
    workers: Vec<SlotPair>,
    tasks: Vec<SlotPair>,
}

fn pair(what: &str) -> io::Result<SlotPair> {
    let (inbox, outbox) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| io::Error::other(format!("socketpair for {what}: {e}")))?;
    // Best effort: the kernel caps it at wmem_max / rmem_max.
    let _ = socket::setsockopt(&outbox, socket::sockopt::SndBuf, &(4 * MAX_MESSAGE));
    let _ = socket::setsockopt(&inbox, socket::sockopt::RcvBuf, &(4 * MAX_MESSAGE));
    Ok(SlotPair { inbox, outbox })
}

impl Mailboxes {
    /// Creates the pairs for `workers` event workers and `tasks` task workers.
    pub fn create(workers: usize, tasks: usize) -> io::Result<Mailboxes> {
        Ok(Mailboxes {
            workers: (0..workers)
                .map(|i| pair(&format!("worker {i}")))
                .collect::<io::Result<_>>()?,
            tasks: (0..tasks)
                .map(|i| pair(&format!("task worker {i}")))
                .collect::<io::Result<_>>()?,
        })
    }

    /// The postbox of the process that serves slot `me` (in a child after fork).
    pub fn postbox(&self, me: Dest) -> io::Result<Postbox> {
        let dup = |fd: &OwnedFd| fd.try_clone();
        let inbox = match me {
            Dest::Worker(i) => dup(&self.workers[i].inbox)?,
            Dest::TaskWorker(i) => dup(&self.tasks[i].inbox)?,
        };
        Ok(Postbox {
            me,
            inbox,
            workers: self
                .workers
                .iter()
                .map(|p| dup(&p.outbox))
                .collect::<io::Result<_>>()?,
            tasks: self
                .tasks
                .iter()
                .map(|p| dup(&p.outbox))
                .collect::<io::Result<_>>()?,
            queued: VecDeque::new(),
            recv_buf: vec![0u8; HEADER + MAX_MESSAGE + 1],
        })
    }

    /// Number of event-worker slots.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }
}

/// A process's view of the mailboxes: its inbox and every outbox, with a
/// queue for messages the kernel could not take yet (never dropped).
#[derive(Debug)]
pub struct Postbox {
    me: Dest,
    inbox: OwnedFd,
    workers: Vec<OwnedFd>,
    tasks: Vec<OwnedFd>,
    queued: VecDeque<(Dest, Vec<u8>)>,
    recv_buf: Vec<u8>,
}

/// Why a send was refused.
#[derive(Debug)]
pub enum SendError {
    /// No such worker or task worker.
    NoSuchDestination(Dest),
    /// The payload is larger than [`MAX_MESSAGE`].
    TooLarge(usize),
    /// Too many messages already wait for a full destination.
    Backlogged(Dest),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NoSuchDestination(d) => write!(f, "no such destination {d:?}"),
            SendError::TooLarge(n) => write!(
                f,
                "message of {n} bytes exceeds the {MAX_MESSAGE}-byte IPC limit"
            ),
            SendError::Backlogged(d) => {
                write!(f, "destination {d:?} has {MAX_QUEUED} messages queued")
            }
        }
    }
}

impl std::error::Error for SendError {}

impl Postbox {
    /// The slot this postbox belongs to.
    pub fn me(&self) -> Dest {
        self.me
    }

    /// The inbox fd, to register for readability in the event loop.
    pub fn inbox_fd(&self) -> RawFd {
        self.inbox.as_raw_fd()
    }

    /// Number of event workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Number of task workers.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Sends (or queues) a message. Order per destination is preserved.
    pub fn send(&mut self, to: Dest, env: &Envelope) -> Result<(), SendError> {
        let fd_ok = match to {
            Dest::Worker(i) => i < self.workers.len(),
            Dest::TaskWorker(i) => i < self.tasks.len(),
        };
        if !fd_ok {
            return Err(SendError::NoSuchDestination(to));
        }
        let bytes = env.encode();
        if bytes.len() - HEADER > MAX_MESSAGE {
            return Err(SendError::TooLarge(bytes.len() - HEADER));
        }
        if self.queued.iter().any(|(d, _)| *d == to) {
            if self.queued.len() >= MAX_QUEUED {
                return Err(SendError::Backlogged(to));
            }
            self.queued.push_back((to, bytes));
            return Ok(());
        }
        match self.try_send(to, &bytes) {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.queued.push_back((to, bytes));
                Ok(())
            }
            Err(e) => {
                log::warn!("ipc send to {to:?} failed: {e}");
                Ok(())
            }
        }
    }

    fn fd(&self, to: Dest) -> RawFd {
        match to {
            Dest::Worker(i) => self.workers[i].as_raw_fd(),
            Dest::TaskWorker(i) => self.tasks[i].as_raw_fd(),
        }
    }

    /// Ok(true) sent, Ok(false) would block.
    fn try_send(&self, to: Dest, bytes: &[u8]) -> io::Result<bool> {
        match socket::send(
            self.fd(to),
            bytes,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(_) => Ok(true),
            Err(nix::errno::Errno::EAGAIN) => Ok(false),
            Err(e) => Err(io::Error::other(format!("send to {to:?}: {e}"))),
        }
    }

    /// A thread-safe sender to `to`, for threads a worker starts (a Redis
    /// subscriber, say): what it sends arrives in that slot's inbox like any
    /// other message.
    pub fn sender(&self, to: Dest) -> io::Result<PipeSender> {
        Ok(PipeSender {
            to,
            fd: std::fs::File::from(self.fd_owned(to).try_clone()?).into(),
        })
    }

    fn fd_owned(&self, to: Dest) -> &OwnedFd {
        match to {
            Dest::Worker(i) => &self.workers[i],
            Dest::TaskWorker(i) => &self.tasks[i],
        }
    }

    /// Retries queued messages; returns true while some remain (the loop
    /// should then wake again soon).
    pub fn flush(&mut self) -> bool {
        let mut blocked: Vec<Dest> = Vec::new();
        let mut keep = VecDeque::new();
        while let Some((to, bytes)) = self.queued.pop_front() {
            if blocked.contains(&to) {
                keep.push_back((to, bytes));
                continue;
            }
            match self.try_send(to, &bytes) {
                Ok(true) => {}
                Ok(false) => {
                    blocked.push(to);
                    keep.push_back((to, bytes));
                }
                Err(e) => log::warn!("ipc: dropping a queued message: {e}"),
            }
        }
        self.queued = keep;
        !self.queued.is_empty()
    }

    /// Whether messages are waiting to be sent.
    pub fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }

    /// Receives one message if any is waiting (non-blocking).
    pub fn recv(&mut self) -> io::Result<Option<Envelope>> {
        loop {
            match socket::recv(
                self.inbox.as_raw_fd(),
                &mut self.recv_buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Ok(None),
                Ok(n) if n > HEADER + MAX_MESSAGE => {
                    log::warn!("ipc: dropping an oversize message on {:?}", self.me);
                    continue;
                }
                Ok(n) => match Envelope::decode(&self.recv_buf[..n]) {
                    Some(env) => return Ok(Some(env)),
                    None => {
                        log::warn!(
                            "ipc: dropping a malformed {n}-byte message on {:?}",
                            self.me
                        );
                        continue;
                    }
                },
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "recv on {:?} inbox: {e}",
                        self.me
                    )))
                }
            }
        }
    }
}

/// A sender usable from any thread (see [`Postbox::sender`]). Blocks for at
/// most a short while when the destination is full, then reports it.
#[derive(Debug)]
pub struct PipeSender {
    to: Dest,
    fd: OwnedFd,
}

impl PipeSender {
    /// Sends one message; retries for up to ~1 s while the inbox is full.
    pub fn send(&self, env: &Envelope) -> io::Result<()> {
        let bytes = env.encode();
        if bytes.len() - HEADER > MAX_MESSAGE {
            return Err(io::Error::other(
                SendError::TooLarge(bytes.len() - HEADER).to_string(),
            ));
        }
        for _ in 0..200 {
            match socket::send(
                self.fd.as_raw_fd(),
                &bytes,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => return Err(io::Error::other(format!("send to {:?}: {e}", self.to))),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{:?} inbox full", self.to),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_between_slots() {
        let mb = Mailboxes::create(2, 1).unwrap();
        let mut w0 = mb.postbox(Dest::Worker(0)).unwrap();
        let mut w1 = mb.postbox(Dest::Worker(1)).unwrap();
        let mut t0 = mb.postbox(Dest::TaskWorker(0)).unwrap();
        w0.send(
            Dest::Worker(1),
            &Envelope::Pipe {
                from: 0,
                data: b"hi".to_vec(),
            },
        )
        .unwrap();
        assert_eq!(
            w1.recv().unwrap(),
            Some(Envelope::Pipe {
                from: 0,
                data: b"hi".to_vec()
            })
        );
        assert_eq!(w1.recv().unwrap(), None);
        w1.send(
            Dest::TaskWorker(0),
            &Envelope::Task {
                id: 9,
                from: 1,
                data: vec![1; 1000],
            },
        )
        .unwrap();
        assert!(matches!(
            t0.recv().unwrap(),
            Some(Envelope::Task { id: 9, from: 1, .. })
        ));
        assert!(matches!(
            w0.send(Dest::Worker(5), &Envelope::Unknown(0)),
            Err(SendError::NoSuchDestination(_))
        ));
        assert!(matches!(
            w0.send(
                Dest::Worker(1),
                &Envelope::Pipe {
                    from: 0,
                    data: vec![0; MAX_MESSAGE + 1]
                }
            ),
            Err(SendError::TooLarge(_))
        ));
    }

    #[test]
    fn full_destination_queues_and_flushes_in_order() {
        let mb = Mailboxes::create(2, 0).unwrap();
        let mut w0 = mb.postbox(Dest::Worker(0)).unwrap();
        let mut w1 = mb.postbox(Dest::Worker(1)).unwrap();
        let n = 400;
        for i in 0..n {
            w0.send(
                Dest::Worker(1),
                &Envelope::Pipe {
                    from: 0,
                    data: vec![(i % 251) as u8; 8192],
                },
            )
            .unwrap();
        }
        assert!(w0.has_queued(), "the socket buffer should have filled");
        let mut got = 0;
        while got < n {
            w0.flush();
            while let Some(Envelope::Pipe { data, .. }) = w1.recv().unwrap() {
                assert_eq!(data[0], (got % 251) as u8, "order preserved");
                got += 1;
            }
        }
        assert!(!w0.flush());
    }
}
