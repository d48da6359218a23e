//! The connection handover protocol: how a stopping worker passes its live
//! connections to the replacement of its slot.
//!
//! This module owns the wire format and the socket, nothing else (the
//! reactor's side — parking connections at a frame boundary, adopting them
//! — is in `migrate.rs`).
//!
//! The manager creates one `SOCK_SEQPACKET` pair per worker slot before it
//! forks ([`HandoverLink::pair`]); every worker of the slot inherits both
//! ends. The predecessor writes on `tx` and the successor reads `rx`; the
//! successor's acknowledgement travels back the other way (written on `rx`,
//! read on `tx`). The manager keeps both ends open, so connections in
//! flight survive the death of either worker: a respawned worker reads and
//! adopts them.
//!
//! Every message is self-contained: a 6-byte header (kind, flags, sender
//! pid) and a payload of at most [`MAX_PAYLOAD`] bytes.
//!
//! | kind | payload | fds |
//! |------|---------|-----|
//! | `BEGIN` | — | — |
//! | `MANIFEST` | a piece of a JSON array of [`ConnSnapshot`]s; flag `MORE` says another piece follows | on the first piece, one per snapshot, in order, at most [`MAX_FDS`] |
//! | `END` | connections sent (u32 LE) | — |
//! | `ACK` | the predecessor's pid (u32 LE) | — |
//!
//! Pieces are assembled per sender pid, so leftovers of a dead sender never
//! mix with a live one's. A manifest is bounded ([`MAX_MANIFEST`]); a
//! malformed one is logged and its fds are closed. Received fds are owned
//! ([`OwnedFd`]) the moment `recvmsg` returns and carry `O_CLOEXEC`
//! (`MSG_CMSG_CLOEXEC`).

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

use crate::reactor::conn::ConnSnapshot;

/// Most connections (fds) one manifest carries.
pub const MAX_FDS: usize = 64;
/// Largest payload of one message.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest assembled manifest: room for one connection carrying full read,
/// write and fragment buffers (2 MiB each by default) in base64.
pub const MAX_MANIFEST: usize = 16 * 1024 * 1024;
const HEADER: usize = 6;

const BEGIN: u8 = 1;
const MANIFEST: u8 = 2;
const END: u8 = 3;
const ACK: u8 = 4;
const MORE: u8 = 1;

/// One slot's handover socket pair (see the module doc).
#[derive(Debug)]
pub struct HandoverLink {
    tx: OwnedFd, // the predecessor sends here, and reads ACKs
    rx: OwnedFd, // the successor reads here, and sends ACKs
}

/// Something that arrived on a handover socket.
#[derive(Debug)]
pub enum Received {
    /// A predecessor started handing over.
    Begin {
        /// Its pid.
        from: u32,
    },
    /// Connections, each with its socket.
    Conns {
        /// The sender's pid.
        from: u32,
        /// Snapshot and socket, in order.
        conns: Vec<(ConnSnapshot, OwnedFd)>,
    },
    /// The predecessor sent everything.
    End {
        /// Its pid.
        from: u32,
        /// How many connections it sent.
        count: u32,
    },
    /// The successor took everything `pid` sent.
    Ack {
        /// The predecessor being acknowledged.
        pid: u32,
    },
}

/// Manifest pieces being assembled, per sender pid.
#[derive(Debug, Default)]
pub struct Assembler {
    partial: HashMap<u32, (Vec<u8>, Vec<OwnedFd>)>,
}

