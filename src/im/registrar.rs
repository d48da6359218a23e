//! The IM server's link to the Route (the seed's `StareListen`), held by
//! worker 0: a listener on `workerStart` dials the Route over WebSocket,
//! registers, then reports its load every `route_heartbeat` seconds. When
//! the Route goes away it redials with exponential backoff and jitter and
//! registers again, so a Route restart heals by itself. Messages other
//! workers forward to the Route queue here (bounded) while the link is down.

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::Value;

use crate::auth;
use crate::cluster::link::{ImFrame, Registration};
use crate::im::app::{ImApp, ATTR_ROUTE_LINK, ATTR_ROUTE_REGISTERED, USERS};
use crate::reactor::{Fd, Message, Server};

/// First redial delay.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest redial delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Forwards kept while the Route is unreachable; older ones are dropped
/// (and counted) past this.
const MAX_QUEUED: usize = 10_000;
/// How often a worker still adopting checks whether the Route link came
/// with the connections (before dialling one of its own).
const ADOPT_POLL_MS: u64 = 50;
/// Lifetime of the registration tokens this server mints for itself.
const REGISTER_TOKEN_TTL: u64 = 3600;

/// The Route link's state.
#[derive(Debug, Default)]
pub struct Registrar {
    /// The connection to the Route, once dialled.
    pub fd: Option<Fd>,
    /// Whether the Route acknowledged the registration.
    pub registered: bool,
    /// Failed dials in a row.
    attempts: u32,
    /// Frames waiting for the link.
    queue: VecDeque<String>,
    /// Forwards dropped because the queue was full.
    pub dropped: u64,
    /// xorshift state for the jitter.
    rng: u64,
    /// The server is draining: tell the Route once registered.
    pub draining: bool,
}

