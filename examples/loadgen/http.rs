//! `http`: keep-alive HTTP/1.1 GET throughput and latency, one request in
//! flight per connection; non-2xx answers count as errors. A `{n}` in the
//! URL becomes a number that changes from request to request (`--vary`).

use std::sync::Arc;

use serde_json::json;
use tokio::time::Instant;

use crate::connect::ErrorLog;
use crate::httpc::{parse_http_url, HttpConn};
use crate::measure::{join_samples, micros, percentile, Window};
use crate::HttpArgs;

/// Runs the mode; the `RESULT` object.
pub async fn run(args: HttpArgs) -> Result<serde_json::Value, String> {
    let (addr, host, path) = parse_http_url(&args.url)?;
    let errors = Arc::new(ErrorLog::default());
    let window = Window::after(args.warmup, args.duration);
    let markers = window.spawn_markers();
    let vary = args.vary.max(1);
    let varying = path.contains("{n}");
    let tasks: Vec<_> = (0..args.conns)
        .map(|k| {
            let (host, path, errors) = (host.clone(), path.clone(), errors.clone());
            // Each connection starts at its own offset: the numbers differ
            // across connections and from request to request.
            let mut n = (k as u64).wrapping_mul(7_919) % vary;
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut conn = match HttpConn::open(addr, &host).await {
                    Ok(c) => c,
                    Err(e) => {
                        errors.record(e);
                        return samples;
                    }
                };
                loop {
                    let sent_at = Instant::now();
                    if sent_at >= window.end {
                        break;
                    }
                    let target = if varying {
                        n = (n + 1) % vary;
                        std::borrow::Cow::Owned(path.replace("{n}", &n.to_string()))
                    } else {
                        std::borrow::Cow::Borrowed(path.as_str())
                    };
                    match conn.request("GET", &target, b"").await {
                        Ok((s, _)) if (200..300).contains(&s) => {
                            let done_at = Instant::now();
                            if window.holds(sent_at, done_at) {
                                samples.push(micros(done_at.duration_since(sent_at)));
                            }
                        }
                        Ok((s, _)) => errors.record(format!("HTTP {s}")),
                        Err(e) => {
                            errors.record(e);
                            return samples;
                        }
                    }
                }
                samples
            })
        })
        .collect();
    let samples = join_samples(tasks, &errors).await;
    let _ = markers.await;
    let n = samples.len();
    let rate = n as f64 / args.duration;
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    let n_errors = errors.total();
    println!(
        "http: {n} requests in {:.1}s = {rate:.0} req/s; latency p50 {p50} us, p99 {p99} us; {n_errors} errors",
        args.duration
    );
    errors.print();
    Ok(json!({
        "mode": "http",
        "url": args.url,
        "conns": args.conns,
        "duration_s": args.duration,
        "requests": n,
        "requests_per_s": rate.round() as u64,
        "p50_us": p50,
        "p99_us": p99,
        "errors": n_errors,
    }))
}
