//! The Route's HTTP endpoints (same port as the WebSocket registry):
//!
//! | endpoint | answer |
//! |----------|--------|
//! | `GET /health` | 200 whenever the worker serves (liveness) |
//! | `GET /ready` | 200 while Redis answers and the registry cache is fresh, else 503 with the reason |
//! | `GET /api/servers` | the live IM servers with details, from the worker's cache; `?fresh=1` reads Redis |
//! | `GET /route?uid=U[&token=T]` | `{"ip","port","token","url","serviceName"}` of the IM server picked for U; 503 when none |
//! | `POST /api/send {"uid","data"[,"from"]}` | `{"delivered":N}`, or 404 `{"error":"offline"}` |
//! | `POST /api/broadcast {"data"[,"from"]}` | `{"routes":N}`: Route workers that relayed it to their IM servers |
//! | `GET /api/online?uid=U` | `{"uid","online","connections","servers"}` |
//! | `GET /metrics` | Prometheus text format, summed over every worker (see [`crate::metrics`]) |
//! | `GET /dashboard` | a self-contained HTML page that polls the three above |
//!
//! `/api/*` requires `Authorization: Bearer <api_key>` when `api_key` is set.
//! `/route` requires a user token (JWT HS256, `aud=user`, `sub=U`) when
//! `auth_secret` is set; the answer carries a fresh token for the IM server.
//! `/health`, `/ready`, `/metrics` and `/dashboard` stay open, as probes and
//! scrapers expect: they show counts and states, never the registry's
//! addresses (the dashboard asks for the key to read `/api/servers`).

use std::time::Duration;

use serde_json::json;

use crate::auth::{self, constant_eq};
use crate::cluster::{admin, valid_uid};
use crate::reactor::{Request, Response, Server};
use crate::route::app::RouteApp;
use crate::route::delivery;
use crate::route::stats;

/// The dashboard page (inline CSS and JS, no external assets).
const DASHBOARD: &str = include_str!("dashboard.html");

/// Routes one request.
pub fn handle(app: &mut RouteApp, srv: &mut Server<RouteApp>, req: &Request) -> Response {
    let path = req.path_only();
    if !admin::allowed(srv, req, path) {
        return Response::json(404, &json!({"error": "not_found", "path": path}));
    }
    if path.starts_with("/api/") && !authorized(app, req) {
        return Response::json(401, &json!({"error": "unauthorized", "message": "missing or wrong Authorization: Bearer <api_key>"}))
            .with_header("WWW-Authenticate", "Bearer");
    }
    match (req.method.as_str(), path) {
        ("GET", "/health") => Response::json(
            200,
            &json!({"status": "ok", "worker_id": srv.worker_id(), "pid": std::process::id()}),
        ),
        ("GET", "/ready") => ready(app, srv),
        ("GET", "/metrics") => metrics(app, srv),
        ("GET", "/dashboard") => Response::new(200, DASHBOARD)
            .with_header("Content-Type", "text/html; charset=utf-8")
            .with_header("Cache-Control", "no-cache"),
        ("GET", "/api/servers") => {
            let fresh = req
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "fresh=1"));
            servers_answer(app, srv, fresh)
        }
        ("GET", "/route") => route_user(app, srv, req),
        ("POST", "/api/send") => send(app, srv, req),
        ("POST", "/api/broadcast") => broadcast(app, srv, req),
        ("GET", "/api/online") => online(app, srv, req),
        (_, "/api/send" | "/api/broadcast") => {
            Response::json(405, &json!({"error": "method_not_allowed"}))
                .with_header("Allow", "POST")
        }
        (
            _,
            "/health" | "/ready" | "/api/servers" | "/route" | "/api/online" | "/metrics"
            | "/dashboard",
        ) => {
            Response::json(405, &json!({"error": "method_not_allowed"})).with_header("Allow", "GET")
        }
        _ => Response::json(404, &json!({"error": "not_found", "path": path})),
    }
}

fn authorized(app: &RouteApp, req: &Request) -> bool {
    if app.cfg.api_key.is_empty() {
        return true;
    }
    let given = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_eq(given.trim().as_bytes(), app.cfg.api_key.as_bytes())
}

