//! `deflate`: closed-loop echo of chat-like JSON over raw sockets, with
//! or without permessage-deflate (the frames are built here, compressed
//! with flate2): messages/s and bytes on the wire per message.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use crate::connect::Connector;
use crate::measure::say;
use crate::DeflateArgs;

/// Chat-like JSON of exactly `n` bytes (varied enough not to be trivial).
fn chat_json(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 200);
    let mut i = 0u64;
    while v.len() < n {
        let line = format!(
            r#"{{"type":"message","id":{},"from":"user-{}","to":"room-{}","ts":{},"text":"message number {} about the meeting at {} o'clock"}},"#,
            i * 7919 % 100_000,
            i * 31 % 977,
            i % 13,
            1_733_097_600_000u64 + i * 1337,
            i,
            i % 24
        );
        v.extend_from_slice(line.as_bytes());
        i += 1;
    }
    v.truncate(n);
    v
}

/// A masked client text frame.
fn masked_frame(rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81 | if rsv1 { 0x40 } else { 0 }];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// Runs the mode; the `RESULT` object.
pub async fn run(args: DeflateArgs) -> Result<serde_json::Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = Connector::new(&args.target)?;
    let text = chat_json(args.size);
    let wire = if args.compress {
        let mut c = flate2::Compress::new(flate2::Compression::new(6), false);
        let mut z = Vec::with_capacity(text.len() + 64);
        c.compress_vec(&text, &mut z, flate2::FlushCompress::Sync)
            .map_err(|e| format!("deflate: {e}"))?;
        z.truncate(z.len().saturating_sub(4)); // 00 00 ff ff
        masked_frame(true, &z)
    } else {
        masked_frame(false, &text)
    };
    let offer = if args.compress {
        "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_no_context_takeover\r\n"
    } else {
        ""
    };
    let mut streams = Vec::new();
    for _ in 0..args.conns {
        let mut s = TcpStream::connect(connector.addr())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b)
                .await
                .map_err(|e| format!("101: {e}"))?;
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") {
            return Err(format!("upgrade refused: {head}"));
        }
        if args.compress && !head.contains("permessage-deflate") {
            return Err("the server did not accept permessage-deflate".into());
        }
        streams.push(s);
    }
    println!("deflate: {} connections up", streams.len());
    let start = Instant::now();
    let measure_start = start + Duration::from_secs_f64(args.warmup);
    let end = measure_start + Duration::from_secs_f64(args.duration);
    let markers = tokio::spawn(async move {
        sleep_until(measure_start).await;
        say("MEASURE_START");
        sleep_until(end).await;
        say("MEASURE_END");
    });
    let wire = Arc::new(wire);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let wire = wire.clone();
            tokio::spawn(async move {
                // (messages, bytes in from the server) inside the window
                let (mut msgs, mut bytes_in) = (0u64, 0u64);
                let mut buf = Vec::new();
                loop {
                    let sent_at = Instant::now();
                    if sent_at >= end {
                        break;
                    }
                    if s.write_all(&wire).await.is_err() {
                        break;
                    }
                    let mut h = [0u8; 2];
                    if s.read_exact(&mut h).await.is_err() {
                        break;
                    }
                    let (len, ext) = match h[1] & 0x7f {
                        126 => {
                            let mut b = [0u8; 2];
                            let _ = s.read_exact(&mut b).await;
                            (u16::from_be_bytes(b) as usize, 2)
                        }
                        127 => {
                            let mut b = [0u8; 8];
                            let _ = s.read_exact(&mut b).await;
                            (u64::from_be_bytes(b) as usize, 8)
                        }
                        n => (n as usize, 0),
                    };
                    buf.resize(len, 0);
                    if s.read_exact(&mut buf).await.is_err() || h[0] & 0x0f != 1 {
                        break;
                    }
                    if sent_at >= measure_start && Instant::now() <= end {
                        msgs += 1;
                        bytes_in += (2 + ext + len) as u64;
                    }
                }
                (msgs, bytes_in)
            })
        })
        .collect();
    let (mut msgs, mut bytes_in) = (0u64, 0u64);
    for t in tasks {
        let (m, b) = t.await.map_err(|e| e.to_string())?;
        msgs += m;
        bytes_in += b;
    }
    markers.await.map_err(|e| e.to_string())?;
    let rate = msgs as f64 / args.duration;
    println!(
        "deflate: {msgs} messages = {rate:.0} msg/s, {} B per message from the server, {} B to it",
        bytes_in / msgs.max(1),
        wire.len()
    );
    Ok(json!({
        "mode": "deflate",
        "compress": args.compress,
        "conns": args.conns,
        "size": args.size,
        "msgs": msgs,
        "msgs_per_s": rate.round() as u64,
        "wire_in_per_msg": bytes_in / msgs.max(1),
        "wire_out_per_msg": wire.len(),
        "errors": 0,
    }))
}
