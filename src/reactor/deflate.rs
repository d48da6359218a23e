//! permessage-deflate (RFC 7692) for the reactor: the negotiation of the
//! `Sec-WebSocket-Extensions` offer, the per-connection parameters (which
//! travel in handover manifests), and the compressor and decompressor.
//!
//! Memory is the design constraint. Without context takeover (the default,
//! `websocket_compression_context_takeover = false`) the server answers
//! every offer with `server_no_context_takeover; client_no_context_takeover`,
//! so each message is a self-contained deflate stream: one compressor per
//! window size and one decompressor per *worker* ([`Codec`]) serve every
//! connection, reset after each message, and a connection holds only its
//! [`Params`] (a few bytes, boxed beside its WebSocket state). With context
//! takeover the zlib state (by zlib's memory formula about 260 KiB out and 40 KiB in) is kept per
//! connection in [`PerConn`], created on first use.
//!
//! Raw deflate with a window under 15 bits needs a zlib backend of flate2
//! (`zlib-rs` here: pure Rust, no C toolchain); miniz_oxide, flate2's
//! default, has no window-bits API. zlib cannot compress with an 8-bit raw
//! window (it silently uses 9), so an offer that limits the server to 8 bits
//! is declined. Inflating is bounded by `package_max_length` (a compression
//! bomb is refused with 1009) and a stream that is not valid deflate with
//! 1007.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde::{Deserialize, Serialize};

use crate::reactor::websocket::close;

/// The bytes a sync flush ends with; removed from each compressed message
/// and put back before inflating (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
/// The deflate level: the fastest, since CPU per message is what a busy
/// server pays; chat-like JSON still shrinks by about half at it.
const LEVEL: u32 = 1;

/// What was agreed with a peer (plain data: handover manifests carry it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// Our compressor is reset after every message.
    pub server_no_context_takeover: bool,
    /// The peer resets its compressor after every message.
    pub client_no_context_takeover: bool,
    /// Our compressor's window (9..=15).
    pub server_max_window_bits: u8,
    /// The peer's compressor's window (we always inflate with 15).
    pub client_max_window_bits: u8,
}

impl Params {
    /// Whether no zlib state needs to survive between messages, so that a
    /// connection can move to another worker without losing anything.
    pub fn stateless(&self) -> bool {
        self.server_no_context_takeover && self.client_no_context_takeover
    }
}

/// The server's compression settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// `websocket_compression`.
    pub enabled: bool,
    /// `websocket_compression_context_takeover`: honour the client's wish
    /// for context takeover instead of asking for none.
    pub context_takeover: bool,
    /// `websocket_compression_threshold`: smaller payloads go out
    /// uncompressed.
    pub threshold: usize,
}

/// One parsed offer.
#[derive(Debug, Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<Option<u8>>,
}

fn window_bits(v: Option<&str>) -> Option<u8> {
    let v = v?.trim().trim_matches('"');
    match v.parse::<u8>() {
        Ok(b @ 8..=15) if !v.starts_with('0') => Some(b),
        _ => None,
    }
}

/// Parses one `permessage-deflate; …` offer; None if it is not one or is
/// malformed (an unknown or repeated parameter, a bad value).
fn parse_offer(offer: &str) -> Option<Offer> {
    let mut parts = offer.split(';');
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("permessage-deflate")
    {
        return None;
    }
    let mut o = Offer::default();
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v)),
            None => (p.trim(), None),
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() && !o.server_no_context_takeover => {
                o.server_no_context_takeover = true
            }
            "client_no_context_takeover" if value.is_none() && !o.client_no_context_takeover => {
                o.client_no_context_takeover = true
            }
            "server_max_window_bits" if o.server_max_window_bits.is_none() => {
                o.server_max_window_bits = Some(window_bits(value)?)
            }
            "client_max_window_bits" if o.client_max_window_bits.is_none() => {
                o.client_max_window_bits = Some(match value {
                    None => None,
                    v => Some(window_bits(v)?),
                })
            }
            _ => return None,
        }
    }
    Some(o)
}

/// Picks the first acceptable offer among the values of every
/// `Sec-WebSocket-Extensions` header. Returns the agreed parameters and the
/// response header's value, or None (no compression) when compression is
/// off or nothing acceptable was offered. O(header length).
pub fn negotiate<'a>(
    cfg: &Config,
    headers: impl Iterator<Item = &'a str>,
) -> Option<(Params, String)> {
    if !cfg.enabled {
        return None;
    }
    for value in headers {
        for offer in value.split(',') {
            let Some(o) = parse_offer(offer) else {
                continue;
            };
            if o.server_max_window_bits == Some(8) {
                continue; // zlib cannot honour an 8-bit raw window
            }
            let p = Params {
                server_no_context_takeover: o.server_no_context_takeover || !cfg.context_takeover,
                client_no_context_takeover: o.client_no_context_takeover || !cfg.context_takeover,
                server_max_window_bits: o.server_max_window_bits.unwrap_or(15),
                client_max_window_bits: o.client_max_window_bits.flatten().unwrap_or(15),
            };
            let mut resp = String::from("permessage-deflate");
            if p.server_no_context_takeover {
                resp.push_str("; server_no_context_takeover");
            }
            if p.client_no_context_takeover {
                resp.push_str("; client_no_context_takeover");
            }
            if let Some(b) = o.server_max_window_bits {
                resp.push_str(&format!("; server_max_window_bits={b}"));
            }
            return Some((p, resp));
        }
    }
    None
}

