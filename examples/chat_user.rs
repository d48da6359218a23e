//! A chat user from the command line: asks the Route's `/route` where to
//! connect, connects to that IM server, sends messages, and prints what it
//! receives. The demo (`scripts/demo.sh`) runs a few of these.
//!
//! ```text
//! cargo run --example chat_user -- --route 127.0.0.1:9500 --uid alice [--secret S] \
//!     [--send bob:hello]… [--listen-ms 2000]
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clap::Parser;
use tungstenite::Message;

#[derive(Parser, Debug)]
struct Args {
    /// The Route's host:port.
    #[arg(long)]
    route: String,
    /// This user's uid.
    #[arg(long)]
    uid: String,
    /// The cluster's auth_secret (the application backend's job, done here
    /// for the demo): mints the user token `/route` wants.
    #[arg(long)]
    secret: Option<String>,
    /// `to:text` messages to send once connected (repeatable).
    #[arg(long)]
    send: Vec<String>,
    /// Wait before sending, in milliseconds (let the others connect).
    #[arg(long, default_value_t = 500)]
    wait_ms: u64,
    /// How long to listen, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    listen_ms: u64,
}

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

fn main() {
    let a = Args::parse();
    let mut path = format!("/route?uid={}", a.uid);
    if let Some(secret) = &a.secret {
        path.push_str(&format!(
            "&token={}",
            swocloud::auth::mint(secret.as_bytes(), &a.uid, "user", 600)
        ));
    }
    let route: serde_json::Value = match http_get(&a.route, &path).map(|b| serde_json::from_str(&b))
    {
        Ok(Ok(v)) => v,
        other => {
            eprintln!("{}: /route failed: {other:?}", a.uid);
            std::process::exit(1);
        }
    };
    let Some(url) = route["url"].as_str() else {
        eprintln!("{}: /route answered {route}", a.uid);
        std::process::exit(1);
    };
    println!(
        "{:<6} routed to {} ({}:{})",
        a.uid,
        route["serviceName"].as_str().unwrap_or("?"),
        route["ip"],
        route["port"]
    );
    let (mut ws, _) = match tungstenite::connect(url) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: connect {url}: {e}", a.uid);
            std::process::exit(1);
        }
    };
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    }
    std::thread::sleep(Duration::from_millis(a.wait_ms));
    for m in &a.send {
        let (to, text) = m.split_once(':').unwrap_or((m, ""));
        let frame = serde_json::json!({"to": to, "data": text}).to_string();
        println!("{:<6} → {to}: {text}", a.uid);
        let _ = ws.send(Message::Text(frame.into()));
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(a.listen_ms) {
        match ws.read() {
            Ok(Message::Text(t)) => println!("{:<6} ← {t}", a.uid),
            Ok(Message::Close(c)) => {
                println!("{:<6} closed: {c:?}", a.uid);
                break;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                println!("{:<6} connection ended: {e}", a.uid);
                break;
            }
        }
    }
    let _ = ws.close(None);
}
