//! The Route's HTTP endpoints (same port as the WebSocket registry):
//!
//! | endpoint | answer |
//! |----------|--------|
//! | `GET /health` | 200 whenever the worker serves (liveness) |
//! | `GET /ready` | 200 while Redis answers and the registry cache is fresh, else 503 with the reason |
//! | `GET /api/servers` | the live IM servers with details (each names the Route `node` holding it), the Route `nodes` with their servers, and the answering `node`; from the worker's cache; `?fresh=1` reads Redis |
//! | `GET /route?uid=U[&token=T]` | `{"ip","port","token","url","serviceName"}` of the IM server picked for U; 503 when none |
//! | `POST /api/send {"uid","data"[,"from"][,"ref"]}` | once stored in the user's inbox: `{"uid","id","seq","status":"delivered"\|"queued"}`; 503 when it could not be stored (with `inbox = false`: `{"delivered":N}`, or 404 `{"error":"offline"}`) |
//! | `GET /api/message?uid=U&seq=N` | `{"uid","seq","id","epoch","status":"queued"\|"delivered"\|"acked"}`, 404 when unknown or trimmed |
//! | `POST /api/broadcast {"data"[,"from"]}` | `{"routes":N}`: Route workers that relayed it to their IM servers |
//! | `GET /api/online?uid=U` | `{"uid","online","connections","servers"}` |
//! | `POST /api/groups/join`, `/leave` `{"group","uid"}` | `{"group","uid","members"}`; 403 `limit` |
//! | `POST /api/groups/send {"group","data"[,"from"]}` | `{"group","gseq","id","servers"}`; 404 `no_such_group` |
//! | `GET /api/groups/members?group=G[&cursor=C]` | `{"group","count","online","members","cursor"}` |
//! | `POST /api/kick {"uid"[,"reason"]}` | `{"uid","servers"}`: every connection closed with 4000 |
//! | `GET /metrics` | Prometheus text format, summed over every worker (see [`crate::metrics`]) |
//! | `GET /dashboard` | a self-contained HTML page that polls the three above |
//! | `GET /chat?uid=U&token=T&peer=P` | a chat page (`chat.html`) on the JavaScript client |
//! | `GET /client/swocloud.js` | that client (`clients/js/swocloud.js`), an ES module |
//!
//! `/api/*` requires `Authorization: Bearer <api_key>` when `api_key` is set.
//! `/route` requires a user token (JWT HS256, `aud=user`, `sub=U`) when
//! `auth_secret` is set; the answer carries a fresh token for the IM server.
//! `/health`, `/ready`, `/metrics` and `/dashboard` stay open, as probes and
//! scrapers expect: they show counts and states, never the registry's
//! addresses (the dashboard asks for the key to read `/api/servers`); so do
//! `/chat` and its client (static files; the page asks `/route` itself).
//!
//! [`Api`] borrows the components a request needs — the registrations
//! (read-only), delivery and the directory — for the length of one request;
//! the answers are typed structs.

use serde_json::{Map, Value};

use crate::auth::{self, constant_eq};
use crate::cluster::link::{Addressed, Broadcast};
use crate::cluster::{admin, valid_uid};
use crate::event::{App, Holds};
use crate::reactor::{Request, Response, Server};
use crate::route::answers::{
    answer, bad, method_not_allowed, not_found, BroadcastDone, Health, Ready,
};
use crate::route::delivery::{Delivery, DeliveryHost, Waiting};
use crate::route::directory::{servers_doc, Directory};
use crate::route::registrations::Registrations;
use crate::route::settings::RouteSettings;
use crate::route::stats;
use crate::route::{groups, messages};

/// The dashboard page (inline CSS and JS, no external assets).
const DASHBOARD: &str = include_str!("dashboard.html");

/// The chat page (inline CSS; imports [`CLIENT_JS`] from `/client/swocloud.js`).
const CHAT: &str = include_str!("chat.html");
/// The JavaScript client (`clients/js/swocloud.js`), an ES module.
const CLIENT_JS: &str = include_str!("../../clients/js/swocloud.js");

/// Lifetime of the user tokens `/route` hands out.
const USER_TOKEN_TTL: u64 = 3600;

fn page(body: &'static str, content_type: &str) -> Response {
    Response::new(200, body)
        .with_header("Content-Type", content_type)
        .with_header("Cache-Control", "no-cache")
}

fn json_body(req: &Request) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad(400, "bad_request", "the body must be a JSON object")),
        Err(e) => Err(bad(400, "bad_json", &format!("the body is not JSON: {e}"))),
    }
}

/// The components one request may use.
#[derive(Debug)]
pub struct Api<'a> {
    /// The Route's settings (api_key, auth_secret).
    pub cfg: &'a RouteSettings,
    /// This worker's registrations (read-only: fallback lists, counts).
    pub regs: &'a Registrations,
    /// Locating and reaching users.
    pub delivery: &'a mut Delivery,
    /// The live servers, the cache and the balancer.
    pub directory: &'a mut Directory,
}

