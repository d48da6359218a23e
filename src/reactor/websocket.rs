//! WebSocket (RFC 6455) for the reactor: the server and client handshakes,
//! and the frame codec over buffers the connection owns.
//!
//! Frame headers are decoded and encoded by tungstenite's `FrameHeader`
//! ("tungstenite framing"); payloads are unmasked here, in place, in our
//! read buffer. tungstenite's `WebSocket` type is deliberately not used: it
//! keeps large buffers per connection, which idle connections cannot afford.
//!
//! [`decode_one`] turns the front of a buffer into at most one [`WsEvent`]
//! and never panics on bad input: a protocol violation is a
//! [`Decoded::Fail`] carrying the close code to send (1002 protocol error,
//! 1007 bad UTF-8, 1009 too big).

use std::hash::{BuildHasher, Hasher};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::reactor::deflate::{Codec, Params, PerConn};
use crate::reactor::frame::{self, Body};
use crate::reactor::http::Request;

/// A WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Text (valid UTF-8).
    Text(String),
    /// Binary.
    Binary(Vec<u8>),
}

impl Message {
    /// The payload bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(s) => s.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The text, if it is a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(s) => Some(s),
            Message::Binary(_) => None,
        }
    }
}

impl Message {
    /// The payload bytes, given away (no copy).
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Message::Text(s) => s.into_bytes(),
            Message::Binary(b) => b,
        }
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Message::Text(s.to_string())
    }
}
impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::Text(s)
    }
}
impl From<&[u8]> for Message {
    fn from(b: &[u8]) -> Self {
        Message::Binary(b.to_vec())
    }
}
impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b)
    }
}

/// Close codes this module sends.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (graceful stop).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Text that is not UTF-8.
    pub const BAD_DATA: u16 = 1007;
    /// A message that violates a policy (e.g. the rate limit).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Server error (a hook panicked).
    pub const INTERNAL: u16 = 1011;
    /// Try again later (overloaded).
    pub const TRY_AGAIN: u16 = 1013;
}

/// Which end of the connection we are: it decides who masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// We accepted the connection: clients must mask, we must not.
    Server,
    /// We dialled it (`ws_connect`): we mask, the server must not.
    Client,
}

/// A message being reassembled from fragments.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Fragments {
    /// Whether the first frame was text.
    pub text: bool,
    /// Payload so far.
    pub data: Vec<u8>,
    /// The first frame had RSV1 (permessage-deflate): inflate at the end.
    #[serde(default)]
    pub compressed: bool,
}

/// Per-connection WebSocket protocol state (small: idle connections pay
/// for it).
#[derive(Debug, Clone)]
pub struct WsState {
    /// Our role.
    pub role: Role,
    /// A fragmented message in progress (boxed: rare).
    pub frag: Option<Box<Fragments>>,
    /// We sent a close frame.
    pub close_sent: bool,
    /// A data frame whose payload is still arriving (boxed: rare).
    pub body: Option<Box<Body>>,
    /// permessage-deflate, when negotiated (boxed: off by default).
    pub deflate: Option<Box<PerConn>>,
}

impl WsState {
    /// Fresh state for a connection in `role`.
    pub fn new(role: Role) -> WsState {
        WsState {
            role,
            frag: None,
            close_sent: false,
            body: None,
            deflate: None,
        }
    }

    /// The agreed permessage-deflate parameters, if any.
    pub fn deflate_params(&self) -> Option<Params> {
        self.deflate.as_ref().and_then(|d| d.params)
    }
}

/// Something the peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// A complete message.
    Message(Message),
    /// A ping with its payload (answer with a pong).
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close frame: code (if any) and reason.
    Close(Option<u16>, String),
}

/// What [`decode_one`] found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Incomplete frame: read more.
    NeedMore,
    /// A frame that completes no event (a non-final fragment) used these bytes.
    Absorbed(usize),
    /// An event and the bytes it used.
    Event(WsEvent, usize),
    /// A protocol violation: close with this code and reason.
    Fail(u16, &'static str),
}

/// Decodes at most one frame from the front of `buf` (unmasking its payload
/// in place). `max` bounds a message's total size. O(frame). Compressed
/// frames are inflated with a throw-away codec: see [`decode_frame`].
pub fn decode_one(st: &mut WsState, buf: &mut [u8], max: usize) -> Decoded {
    decode_frame(st, buf, max, &mut Codec::default())
}

