//! The admin address (`admin_listen`), for both apps: when it is set, the operator's
//! endpoints — `/api/*`, `/metrics`, `/dashboard` — are answered only on
//! connections the worker accepted on that address, and are `404 Not
//! Found` on the public one (as if they did not exist, so a scan of the
//! public port learns nothing). `/health`, `/ready`, `/route` and the chat
//! page (`/chat`, `/client/swocloud.js`) stay on both (the IM server's
//! `/metrics` is admin-only too).
//!
//! The admin address is no authentication: bind it to loopback or a
//! private network, and keep `api_key` set.

use crate::event::App;
use crate::reactor::{Request, Server};

/// Whether `path` is an operator endpoint.
pub fn is_admin_path(path: &str) -> bool {
    path.starts_with("/api/") || path == "/api" || path == "/metrics" || path == "/dashboard"
}

/// Whether the request may be answered on the connection it came on:
/// always without `admin_listen`; with it, admin paths only on admin
/// connections. O(1).
pub fn allowed<A: App>(srv: &Server<A>, req: &Request, path: &str) -> bool {
    if srv.settings().admin_listen.is_none() || !is_admin_path(path) {
        return true;
    }
    srv.connection_info(req.fd).is_some_and(|i| i.admin)
}

#[cfg(test)]
mod tests {
    #[test]
    fn admin_paths() {
        for p in [
            "/api/send",
            "/api/servers",
            "/metrics",
            "/dashboard",
            "/api",
        ] {
            assert!(super::is_admin_path(p), "{p}");
        }
        for p in [
            "/health",
            "/ready",
            "/route",
            "/",
            "/apix",
            "/metricsx",
            "/chat",
            "/client/swocloud.js",
        ] {
            assert!(!super::is_admin_path(p), "{p}");
        }
    }
}