fn ready(app: &RouteApp, srv: &mut Server<RouteApp>) -> Response {
    let max_age = Duration::from_secs_f64(app.cfg.cache_refresh * 2.0 + 1.0);
    let mut reasons = Vec::new();
    if !srv.redis_ok() {
        reasons.push("redis unreachable".to_string());
    }
    if let Some(c) = &app.cache {
        let g = c.lock().unwrap_or_else(|p| p.into_inner());
        if !g.fresh(max_age) {
            reasons.push(format!(
                "registry cache stale ({})",
                g.last_error.as_deref().unwrap_or("not refreshed yet")
            ));
        }
    }
    if srv.is_stopping() {
        reasons.push("draining".into());
    }
    if reasons.is_empty() {
        Response::json(200, &json!({"ready": true}))
    } else {
        Response::json(503, &json!({"ready": false, "reasons": reasons}))
    }
}

/// Lifetime of the user tokens `/route` hands out.
const USER_TOKEN_TTL: u64 = 3600;
/// How long the uid → server choice is remembered in Redis.
const ROUTE_RECORD_TTL: u64 = 3600;

fn query<'a>(req: &'a Request, key: &str) -> Option<&'a str> {
    req.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn bad(status: u16, error: &str, message: &str) -> Response {
    Response::json(status, &json!({"error": error, "message": message}))
}

fn json_body(req: &Request) -> Result<serde_json::Map<String, serde_json::Value>, Response> {
    match serde_json::from_slice::<serde_json::Value>(&req.body) {
        Ok(serde_json::Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad(400, "bad_request", "the body must be a JSON object")),
        Err(e) => Err(bad(400, "bad_json", &format!("the body is not JSON: {e}"))),
    }
}

/// `GET /route?uid=U`: pick an IM server for U and record the choice.
fn route_user(app: &mut RouteApp, srv: &mut Server<RouteApp>, req: &Request) -> Response {
    let uid = query(req, "uid").unwrap_or("");
    if !valid_uid(uid) {
        return bad(
            400,
            "bad_request",
            "a valid uid query parameter is required ([A-Za-z0-9_.@:-], 1..=128)",
        );
    }
    let secret = app.cfg.auth_secret.clone();
    if !secret.is_empty() {
        if let Err(e) = auth::verify(
            secret.as_bytes(),
            query(req, "token").unwrap_or(""),
            "user",
            Some(uid),
        ) {
            return bad(401, "unauthorized", &e.to_string());
        }
    }
    let (servers, _) = app.servers(srv, false);
    let Some(chosen) = app.picker.pick(app.cfg.balancer, &servers, uid).cloned() else {
        return bad(503, "no_server", "no live IM server is registered");
    };
    let route_key = app.registry.keys().route(uid);
    let member = chosen.member();
    let _ = srv.redis_cmd(|c| {
        redis::cmd("SET")
            .arg(&route_key)
            .arg(&member)
            .arg("EX")
            .arg(ROUTE_RECORD_TTL)
            .query::<()>(c)
    });
    let token = if secret.is_empty() {
        String::new()
    } else {
        auth::mint(secret.as_bytes(), uid, "user", USER_TOKEN_TTL)
    };
    let mut url = format!("ws://{}:{}/?uid={uid}", chosen.ip, chosen.port);
    if !token.is_empty() {
        url.push_str(&format!("&token={token}"));
    }
    Response::json(
        200,
        &json!({"ip": chosen.ip, "port": chosen.port, "token": token, "url": url, "serviceName": chosen.service_name}),
    )
}

/// `POST /api/send {"uid","data"}`.
fn send(app: &mut RouteApp, srv: &mut Server<RouteApp>, req: &Request) -> Response {
    let body = match json_body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(uid) = body
        .get("uid")
        .and_then(|v| v.as_str())
        .filter(|u| valid_uid(u))
    else {
        return bad(
            400,
            "bad_request",
            "field `uid` (a valid uid string) is required",
        );
    };
    let Some(data) = body.get("data") else {
        return bad(400, "bad_request", "field `data` is required");
    };
    let from = body.get("from").and_then(|v| v.as_str()).unwrap_or("api");
    match delivery::deliver(app, srv, uid, from, data, None) {
        None => bad(503, "unavailable", "Redis is unreachable; nothing was sent"),
        Some(0) => Response::json(404, &json!({"error": "offline", "uid": uid})),
        Some(n) => Response::json(200, &json!({"delivered": n})),
    }
}

