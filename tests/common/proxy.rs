//! A TCP proxy that tests put in front of a private Redis to make it slow
//! or silent: [`FaultProxy`] forwards both ways, and can hold every chunk
//! the client sends for a set time before Redis sees it, so every reply
//! comes that much later (order kept, so pipelining still works: a 300 ms
//! delay is latency, not a 300 ms-per-reply throughput cap; and a Redis
//! killed meanwhile never answered what was held), or
//! black-hole the traffic of every connection it holds (accepts, reads,
//! never answers). Modes change at run time and apply to connections
//! already open.

#![allow(dead_code)]
// A test tool: a proxy that cannot bind is a failed test or benchmark.
#![allow(clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Hold every client→server chunk this long.
    Delay(Duration),
    /// Forward nothing either way (connections stay open).
    BlackHole,
}

#[derive(Default)]
struct Shared {
    delay_ms: AtomicU64,    // client→server delay
    black_hole: AtomicBool, // swallow everything
    stop: AtomicBool,       // the proxy is dropped
    accepted: AtomicU64,    // connections accepted so far
}

/// A proxy on a free 127.0.0.1 port in front of `upstream`.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Starts forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                sh.accepted.fetch_add(1, SeqCst);
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                pipe(&client, &server, sh.clone(), true);
                pipe(&server, &client, sh.clone(), false);
            }
        });
        FaultProxy { addr, shared }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Connections accepted so far (a reconnect shows as one more).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(SeqCst)
    }

    /// Changes what the proxy does, for open and new connections.
    pub fn set(&self, mode: Mode) {
        let (ms, hole) = match mode {
            Mode::Pass => (0, false),
            Mode::Delay(d) => (d.as_millis() as u64, false),
            Mode::BlackHole => (0, true),
        };
        self.shared.delay_ms.store(ms, SeqCst);
        self.shared.black_hole.store(hole, SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// Copies `from` → `to` on two threads: a reader that stamps each chunk
/// with its due time, and a writer that waits until then.
fn pipe(from: &TcpStream, to: &TcpStream, sh: Arc<Shared>, delayed: bool) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let sh2 = sh.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sh2.stop.load(SeqCst) {
                        return;
                    }
                    if sh2.black_hole.load(SeqCst) {
                        continue;
                    }
                    let delay = if delayed {
                        sh2.delay_ms.load(SeqCst)
                    } else {
                        0
                    };
                    let due = Instant::now() + Duration::from_millis(delay);
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if sh.black_hole.load(SeqCst) {
                continue;
            }
            if to.write_all(&bytes).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
