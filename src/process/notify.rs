//! systemd's readiness protocol (`sd_notify(3)`) without libsystemd: one
//! datagram to the Unix socket named by `$NOTIFY_SOCKET`.
//!
//! This module owns the master's messages to the service manager:
//! [`ready`] once the server serves (and again when a reload finished),
//! [`reloading`] when a SIGUSR1 reload begins, [`stopping`] when a stop
//! begins. When `NOTIFY_SOCKET` is unset (not started by systemd with
//! `Type=notify`, or `start -d`) every call does nothing. A socket path
//! starting with `@` is in Linux's abstract namespace. Failures are logged
//! at debug and otherwise ignored: a server must not stop serving because
//! its supervisor went away.
//!
//! Only the master calls these: its pid is the unit's main pid, and the
//! unit runs `swocloud start` in the foreground (systemd expects a
//! `Type=notify` service not to fork away).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd the service serves (start-up done, or a reload done).
pub fn ready() {
    notify(&format!("READY=1\nMAINPID={}", std::process::id()));
}

/// Tells systemd a reload began; [`ready`] ends it.
pub fn reloading() {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// Tells systemd a stop began.
pub fn stopping() {
    notify("STOPPING=1");
}

/// Sends `state` to `$NOTIFY_SOCKET` if it is set.
fn notify(state: &str) {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    let Some(path) = path.to_str() else {
        log::debug!("sd_notify: NOTIFY_SOCKET is not UTF-8; ignored");
        return;
    };
    match send(path, state) {
        Ok(()) => log::debug!("sd_notify: {}", state.replace('\n', " ")),
        Err(e) => log::debug!("sd_notify to {path}: {e}"),
    }
}

/// Sends one datagram `state` to the socket `path` (`@name`: abstract
/// namespace). The caller decides what a failure means.
pub fn send(path: &str, state: &str) -> io::Result<()> {
    let addr = address(path)?;
    let sock = UnixDatagram::unbound()?;
    let n = sock.send_to_addr(state.as_bytes(), &addr)?;
    if n != state.len() {
        return Err(io::Error::other(format!(
            "short write ({n} of {} bytes)",
            state.len()
        )));
    }
    Ok(())
}

/// Parses a `NOTIFY_SOCKET` value into a socket address.
fn address(path: &str) -> io::Result<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if path.starts_with('/') {
        SocketAddr::from_pathname(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {path:?} is neither an absolute path nor @abstract"),
        ))
    }
}

/// CLOCK_MONOTONIC in microseconds (what systemd ≥ 253 wants beside
/// `RELOADING=1`).
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("swocloud-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        send(&format!("@{name}"), "STOPPING=1").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn refuses_relative_paths_and_reports_missing_sockets() {
        assert!(send("relative.sock", "READY=1").is_err());
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.sock");
        assert!(send(gone.to_str().unwrap(), "READY=1").is_err());
    }
}