/// [`decode_one`] with the worker's shared (de)compressors. A data frame
/// whose payload is incomplete is not left in `buf` to be parsed again on
/// the next read: its header is consumed and its payload moved into the
/// message buffer ([`Body`]), which later bytes complete (Absorbed). O(the
/// bytes used).
pub fn decode_frame(st: &mut WsState, buf: &mut [u8], max: usize, codec: &mut Codec) -> Decoded {
    if st.body.is_some() {
        return frame::feed_body(st, buf, max, codec);
    }
    let mut cur = Cursor::new(&buf[..]);
    let (hdr, len) = match FrameHeader::parse(&mut cur) {
        Ok(Some(h)) => h,
        Ok(None) => return Decoded::NeedMore,
        Err(_) => return Decoded::Fail(close::PROTOCOL, "reserved opcode"),
    };
    let hlen = cur.position() as usize;
    let first_data = matches!(hdr.opcode, OpCode::Data(Data::Text | Data::Binary));
    if (hdr.rsv1 && !(first_data && st.deflate.is_some())) || hdr.rsv2 || hdr.rsv3 {
        return Decoded::Fail(close::PROTOCOL, "reserved bits set");
    }
    match (st.role, hdr.mask.is_some()) {
        (Role::Server, false) => return Decoded::Fail(close::PROTOCOL, "unmasked client frame"),
        (Role::Client, true) => return Decoded::Fail(close::PROTOCOL, "masked server frame"),
        _ => {}
    }
    let is_control = matches!(hdr.opcode, OpCode::Control(_));
    if is_control && (!hdr.is_final || len > 125) {
        return Decoded::Fail(close::PROTOCOL, "fragmented or oversize control frame");
    }
    let so_far = st.frag.as_ref().map_or(0, |f| f.data.len() as u64);
    if !is_control && len.saturating_add(so_far) > max as u64 {
        return Decoded::Fail(close::TOO_BIG, "message exceeds package_max_length");
    }
    let len = len as usize;
    // Which message a data frame belongs to: (text, compressed).
    let kind = match hdr.opcode {
        OpCode::Data(Data::Continue) => match &st.frag {
            Some(f) => Some((f.text, f.compressed)),
            None => return Decoded::Fail(close::PROTOCOL, "continuation frame without a message"),
        },
        OpCode::Data(d @ (Data::Text | Data::Binary)) => {
            if st.frag.is_some() {
                return Decoded::Fail(close::PROTOCOL, "new message inside a fragmented one");
            }
            Some((d == Data::Text, hdr.rsv1))
        }
        _ => None,
    };
    if buf.len() - hlen < len {
        return match kind {
            Some((text, z)) => {
                frame::start_body(st, text, z, hdr.is_final, hdr.mask, len, hlen, &buf[hlen..])
            }
            None => Decoded::NeedMore,
        };
    }
    let used = hlen + len;
    let payload = &mut buf[hlen..used];
    if let Some(mask) = hdr.mask {
        apply_mask(payload, mask);
    }
    let payload = &buf[hlen..used];
    if let Some((text, z)) = kind {
        let data = match st.frag.take() {
            Some(mut f) => {
                f.data.extend_from_slice(payload);
                f.data
            }
            None => payload.to_vec(),
        };
        return frame::complete_data(st, text, z, hdr.is_final, data, used, max, codec);
    }
    match hdr.opcode {
        OpCode::Control(Control::Ping) => Decoded::Event(WsEvent::Ping(payload.to_vec()), used),
        OpCode::Control(Control::Pong) => Decoded::Event(WsEvent::Pong, used),
        OpCode::Control(Control::Close) => match payload.len() {
            0 => Decoded::Event(WsEvent::Close(None, String::new()), used),
            1 => Decoded::Fail(close::PROTOCOL, "one-byte close payload"),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !CloseCode::from(code).is_allowed() {
                    return Decoded::Fail(close::PROTOCOL, "invalid close code");
                }
                match std::str::from_utf8(&payload[2..]) {
                    Ok(r) => Decoded::Event(WsEvent::Close(Some(code), r.to_string()), used),
                    Err(_) => Decoded::Fail(close::BAD_DATA, "close reason is not UTF-8"),
                }
            }
        },
        _ => Decoded::Fail(close::PROTOCOL, "reserved opcode"),
    }
}

/// XORs `data` with the 4-byte `mask` (masking and unmasking are the same).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    apply_mask_at(data, mask, 0);
}

/// [`apply_mask`] for bytes that start `offset` bytes into the payload.
/// Eight bytes at a time (the compiler vectorises the loop). O(len).
pub fn apply_mask_at(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let r = offset & 3;
    let m = [
        mask[r],
        mask[(r + 1) & 3],
        mask[(r + 2) & 3],
        mask[(r + 3) & 3],
    ];
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// A fresh, unpredictable masking key (std's randomly seeded SipHash over a
/// counter: no extra dependency, good enough for masking).
pub fn random_mask() -> [u8; 4] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() as u32).to_ne_bytes()
}

