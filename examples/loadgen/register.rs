//! `register`: fake IM servers registering with a Route (the seed's
//! register frame) and pinging, held for `--hold` seconds.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::connect::{Connector, ErrorLog};
use crate::measure::say;
use crate::{RegisterArgs, CONNECT_TIMEOUT};

/// Runs the mode; the `RESULT` object.
pub async fn run(args: RegisterArgs) -> Result<serde_json::Value, String> {
    let connector = Arc::new(Connector::new(&args.target)?);
    let errors = Arc::new(ErrorLog::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..args.count {
        let i = args.first + k;
        let frame = json!({
            "method": "register",
            "serviceName": format!("IM_{i}"),
            "ip": format!("127.0.0.{}", 10 + i % 240),
            "port": args.port_base as usize + i,
        })
        .to_string();
        let (connector, errors, ack_tx) = (connector.clone(), errors.clone(), ack_tx.clone());
        let mut stop = stop_rx.clone();
        let ping = Duration::from_millis(args.ping_ms.max(1));
        tasks.push(tokio::spawn(async move {
            let mut ws = match connector.connect().await {
                Ok(ws) => ws,
                Err(e) => {
                    errors.record(e);
                    let _ = ack_tx.send(false);
                    return;
                }
            };
            if let Err(e) = ws.send(Message::text(frame)).await {
                errors.record(format!("send: {e}"));
                let _ = ack_tx.send(false);
                return;
            }
            let mut acked = false;
            let mut tick = tokio::time::interval_at(Instant::now() + ping, ping);
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(t))) => {
                            if !acked && t.contains("\"registered\"") {
                                acked = true;
                                let _ = ack_tx.send(true);
                            } else if t.contains("\"error\"") {
                                errors.record(format!("route: {t}"));
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            errors.record("closed by the Route".into());
                            if !acked {
                                let _ = ack_tx.send(false);
                            }
                            return;
                        }
                    },
                    _ = tick.tick() => {
                        if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                            errors.record("ping failed".into());
                            return;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
        }));
    }
    drop(ack_tx);
    let (mut ok, mut failed) = (0usize, 0usize);
    while ok + failed < args.count {
        match timeout(CONNECT_TIMEOUT, ack_rx.recv()).await {
            Ok(Some(true)) => ok += 1,
            Ok(Some(false)) => failed += 1,
            Ok(None) | Err(_) => break,
        }
    }
    let took = t0.elapsed().as_secs_f64();
    say(&format!("REGISTERED {ok}"));
    println!("register: {ok}/{} registered in {took:.2}s", args.count);
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let _ = stop_tx.send(true);
    let _ = timeout(Duration::from_secs(5), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    errors.print();
    Ok(json!({
        "mode": "register",
        "count": args.count,
        "registered": ok,
        "failed": args.count - ok,
        "register_s": (took * 1000.0).round() / 1000.0,
        "errors": errors.total(),
    }))
}
