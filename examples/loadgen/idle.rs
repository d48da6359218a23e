//! `idle`: opens many connections (source addresses round-robin) and holds
//! them, answering pings, for `--hold` seconds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::connect::{Connector, ErrorLog};
use crate::measure::say;
use crate::{IdleArgs, Ws};

/// Runs the mode; the `RESULT` object.
pub async fn run(args: IdleArgs) -> Result<serde_json::Value, String> {
    let connector = Arc::new(Connector::new(&args.target)?);
    let errors = ErrorLog::default();
    let t0 = Instant::now();
    let conns = connector
        .connect_many(args.conns, args.connect_concurrency, &errors)
        .await;
    let connect_s = t0.elapsed().as_secs_f64();
    let ok = conns.len();
    let failed = errors.total();
    println!(
        "idle: {ok}/{} connections up in {connect_s:.2}s, {failed} failed",
        args.conns
    );
    errors.print();

    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicUsize::new(0));
    let holders: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(hold(ws, stop_rx.clone(), dropped.clone())))
        .collect();
    say(&format!("HOLDING {ok}"));
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let dropped_n = dropped.load(Ordering::Relaxed);
    println!(
        "idle: held for {:.1}s, {dropped_n} dropped by the server",
        args.hold
    );

    let _ = stop_tx.send(true);
    let closing = async {
        for h in holders {
            let _ = h.await;
        }
    };
    let _ = timeout(Duration::from_secs(10), closing).await;
    println!("idle: closed");
    Ok(json!({
        "mode": "idle",
        "conns": args.conns,
        "ok": ok,
        "failed": failed,
        "dropped": dropped_n,
        "connect_s": (connect_s * 1000.0).round() / 1000.0,
        "conns_per_s": (ok as f64 / connect_s).round() as u64,
        "errors": failed + dropped_n,
    }))
}

/// Keeps one connection open (reading, so pings get answered) until told to
/// stop, then closes it.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>, dropped: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => break,
        }
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
}