/// Appends one final frame to `out`, masked when `role` is the client.
/// O(payload).
pub fn encode_frame(out: &mut Vec<u8>, role: Role, opcode: OpCode, payload: &[u8]) {
    encode_frame_rsv(out, role, opcode, payload, false);
}

/// [`encode_frame`] with RSV1 (a permessage-deflate payload) as given.
pub fn encode_frame_rsv(out: &mut Vec<u8>, role: Role, opcode: OpCode, payload: &[u8], rsv1: bool) {
    let mask = (role == Role::Client).then(random_mask);
    let hdr = FrameHeader {
        is_final: true,
        opcode,
        mask,
        rsv1,
        ..FrameHeader::default()
    };
    // Writing into a Vec cannot fail.
    let _ = hdr.format(payload.len() as u64, out);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m);
    }
}

/// Appends a message frame.
pub fn encode_message(out: &mut Vec<u8>, role: Role, msg: &Message) {
    let op = match msg {
        Message::Text(_) => Data::Text,
        Message::Binary(_) => Data::Binary,
    };
    encode_frame(out, role, OpCode::Data(op), msg.as_bytes());
}

/// Appends a close frame (the reason is cut to fit 125 bytes at a UTF-8
/// boundary).
pub fn encode_close(out: &mut Vec<u8>, role: Role, code: u16, reason: &str) {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(out, role, OpCode::Control(Control::Close), &payload);
}

/// Whether a request asks for a WebSocket upgrade (`Upgrade: websocket`).
pub fn wants_upgrade(req: &Request) -> bool {
    req.header("upgrade").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
    })
}

/// Validates an upgrade request and returns the 101 response to send, or
/// why it is refused (answered with 400).
pub fn accept_upgrade(req: &Request) -> Result<Vec<u8>, &'static str> {
    accept_upgrade_with(req, None).map(|(r, _)| r)
}

/// [`accept_upgrade`] that also negotiates permessage-deflate under `cfg`
/// (see [`crate::reactor::deflate::negotiate`]) and returns what was agreed.
pub fn accept_upgrade_with(
    req: &Request,
    cfg: Option<&crate::reactor::deflate::Config>,
) -> Result<(Vec<u8>, Option<Params>), &'static str> {
    if req.method != "GET" || req.version < 1 {
        return Err("WebSocket upgrade needs GET and HTTP/1.1");
    }
    let connection = req.header("connection").unwrap_or("");
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return Err("missing Connection: Upgrade");
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err("Sec-WebSocket-Version must be 13");
    }
    let key = req.header("sec-websocket-key").map(str::trim).unwrap_or("");
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err("bad Sec-WebSocket-Key"),
    }
    let offers = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.as_str());
    let agreed = cfg.and_then(|c| crate::reactor::deflate::negotiate(c, offers));
    let ext = match &agreed {
        Some((_, v)) => format!("Sec-WebSocket-Extensions: {v}\r\n"),
        None => String::new(),
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{ext}\r\n",
        derive_accept_key(key.as_bytes())
    );
    Ok((resp.into_bytes(), agreed.map(|(p, _)| p)))
}

/// The client's upgrade request for `host` and `path`, and the key it used.
pub fn client_request(host: &str, path: &str) -> (Vec<u8>, String) {
    let key = tungstenite::handshake::client::generate_key();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    (req.into_bytes(), key)
}

/// What the server answered to our upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientHandshake {
    /// Incomplete response head.
    Partial,
    /// Upgraded; the head used this many bytes.
    Done(usize),
    /// Refused, with why.
    Fail(String),
}

/// Checks the server's response to a request sent with `key`.
pub fn check_response(buf: &[u8], key: &str) -> ClientHandshake {
    let mut slots = [httparse::EMPTY_HEADER; crate::reactor::http::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= crate::reactor::http::MAX_HEAD => {
            return ClientHandshake::Partial
        }
        Ok(httparse::Status::Partial) => {
            return ClientHandshake::Fail("response head too large".into())
        }
        Err(e) => return ClientHandshake::Fail(format!("malformed response: {e}")),
    };
    if resp.code != Some(101) {
        return ClientHandshake::Fail(format!("status {} instead of 101", resp.code.unwrap_or(0)));
    }
    let accept = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return ClientHandshake::Fail("wrong Sec-WebSocket-Accept".into());
    }
    ClientHandshake::Done(used)
}

#[cfg(test)]
#[path = "websocket_tests.rs"]
mod tests;
