//! The large-frame path: a data frame whose header has arrived but whose
//! payload has not is read straight into its message buffer ([`Body`]),
//! and a large outgoing message is written from the caller's bytes.
//!
//! Two-phase framing, as in mini-redis: the header check says how many
//! payload bytes the frame needs (bounded by `package_max_length`); the
//! bytes already read are copied into the message buffer once, and every
//! further `read(2)` lands in the buffer itself and is unmasked there, in
//! place, once. The buffer starts at up to [`BODY_CHUNK`] and doubles as
//! bytes arrive, capped at the frame's size, so a peer that announces a
//! large frame and stalls holds no more than it sent (and no address
//! space for the rest: thousands of such peers must not exhaust
//! mappings); glibc grows a large, mmapped buffer with `mremap`, without
//! copying. The completed buffer *is* the message handed to
//! `on_message` (no copy), and an echo of it is written with `writev` of
//! header + payload; whatever the socket does not take stays in that same
//! `Vec` as the connection's output. Before this, a partial frame was
//! appended to the connection's input on every read, re-parsed, unmasked
//! a byte at a time, copied into the message, and copied again into the
//! output buffer.

use std::io;
use std::os::fd::AsRawFd;

use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::reactor::conn::{Conn, Phase};
use crate::reactor::deflate::Codec;
use crate::reactor::websocket::{self as ws, apply_mask_at, Decoded, Fragments, Message, Role};
use crate::reactor::websocket::{WsEvent, WsState};

/// Payloads at least this large are written straight from the message
/// (`writev`) when nothing else is queued; smaller ones are batched into
/// the output buffer and flushed once per loop iteration.
pub const DIRECT_WRITE_MIN: usize = 16 * 1024;

/// The first reservation for a frame's payload beyond what has arrived
/// (the size of one scratch read).
pub const BODY_CHUNK: usize = 64 * 1024;

/// A data frame being received: its payload so far, already unmasked,
/// appended to the message's earlier fragments.
#[derive(Debug, Clone)]
pub struct Body {
    /// The message is text.
    pub text: bool,
    /// The message is compressed (RSV1 on its first frame).
    pub compressed: bool,
    /// This frame ends the message.
    pub fin: bool,
    /// The frame's masking key.
    pub mask: Option<[u8; 4]>,
    /// Where this frame's payload starts in `data`.
    pub start: usize,
    /// `data.len()` once this frame is complete.
    pub end: usize,
    /// The message so far.
    pub data: Vec<u8>,
}

impl Body {
    /// Payload bytes this frame still needs.
    pub fn need(&self) -> usize {
        self.end - self.data.len()
    }

    /// Appends at most [`Body::need`] bytes of `src`, unmasking them;
    /// returns how many were taken. O(taken).
    fn feed(&mut self, src: &[u8]) -> usize {
        let take = self.need().min(src.len());
        let from = self.data.len();
        self.data.extend_from_slice(&src[..take]);
        self.unmask_from(from);
        take
    }

    /// Unmasks `data[from..]` (bytes just appended).
    fn unmask_from(&mut self, from: usize) {
        if let Some(m) = self.mask {
            apply_mask_at(&mut self.data[from..], m, from - self.start);
        }
    }
}

/// Starts receiving a data frame whose payload (`len` bytes) is not
/// complete: `avail` holds its first bytes. Returns the bytes used (`hlen`
/// + all of `avail`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_body(
    st: &mut WsState,
    text: bool,
    compressed: bool,
    fin: bool,
    mask: Option<[u8; 4]>,
    len: usize,
    hlen: usize,
    avail: &[u8],
) -> Decoded {
    let mut data = st.frag.take().map(|f| f.data).unwrap_or_default();
    let first = len.min(avail.len().max(BODY_CHUNK));
    if data.is_empty() {
        data.reserve_exact(first);
    } else {
        data.reserve(first); // amortised over many fragments
    }
    let start = data.len();
    let mut b = Body {
        text,
        compressed,
        fin,
        mask,
        start,
        end: start + len,
        data,
    };
    b.feed(avail);
    st.body = Some(Box::new(b));
    Decoded::Absorbed(hlen + avail.len())
}

