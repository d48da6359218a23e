//! The reactor over real sockets on 127.0.0.1, part one (WebSocket and
//! HTTP; timers, workers, tasks and the outbound client are in
//! `reactor_workers.rs`): reactors run in-process on threads (stopped with
//! a `StopHandle`), clients are tungstenite's blocking client or raw TCP
//! when the test needs to send malformed bytes.
//!
//! Polling, ports and the private Redis come from `tests/common`; the
//! in-process worker, raw frames and the test application are the
//! reactor tests' own kit, `tests/common/reactor_kit.rs`.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "common/reactor_kit.rs"]
mod kit;

use kit::*;

// ---- WebSocket ------------------------------------------------------------

#[test]
fn echoes_text_binary_and_large_messages() {
    let (w, _) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/");
    c.send(WsMsg::text("hello")).unwrap();
    assert_eq!(next(&mut c), WsMsg::text("hello"));
    c.send(WsMsg::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(next(&mut c), WsMsg::binary(vec![1u8, 2, 3]));
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    c.send(WsMsg::binary(big.clone())).unwrap();
    assert_eq!(next(&mut c), WsMsg::binary(big));
    assert!(w.row.messages_in.load(Ordering::Relaxed) >= 3);
}

#[test]
fn reassembles_fragmented_messages_around_a_ping() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, false, b"frag", true)).unwrap();
    s.write_all(&frame(0x9, true, b"p", true)).unwrap();
    s.write_all(&frame(0x0, false, b"men", true)).unwrap();
    s.write_all(&frame(0x0, true, b"ted", true)).unwrap();
    assert_eq!(
        read_frame(&mut s),
        (0xA, b"p".to_vec()),
        "pong first, with the ping's payload"
    );
    assert_eq!(read_frame(&mut s), (0x1, b"fragmented".to_vec()));
}

#[test]
fn ping_gets_pong() {
    let (w, _) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/");
    c.send(WsMsg::Ping(b"abc".to_vec().into())).unwrap();
    match c.read().unwrap() {
        WsMsg::Pong(p) => assert_eq!(&p[..], b"abc"),
        m => panic!("expected a pong, got {m:?}"),
    }
}

#[test]
fn close_handshake_completes_and_on_close_runs() {
    let (w, seen) = echo(settings(|_| {}));
    let mut c = ws(w.addr(), "/");
    c.close(None).unwrap();
    let mut saw_close = false;
    loop {
        match c.read() {
            Ok(WsMsg::Close(_)) => saw_close = true,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(saw_close, "the server echoed the close frame");
    wait_until(WAIT, "on_close", || seen.closed.load(Ordering::SeqCst) == 1);
    wait_until(WAIT, "connection count 0", || {
        w.row.connections.load(Ordering::Relaxed) == 0
    });
}

#[test]
fn unmasked_client_frame_gets_1002() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, b"plain", false)).unwrap();
    expect_close(&mut s, 1002);
    assert_serves(w.addr());
}

#[test]
fn reserved_opcode_and_bad_utf8_get_1002_and_1007() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x3, true, b"x", true)).unwrap();
    expect_close(&mut s, 1002);
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, &[0xc3, 0x28], true)).unwrap();
    expect_close(&mut s, 1007);
    assert_serves(w.addr());
}

#[test]
fn frame_over_package_max_length_gets_1009() {
    let (w, _) = echo(settings(|s| s.package_max_length = 4096));
    let mut s = raw_ws(w.addr());
    // Only the header is needed: the size is refused before the payload.
    let f = frame(0x2, true, &vec![0u8; 10_000], true);
    s.write_all(&f[..14]).unwrap();
    expect_close(&mut s, 1009);
    assert_serves(w.addr());
}

#[test]
fn panic_in_on_message_closes_only_that_connection() {
    let (w, _) = echo(settings(|_| {}));
    let mut other = ws(w.addr(), "/");
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, b"panic", true)).unwrap();
    expect_close(&mut s, 1011);
    other.send(WsMsg::text("alive")).unwrap();
    assert_eq!(next(&mut other), WsMsg::text("alive"));
    assert_serves(w.addr());
}

#[test]
fn oversize_output_to_a_non_reading_client_disconnects_it() {
    let (w, seen) = echo(settings(|s| s.buffer_output_size = 256 * 1024));
    let mut s = raw_ws(w.addr());
    s.write_all(&frame(0x1, true, b"flood:64", true)).unwrap();
    wait_until(WAIT, "the slow reader to be cut", || {
        seen.closed.load(Ordering::SeqCst) == 1
    });
    assert_eq!(
        seen.push_refused.load(Ordering::SeqCst),
        1,
        "push reported the cut"
    );
    assert_serves(w.addr());
}

// ---- HTTP -----------------------------------------------------------------

#[test]
fn http_keep_alive_serves_several_requests_on_one_connection() {
    let (w, _) = echo(settings(|_| {}));
    let mut s = raw(w.addr());
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s), (200, "hello".into()));
    }
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        .unwrap();
    assert_eq!(read_response(&mut s), (200, "body".into()));
    assert_eq!(w.row.accepted.load(Ordering::Relaxed), 1);
    assert_eq!(w.row.requests.load(Ordering::Relaxed), 4);
}

#[test]
fn garbage_gets_400_and_close() {
    let (w, _) = echo(settings(|_| {}));
    let resp = http_once(w.addr(), b"\x16\x03\x01 garbage garbage\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_serves(w.addr());
}

#[test]
fn oversize_body_and_headers_are_refused() {
    let (w, _) = echo(settings(|s| s.package_max_length = 2048));
    let resp = http_once(
        w.addr(),
        b"POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    let many: String = (0..80).map(|i| format!("X-{i}: v\r\n")).collect();
    let resp = http_once(w.addr(), format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_serves(w.addr());
}

#[test]
fn bad_upgrades_get_400() {
    let (w, _) = echo(settings(|_| {}));
    let bad_key = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n";
    let resp = http_once(w.addr(), bad_key);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let no_version = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let resp = http_once(w.addr(), no_version);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_serves(w.addr());
}

#[test]
fn unfinished_handshake_is_closed_after_handshake_timeout() {
    let (w, _) = echo(settings(|s| s.handshake_timeout = 0.3));
    let mut s = raw(w.addr());
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out); // EOF or reset once the server gives up
    let took = t0.elapsed();
    assert!(out.is_empty());
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert_serves(w.addr());
}

#[test]
fn past_max_conn_new_connections_get_503() {
    let (w, _) = echo(settings(|s| s.max_conn = 2));
    let a = ws(w.addr(), "/");
    let mut b = ws(w.addr(), "/");
    let resp = http_once(w.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    drop(a);
    b.send(WsMsg::text("b")).unwrap();
    assert_eq!(next(&mut b), WsMsg::text("b"));
    drop(b);
    wait_until(WAIT, "both closed", || {
        w.row.connections.load(Ordering::Relaxed) == 0
    });
    assert_serves(w.addr());
}