/// A connection's compression: its parameters and, with context takeover,
/// its own zlib state (created on first use).
#[derive(Default)]
pub struct PerConn {
    /// What was agreed.
    pub params: Option<Params>,
    tx: Option<Compress>,
    rx: Option<Decompress>,
}

impl std::fmt::Debug for PerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerConn")
            .field("params", &self.params)
            .field("tx", &self.tx.is_some())
            .field("rx", &self.rx.is_some())
            .finish()
    }
}

impl Clone for PerConn {
    /// Clones the parameters only: zlib state cannot be copied.
    fn clone(&self) -> Self {
        PerConn {
            params: self.params,
            tx: None,
            rx: None,
        }
    }
}

impl PerConn {
    /// State for agreed `params`.
    pub fn new(params: Params) -> PerConn {
        PerConn {
            params: Some(params),
            tx: None,
            rx: None,
        }
    }
}

/// A worker's compression settings and its shared compressors (one per
/// window size, made on first use) and decompressor, for connections
/// without context takeover.
#[derive(Default)]
pub struct Codec {
    /// The settings.
    pub cfg: Config,
    tx: Vec<(u8, Compress)>,
    rx: Option<Decompress>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("compressors", &self.tx.len())
            .field("decompressor", &self.rx.is_some())
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn new_compress(bits: u8) -> Compress {
    Compress::new_with_window_bits(Compression::new(LEVEL), false, bits.clamp(9, 15))
}

impl Codec {
    /// A codec for `cfg` (no zlib state until first used).
    pub fn new(cfg: Config) -> Codec {
        Codec {
            cfg,
            ..Codec::default()
        }
    }

    /// The compressed form of `payload` for a connection with `pc`, or None
    /// when it is to go out as it is (under the threshold, nothing agreed,
    /// or a zlib error, logged). O(payload).
    pub fn compress(&mut self, pc: &mut PerConn, payload: &[u8]) -> Option<Vec<u8>> {
        let p = pc.params?;
        if payload.len() < self.cfg.threshold {
            return None;
        }
        let bits = p.server_max_window_bits;
        let c = if p.server_no_context_takeover {
            let i = match self.tx.iter().position(|(b, _)| *b == bits) {
                Some(i) => i,
                None => {
                    self.tx.push((bits, new_compress(bits)));
                    self.tx.len() - 1
                }
            };
            &mut self.tx[i].1
        } else {
            pc.tx.get_or_insert_with(|| new_compress(bits))
        };
        let out = deflate_message(c, payload);
        if p.server_no_context_takeover {
            c.reset();
        }
        match out {
            Ok(v) => Some(v),
            Err(e) => {
                // With context takeover the stream is now unusable: drop it
                // (the peer fails on our next message; nothing better exists).
                pc.tx = None;
                log::warn!("permessage-deflate: compressing failed: {e}");
                None
            }
        }
    }