/// Feeds `buf` into the frame in progress; when it completes, finishes the
/// frame (a message, or a fragment kept for later). NeedMore when nothing
/// could be used.
pub(crate) fn feed_body(st: &mut WsState, buf: &[u8], max: usize, codec: &mut Codec) -> Decoded {
    let Some(b) = st.body.as_mut() else {
        return Decoded::NeedMore;
    };
    let used = b.feed(buf);
    if b.need() > 0 {
        return if used == 0 {
            Decoded::NeedMore
        } else {
            Decoded::Absorbed(used)
        };
    }
    let Some(b) = st.body.take() else {
        return Decoded::NeedMore;
    };
    complete_data(st, b.text, b.compressed, b.fin, b.data, used, max, codec)
}

/// A data frame is complete and `data` holds the message so far: keep it
/// as fragments, or (final frame) inflate and validate it into a message.
#[allow(clippy::too_many_arguments)]
pub(crate) fn complete_data(
    st: &mut WsState,
    text: bool,
    compressed: bool,
    fin: bool,
    data: Vec<u8>,
    used: usize,
    max: usize,
    codec: &mut Codec,
) -> Decoded {
    if !fin {
        st.frag = Some(Box::new(Fragments {
            text,
            data,
            compressed,
        }));
        return Decoded::Absorbed(used);
    }
    let data = if compressed {
        let pc = st.deflate.get_or_insert_with(Default::default);
        match codec.decompress(pc, &data, max) {
            Ok(d) => d,
            Err((code, why)) => return Decoded::Fail(code, why),
        }
    } else {
        data
    };
    if text {
        match String::from_utf8(data) {
            Ok(s) => Decoded::Event(WsEvent::Message(Message::Text(s)), used),
            Err(_) => Decoded::Fail(ws::close::BAD_DATA, "text message is not UTF-8"),
        }
    } else {
        Decoded::Event(WsEvent::Message(Message::Binary(data)), used)
    }
}

