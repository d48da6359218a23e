//! `echo`: closed-loop echo throughput and latency, one message in flight
//! per connection.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::connect::{Connector, ErrorLog};
use crate::measure::{self, join_samples, micros, percentile, Window};
use crate::{EchoArgs, Ws, ECHO_TIMEOUT};

/// Runs the mode; the `RESULT` object.
pub async fn run(args: EchoArgs) -> Result<serde_json::Value, String> {
    // Large messages are not read 4 KiB at a time; small ones keep the 4 KiB
    // of the other modes.
    let buffer = args.buffer.unwrap_or(args.size.clamp(4096, 128 * 1024));
    let connector = Arc::new(Connector::new(&args.target)?.buffer_size(buffer));
    let errors = Arc::new(ErrorLog::default());
    let t0 = Instant::now();
    let conns = connector
        .connect_many(args.conns, args.connect_concurrency, &errors)
        .await;
    println!(
        "echo: {}/{} connections up in {:.2}s",
        conns.len(),
        args.conns,
        t0.elapsed().as_secs_f64()
    );
    if conns.is_empty() {
        errors.print();
        return Err("no connection could be opened".into());
    }

    let payload = if args.binary {
        Message::binary(vec![b'x'; args.size])
    } else {
        Message::text("x".repeat(args.size))
    };
    let window = Window::after(args.warmup, args.duration);
    let markers = window.spawn_markers();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| {
            let payload = payload.clone();
            let errors = errors.clone();
            tokio::spawn(echo_loop(ws, payload, window, errors))
        })
        .collect();
    let samples = join_samples(tasks, &errors).await;
    let _ = markers.await;

    let msgs = samples.len();
    let rate = msgs as f64 / args.duration;
    let (p50, p99, p999, max) = (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        percentile(&samples, 99.9),
        measure::max(&samples),
    );
    let n_errors = errors.total();
    println!(
        "echo: {msgs} messages in {:.1}s = {rate:.0} msg/s; latency p50 {p50} us, p99 {p99} us, p99.9 {p999} us, max {max} us; {n_errors} errors",
        args.duration
    );
    errors.print();
    Ok(json!({
        "mode": "echo",
        "conns": args.conns,
        "size": args.size,
        "duration_s": args.duration,
        "msgs": msgs,
        "msgs_per_s": rate.round() as u64,
        "p50_us": p50,
        "p99_us": p99,
        "p999_us": p999,
        "max_us": max,
        "errors": n_errors,
    }))
}

/// One connection's closed loop. Returns the latencies (µs) of the round
/// trips that started and finished inside the measured window.
async fn echo_loop(
    mut ws: Ws,
    payload: Message,
    window: Window,
    errors: Arc<ErrorLog>,
) -> Vec<u32> {
    let expected_len = payload.len();
    let mut samples = Vec::new();
    loop {
        let sent_at = Instant::now();
        if sent_at >= window.end {
            break;
        }
        if let Err(e) = ws.send(payload.clone()).await {
            errors.record(format!("send: {e}"));
            return samples;
        }
        let reply = match timeout(ECHO_TIMEOUT, next_data(&mut ws)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                errors.record(e);
                return samples;
            }
            Err(_) => {
                errors.record("echo timed out".into());
                return samples;
            }
        };
        let done_at = Instant::now();
        if reply.len() != expected_len {
            errors.record(format!("echo of {} bytes for {expected_len}", reply.len()));
        } else if window.holds(sent_at, done_at) {
            samples.push(micros(done_at.duration_since(sent_at)));
        }
    }
    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
    samples
}

/// The next Text or Binary message (control frames are skipped; pings are
/// answered by tungstenite).
async fn next_data(ws: &mut Ws) -> Result<Message, String> {
    loop {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(m),
            Some(Ok(Message::Close(_))) | None => return Err("closed by server".into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("recv: {e}")),
        }
    }
}
