//! The Route's HTTP endpoints (same port as the WebSocket registry):
//!
//! | endpoint | answer |
//! |----------|--------|
//! | `GET /health` | 200 whenever the worker serves (liveness) |
//! | `GET /ready` | 200 while Redis answers and the registry cache is fresh, else 503 with the reason |
//! | `GET /api/servers` | the live IM servers with details, from the worker's cache; `?fresh=1` reads Redis |
//! | `GET /metrics` | Prometheus text format, summed over every worker (see [`crate::metrics`]) |
//! | `GET /dashboard` | a self-contained HTML page that polls the three above |
//!
//! `/api/*` requires `Authorization: Bearer <api_key>` when `api_key` is set.
//! `/health`, `/ready`, `/metrics` and `/dashboard` stay open, as probes and
//! scrapers expect: they show counts and states, never the registry's
//! addresses (the dashboard asks for the key to read `/api/servers`).

use std::time::Duration;

use serde_json::json;

use crate::auth::constant_eq;
use crate::reactor::{Request, Response, Server};
use crate::route::app::RouteApp;
use crate::route::stats;

/// The dashboard page (inline CSS and JS, no external assets).
const DASHBOARD: &str = include_str!("dashboard.html");

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
        ("GET", "/metrics") => metrics(app, srv),
        ("GET", "/dashboard") => Response::new(200, DASHBOARD)
            .with_header("Content-Type", "text/html; charset=utf-8")
            .with_header("Cache-Control", "no-cache"),
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
        (_, "/health" | "/ready" | "/api/servers" | "/metrics" | "/dashboard") => {
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
