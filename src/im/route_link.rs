//! The IM server's link to the Route (the seed's `StareListen`), held by
//! worker 0: a listener on `workerStart` dials the Route over WebSocket,
//! registers, then reports its load every `route_heartbeat` seconds. When
//! the Route goes away it redials with exponential backoff and jitter and
//! registers again, so a Route restart heals by itself. Messages other
//! workers forward to the Route queue here (bounded) while the link is down.
//!
//! **Several Route nodes** (`route_urls`): the link is to one node at a
//! time. Every heartbeat also sends a WebSocket ping; a link that brought
//! nothing (not even the pong) for `route_timeout` is given up. A link
//! that closes, is given up, or cannot be dialled moves the link to the
//! next URL of the list (cyclically), after the usual backoff delay (the
//! backoff is reset by each acknowledged registration, so the first
//! failover dial waits 50–100 ms). The link stays where it landed: a node
//! earlier in the list that comes back is used again only when the link
//! fails over again, never by a switch back (no flapping). Any node takes
//! any IM server: they share the registry in Redis, and a registration
//! replaces the entry the dead node held.
//!
//! [`RouteLink`] is the mechanism (dial, register, queue, redial delays);
//! the app owns the timers: a method that wants to run again later returns
//! the delay, and the app schedules it. The link makes no Redis call.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::auth;
use crate::backoff::Backoff;
use crate::cluster::link::{Addressed, ImFrame, Registration};
use crate::event::App;
use crate::im::settings::{ImSettings, DEFAULT_ROUTE_URL};
use crate::im::stats;
use crate::process::scoreboard::now_ms;
use crate::reactor::resolve::Resolver;
use crate::reactor::{Fd, Message, Server};

/// Connection attribute on the Route link: true.
const ATTR_ROUTE_LINK: &str = "im.route_link";
/// Connection attribute on the Route link: the Route acknowledged us.
const ATTR_ROUTE_REGISTERED: &str = "im.route_registered";
/// Connection attribute on the Route link: the URL it was dialled at (so
/// the worker adopting it knows where in `route_urls` it is).
const ATTR_ROUTE_URL: &str = "im.route_url";

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

/// Who this IM server says it is when it registers.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `serviceName`.
    pub service_name: String,
    /// Advertised IP.
    pub ip: String,
    /// Advertised port.
    pub port: u16,
    /// Instance epoch.
    pub epoch: String,
}

/// Worker 0's link to the Route.
#[derive(Debug)]
pub struct RouteLink {
    /// The Route nodes' `ws://` URLs, in order (never empty).
    urls: Vec<String>,
    /// Index in `urls` of the node dialled now (or next).
    current: usize,
    /// How long the open link may bring nothing before it is given up.
    silence: Duration,
    /// Mints registration tokens when not empty.
    auth_secret: String,
    identity: Identity,
    /// The connection to the Route, once dialled.
    fd: Option<Fd>,
    /// Whether that connection's WebSocket is open (`on_connect` came, or
    /// it was adopted).
    open: bool,
    /// When the last registered link was lost (for the failover's log line).
    lost_at: Option<Instant>,
    /// Whether the Route acknowledged the registration.
    registered: bool,
    /// Redial delay (exponential, capped, jittered).
    backoff: Backoff,
    /// Frames waiting for the link.
    queue: VecDeque<String>,
    /// Forwards dropped because the queue was full.
    dropped: u64,
    /// The server is draining: tell the Route once registered.
    draining: bool,
    /// Where each node is (made at its first dial, in the worker).
    targets: Vec<Option<Target>>,
}

/// Where the Route is: its address (kept current off the loop), the
/// `Host` header and the path.
#[derive(Debug, Clone)]
pub struct Target {
    /// The host's addresses.
    pub resolver: Resolver,
    /// `host:port`, for the `Host` header.
    pub host: String,
    /// Request path.
    pub path: String,
}

/// `ws://host:port/path` → a [`Target`]. An IP literal needs no lookup; a
/// name is looked up once here and then by the resolver's own thread, so
/// call it in the worker (after the fork), never in the loop's hot path.
pub fn parse_ws_url(url: &str) -> Result<Target, String> {
    let (host, port, hostport, path) = split_ws_url(url)?;
    Ok(Target {
        resolver: Resolver::new(host, port),
        host: hostport.to_string(),
        path,
    })
}

/// Checks a Route URL (`route_url`, each of `route_urls`) without looking
/// anything up (what the master does before it forks: no thread, no DNS).
pub fn check_ws_url(url: &str) -> Result<(), String> {
    split_ws_url(url).map(drop)
}

/// `ws://host:port/path` → (host, port, `host:port`, path).
fn split_ws_url(url: &str) -> Result<(&str, u16, &str, String), String> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| {
        format!("Route URL {url:?} (route_url, route_urls) must start with ws://")
    })?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("Route URL {url:?} (route_url, route_urls): expected host:port"))?;
    Ok((host, port, hostport, path))
}

impl RouteLink {
    /// The next redial delay: exponential, capped, with 50–100 % jitter.
    fn next_delay(&mut self) -> Duration {
        self.backoff.next()
    }

