//! The Route's HTTP endpoints (same port as the WebSocket registry):
//!
//! | endpoint | answer |
//! |----------|--------|
//! | `GET /health` | 200 whenever the worker serves (liveness) |
//! | `GET /ready` | 200 while Redis answers and the registry cache is fresh, else 503 with the reason |
//! | `GET /api/servers` | the live IM servers with details, from the worker's cache; `?fresh=1` reads Redis |
//!
//! `/api/*` requires `Authorization: Bearer <api_key>` when `api_key` is set.

use std::time::Duration;

use serde_json::json;

use crate::auth::constant_eq;
use crate::reactor::{Request, Response, Server};
use crate::route::app::RouteApp;

/// Routes one request.
pub fn handle(app: &mut RouteApp, srv: &mut Server<RouteApp>, req: &Request) -> Response {
    let path = req.path_only();
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
        ("GET", "/api/servers") => {
            let fresh = req
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "fresh=1"));
            let (servers, source) = app.servers(srv, fresh);
            Response::json(
                200,
                &json!({"count": servers.len(), "source": source, "servers": servers}),
            )
        }
        (_, "/health" | "/ready" | "/api/servers") => {
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
