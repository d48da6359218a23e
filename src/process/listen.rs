//! The listening sockets: one `SO_REUSEPORT` socket per worker slot.
//!
//! The master binds them before anything forks, so "port in use" is found
//! (and reported) before the daemon detaches, and each slot's accept queue
//! outlives any one worker process: a respawned or reloaded worker inherits
//! its slot's socket, and connections that queued while the slot changed
//! hands are accepted by the successor instead of being reset by the kernel
//! (which is what happens to the queue of a closed reuseport socket).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};

/// Accept backlog per slot.
const BACKLOG: i32 = 4096;

fn new_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(io::Error::from)
}

/// Binds `count` reuseport listeners on `addr`. Fails with a clear message
/// when anything else (another server, or a swocloud already running)
/// holds the port. Port 0 picks a free port shared by all slots.
pub fn bind_slots(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    let ctx = |what: &str, e: nix::Error| {
        io::Error::new(io::Error::from(e).kind(), format!("{what} {addr}: {e}"))
    };
    // Probe without SO_REUSEPORT: fails if any socket already listens there.
    let probe = new_socket(addr)?;
    socket::setsockopt(&probe, sockopt::ReuseAddr, &true).map_err(|e| ctx("SO_REUSEADDR on", e))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&probe),
        &SockaddrStorage::from(addr),
    )
    .map_err(|e| match e {
        nix::Error::EADDRINUSE => io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("cannot listen on {addr}: address already in use"),
        ),
        e => ctx("cannot bind", e),
    })?;
    let mut addr = addr;
    if addr.port() == 0 {
        let local: SockaddrStorage = socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&probe))
            .map_err(|e| ctx("getsockname", e))?;
        let port = local
            .as_sockaddr_in()
            .map(|a| a.port())
            .or_else(|| local.as_sockaddr_in6().map(|a| a.port()))
            .unwrap_or(0);
        addr.set_port(port);
    }
    drop(probe);
    (0..count)
        .map(|_| {
            let fd = new_socket(addr)?;
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true)
                .map_err(|e| ctx("SO_REUSEADDR on", e))?;
            socket::setsockopt(&fd, sockopt::ReusePort, &true)
                .map_err(|e| ctx("SO_REUSEPORT on", e))?;
            socket::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(addr),
            )
            .map_err(|e| ctx("cannot bind", e))?;
            socket::listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))
                .map_err(|e| ctx("cannot listen on", e))?;
            Ok(TcpListener::from(fd))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_share_a_port_and_a_second_server_is_refused() {
        let slots = super::bind_slots("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = slots[0].local_addr().unwrap().port();
        assert!(slots.iter().all(|l| l.local_addr().unwrap().port() == port));
        let err = super::bind_slots(format!("127.0.0.1:{port}").parse().unwrap(), 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("already in use"), "{err}");
    }
}