    /// Inflates one compressed message for a connection with `pc`, at most
    /// `max` bytes. Errors carry the close code: 1009 over `max`, 1007 not
    /// deflate, 1002 nothing agreed. O(output).
    pub fn decompress(
        &mut self,
        pc: &mut PerConn,
        payload: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, (u16, &'static str)> {
        let Some(p) = pc.params else {
            return Err((
                close::PROTOCOL,
                "compressed frame without permessage-deflate",
            ));
        };
        if p.client_no_context_takeover {
            let d = self.rx.get_or_insert_with(|| Decompress::new(false));
            let r = inflate_bounded(d, payload, max);
            d.reset(false);
            r
        } else {
            let d = pc.rx.get_or_insert_with(|| Decompress::new(false));
            let r = inflate_bounded(d, payload, max);
            if r.is_err() {
                pc.rx = None;
            }
            r
        }
    }
}

/// Compresses one message with a sync flush and strips the flush's tail.
/// O(payload).
pub fn deflate_message(c: &mut Compress, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    let start = c.total_in();
    loop {
        let used = (c.total_in() - start) as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        c.compress_vec(
            &payload[used.min(payload.len())..],
            &mut out,
            FlushCompress::Sync,
        )
        .map_err(|e| format!("deflate: {e}"))?;
        let used = (c.total_in() - start) as usize;
        // The flush is complete once all input is in and zlib left room.
        if used >= payload.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Ok(out)
}

/// Inflates one message (its payload, then the stripped tail) with `d`,
/// refusing to produce more than `max` bytes. Never panics on any input.
/// O(output), memory O(min(output, max)).
pub fn inflate_bounded(
    d: &mut Decompress,
    payload: &[u8],
    max: usize,
) -> Result<Vec<u8>, (u16, &'static str)> {
    const BOMB: (u16, &str) = (
        close::TOO_BIG,
        "inflated message exceeds package_max_length",
    );
    const BAD: (u16, &str) = (close::BAD_DATA, "invalid deflate data");
    let bound = max.saturating_add(1);
    let mut out: Vec<u8> = Vec::with_capacity(payload.len().saturating_mul(3).max(256).min(bound));
    for input in [payload, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let used = (d.total_in() - start) as usize;
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(BOMB);
                }
                let grow = out.capacity().min(bound - out.len()).max(1);
                out.reserve_exact(grow);
            }
            let before = (d.total_in(), out.len());
            let st = d
                .decompress_vec(
                    &input[used.min(input.len())..],
                    &mut out,
                    FlushDecompress::Sync,
                )
                .map_err(|_| BAD)?;
            if out.len() > max {
                return Err(BOMB);
            }
            let used = (d.total_in() - start) as usize;
            if st == Status::StreamEnd {
                d.reset(false); // a final block: the next message starts afresh
                return Ok(out);
            }
            let progressed = (d.total_in(), out.len()) != before;
            if used >= input.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed && out.len() < out.capacity() {
                return Err(BAD);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(takeover: bool) -> Config {
        Config {
            enabled: true,
            context_takeover: takeover,
            threshold: 0,
        }
    }

    #[test]
    fn negotiation() {
        let one = |c: &Config, h: &str| negotiate(c, std::iter::once(h));
        assert_eq!(
            one(
                &Config {
                    enabled: false,
                    ..cfg(true)
                },
                "permessage-deflate"
            ),
            None
        );
        let (p, r) = one(&cfg(false), "permessage-deflate; client_max_window_bits").unwrap();
        assert!(p.stateless());
        assert_eq!(
            r,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let (p, r) = one(&cfg(true), "permessage-deflate; server_max_window_bits=10").unwrap();
        assert!(!p.server_no_context_takeover && !p.client_no_context_takeover);
        assert_eq!(p.server_max_window_bits, 10);
        assert_eq!(r, "permessage-deflate; server_max_window_bits=10");
        // 8 bits declined, the next offer taken; junk offers skipped.
        let (p, _) = one(
            &cfg(true),
            "x-foo, permessage-deflate; server_max_window_bits=8, permessage-deflate; bogus, permessage-deflate; server_no_context_takeover",
        )
        .unwrap();
        assert!(p.server_no_context_takeover && !p.client_no_context_takeover);
        assert_eq!(
            one(&cfg(true), "permessage-deflate; server_max_window_bits=16"),
            None
        );
        assert_eq!(
            one(
                &cfg(true),
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
            ),
            None
        );
    }

    #[test]
    fn round_trip_both_modes_and_bomb() {
        let msg =
            br#"{"type":"chat","from":"alice","to":"bob","text":"hello hello hello"}"#.repeat(20);
        for takeover in [false, true] {
            let (p, _) = negotiate(&cfg(takeover), std::iter::once("permessage-deflate")).unwrap();
            let mut ours = Codec::new(cfg(takeover));
            let mut pc = PerConn::new(p);
            let mut peer = PerConn::new(p);
            let mut theirs = Codec::new(cfg(takeover));
            for _ in 0..3 {
                let z = ours.compress(&mut pc, &msg).unwrap();
                assert!(z.len() < msg.len() / 4, "{} of {}", z.len(), msg.len());
                assert_eq!(theirs.decompress(&mut peer, &z, 1 << 20).unwrap(), msg);
            }
        }
        let zeros = vec![0u8; 1 << 20];
        let mut c = Compress::new(Compression::new(9), false);
        let z = deflate_message(&mut c, &zeros).unwrap();
        let mut d = Decompress::new(false);
        assert_eq!(inflate_bounded(&mut d, &z, 100_000), Err(BOMB_CODE));
        let mut d = Decompress::new(false);
        assert_eq!(inflate_bounded(&mut d, &z, 1 << 20).unwrap().len(), 1 << 20);
        let mut d = Decompress::new(false);
        assert_eq!(
            inflate_bounded(&mut d, &[0xff; 9], 1000).unwrap_err().0,
            close::BAD_DATA
        );
    }

    const BOMB_CODE: (u16, &str) = (
        close::TOO_BIG,
        "inflated message exceeds package_max_length",
    );
}
