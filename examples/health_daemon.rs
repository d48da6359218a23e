//! The smallest complete swocloud daemon: the framework's process model and
//! CLI (`start [-d] | stop | reload | status`) serving the minimal
//! [`HealthApp`] (`GET /health`, a WebSocket echo, `task:<data>` round trips
//! through the task workers). The process-model tests drive it.
//!
//! ```text
//! cargo run --example health_daemon -- start --port 9501 --worker-num 2 --task-worker-num 1
//! ```

use swocloud::apps::health::HealthApp;
use swocloud::config::NoAppSettings;

fn main() {
    let mut defaults = toml::Table::new();
    defaults.insert(
        "pid_file".into(),
        toml::Value::String("health_daemon.pid".into()),
    );
    let code = swocloud::cli::main(
        "health_daemon",
        "A minimal swocloud server",
        defaults,
        |_s, _x: NoAppSettings| Ok(HealthApp::default()),
    );
    std::process::exit(code);
}
