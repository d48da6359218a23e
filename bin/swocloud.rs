//! `swocloud`: the Route daemon — start [-d] | stop | reload | status.

use swocloud::apps::health::HealthApp;
use swocloud::config::NoAppSettings;

fn main() {
    let code = swocloud::cli::main(
        "swocloud",
        "The swocloud Route: registry, balancer and message router of an IM cluster",
        toml::Table::new(),
        |_settings, _app: NoAppSettings| Ok(HealthApp::default()),
    );
    std::process::exit(code);
}
