//! The WebSocket frame path over real loopback sockets (issue 17): echo
//! correctness at every length-encoding boundary, in text and binary,
//! whole and fragmented, fed one byte at a time; and permessage-deflate
//! negotiated or not, in both context-takeover modes, against a
//! compression bomb and against compressed invalid UTF-8.
//!
//! The server is an echo reactor on a thread ([`common::frames::EchoWorker`]);
//! the client is raw TCP with frames built by hand and deflate done with
//! flate2 directly, so both the framing and the compression are checked
//! against an independent implementation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic by design

mod common;

use common::frames::{client_frame, ClientDeflate, EchoWorker, RawWs};

const MAX: usize = 1536 * 1024;

fn payload(n: usize, text: bool) -> Vec<u8> {
    if text {
        // Multi-byte characters across every boundary, cut to exactly n.
        let s = "aé€😀".repeat(n / 10 + 1);
        let mut v = s.into_bytes();
        v.truncate(n);
        if let Err(e) = std::str::from_utf8(&v) {
            let ok = e.valid_up_to();
            v[ok..].fill(b'x');
        }
        v
    } else {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }
}

/// Sends `data` as one message (in `pieces` frames) and checks the echo.
fn echo(ws: &mut RawWs, data: &[u8], text: bool, pieces: usize) {
    let op = if text { 1 } else { 2 };
    let step = data.len().div_ceil(pieces).max(1);
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(step).collect()
    };
    let mut wire = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let fin = i + 1 == chunks.len();
        wire.extend(client_frame(if i == 0 { op } else { 0 }, fin, false, c));
    }
    ws.send(&wire);
    let f = ws.next_data();
    assert_eq!(f.opcode, op, "echo of {} bytes: wrong opcode", data.len());
    assert!(f.fin && !f.rsv1);
    assert_eq!(f.payload.len(), data.len());
    assert!(f.payload == data, "echo of {} bytes differs", data.len());
}

#[test]
fn echo_at_every_length_boundary_whole_and_fragmented() {
    let w = EchoWorker::start(|s| s.package_max_length = MAX);
    let mut ws = RawWs::connect(w.addr, None);
    for &n in &[0, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20, MAX] {
        for text in [false, true] {
            let data = payload(n, text);
            echo(&mut ws, &data, text, 1);
            echo(&mut ws, &data, text, 3);
        }
    }
    // One byte over package_max_length: refused with 1009.
    ws.send(&client_frame(2, true, false, &vec![0; MAX + 1]));
    assert_eq!(ws.next_data().close_code(), Some(1009));
}

#[test]
fn frames_fed_one_byte_at_a_time() {
    let w = EchoWorker::start(|s| s.package_max_length = MAX);
    let mut ws = RawWs::connect(w.addr, None);
    // A 7-bit, a 16-bit and a 64-bit length, a fragmented message and a
    // ping between its fragments: every header boundary is a read boundary.
    for &n in &[5usize, 300, 70_000] {
        let data = payload(n, false);
        let wire = client_frame(2, true, false, &data);
        let head = 20.min(wire.len());
        for b in &wire[..head] {
            ws.send(std::slice::from_ref(b));
        }
        ws.send(&wire[head..]);
        let f = ws.next_data();
        assert_eq!((f.opcode, f.payload.len()), (2, n));
        assert!(f.payload == data);
    }
    let mut wire = client_frame(1, false, false, b"hello, ");
    wire.extend(client_frame(9, true, false, b"ping"));
    wire.extend(client_frame(0, true, false, "wörld".as_bytes()));
    for b in &wire {
        ws.send(std::slice::from_ref(b));
    }
    let pong = ws.read_frame();
    assert_eq!((pong.opcode, &pong.payload[..]), (10, &b"ping"[..]));
    let f = ws.next_data();
    assert_eq!((f.opcode, &f.payload[..]), (1, "hello, wörld".as_bytes()));
}

