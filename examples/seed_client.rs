//! The seed's IM-server registration client (its `StareListen`), in Rust:
//! connect to the Route, send the seed's exact `register` JSON, then ping
//! every 3 s. Used by the Route's tests as a real, separately killable IM
//! server process, and handy to poke a running Route by hand:
//!
//! ```text
//! cargo run --example seed_client -- --url ws://127.0.0.1:9500/ --name IM_1 --ip 192.168.100.153 --port 9000
//! ```
//!
//! Prints every frame the Route sends, one per line, and exits when the
//! connection closes.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clap::Parser;
use tungstenite::{Message, WebSocket};

#[derive(Parser, Debug)]
struct Args {
    /// The Route's WebSocket URL.
    #[arg(long)]
    url: String,
    /// serviceName.
    #[arg(long, default_value = "IM_1")]
    name: String,
    /// Advertised IP (data only: nothing connects to it).
    #[arg(long, default_value = "192.168.100.153")]
    ip: String,
    /// Advertised port.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Registration token (when the Route has auth_secret).
    #[arg(long)]
    token: Option<String>,
    /// Ping interval in milliseconds (the seed: 3000).
    #[arg(long, default_value_t = 3000)]
    ping_ms: u64,
    /// Send this raw text instead of the register JSON.
    #[arg(long)]
    raw: Option<String>,
}

fn main() {
    let a = Args::parse();
    let (mut ws, _) = match tungstenite::connect(a.url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connect {}: {e}", a.url);
            std::process::exit(1);
        }
    };
    set_timeout(&mut ws, Duration::from_millis(100));
    let frame = a.raw.clone().unwrap_or_else(|| {
        let mut v = serde_json::json!({"method": "register", "serviceName": a.name, "ip": a.ip, "port": a.port});
        if let Some(t) = &a.token {
            v["token"] = serde_json::Value::String(t.clone());
        }
        v.to_string()
    });
    if let Err(e) = ws.send(Message::Text(frame.into())) {
        eprintln!("send: {e}");
        std::process::exit(1);
    }
    let mut last_ping = Instant::now();
    loop {
        if last_ping.elapsed() >= Duration::from_millis(a.ping_ms) {
            last_ping = Instant::now();
            if ws.send(Message::Ping(Vec::new().into())).is_err() {
                break;
            }
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                println!("{t}");
                let _ = std::io::stdout().flush();
            }
            Ok(Message::Close(c)) => {
                println!(
                    "CLOSED {}",
                    c.map(|c| format!("{} {}", u16::from(c.code), c.reason))
                        .unwrap_or_default()
                );
                let _ = std::io::stdout().flush();
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        // A read with SO_RCVTIMEO fails with EINTR after a
                        // SIGSTOP/SIGCONT (signal(7)): the socket is fine.
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("connection ended: {e}");
                break;
            }
        }
    }
}

fn set_timeout(ws: &mut WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>, t: Duration) {
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        let _ = s.set_read_timeout(Some(t));
    }
}
