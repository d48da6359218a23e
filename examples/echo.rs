//! WebSocket echo server on the full swocloud runtime (master → manager →
//! SO_REUSEPORT workers), as the benchmarks run it.
//!
//! ```text
//! cargo run --release --example echo -- --port 9501 --workers 2 [--host 127.0.0.1]
//! ```
//!
//! Echoes text and binary WebSocket messages; `GET /` answers 200. Ctrl-C
//! or SIGTERM stops the tree gracefully (WebSocket peers get close 1001).
//! Any other setting can be given as `--set key=value` (e.g.
//! `--set max_conn=30000`).

use clap::Parser;
use swocloud::config::{self, NoAppSettings};
use swocloud::event::App;
use swocloud::reactor::{Fd, Message, Request, Response, Server};

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 9501)]
    port: u16,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Any other setting, KEY=VALUE (repeatable).
    #[arg(long = "set")]
    set: Vec<String>,
}

/// The echo application.
struct Echo;

impl App for Echo {
    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        srv.push(fd, msg);
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        match (req.method.as_str(), req.path_only()) {
            ("GET", "/") => {
                Response::text(200, &format!("swocloud echo, worker {}\n", srv.worker_id()))
            }
            _ => Response::text(404, "not found\n"),
        }
    }
}

fn main() {
    let a = Args::parse();
    let pid_file = std::env::temp_dir().join(format!("swocloud-echo-{}.pid", a.port));
    let mut overrides = vec![
        ("host".to_string(), toml::Value::String(a.host.clone())),
        ("port".to_string(), toml::Value::Integer(a.port.into())),
        (
            "worker_num".to_string(),
            toml::Value::Integer(a.workers.max(1) as i64),
        ),
        (
            "pid_file".to_string(),
            toml::Value::String(pid_file.display().to_string()),
        ),
        ("max_conn".to_string(), toml::Value::Integer(100_000)),
        ("log_level".to_string(), toml::Value::String("warn".into())),
    ];
    for s in &a.set {
        match config::parse_override(s) {
            Ok(kv) => overrides.push(kv),
            Err(e) => {
                eprintln!("echo: {e}");
                std::process::exit(2);
            }
        }
    }
    let (settings, _): (_, NoAppSettings) = match config::load(toml::Table::new(), None, &overrides)
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("echo: {e}");
            std::process::exit(2);
        }
    };
    std::process::exit(swocloud::process::master::start(settings, Echo));
}