    /// The link for these settings (checked by [`ImSettings::validate`]
    /// in the master) and this identity.
    pub fn new(cfg: &ImSettings, identity: Identity) -> RouteLink {
        let urls = cfg
            .route_list()
            .unwrap_or_else(|_| vec![DEFAULT_ROUTE_URL.to_string()]);
        RouteLink {
            targets: vec![None; urls.len()],
            urls,
            current: 0,
            silence: cfg.route_silence(),
            auth_secret: cfg.auth_secret.clone(),
            identity,
            backoff: Backoff::new(BACKOFF_START, BACKOFF_MAX).with_jitter(),
            fd: None,
            open: false,
            lost_at: None,
            registered: false,
            queue: VecDeque::new(),
            dropped: 0,
            draining: false,
        }
    }

    /// The URL of the node dialled now (or next).
    pub fn url(&self) -> &str {
        self.urls.get(self.current).map_or(DEFAULT_ROUTE_URL, |u| u)
    }

    /// Moves to the next node of the list (cyclically; a one-node list
    /// stays put).
    fn fail_over<A: App>(&mut self, srv: &Server<A>) {
        if self.urls.len() < 2 {
            return;
        }
        let from = self.url().to_string();
        self.current = (self.current + 1) % self.urls.len();
        stats::add(srv, stats::ROUTE_FAILOVERS, 1);
        log::warn!(
            "im: failing over from the Route at {from} to {}",
            self.url()
        );
    }

    /// Whether `fd` is the Route link.
    pub fn is_link(&self, fd: Fd) -> bool {
        self.fd == Some(fd)
    }

    /// Whether the Route acknowledged the registration.
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// Forwards dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Dials the Route. Returns when to call again: while adopting (the
    /// predecessor's link may be on its way), or after a failed dial.
    pub fn dial<A: App>(&mut self, srv: &mut Server<A>) -> Option<Duration> {
        if srv.is_stopping() || self.fd.is_some() {
            return None;
        }
        if srv.is_adopting() {
            return Some(Duration::from_millis(ADOPT_POLL_MS));
        }
        let i = self.current;
        if self.targets.get(i).is_some_and(Option::is_none) {
            match parse_ws_url(self.url()) {
                Ok(t) => self.targets[i] = Some(t),
                Err(e) => {
                    log::error!("im: {e}");
                    self.fail_over(srv);
                    return Some(self.redial_delay());
                }
            }
        }
        let dialled = match self.targets.get(i).and_then(Option::as_ref) {
            Some(t) => match t.resolver.current().first() {
                Some(addr) => srv
                    .ws_connect(*addr, &t.host, &t.path)
                    .map_err(|e| e.to_string()),
                None => Err(format!("{} does not resolve (yet)", t.resolver.describe())),
            },
            None => Err("no route_url".to_string()),
        };
        match dialled {
            Ok(fd) => {
                self.fd = Some(fd);
                srv.set_attr(fd, ATTR_ROUTE_LINK, Value::Bool(true));
                srv.set_attr(fd, ATTR_ROUTE_URL, Value::from(self.url()));
                None
            }
            Err(e) => {
                log::warn!("im: cannot dial the Route at {}: {e}", self.url());
                self.fail_over(srv);
                Some(self.redial_delay())
            }
        }
    }

    fn redial_delay(&mut self) -> Duration {
        let delay = self.next_delay();
        log::info!(
            "im: dialling the Route at {} in {} ms",
            self.url(),
            delay.as_millis()
        );
        delay
    }

    /// The link is up: register (the seed's frame, plus token, load and
    /// epoch).
    pub fn connected<A: App>(&mut self, srv: &mut Server<A>, fd: Fd, load: u64) {
        self.open = true;
        let id = &self.identity;
        let token = (!self.auth_secret.is_empty()).then(|| {
            auth::mint(
                self.auth_secret.as_bytes(),
                &id.service_name,
                "register",
                REGISTER_TOKEN_TTL,
            )
        });
        let reg = ImFrame::Register(Registration {
            service_name: id.service_name.clone(),
            ip: id.ip.clone(),
            port: id.port,
            token,
            load: Some(load),
            epoch: Some(id.epoch.clone()),
        });
        srv.push(fd, Message::Text(reg.to_text()));
        log::info!(
            "im: connected to the Route at {}; registering as {}",
            self.url(),
            id.service_name
        );
    }

    /// The Route (node `node`; empty: not known, as for an adopted link)
    /// acknowledged: reset the backoff, flush what waited.
    pub fn registered<A: App>(&mut self, srv: &mut Server<A>, node: &str) {
        self.registered = true;
        if let Some(fd) = self.fd {
            srv.set_attr(fd, ATTR_ROUTE_REGISTERED, Value::Bool(true));
        }
        self.backoff.reset();
        let after = self
            .lost_at
            .take()
            .map(|t| {
                format!(
                    ", {} ms after the last link was lost",
                    t.elapsed().as_millis()
                )
            })
            .unwrap_or_default();
        let node = if node.is_empty() {
            String::new()
        } else {
            format!(" node {node}")
        };
        log::info!(
            "im: registered with the Route{node} at {} as {} (epoch {}){after}",
            self.url(),
            self.identity.service_name,
            self.identity.epoch
        );
        if self.draining {
            self.send(srv, &ImFrame::Draining);
        }
        if let Some(fd) = self.fd {
            while let Some(frame) = self.queue.pop_front() {
                srv.push(fd, Message::Text(frame));
            }
        }
    }

