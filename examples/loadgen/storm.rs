//! `storm`: the handshake rate (connect, handshake, send Close, drop), a
//! bounded number in flight.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::{timeout, Instant};

use crate::connect::{bounded, Connector, ErrorLog};
use crate::measure::{micros, percentile};
use crate::StormArgs;

/// Runs the mode; the `RESULT` object.
pub async fn run(args: StormArgs) -> Result<serde_json::Value, String> {
    let connector = Arc::new(Connector::new(&args.target)?);
    let errors = ErrorLog::default();
    let t0 = Instant::now();
    let results = bounded(args.total, args.concurrency, |_, permit| {
        let connector = connector.clone();
        async move {
            let started = Instant::now();
            let res = connector.connect().await;
            let latency = started.elapsed();
            drop(permit);
            let mut ws = res?;
            // Send Close and drop without waiting for the reply.
            let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
            Ok(micros(latency))
        }
    })
    .await;
    let mut samples = Vec::with_capacity(args.total);
    for r in results {
        match r {
            Ok(us) => samples.push(us),
            Err(e) => errors.record(e),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    samples.sort_unstable();
    let ok = samples.len();
    let failed = errors.total();
    let rate = ok as f64 / elapsed;
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    println!(
        "storm: {ok}/{} handshakes in {elapsed:.2}s = {rate:.0}/s; handshake p50 {p50} us, p99 {p99} us; {failed} failed",
        args.total
    );
    errors.print();
    Ok(json!({
        "mode": "storm",
        "total": args.total,
        "concurrency": args.concurrency,
        "ok": ok,
        "failed": failed,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "handshakes_per_s": rate.round() as u64,
        "p50_us": p50,
        "p99_us": p99,
        "errors": failed,
    }))
}
