//! Accepting when the process is out of file descriptors: connections that
//! queue while `accept` fails with `EMFILE` are accepted once fds free up
//! (nginx's back-off), even though no new connection raises a new edge on
//! the listener. This binary holds one test only, because it lowers the
//! whole process's `RLIMIT_NOFILE` and fills its fd table.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic by design

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use socket2::{Domain, Socket, Type};
use swocloud::config::Settings;
use swocloud::event::App;
use swocloud::reactor::{Request, Response, Server};

/// Clients that connect while the fd table is full.
const CLIENTS: usize = 4;

struct Hello;

impl App for Hello {
    fn on_request(&mut self, _srv: &mut Server<Self>, _req: &Request) -> Response {
        Response::text(200, "hello\n")
    }
}

/// The highest fd this process has open.
fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap()
}

#[test]
fn connections_queued_during_emfile_are_accepted_once_fds_free_up() {
    let w = common::inproc::InProc::start(Settings::default(), || Hello);
    let (addr, row) = (w.addr(), w.row);

    // The clients' sockets exist before the fd table fills; connecting
    // them needs no new fd.
    let socks: Vec<Socket> = (0..CLIENTS)
        .map(|_| Socket::new(Domain::IPV4, Type::STREAM, None).unwrap())
        .collect();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, highest_fd() + 1, hard).unwrap();
    let mut filler = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        filler.push(f);
        assert!(filler.len() < 100_000, "the fd limit did not take");
    }
    for s in &socks {
        s.connect(&addr.into()).unwrap(); // completes in the kernel's queue
    }
    // The worker is woken for each, fails to accept (EMFILE) and backs off.
    std::thread::sleep(Duration::from_millis(300));
    let accepted_while_full = row.accepted.load(Relaxed);

    drop(filler);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert_eq!(
        accepted_while_full, 0,
        "nothing can be accepted without fds"
    );

    // No new connection arrives, so no new edge: only the back-off's retry
    // can take the queued ones.
    for s in socks {
        let mut c: TcpStream = s.into();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out)
            .expect("a connection queued during EMFILE was served");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("hello\n"), "{out}");
    }
    assert_eq!(row.accepted.load(Relaxed), CLIENTS as u64);
    w.stop();
    w.join();
}