/// `ws://host:port/path` → (address, host header, path).
pub fn parse_ws_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("route_url {url:?} must start with ws://"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("route_url {url:?}: cannot resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("route_url {url:?}: {hostport} has no address"))?;
    Ok((addr, hostport.to_string(), path))
}

impl Registrar {
    fn jitter(&mut self) -> f64 {
        if self.rng == 0 {
            self.rng = u64::from(std::process::id()) << 32
                | crate::process::scoreboard::now_ms() & 0xffff_ffff
                | 1;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        0.5 + (self.rng % 1000) as f64 / 2000.0
    }

    /// The next redial delay: exponential, capped, with 50–100 % jitter.
    fn next_delay(&mut self) -> Duration {
        let base = BACKOFF_START
            .saturating_mul(1 << self.attempts.min(8))
            .min(BACKOFF_MAX);
        self.attempts += 1;
        base.mul_f64(self.jitter())
    }
}

impl ImApp {
    /// Dials the Route (worker 0). On failure, schedules a redial.
    pub(crate) fn dial_route(&mut self, srv: &mut Server<Self>) {
        if srv.is_stopping() || self.registrar.fd.is_some() {
            return;
        }
        if srv.is_adopting() {
            // The predecessor's Route link may be on its way here.
            srv.after(ADOPT_POLL_MS, |app: &mut ImApp, srv, _| app.dial_route(srv));
            return;
        }
        let dialled = parse_ws_url(&self.cfg.route_url).and_then(|(addr, host, path)| {
            srv.ws_connect(addr, &host, &path)
                .map_err(|e| e.to_string())
        });
        match dialled {
            Ok(fd) => {
                self.registrar.fd = Some(fd);
                srv.set_attr(fd, ATTR_ROUTE_LINK, Value::Bool(true));
            }
            Err(e) => {
                log::warn!("im: cannot dial the Route at {}: {e}", self.cfg.route_url);
                self.schedule_redial(srv);
            }
        }
    }

    pub(crate) fn schedule_redial(&mut self, srv: &mut Server<Self>) {
        let delay = self.registrar.next_delay();
        log::info!("im: redialling the Route in {} ms", delay.as_millis());
        srv.after(delay.as_millis() as u64, |app: &mut ImApp, srv, _| {
            app.dial_route(srv)
        });
    }

    /// The Route link is up: register (the seed's frame, plus token, load
    /// and epoch).
    pub(crate) fn route_connected(&mut self, srv: &mut Server<Self>, fd: Fd) {
        let token = (!self.cfg.auth_secret.is_empty()).then(|| {
            auth::mint(
                self.cfg.auth_secret.as_bytes(),
                &self.cfg.service_name,
                "register",
                REGISTER_TOKEN_TTL,
            )
        });
        let reg = ImFrame::Register(Registration {
            service_name: self.cfg.service_name.clone(),
            ip: self.advertise_ip.clone(),
            port: self.advertise_port,
            token,
            load: Some(self.load(srv)),
            epoch: Some(self.epoch.clone()),
        });
        srv.push(fd, Message::Text(reg.to_text()));
        log::info!(
            "im: connected to the Route at {}; registering as {}",
            self.cfg.route_url,
            self.cfg.service_name
        );
    }

    /// The Route acknowledged: reset the backoff, flush what waited.
    pub(crate) fn route_registered(&mut self, srv: &mut Server<Self>) {
        self.registrar.registered = true;
        if let Some(fd) = self.registrar.fd {
            srv.set_attr(fd, ATTR_ROUTE_REGISTERED, Value::Bool(true));
        }
        self.registrar.attempts = 0;
        log::info!(
            "im: registered with the Route as {} (epoch {})",
            self.cfg.service_name,
            self.epoch
        );
        if self.registrar.draining {
            self.send_to_route(srv, ImFrame::Draining.to_text());
        }
        if let Some(fd) = self.registrar.fd {
            while let Some(frame) = self.registrar.queue.pop_front() {
                srv.push(fd, Message::Text(frame));
            }
        }
    }

    /// The Route link closed: forget it and redial.
    pub(crate) fn route_closed(&mut self, srv: &mut Server<Self>) {
        self.registrar.fd = None;
        if std::mem::take(&mut self.registrar.registered) {
            log::warn!("im: lost the Route connection");
        }
        if !srv.is_stopping() {
            self.schedule_redial(srv);
        }
    }

    /// Sends a frame to the Route now, or queues it until the link is back.
    pub(crate) fn send_to_route(&mut self, srv: &mut Server<Self>, frame: String) {
        match self.registrar.fd.filter(|_| self.registrar.registered) {
            Some(fd) if srv.push(fd, Message::Text(frame.clone())) => {}
            _ => {
                if self.registrar.queue.len() >= MAX_QUEUED {
                    self.registrar.queue.pop_front();
                    self.registrar.dropped += 1;
                }
                self.registrar.queue.push_back(frame);
            }
        }
    }

    /// The heartbeat: a load report every `route_heartbeat` seconds.
    pub(crate) fn heartbeat(&mut self, srv: &mut Server<Self>) {
        if let (Some(fd), true) = (self.registrar.fd, self.registrar.registered) {
            let load = self.load(srv);
            srv.push(
                fd,
                Message::Text(ImFrame::Heartbeat { load: Some(load) }.to_text()),
            );
        }
    }

    /// Users connected to this server, over all its workers.
    pub(crate) fn load(&self, srv: &Server<Self>) -> u64 {
        let sb = srv.scoreboard();
        sb.snapshot()
            .iter()
            .filter(|r| r.role == "worker")
            .map(|r| sb.row(r.index).app[USERS].load(Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_backoff() {
        let (addr, host, path) = parse_ws_url("ws://127.0.0.1:9500/").unwrap();
        assert_eq!(
            (addr.port(), host.as_str(), path.as_str()),
            (9500, "127.0.0.1:9500", "/")
        );
        assert_eq!(parse_ws_url("ws://127.0.0.1:9500").unwrap().2, "/");
        assert!(parse_ws_url("http://x").is_err());
        let mut r = Registrar::default();
        let delays: Vec<Duration> = (0..12).map(|_| r.next_delay()).collect();
        assert!(delays[0] <= BACKOFF_START && delays[0] >= BACKOFF_START / 2);
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(delays[11] >= BACKOFF_MAX / 2, "capped growth: {delays:?}");
    }
}