impl HandoverLink {
    /// A new pair (close-on-exec, non-blocking), made by the manager before
    /// it forks.
    pub fn pair() -> io::Result<HandoverLink> {
        let (tx, rx) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| io::Error::other(format!("socketpair for a handover link: {e}")))?;
        // Best effort: a few full messages in flight.
        let _ = socket::setsockopt(&tx, socket::sockopt::SndBuf, &(4 * MAX_PAYLOAD));
        let _ = socket::setsockopt(&rx, socket::sockopt::RcvBuf, &(4 * MAX_PAYLOAD));
        Ok(HandoverLink { tx, rx })
    }

    /// The same pair under new (close-on-exec) descriptors, for a child.
    pub fn try_clone(&self) -> io::Result<HandoverLink> {
        Ok(HandoverLink {
            tx: self.tx.try_clone()?,
            rx: self.rx.try_clone()?,
        })
    }

    /// The successor's end, to register for readability.
    pub fn rx_fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// The predecessor's end, to register for readability (ACKs).
    pub fn tx_fd(&self) -> RawFd {
        self.tx.as_raw_fd()
    }

    /// Predecessor: announces the handover.
    pub fn send_begin(&self, deadline: Instant) -> io::Result<()> {
        send(self.tx.as_fd(), BEGIN, 0, &[], &[], deadline)
    }

    /// Predecessor: sends one manifest of at most [`MAX_FDS`] connections,
    /// its JSON cut into pieces of at most [`MAX_PAYLOAD`] bytes, the fds
    /// riding on the first piece. Blocks (polling) until `deadline` while
    /// the successor's queue is full. On error the caller keeps (and
    /// closes) these connections: a manifest whose pieces never complete
    /// is never adopted, and its fds close with the receiver's next one.
    pub fn send_manifest(
        &self,
        json: &[u8],
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> io::Result<()> {
        if fds.len() > MAX_FDS || json.len() > MAX_MANIFEST {
            return Err(io::Error::other(format!(
                "manifest of {} connections / {} bytes exceeds the limits",
                fds.len(),
                json.len()
            )));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let pieces: Vec<&[u8]> = json.chunks(MAX_PAYLOAD).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let flags = if i + 1 < pieces.len() { MORE } else { 0 };
            let fds = if i == 0 { &raw[..] } else { &[] };
            send(self.tx.as_fd(), MANIFEST, flags, piece, fds, deadline)?;
        }
        Ok(())
    }

    /// Predecessor: everything is sent.
    pub fn send_end(&self, count: u32, deadline: Instant) -> io::Result<()> {
        send(self.tx.as_fd(), END, 0, &count.to_le_bytes(), &[], deadline)
    }

    /// Successor: acknowledges everything `pid` sent.
    pub fn send_ack(&self, pid: u32, deadline: Instant) -> io::Result<()> {
        send(self.rx.as_fd(), ACK, 0, &pid.to_le_bytes(), &[], deadline)
    }

    /// Successor: the next complete message on `rx`, if any (non-blocking).
    pub fn recv_rx(&self, asm: &mut Assembler) -> io::Result<Option<Received>> {
        recv(self.rx.as_fd(), asm)
    }

    /// Predecessor: the next complete message on `tx` (ACKs), if any.
    pub fn recv_tx(&self, asm: &mut Assembler) -> io::Result<Option<Received>> {
        recv(self.tx.as_fd(), asm)
    }
}

fn header(kind: u8, flags: u8) -> [u8; HEADER] {
    let pid = std::process::id().to_le_bytes();
    [kind, flags, pid[0], pid[1], pid[2], pid[3]]
}

/// Sends one message, waiting for room until `deadline`.
fn send(
    fd: BorrowedFd<'_>,
    kind: u8,
    flags: u8,
    payload: &[u8],
    fds: &[RawFd],
    deadline: Instant,
) -> io::Result<()> {
    let head = header(kind, flags);
    let iov = [IoSlice::new(&head), IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(
            fd.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handover socket full until the deadline (is the successor reading?)",
                    ));
                }
                let ms = left.as_millis().clamp(1, 1000) as u16;
                let mut p = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
                let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(ms));
            }
            Err(e) => {
                return Err(io::Error::other(format!(
                    "sendmsg on the handover socket ({} fds): {e}",
                    fds.len()
                )))
            }
        }
    }
}

/// Receives until one complete message is assembled or the socket is empty.
fn recv(fd: BorrowedFd<'_>, asm: &mut Assembler) -> io::Result<Option<Received>> {
    let mut buf = vec![0u8; HEADER + MAX_PAYLOAD];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (n, truncated, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<()>(
                fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "recvmsg on a handover socket: {e}"
                    )))
                }
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for r in raw {
                            // SAFETY: the kernel just installed `r` in our fd
                            // table for this message; nothing else refers to
                            // it, so we are its only owner.
                            fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                        }
                    }
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (msg.bytes, truncated, fds)
        };
        if n == 0 && fds.is_empty() {
            return Ok(None); // an empty datagram: nothing to do
        }
        if n < HEADER || truncated {
            log::warn!(
                "handover: dropping a malformed message ({n} bytes{}); closing its {} fds",
                if truncated { ", truncated" } else { "" },
                fds.len()
            );
            continue; // `fds` drop here: closed
        }
        let (kind, flags) = (buf[0], buf[1]);
        let from = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]);
        let payload = &buf[HEADER..n];
        let word = || {
            payload
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if kind != MANIFEST && !fds.is_empty() {
            log::warn!(
                "handover: closing {} fds that came with a kind-{kind} message",
                fds.len()
            );
        }
        match kind {
            BEGIN => return Ok(Some(Received::Begin { from })),
            END => {
                return Ok(Some(Received::End {
                    from,
                    count: word().unwrap_or(0),
                }))
            }
            ACK => match word() {
                Some(pid) => return Ok(Some(Received::Ack { pid })),
                None => log::warn!("handover: dropping an ACK without a pid"),
            },
            MANIFEST => {
                if let Some(r) = asm.piece(from, flags & MORE != 0, payload, fds) {
                    return Ok(Some(r));
                }
            }
            k => log::warn!("handover: dropping a message of unknown kind {k} from pid {from}"),
        }
    }
}