/// `POST /api/broadcast {"data"}`.
fn broadcast(app: &RouteApp, srv: &mut Server<RouteApp>, req: &Request) -> Response {
    let body = match json_body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(data) = body.get("data") else {
        return bad(400, "bad_request", "field `data` is required");
    };
    let from = body.get("from").and_then(|v| v.as_str()).unwrap_or("api");
    match delivery::broadcast(app, srv, from, data) {
        Some(n) => Response::json(200, &json!({"routes": n})),
        None => bad(503, "unavailable", "Redis is unreachable; nothing was sent"),
    }
}

/// `GET /api/online?uid=U`.
fn online(app: &mut RouteApp, srv: &mut Server<RouteApp>, req: &Request) -> Response {
    let Some(uid) = query(req, "uid").filter(|u| valid_uid(u)) else {
        return bad(
            400,
            "bad_request",
            "a valid uid query parameter is required",
        );
    };
    match delivery::locate(app, srv, uid) {
        None => bad(503, "unavailable", "Redis is unreachable"),
        Some(found) => {
            let connections: usize = found.iter().map(|(_, n)| n).sum();
            let servers: Vec<&str> = found.iter().map(|(e, _)| e.service_name.as_str()).collect();
            Response::json(
                200,
                &json!({"uid": uid, "online": connections > 0, "connections": connections, "servers": servers}),
            )
        }
    }
}

/// `/metrics`: the framework's figures and the Route's counters, summed
/// over all workers, plus this worker's view of the registry.
fn metrics(app: &RouteApp, srv: &Server<RouteApp>) -> Response {
    let sb = srv.scoreboard();
    let mut m = crate::metrics::Exposition::new();
    m.framework(&sb);
    m.app_counters(&sb, stats::COUNTERS);
    let (servers, fresh) = match &app.cache {
        Some(c) => {
            let g = c.lock().unwrap_or_else(|p| p.into_inner());
            let max_age = Duration::from_secs_f64(app.cfg.cache_refresh * 2.0 + 1.0);
            (g.entries.len(), g.fresh(max_age))
        }
        None => (
            app.peers.values().filter(|p| p.held.is_some()).count(),
            false,
        ),
    };
    m.gauge(
        "swocloud_route_im_servers",
        "IM servers registered, from the answering worker's registry cache.",
        &[],
        servers as u64,
    );
    m.gauge(
        "swocloud_route_cache_fresh",
        "1 while the answering worker's registry cache is connected and fresh.",
        &[],
        u64::from(fresh),
    );
    crate::metrics::response(m.finish())
}

/// The `/api/servers` document, serialised straight from the entries.
#[derive(serde::Serialize)]
struct ServersDoc<'a> {
    count: usize,
    source: &'a str,
    servers: &'a [crate::cluster::servers::ServerEntry],
}

/// `GET /api/servers`. From a warm cache the serialised answer is kept per
/// cache generation (it changes only when the registry does), so a lookup
/// costs neither Redis nor serialisation; `fresh` reads Redis every time.
fn servers_answer(app: &mut RouteApp, srv: &mut Server<RouteApp>, fresh: bool) -> Response {
    let json_response =
        |body: Vec<u8>| Response::new(200, body).with_header("Content-Type", "application/json");
    if !fresh {
        if let Some(cache) = &app.cache {
            let g = cache.lock().unwrap_or_else(|p| p.into_inner());
            if g.refreshed_at.is_some() {
                let generation = (g.refreshes, g.connected);
                if let Some((gen, body)) = &app.servers_body {
                    if *gen == generation {
                        return json_response(body.clone());
                    }
                }
                let source = if g.connected { "cache" } else { "stale-cache" };
                let doc = ServersDoc {
                    count: g.entries.len(),
                    source,
                    servers: &g.entries,
                };
                let body = serde_json::to_vec(&doc).unwrap_or_default();
                drop(g);
                app.servers_body = Some((generation, body.clone()));
                return json_response(body);
            }
        }
    }
    let (servers, source) = app.servers(srv, fresh);
    let doc = ServersDoc {
        count: servers.len(),
        source,
        servers: &servers,
    };
    json_response(serde_json::to_vec(&doc).unwrap_or_default())
}