    /// A connection moved here from the worker this one replaced: if it is
    /// the Route link, take it (registered or not) and return true.
    pub fn adopt<A: App>(
        &mut self,
        srv: &mut Server<A>,
        fd: Fd,
        attrs: &HashMap<String, Value>,
    ) -> bool {
        if attrs.get(ATTR_ROUTE_LINK) != Some(&Value::Bool(true)) {
            return false;
        }
        let registered = attrs.get(ATTR_ROUTE_REGISTERED) == Some(&Value::Bool(true));
        let url = attrs.get(ATTR_ROUTE_URL).and_then(Value::as_str);
        if let Some(i) = url.and_then(|u| self.urls.iter().position(|x| x == u)) {
            self.current = i;
        }
        log::info!(
            "im: took over the Route link to {} (fd {fd}, registered: {registered})",
            self.url()
        );
        self.fd = Some(fd);
        self.open = true;
        if let Some(u) = url {
            srv.set_attr(fd, ATTR_ROUTE_URL, Value::from(u));
        }
        if registered {
            self.registered(srv, "");
        }
        true
    }

    /// The link closed (or was given up): forget it and move to the next
    /// node. Returns when to redial (None while stopping).
    pub fn closed<A: App>(&mut self, srv: &Server<A>) -> Option<Duration> {
        self.fd = None;
        self.open = false;
        if std::mem::take(&mut self.registered) {
            log::warn!("im: lost the Route connection to {}", self.url());
            self.lost_at = Some(Instant::now());
        }
        if srv.is_stopping() {
            return None;
        }
        self.fail_over(srv);
        Some(self.redial_delay())
    }

    /// Sends a frame to the Route now, or queues it (bounded) until the
    /// link is back.
    pub fn send<A: App>(&mut self, srv: &mut Server<A>, frame: &ImFrame) {
        let text = frame.to_text();
        match self.fd.filter(|_| self.registered) {
            Some(fd) if srv.push(fd, Message::Text(text.clone())) => {}
            _ => {
                if self.queue.len() >= MAX_QUEUED {
                    self.queue.pop_front();
                    self.dropped += 1;
                }
                self.queue.push_back(text);
            }
        }
    }

    /// Forwards a message for a user on another server.
    pub fn forward<A: App>(&mut self, srv: &mut Server<A>, msg: Addressed) {
        self.send(srv, &ImFrame::Forward(msg));
    }

    /// The heartbeat: a load report (while registered) and a ping (while
    /// open). A link that brought nothing for `route_timeout` is given up
    /// here (closed; its `on_close` is no longer the link's): returns when
    /// to dial the next node then.
    pub fn heartbeat<A: App>(&mut self, srv: &mut Server<A>, load: u64) -> Option<Duration> {
        let fd = self.fd.filter(|_| self.open)?;
        let heard_ms = srv.connection_info(fd)?.last_active_ms;
        let silent_ms = now_ms().saturating_sub(heard_ms);
        if silent_ms > self.silence.as_millis() as u64 {
            log::warn!(
                "im: the Route at {} sent nothing (not even a pong) for {silent_ms} ms, more than route_timeout: giving the link up",
                self.url()
            );
            srv.close(fd);
            return self.closed(srv);
        }
        if self.registered {
            let beat = ImFrame::Heartbeat { load: Some(load) };
            srv.push(fd, Message::Text(beat.to_text()));
        }
        srv.ping(fd, b"");
        None
    }

    /// The server is stopping: tell the Route (now, or once registered).
    pub fn drain<A: App>(&mut self, srv: &mut Server<A>) {
        self.draining = true;
        if self.registered {
            self.send(srv, &ImFrame::Draining);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_backoff() {
        let t = parse_ws_url("ws://127.0.0.1:9500/").unwrap();
        assert_eq!(
            (
                t.resolver.current()[0].port(),
                t.host.as_str(),
                t.path.as_str()
            ),
            (9500, "127.0.0.1:9500", "/")
        );
        assert_eq!(parse_ws_url("ws://127.0.0.1:9500").unwrap().path, "/");
        assert!(parse_ws_url("http://x").is_err());
        assert!(parse_ws_url("ws://no-port/").is_err());
        let mut r = RouteLink::new(&ImSettings::default(), Identity::default());
        assert_eq!(r.url(), DEFAULT_ROUTE_URL);
        let delays: Vec<Duration> = (0..12).map(|_| r.next_delay()).collect();
        assert!(delays[0] <= BACKOFF_START && delays[0] >= BACKOFF_START / 2);
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(delays[11] >= BACKOFF_MAX / 2, "capped growth: {delays:?}");
    }
}
