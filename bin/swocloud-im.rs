//! `swocloud-im`: the IM server daemon — start [-d] | stop | reload | status.
//!
//! Holds end users' WebSocket connections, registers with the Route and
//! delivers messages. See the crate docs and the README.

use swocloud::im::settings::{framework_defaults, ImSettings};
use swocloud::im::ImApp;

fn main() {
    let code = swocloud::cli::main(
        "swocloud-im",
        "A swocloud IM server: holds users' WebSocket connections and delivers their messages",
        framework_defaults(),
        |settings, cfg: ImSettings| {
            cfg.validate()?;
            Ok(ImApp::new(
                cfg,
                &settings.host,
                settings.port,
                &settings.redis_prefix,
            ))
        },
    );
    std::process::exit(code);
}
