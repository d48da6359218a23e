//! The benchmark peer: a tokio + tokio-tungstenite WebSocket echo server.
//!
//! `scripts/bench.sh` runs it against the same load as swocloud's own echo
//! example, so it is configured to be comparable: a multi-thread runtime with
//! `--threads` workers (like `--workers` processes), WebSocket read/write
//! buffers of `--read-buffer`/`--write-buffer` bytes (4 KiB by default
//! instead of tungstenite's 128 KiB), and a 2 MiB message limit.
//!
//! Every Text and Binary message is sent back as is. A plain HTTP request
//! without `Upgrade: websocket` gets `200 OK` (a readiness probe).
//!
//! ```text
//! cargo run --release --example tokio_echo -- --port 9001 --threads 2
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser, Debug)]
#[command(about = "tokio-tungstenite WebSocket echo server (benchmark peer)")]
struct Args {
    /// TCP port to listen on (127.0.0.1).
    #[arg(long)]
    port: u16,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// WebSocket read buffer size per connection, in bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// WebSocket write buffer size per connection, in bytes.
    #[arg(long, default_value_t = 4096)]
    write_buffer: usize,
    /// Listen backlog.
    #[arg(long, default_value_t = 4096)]
    backlog: u32,
    /// Set SO_REUSEPORT, so several processes can share the port (to stand
    /// in for a multi-process server when testing the bench plumbing).
    #[arg(long)]
    reuseport: bool,
}

/// Largest accepted message.
const MAX_MESSAGE: usize = 2 << 20;

/// How long a client gets to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(args.reuseport)?;
    socket.bind(addr)?;
    let listener = socket.listen(args.backlog)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(args.read_buffer)
        .write_buffer_size(args.write_buffer)
        .max_write_buffer_size(args.write_buffer.max(MAX_MESSAGE) * 2)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, config));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, config: WebSocketConfig) {
    let _ = stream.set_nodelay(true);
    match tokio::time::timeout(HEAD_TIMEOUT, is_websocket_upgrade(&stream)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                .await;
            return;
        }
        _ => return,
    }
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    // Pings are answered and Closes replied to by tungstenite itself.
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            break;
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// Peeks at the request head (without consuming it) and tells whether it asks
/// for a WebSocket upgrade.
async fn is_websocket_upgrade(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let head = &buf[..n];
        if head.windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
            let head = String::from_utf8_lossy(head).to_ascii_lowercase();
            return Ok(head.contains("upgrade: websocket"));
        }
        // Incomplete head: peek would return the same bytes at once, so
        // give the rest a moment to arrive.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Raises the soft open-files limit to the hard limit.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
