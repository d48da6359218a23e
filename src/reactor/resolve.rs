//! [`Resolver`]: a host name turned into addresses without blocking the
//! loop. An IP literal is parsed on the spot. A name is resolved once at
//! start (before the loop serves) and then re-resolved every
//! [`REFRESH`] on a small helper thread, so a Redis or Route that comes
//! back on a new address is dialled there (the failure centrifugo#735
//! describes), and a slow DNS server can never stall a worker.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a host name is looked up again.
pub const REFRESH: Duration = Duration::from_secs(10);

/// Addresses for one `host:port`, kept current off the loop.
#[derive(Debug, Clone)]
pub struct Resolver {
    host: String,                       // as configured
    port: u16,                          // as configured
    addrs: Arc<Mutex<Vec<SocketAddr>>>, // latest lookup
}

impl Resolver {
    /// Addresses for `host:port`. A name is looked up now (once) and then
    /// by a background thread.
    pub fn new(host: &str, port: u16) -> Resolver {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Resolver {
                addrs: Arc::new(Mutex::new(vec![SocketAddr::new(ip, port)])),
                host,
                port,
            };
        }
        let addrs = Arc::new(Mutex::new(lookup(&host, port)));
        let r = Resolver {
            host: host.clone(),
            port,
            addrs: addrs.clone(),
        };
        let weak = Arc::downgrade(&addrs);
        let spawned = std::thread::Builder::new()
            .name(format!("resolve {host}"))
            .spawn(move || loop {
                std::thread::sleep(REFRESH);
                let found = lookup(&host, port);
                let Some(slot) = weak.upgrade() else { return };
                if !found.is_empty() {
                    if let Ok(mut g) = slot.lock() {
                        *g = found;
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("resolver for {}: no refresh thread: {e}", r.describe());
        }
        r
    }

    /// The latest addresses (empty while a name has not resolved).
    pub fn current(&self) -> Vec<SocketAddr> {
        self.addrs.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// `host:port`, for logs.
    pub fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn lookup(host: &str, port: u16) -> Vec<SocketAddr> {
    match (host, port).to_socket_addrs() {
        Ok(it) => it.collect(),
        Err(e) => {
            log::warn!("resolving {host}:{port}: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_need_no_lookup() {
        let r = Resolver::new("127.0.0.3", 6380);
        assert_eq!(r.current(), vec!["127.0.0.3:6380".parse().unwrap()]);
        let r = Resolver::new("[::1]", 7);
        assert_eq!(r.current(), vec!["[::1]:7".parse().unwrap()]);
    }

    #[test]
    fn localhost_resolves() {
        let r = Resolver::new("localhost", 6379);
        assert!(r.current().iter().any(|a| a.ip().is_loopback()));
    }
}