impl Api<'_> {
    /// Routes one request.
    pub fn handle<A: DeliveryHost + Holds<Directory>>(
        &mut self,
        srv: &mut Server<A>,
        req: &Request,
    ) -> Response {
        let path = req.path_only();
        if !admin::allowed(srv, req, path) {
            return not_found(path);
        }
        if path.starts_with("/api/") && !self.authorized(req) {
            return bad(
                401,
                "unauthorized",
                "missing or wrong Authorization: Bearer <api_key>",
            )
            .with_header("WWW-Authenticate", "Bearer");
        }
        match (req.method.as_str(), path) {
            ("GET", "/health") => answer(
                200,
                &Health {
                    status: "ok",
                    worker_id: srv.worker_id(),
                    pid: std::process::id(),
                },
            ),
            ("GET", "/ready") => self.ready(srv),
            ("GET", "/metrics") => self.metrics(srv),
            ("GET", "/dashboard") => Response::new(200, DASHBOARD)
                .with_header("Content-Type", "text/html; charset=utf-8")
                .with_header("Cache-Control", "no-cache"),
            ("GET", "/chat") => page(CHAT, "text/html; charset=utf-8"),
            ("GET", "/client/swocloud.js") => page(CLIENT_JS, "text/javascript; charset=utf-8"),
            ("GET", "/api/servers") if req.query_param("fresh").as_deref() == Some("1") => {
                self.fresh_servers(srv, req)
            }
            ("GET", "/api/servers") => {
                let body = self.directory.servers_json(self.regs);
                Response::new(200, body).with_header("Content-Type", "application/json")
            }
            ("GET", "/route") => self.route_user(srv, req),
            ("POST", "/api/send") => self.send(srv, req),
            ("POST", "/api/broadcast") => self.broadcast(srv, req),
            ("GET", "/api/online") => self.online(srv, req),
            ("POST", "/api/groups/join") => groups::join(srv, self.delivery, req),
            ("POST", "/api/groups/leave") => groups::leave(srv, self.delivery, req),
            ("POST", "/api/groups/send") => groups::send(srv, self.delivery, req),
            ("GET", "/api/groups/members") => groups::members(srv, self.delivery, req),
            ("POST", "/api/kick") => {
                groups::kick(srv, self.delivery, self.directory.cache(), self.regs, req)
            }
            ("GET", "/api/message") => match self.delivery.inbox() {
                Some(inbox) => messages::status(srv, inbox, req),
                None => bad(404, "not_found", "inbox = false: messages are not stored"),
            },
            (
                _,
                "/api/send" | "/api/broadcast" | "/api/groups/join" | "/api/groups/leave"
                | "/api/groups/send" | "/api/kick",
            ) => method_not_allowed("POST"),
            (
                _,
                "/health"
                | "/ready"
                | "/api/servers"
                | "/route"
                | "/api/online"
                | "/metrics"
                | "/dashboard"
                | "/api/message"
                | "/chat"
                | "/client/swocloud.js",
            ) => method_not_allowed("GET"),
            _ => not_found(path),
        }
    }

    fn authorized(&self, req: &Request) -> bool {
        if self.cfg.api_key.is_empty() {
            return true;
        }
        let given = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_eq(given.trim().as_bytes(), self.cfg.api_key.as_bytes())
    }

    fn ready<A: App>(&self, srv: &Server<A>) -> Response {
        let mut reasons = Vec::new();
        if let Err(why) = srv.redis_ready() {
            reasons.push(why.to_string());
        }
        if let Some(stale) = self.directory.stale_reason() {
            reasons.push(stale);
        }
        if srv.is_stopping() {
            reasons.push("draining".into());
        }
        let ready = reasons.is_empty();
        answer(if ready { 200 } else { 503 }, &Ready { ready, reasons })
    }

    /// `GET /route?uid=U`: pick an IM server for U and record the choice.
    fn route_user<A: Holds<Directory>>(&mut self, srv: &mut Server<A>, req: &Request) -> Response {
        let uid = req.query_param("uid").unwrap_or_default();
        let uid: &str = &uid;
        if !valid_uid(uid) {
            return bad(
                400,
                "bad_request",
                "a valid uid query parameter is required ([A-Za-z0-9_.@:-], 1..=128)",
            );
        }
        let secret = self.cfg.auth_secret.as_bytes();
        if !secret.is_empty() {
            let token = req.query_param("token").unwrap_or_default();
            let token: &str = &token;
            if let Err(e) = auth::verify(secret, token, "user", Some(uid)) {
                return bad(401, "unauthorized", &e.to_string());
            }
        }
        let token = if secret.is_empty() {
            String::new()
        } else {
            auth::mint(secret, uid, "user", USER_TOKEN_TTL)
        };
        let Some((body, member)) = self.directory.route(self.regs, uid, &token) else {
            return bad(503, "no_server", "no live IM server is registered");
        };
        self.directory.record_route(srv, uid, &member);
        Response::new(200, body).with_header("Content-Type", "application/json")
    }

    /// `POST /api/send {"uid","data"}`.
    fn send<A: DeliveryHost>(&mut self, srv: &mut Server<A>, req: &Request) -> Response {
        let mut body = match json_body(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Some(uid) = body
            .get("uid")
            .and_then(Value::as_str)
            .filter(|u| valid_uid(u))
            .map(str::to_string)
        else {
            return bad(
                400,
                "bad_request",
                "field `uid` (a valid uid string) is required",
            );
        };
        let Some(data) = body.remove("data") else {
            return bad(400, "bad_request", "field `data` is required");
        };
        let from = body.get("from").and_then(Value::as_str).unwrap_or("api");
        let msg = Addressed::new(uid.clone(), from.to_string(), data);
        if let Some(inbox) = self.delivery.inbox() {
            let reference = match body.get("ref") {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) if r.len() <= crate::cluster::user::MAX_REF => {
                    Some(r.as_str())
                }
                Some(_) => {
                    return bad(
                        400,
                        "bad_request",
                        "`ref` must be a string of at most 128 bytes",
                    )
                }
            };
            messages::send(srv, inbox, msg, reference, req.fd);
            return Response::later();
        }
        let w = Waiting::Send { msg, http: req.fd };
        self.delivery
            .submit(srv, self.directory.cache(), self.regs, &uid, w);
        Response::later()
    }

    /// `GET /api/servers?fresh=1`: read Redis now.
    fn fresh_servers<A: App>(&self, srv: &mut Server<A>, req: &Request) -> Response {
        let http = req.fd;
        let node = self.regs.node().to_string();
        srv.redis(
            self.delivery.list_request(),
            move |_: &mut A,
                  srv,
                  r: redis::RedisResult<std::collections::HashMap<String, String>>| {
                let resp = match r {
                    Ok(map) => {
                        let entries = crate::cluster::servers::parse_list(map);
                        Response::new(200, servers_doc(&entries, "redis", &node))
                            .with_header("Content-Type", "application/json")
                    }
                    Err(e) => bad(503, "unavailable", &format!("Redis: {e}")),
                };
                srv.respond(http, resp);
            },
        );
        Response::later()
    }

    /// `POST /api/broadcast {"data"}`.
    fn broadcast<A: App>(&self, srv: &mut Server<A>, req: &Request) -> Response {
        let mut body = match json_body(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Some(data) = body.remove("data") else {
            return bad(400, "bad_request", "field `data` is required");
        };
        let from = body.get("from").and_then(Value::as_str).unwrap_or("api");
        let msg = Broadcast {
            from: from.to_string(),
            data,
        };
        if self.delivery.broadcast(srv, msg) {
            answer(200, &BroadcastDone { routes: 1 })
        } else {
            bad(503, "unavailable", "Redis is unreachable; nothing was sent")
        }
    }

    /// `GET /api/online?uid=U`.
    fn online<A: DeliveryHost>(&mut self, srv: &mut Server<A>, req: &Request) -> Response {
        let Some(uid) = req.query_param("uid").filter(|u| valid_uid(u)) else {
            return bad(
                400,
                "bad_request",
                "a valid uid query parameter is required",
            );
        };
        let w = Waiting::Online {
            uid: uid.to_string(),
            http: req.fd,
        };
        self.delivery
            .submit(srv, self.directory.cache(), self.regs, &uid, w);
        Response::later()
    }

    /// `/metrics`: the framework's figures and the Route's counters, summed
    /// over all workers, plus this worker's view of the registry.
    fn metrics<A: App>(&self, srv: &Server<A>) -> Response {
        let sb = srv.scoreboard();
        let mut m = crate::metrics::Exposition::new();
        m.framework(&sb);
        m.app_counters(&sb, stats::COUNTERS);
        let (servers, nodes, fresh) = self.directory.cache_gauges().unwrap_or((
            self.regs.held_count(),
            usize::from(self.regs.held_count() > 0),
            false,
        ));
        m.gauge(
            "swocloud_route_im_servers",
            "IM servers registered, from the answering worker's registry cache.",
            &[],
            servers as u64,
        );
        m.gauge(
            "swocloud_route_nodes",
            "Route nodes holding at least one registered IM server, from the answering worker's registry cache.",
            &[],
            nodes as u64,
        );
        m.gauge(
            "swocloud_route_cache_fresh",
            "1 while the answering worker's registry cache is connected and fresh.",
            &[],
            u64::from(fresh),
        );
        crate::metrics::response(m.finish())
    }
}