impl Assembler {
    /// Adds a manifest piece; returns the connections once the last piece
    /// of a valid manifest arrived.
    fn piece(
        &mut self,
        from: u32,
        more: bool,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Option<Received> {
        let slot = self.partial.entry(from).or_default();
        if !fds.is_empty() && !slot.0.is_empty() {
            log::warn!("handover: pid {from} started a new manifest before ending the last one; dropping the old one");
            *slot = Default::default();
        }
        if slot.1.len() + fds.len() > MAX_FDS || slot.0.len() + payload.len() > MAX_MANIFEST {
            log::warn!("handover: manifest from pid {from} exceeds the limits; closing its fds");
            self.partial.remove(&from);
            return None;
        }
        slot.0.extend_from_slice(payload);
        slot.1.extend(fds);
        if more {
            return None;
        }
        let (json, fds) = self.partial.remove(&from)?;
        Some(Received::Conns {
            from,
            conns: pair_up(from, &json, fds),
        })
    }

    /// Drops partial manifests (their fds close).
    pub fn clear(&mut self) {
        self.partial.clear();
    }
}

/// Matches snapshots with fds; a malformed manifest or a count mismatch is
/// logged, and every fd not paired is closed.
fn pair_up(from: u32, json: &[u8], fds: Vec<OwnedFd>) -> Vec<(ConnSnapshot, OwnedFd)> {
    let snaps: Vec<ConnSnapshot> = match serde_json::from_slice(json) {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "handover: malformed manifest from pid {from} ({} bytes): {e}; closing its {} fds",
                json.len(),
                fds.len()
            );
            return Vec::new();
        }
    };
    if snaps.len() != fds.len() {
        log::warn!(
            "handover: manifest from pid {from} lists {} connections but carried {} fds; closing all",
            snaps.len(),
            fds.len()
        );
        return Vec::new();
    }
    snaps.into_iter().zip(fds).collect()
}

/// Serde helper: byte buffers as base64 strings (a third bigger, instead
/// of the four times of a JSON number array).
pub(crate) mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Encodes.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    /// Decodes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn snap(n: usize, rbuf: usize) -> ConnSnapshot {
        serde_json::from_value(serde_json::json!({
            "info": {"fd": n, "worker_id": 0, "peer": "127.0.0.1:1", "kind": "WebSocket",
                     "path": "/", "connected_ms": 1, "last_active_ms": 2},
            "phase": "WebSocket", "role": "Server", "fragments": null, "close_sent": false,
            "read_buffer": "", "write_buffer": "", "attrs": {}
        }))
        .map(|mut s: ConnSnapshot| {
            s.read_buffer = vec![7; rbuf];
            s
        })
        .unwrap()
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    fn recv_all(link: &HandoverLink, asm: &mut Assembler) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(r) = link.recv_rx(asm).unwrap() {
            out.push(r);
        }
        out
    }

    #[test]
    fn manifests_carry_fds_and_big_ones_are_pieced() {
        let link = HandoverLink::pair().unwrap();
        let files: Vec<OwnedFd> = (0..3)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let snaps = vec![snap(1, 0), snap(2, 200_000), snap(3, 5)];
        let json = serde_json::to_vec(&snaps).unwrap();
        assert!(json.len() > MAX_PAYLOAD, "pieced");
        link.send_begin(deadline()).unwrap();
        let fds: Vec<BorrowedFd> = files.iter().map(|f| f.as_fd()).collect();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| link.send_manifest(&json, &fds, deadline()));
            let mut asm = Assembler::default();
            let mut got = Vec::new();
            while got.len() < 2 {
                got.extend(recv_all(&link, &mut asm));
                std::thread::sleep(Duration::from_millis(1));
            }
            h.join().unwrap().unwrap();
            got
        });
        assert!(matches!(sender[0], Received::Begin { .. }));
        let Received::Conns { conns, .. } = &sender[1] else {
            panic!("{sender:?}")
        };
        assert_eq!(conns.len(), 3);
        assert_eq!(conns[1].0.read_buffer.len(), 200_000);
        for (_, fd) in conns {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert!(
                flags & libc::FD_CLOEXEC != 0,
                "received fds are close-on-exec"
            );
        }
        link.send_end(3, deadline()).unwrap();
        link.send_ack(42, deadline()).unwrap();
        let mut asm = Assembler::default();
        assert!(matches!(
            link.recv_rx(&mut asm).unwrap(),
            Some(Received::End { count: 3, .. })
        ));
        assert!(matches!(
            link.recv_tx(&mut asm).unwrap(),
            Some(Received::Ack { pid: 42 })
        ));
    }

    #[test]
    fn a_malformed_manifest_closes_its_fds() {
        let link = HandoverLink::pair().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let owned: OwnedFd = a.into();
        link.send_manifest(b"[{\"nonsense\":1}]", &[owned.as_fd()], deadline())
            .unwrap();
        drop(owned);
        let mut asm = Assembler::default();
        match link.recv_rx(&mut asm).unwrap() {
            Some(Received::Conns { conns, .. }) => assert!(conns.is_empty()),
            other => panic!("{other:?}"),
        }
        // Every copy of `a` is closed now: its peer reads EOF.
        let mut buf = [0u8; 1];
        b.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(std::io::Read::read(&mut &b, &mut buf).unwrap(), 0);
        // A bare header with garbage kind, and a short datagram, are skipped.
        socket::send(link.tx_fd(), &[9, 0, 0, 0, 0, 0], MsgFlags::empty()).unwrap();
        socket::send(link.tx_fd(), &[1], MsgFlags::empty()).unwrap();
        assert!(link.recv_rx(&mut asm).unwrap().is_none());
    }
}
