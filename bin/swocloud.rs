//! `swocloud`: the Route daemon — start [-d] | stop | reload | status.
//!
//! The Route is the IM cluster's registry: IM servers register over
//! WebSocket, the Route keeps the live set in Redis and answers lookups
//! over HTTP. See the crate docs and the README.

use swocloud::route::settings::{framework_defaults, RouteSettings};
use swocloud::route::RouteApp;

fn main() {
    let code = swocloud::cli::main_with_status(
        "swocloud",
        "The swocloud Route: registry, balancer and message router of an IM cluster",
        framework_defaults(),
        |settings, cfg: RouteSettings| {
            cfg.validate()?;
            Ok(RouteApp::new(cfg, &settings.redis_prefix))
        },
        Some(swocloud::route::status::section),
    );
    std::process::exit(code);
}
