//! The IM server's HTTP endpoints: `/health`, `/ready` (Redis, the Route
//! registration on worker 0, draining) and `/metrics` (admin-only when
//! `admin_listen` is set). Answers are typed structs.

use serde::Serialize;

use crate::cluster::admin;
use crate::event::App;
use crate::im::stats;
use crate::reactor::{Request, Response, Server};

/// `/health`.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    worker_id: usize,
    pid: u32,
}

/// `/ready`: `{"ready":true}`, or false with the reasons.
#[derive(Serialize)]
struct Ready {
    ready: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasons: Vec<&'static str>,
}

/// `{"error":"not_found"}`.
#[derive(Serialize)]
struct NotFound {
    error: &'static str,
}

fn answer(status: u16, body: &impl Serialize) -> Response {
    Response::new(status, serde_json::to_vec(body).unwrap_or_default())
        .with_header("Content-Type", "application/json")
}

/// Answers one request; `route_registered` is whether this worker's Route
/// link is acknowledged (only worker 0 holds one).
pub fn handle<A: App>(srv: &Server<A>, req: &Request, route_registered: bool) -> Response {
    let not_found = || answer(404, &NotFound { error: "not_found" });
    if !admin::allowed(srv, req, req.path_only()) {
        return not_found();
    }
    match (req.method.as_str(), req.path_only()) {
        ("GET", "/health") => answer(
            200,
            &Health {
                status: "ok",
                worker_id: srv.worker_id(),
                pid: std::process::id(),
            },
        ),
        ("GET", "/ready") => {
            let route_ok = srv.worker_id() != 0 || route_registered;
            let mut reasons = Vec::new();
            if let Err(why) = srv.redis_ready() {
                reasons.push(why);
            }
            if !route_ok {
                reasons.push("not registered with the Route");
            }
            if srv.is_stopping() {
                reasons.push("draining");
            }
            let ready = reasons.is_empty();
            answer(if ready { 200 } else { 503 }, &Ready { ready, reasons })
        }
        ("GET", "/metrics") => {
            let sb = srv.scoreboard();
            let mut m = crate::metrics::Exposition::new();
            m.framework(&sb);
            m.app_counters(&sb, stats::COUNTERS);
            m.gauge(
                "swocloud_im_users",
                "Users connected to this IM server, over all its workers.",
                &[],
                stats::load(srv),
            );
            crate::metrics::response(m.finish())
        }
        _ => not_found(),
    }
}