/// Writes a frame header for a server frame (unmasked) into `out`;
/// returns its length (2, 4 or 10).
pub fn server_header(out: &mut [u8; 10], opcode: u8, rsv1: bool, len: usize) -> usize {
    out[0] = 0x80 | if rsv1 { 0x40 } else { 0 } | (opcode & 0x0f);
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= 0xffff {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

impl Conn {
    /// The payload bytes the frame in progress still needs (0: none).
    pub fn body_need(&self) -> usize {
        match &self.phase {
            Phase::WebSocket(st) => st.body.as_ref().map_or(0, |b| b.need()),
            _ => 0,
        }
    }

    /// Reads the frame in progress straight into its buffer: at most what
    /// it still needs, so the next frame's bytes stay in the kernel for
    /// the next read. Returns the bytes read (0: EOF) and how many were
    /// asked for. O(bytes read).
    pub fn read_body(&mut self) -> io::Result<(usize, usize)> {
        let fd = self.stream.as_raw_fd();
        let Phase::WebSocket(st) = &mut self.phase else {
            return Ok((0, 0));
        };
        let Some(b) = st.body.as_mut() else {
            return Ok((0, 0));
        };
        let want = b.need();
        if b.data.capacity() == b.data.len() {
            // Double, capped at the frame's end.
            b.data.reserve_exact(want.min(b.data.len().max(BODY_CHUNK)));
        }
        let spare = b.data.spare_capacity_mut();
        let want = want.min(spare.len());
        // SAFETY: `spare` is the Vec's own unused capacity, valid for
        // `want` bytes; read(2) writes at most `want` bytes into it and
        // returns how many, and only those are made part of the Vec below.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let from = b.data.len();
        // SAFETY: read(2) initialised bytes `from..from + n`, n <= want <=
        // spare capacity.
        unsafe { b.data.set_len(from + n) };
        b.unmask_from(from);
        Ok((n, want))
    }

    /// Queues (or writes at once) a message the caller gives away. A
    /// server's large uncompressed or compressed payload, with nothing
    /// else queued, is written with `writev` from the message's own bytes,
    /// and an unwritten rest stays in that buffer (no copy); everything
    /// else is encoded into the output buffer. False if not an open
    /// WebSocket.
    pub fn queue_owned(&mut self, msg: Message, codec: &mut Codec) -> bool {
        let Phase::WebSocket(st) = &mut self.phase else {
            return false;
        };
        if st.close_sent {
            return false;
        }
        let opcode = match msg {
            Message::Text(_) => Data::Text,
            Message::Binary(_) => Data::Binary,
        };
        let compressed = match st.deflate.as_mut() {
            Some(pc) if st.role == Role::Server => codec.compress(pc, msg.as_bytes()),
            _ => None,
        };
        let rsv1 = compressed.is_some();
        let payload = match compressed {
            Some(z) => z,
            None => msg.into_bytes(),
        };
        let role = st.role;
        if role == Role::Server && payload.len() >= DIRECT_WRITE_MIN && self.pending_out() == 0 {
            return self.write_direct(u8::from(OpCode::Data(opcode)), rsv1, payload);
        }
        self.compact_output();
        ws::encode_frame_rsv(&mut self.wbuf, role, OpCode::Data(opcode), &payload, rsv1);
        true
    }

    /// Drops already-written output from the front of the buffer before
    /// more is appended, once that is at least half of it (amortised O(1)
    /// per byte; the flush itself never moves bytes).
    pub fn compact_output(&mut self) {
        if self.wpos > 0 && self.wpos * 2 >= self.wbuf.len() {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
    }

    /// `writev` of a server frame header and `payload` with nothing else
    /// pending; the rest (if the socket is full) becomes the output buffer.
    fn write_direct(&mut self, opcode: u8, rsv1: bool, payload: Vec<u8>) -> bool {
        let mut hdr = [0u8; 10];
        let hlen = server_header(&mut hdr, opcode, rsv1, payload.len());
        let iov = [io::IoSlice::new(&hdr[..hlen]), io::IoSlice::new(&payload)];
        let written = loop {
            match io::Write::write_vectored(&mut self.stream, &iov) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock or an error: queue it all; the flush reports
                // a real error.
                Err(_) => break 0,
            }
        };
        if written >= hlen {
            self.wbuf = payload;
            self.wpos = written - hlen;
        } else {
            let mut v = Vec::with_capacity(hlen - written + payload.len());
            v.extend_from_slice(&hdr[written..hlen]);
            v.extend_from_slice(&payload);
            self.wbuf = v;
            self.wpos = 0;
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::websocket::{apply_mask, decode_frame};

    fn client_frame(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mask = [0x0f, 0xa5, 0x3c, 0x99];
        let hdr = tungstenite::protocol::frame::FrameHeader {
            is_final: fin,
            opcode: OpCode::from(op),
            mask: Some(mask),
            ..Default::default()
        };
        hdr.format(payload.len() as u64, &mut out).unwrap();
        let s = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[s..], mask);
        out
    }

    /// Feeds `wire` in pieces (first `split` bytes, then `step`-byte
    /// chunks) the way the loop does: leftovers kept, bodies absorbed.
    fn feed(wire: &[u8], split: usize, step: usize) -> Vec<WsEvent> {
        let mut st = WsState::new(Role::Server);
        let mut codec = Codec::default();
        let (mut events, mut pending) = (Vec::new(), Vec::new());
        let mut pieces = vec![&wire[..split]];
        pieces.extend(wire[split..].chunks(step));
        for p in pieces {
            pending.extend_from_slice(p);
            let mut pos = 0;
            loop {
                match decode_frame(&mut st, &mut pending[pos..], 1 << 20, &mut codec) {
                    Decoded::NeedMore => break,
                    Decoded::Absorbed(n) => pos += n,
                    Decoded::Event(e, n) => {
                        pos += n;
                        events.push(e);
                    }
                    Decoded::Fail(c, why) => panic!("{c} {why}"),
                }
            }
            pending.drain(..pos);
        }
        events
    }

    #[test]
    fn split_at_every_header_boundary_and_odd_chunks() {
        for n in [0usize, 5, 125, 126, 300, 65535, 65536, 70_000] {
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut wire = client_frame(2, false, &data[..n / 3]);
            wire.extend(client_frame(9, true, b"p"));
            wire.extend(client_frame(0, true, &data[n / 3..]));
            let want = vec![
                WsEvent::Ping(b"p".to_vec()),
                WsEvent::Message(Message::Binary(data)),
            ];
            for split in 0..=16.min(wire.len()) {
                for step in [1usize, 3, 7, 4096] {
                    if n > 1000 && step < 7 {
                        continue; // slow in a debug build, and step 7 covers it
                    }
                    assert_eq!(
                        feed(&wire, split, step),
                        want,
                        "n {n} split {split} step {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn headers_match_tungstenite() {
        for len in [0usize, 125, 126, 65535, 65536, 1 << 20] {
            let mut ours = [0u8; 10];
            let n = server_header(&mut ours, 2, false, len);
            let mut theirs = Vec::new();
            ws::encode_frame(
                &mut theirs,
                Role::Server,
                OpCode::Data(Data::Binary),
                &vec![0; len],
            );
            assert_eq!(&ours[..n], &theirs[..n], "len {len}");
        }
    }
}