const CHAT: &str = r#"{"type":"message","from":"user-1234","to":"room-42","ts":1733097600123,"text":"Meet at the usual place at eight; bring the slides and the demo laptop."}"#;

fn chat(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    while v.len() < n {
        v.extend_from_slice(CHAT.as_bytes());
        v.push(b'\n');
    }
    v.truncate(n);
    v
}

/// Sends `data` compressed (RSV1) and returns the echoed payload inflated.
fn echo_compressed(ws: &mut RawWs, z: &mut ClientDeflate, data: &[u8]) -> (usize, Vec<u8>) {
    let wire = z.compress(data);
    ws.send(&client_frame(1, true, true, &wire));
    let f = ws.next_data();
    assert_eq!(f.opcode, 1, "{:?}", f.close_code());
    if f.rsv1 {
        (f.payload.len(), z.decompress(&f.payload))
    } else {
        (f.payload.len(), f.payload)
    }
}

#[test]
fn compression_negotiated_without_context_takeover() {
    let w = EchoWorker::start(|s| s.websocket_compression = true);
    let mut ws = RawWs::connect(w.addr, Some("permessage-deflate; client_max_window_bits"));
    assert_eq!(
        ws.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let mut z = ClientDeflate::new(true);
    let data = chat(1024);
    let mut sizes = Vec::new();
    for _ in 0..3 {
        let (wire, back) = echo_compressed(&mut ws, &mut z, &data);
        assert_eq!(back, data);
        sizes.push(wire);
    }
    assert!(
        sizes[0] < 1024 / 2,
        "compressed reply of {} bytes",
        sizes[0]
    );
    assert_eq!(sizes[0], sizes[2], "no context: every message alike");
    // Under the threshold (128 B): sent as it is, though the client's was
    // compressed; an uncompressed client message is fine too.
    ws.send(&client_frame(1, true, true, &z.compress(b"hi")));
    let f = ws.next_data();
    assert!(!f.rsv1 && f.payload == b"hi");
    ws.send(&client_frame(2, true, false, &[1, 2, 3]));
    let f = ws.next_data();
    assert!(!f.rsv1 && f.payload == [1, 2, 3]);
    // Fragmented and compressed: RSV1 on the first frame only.
    let wire = z.compress(&data);
    let (a, b) = wire.split_at(wire.len() / 2);
    let mut two = client_frame(1, false, true, a);
    two.extend(client_frame(0, true, false, b));
    ws.send(&two);
    let f = ws.next_data();
    assert!(f.rsv1);
    assert_eq!(z.decompress(&f.payload), data);
}

#[test]
fn compression_with_context_takeover() {
    let w = EchoWorker::start(|s| {
        s.websocket_compression = true;
        s.websocket_compression_context_takeover = true;
    });
    let mut ws = RawWs::connect(w.addr, Some("permessage-deflate"));
    assert_eq!(ws.extensions.as_deref(), Some("permessage-deflate"));
    let mut z = ClientDeflate::new(false);
    let data = chat(1024);
    let (first, back) = echo_compressed(&mut ws, &mut z, &data);
    assert_eq!(back, data);
    let (second, back) = echo_compressed(&mut ws, &mut z, &data);
    assert_eq!(back, data);
    // The server's window holds the first message: the second is a few
    // back-references.
    assert!(second * 4 < first, "first {first} B, second {second} B");

    // A client that asks for no server context takeover gets it.
    let mut ws = RawWs::connect(
        w.addr,
        Some("permessage-deflate; server_no_context_takeover"),
    );
    assert_eq!(
        ws.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover")
    );
    let mut z = ClientDeflate::new(false);
    let (a, _) = echo_compressed(&mut ws, &mut z, &data);
    let (b, back) = echo_compressed(&mut ws, &mut z, &data);
    assert_eq!(back, data);
    assert_eq!(a, b);
}

#[test]
fn compression_not_negotiated() {
    // Off (the default): the offer is ignored and RSV1 is a protocol error.
    let w = EchoWorker::start(|_| {});
    let mut ws = RawWs::connect(w.addr, Some("permessage-deflate"));
    assert_eq!(ws.extensions, None);
    let mut z = ClientDeflate::new(true);
    ws.send(&client_frame(1, true, true, &z.compress(&chat(500))));
    assert_eq!(ws.next_data().close_code(), Some(1002));
    // On, but a client that offers nothing gets nothing.
    let w = EchoWorker::start(|s| s.websocket_compression = true);
    let mut ws = RawWs::connect(w.addr, None);
    assert_eq!(ws.extensions, None);
    let data = chat(1000);
    echo(&mut ws, &data, true, 1);
}

#[test]
fn compression_bomb_is_refused_while_another_client_is_served() {
    let w = EchoWorker::start(|s| {
        s.websocket_compression = true;
        s.package_max_length = 64 * 1024;
    });
    let offer = Some("permessage-deflate");
    let mut good = RawWs::connect(w.addr, offer);
    let mut gz = ClientDeflate::new(true);
    let mut bad = RawWs::connect(w.addr, offer);
    let mut bz = ClientDeflate::new(true);
    // 16 MiB of zeros deflate to about 16 KiB: under the limit on the
    // wire, 256 times over it inflated.
    let bomb = bz.compress(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 64 * 1024);
    bad.send(&client_frame(2, true, true, &bomb));
    let data = chat(2000);
    assert_eq!(echo_compressed(&mut good, &mut gz, &data).1, data);
    assert_eq!(bad.next_data().close_code(), Some(1009));
    assert_eq!(echo_compressed(&mut good, &mut gz, &data).1, data);
}

#[test]
fn compressed_invalid_utf8_is_refused() {
    let w = EchoWorker::start(|s| s.websocket_compression = true);
    let mut ws = RawWs::connect(w.addr, Some("permessage-deflate"));
    let mut z = ClientDeflate::new(true);
    let mut bad = chat(300);
    bad[150] = 0xff;
    ws.send(&client_frame(1, true, true, &z.compress(&bad)));
    assert_eq!(ws.next_data().close_code(), Some(1007));
    // Not deflate at all: 1007 as well.
    let mut ws = RawWs::connect(w.addr, Some("permessage-deflate"));
    ws.send(&client_frame(2, true, true, &[0xff; 40]));
    assert_eq!(ws.next_data().close_code(), Some(1007));
}

/// Node's `ws` client (installed by scripts/setup.sh into tests/node/, the
/// extension offer browsers send) negotiates permessage-deflate with the
/// echo worker and gets every size back byte for byte, in both
/// context-takeover modes.
#[test]
fn a_real_deflate_client_negotiates_and_round_trips() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/ws").exists(),
        "tests/node/node_modules/ws is missing: run scripts/setup.sh"
    );
    for (mode, takeover) in [("no-takeover", false), ("takeover", true)] {
        let w = EchoWorker::start(|s| {
            s.websocket_compression = true;
            s.websocket_compression_context_takeover = takeover;
        });
        let out = std::process::Command::new("node")
            .current_dir(&dir)
            .arg("deflate_echo.mjs")
            .arg(format!("ws://{}/", w.addr))
            .arg(mode)
            .output()
            .expect("node runs (scripts/setup.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "{mode}: {e}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let ext = v["extensions"].as_str().unwrap_or("");
        assert!(
            ext.contains("permessage-deflate"),
            "{mode}: not negotiated: {v}"
        );
        if !takeover {
            assert!(ext.contains("server_no_context_takeover"), "{mode}: {v}");
        }
        let (read, total) = (
            v["bytesRead"].as_u64().unwrap(),
            v["total"].as_u64().unwrap(),
        );
        assert!(
            read < total / 2,
            "{mode}: the echoes were not compressed: {v}"
        );
        let results = v["results"].as_array().expect("results");
        assert_eq!(results.len(), 7, "{mode}: {v}");
        assert!(results.iter().all(|r| r["ok"] == true), "{mode}: {v}");
    }
}
