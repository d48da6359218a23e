//! Helpers for the frame-path tests (`tests/frames.rs`): an echo reactor
//! run in-process on a thread over a real loopback listener
//! ([`EchoWorker`]), and a raw WebSocket client over `TcpStream`
//! ([`RawWs`]) that can send any frame (fragmented, RSV1, one byte at a
//! time) and does permessage-deflate itself with flate2, since
//! tungstenite's client has no deflate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use swocloud::config::Settings;
use swocloud::event::App;
use swocloud::reactor::{Fd, Message, Server};

/// How long a test waits for a frame or for the worker to start.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

/// Echoes every message back.
pub struct Echo;

impl App for Echo {
    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        srv.push(fd, msg);
    }
}

/// A one-worker echo reactor on a thread ([`super::inproc::InProc`]);
/// stopped on drop.
pub struct EchoWorker {
    /// Where it listens.
    pub addr: SocketAddr,
    _worker: super::inproc::InProc,
}

impl EchoWorker {
    /// Starts one with the default settings changed by `f`; returns once it
    /// serves (its readiness callback ran).
    pub fn start(f: impl FnOnce(&mut Settings)) -> EchoWorker {
        let mut s = Settings::default();
        f(&mut s);
        let w = super::inproc::InProc::start(s, || Echo);
        EchoWorker {
            addr: w.addr(),
            _worker: w,
        }
    }
}

/// One frame as the server sent it.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A client frame: masked with a fixed key, RSV1 as given.
pub fn client_frame(opcode: u8, fin: bool, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![opcode | if fin { 0x80 } else { 0 } | if rsv1 { 0x40 } else { 0 }];
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
    let key = [0x5a, 0xc3, 0x19, 0xe7];
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// A raw client connection after the upgrade.
pub struct RawWs {
    pub stream: TcpStream,
    /// The server's `Sec-WebSocket-Extensions`, if it sent one.
    pub extensions: Option<String>,
}

impl RawWs {
    /// Connects and upgrades, offering `extensions` if given.
    pub fn connect(addr: SocketAddr, extensions: Option<&str>) -> RawWs {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(FRAME_WAIT)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let ext = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{ext}\r\n"
        );
        s.write_all(req.as_bytes()).expect("send upgrade");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("read 101 head");
            head.push(b[0]);
        }
        let head = String::from_utf8(head).expect("ASCII head");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| v.trim().to_string())
        });
        RawWs {
            stream: s,
            extensions,
        }
    }

    /// Writes bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one frame.
    pub fn read_frame(&mut self) -> Frame {
        let s = &mut self.stream;
        let mut h = [0u8; 2];
        s.read_exact(&mut h).expect("frame header");
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).expect("length");
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).expect("length");
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).expect("payload");
        Frame {
            fin: h[0] & 0x80 != 0,
            rsv1: h[0] & 0x40 != 0,
            opcode: h[0] & 0x0f,
            payload,
        }
    }

    /// Reads frames until a data frame or a close frame.
    pub fn next_data(&mut self) -> Frame {
        loop {
            let f = self.read_frame();
            if f.opcode != 9 && f.opcode != 10 {
                return f;
            }
        }
    }
}

/// The client half of permessage-deflate, written with flate2 directly.
pub struct ClientDeflate {
    tx: Compress,
    rx: Decompress,
    /// Reset both after every message (no context takeover).
    pub reset: bool,
}

impl ClientDeflate {
    pub fn new(reset: bool) -> ClientDeflate {
        ClientDeflate {
            tx: Compress::new(Compression::new(6), false),
            rx: Decompress::new(false),
            reset,
        }
    }

    /// One message compressed with a sync flush, the 00 00 ff ff removed.
    pub fn compress(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        let start = self.tx.total_in();
        loop {
            let used = (self.tx.total_in() - start) as usize;
            out.reserve(4096);
            self.tx
                .compress_vec(&data[used..], &mut out, FlushCompress::Sync)
                .expect("deflate");
            if (self.tx.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
                break;
            }
        }
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        if self.reset {
            self.tx.reset();
        }
        out
    }

    /// Inflates one message from the server.
    pub fn decompress(&mut self, data: &[u8]) -> Vec<u8> {
        let mut input = data.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(data.len() * 4 + 64);
        let start = self.rx.total_in();
        loop {
            let used = (self.rx.total_in() - start) as usize;
            out.reserve(64 * 1024);
            self.rx
                .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
                .expect("inflate");
            if (self.rx.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                break;
            }
        }
        if self.reset {
            self.rx.reset(false);
        }
        out
    }
}
