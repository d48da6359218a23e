//! `api-send` and `u2u`: users on IM servers, messages sent through the
//! Route's `POST /api/send` or from user to user across two IM servers, at
//! most `--window` in flight; end-to-end latency from the timestamp each
//! message carries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::connect::{bounded, Connector, ErrorLog};
use crate::httpc::{parse_http_url, HttpConn};
use crate::measure::{self, percentile, Window};
use crate::{ClusterArgs, Target, Ws};

/// Nanoseconds since the Unix epoch (the timestamp carried in messages).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Shared figures of a cluster run.
#[derive(Default)]
struct Flow {
    sent: AtomicUsize,
    sent_in_window: AtomicUsize,
    received: AtomicUsize,
    received_in_window: AtomicUsize,
    samples: Mutex<Vec<u32>>,
}

/// One sender's turns: paced (if `--rate`), each holding a window slot,
/// until the run ends.
struct Turns {
    next: Instant,          // the next paced send
    pace: Option<Duration>, // between this sender's sends
    end: Instant,           // no turn from then on
    window: Arc<Semaphore>, // messages in flight
}

impl Turns {
    /// Waits for the next turn (its pace, then a window slot, which the
    /// reader gives back when the message arrives); false once the run is
    /// over.
    async fn next(&mut self) -> bool {
        if Instant::now() >= self.end {
            return false;
        }
        if let Some(p) = self.pace {
            sleep_until(self.next).await;
            self.next += p;
        }
        let wait = self.end.saturating_duration_since(Instant::now());
        match timeout(wait, self.window.clone().acquire_owned()).await {
            Ok(Ok(p)) => {
                p.forget();
                true
            }
            _ => false,
        }
    }
}

/// Sender `k` of `n`'s first paced turn: the senders' turns are spread
/// evenly over one pace period, so "paced at R msg/s" is one message every
/// 1/R s, not a burst of `n` messages (all senders at once) every n/R s,
/// which would measure how long the cluster takes to drain a burst.
fn first_turn(start: Instant, pace: Option<Duration>, k: usize, n: usize) -> Instant {
    match pace {
        Some(p) if n > 1 => start + p.mul_f64(k as f64 / n as f64),
        _ => start,
    }
}

impl Flow {
    /// The latency samples (µs); a panicked reader leaves them usable.
    fn samples(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `api-send`, or `u2u` if `u2u`; the `RESULT` object.
pub async fn run(args: ClusterArgs, u2u: bool) -> Result<serde_json::Value, String> {
    use futures_util::stream::{SplitSink, SplitStream};
    let ims: Vec<String> = args.ims.split(',').map(|s| s.trim().to_string()).collect();
    if u2u && ims.len() < 2 {
        return Err("u2u needs two IM servers in --ims".into());
    }
    let connectors = ims
        .iter()
        .map(|u| {
            Connector::new(&Target {
                url: u.clone(),
                src_ips: args.src_ips.clone(),
            })
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let errors = Arc::new(ErrorLog::default());
    let uid = |i: usize| format!("{}{i}", args.uid_prefix);

    // Connect every user (bounded concurrency), keeping the index.
    let t0 = Instant::now();
    let results = bounded(args.users, args.connect_concurrency, |i, permit| {
        let c = connectors[i % connectors.len()].clone();
        let base = &ims[i % ims.len()];
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}uid={}", uid(i));
        async move {
            let r = c.connect_url(&url).await;
            drop(permit);
            r
        }
    })
    .await;
    let mut sinks: Vec<Option<SplitSink<Ws, Message>>> = Vec::with_capacity(args.users);
    let mut streams: Vec<SplitStream<Ws>> = Vec::with_capacity(args.users);
    let mut up = 0usize;
    for r in results {
        match r {
            Ok(ws) => {
                let (si, st) = ws.split();
                sinks.push(Some(si));
                streams.push(st);
                up += 1;
            }
            Err(e) => {
                errors.record(e);
                sinks.push(None);
            }
        }
    }
    println!(
        "{}: {up}/{} users up in {:.2}s",
        if u2u { "u2u" } else { "api-send" },
        args.users,
        t0.elapsed().as_secs_f64()
    );
    if up < args.users {
        errors.print();
        return Err(format!(
            "only {up}/{} users connected; refusing to measure a partial cluster",
            args.users
        ));
    }
    // Let the IM servers record every user's presence.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let flow = Arc::new(Flow::default());
    let window = Arc::new(Semaphore::new(args.window.max(1)));
    let measured = Window::after(args.warmup, args.duration);
    let base_ns = now_ns();
    let end = measured.end;
    let ms_ns = base_ns + (args.warmup * 1e9) as u64;
    let end_ns = ms_ns + (args.duration * 1e9) as u64;
    let (stop_tx, stop_rx) = watch::channel(false);

    // Readers: every user's socket.
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut st| {
            let (flow, window, errors) = (flow.clone(), window.clone(), errors.clone());
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        m = st.next() => m,
                        _ = stop.changed() => return,
                    };
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => {
                            errors.record("user connection closed by the server".into());
                            return;
                        }
                    };
                    let v: serde_json::Value = match serde_json::from_str(&text) {
                        Ok(v) => v,
                        Err(_) => {
                            errors.record("non-JSON frame".into());
                            continue;
                        }
                    };
                    if let Some(code) = v.pointer("/error/code").and_then(|c| c.as_str()) {
                        errors.record(format!("error frame: {code}"));
                        window.add_permits(1);
                        continue;
                    }
                    if v.get("method").is_some() {
                        continue; // welcome (and resync): the inbox's, not a message
                    }
                    let Some(t) = v.pointer("/data/t").and_then(|t| t.as_u64()) else {
                        errors.record(format!("unexpected frame: {text}"));
                        continue;
                    };
                    let now = now_ns();
                    window.add_permits(1);
                    flow.received.fetch_add(1, Ordering::Relaxed);
                    if now >= ms_ns && now <= end_ns {
                        flow.received_in_window.fetch_add(1, Ordering::Relaxed);
                    }
                    if t >= ms_ns && now <= end_ns {
                        let us = (now.saturating_sub(t) / 1000) as u32;
                        flow.samples().push(us);
                    }
                }
            })
        })
        .collect();

    let markers = measured.spawn_markers();
    let nsenders = if u2u { args.senders } else { args.http_conns }.max(1);
    let pace = (args.rate > 0.0).then(|| Duration::from_secs_f64(nsenders as f64 / args.rate));
    let next_msg = Arc::new(AtomicUsize::new(0));
    let half = args.users / 2;
    let mut senders = Vec::new();
    for k in 0..nsenders {
        let (flow, window, errors, next_msg) = (
            flow.clone(),
            window.clone(),
            errors.clone(),
            next_msg.clone(),
        );
        let prefix = args.uid_prefix.clone();
        let mut turns = Turns {
            next: first_turn(Instant::now(), pace, k, nsenders),
            pace,
            end,
            window: window.clone(),
        };
        let sent = move |flow: &Flow| {
            flow.sent.fetch_add(1, Ordering::Relaxed);
            if measured.covers(Instant::now()) {
                flow.sent_in_window.fetch_add(1, Ordering::Relaxed);
            }
        };
        if u2u {
            // Sender: user 2k (on the first IM server); targets: odd users
            // (the second), rotating.
            let Some(mut sink) = sinks.get_mut((2 * k) % args.users).and_then(Option::take) else {
                break;
            };
            senders.push(tokio::spawn(async move {
                while turns.next().await {
                    let m = next_msg.fetch_add(1, Ordering::Relaxed);
                    let to = format!("{prefix}{}", 2 * (m % half.max(1)) + 1);
                    let frame = json!({"to": to, "data": {"t": now_ns()}}).to_string();
                    if let Err(e) = sink.send(Message::text(frame)).await {
                        errors.record(format!("send: {e}"));
                        return;
                    }
                    sent(&flow);
                }
                // Not closed here: the user's reader still runs until the
                // drain ends (a Close now would read as a server close).
                drop(sink);
            }));
        } else {
            let route = args
                .route
                .clone()
                .ok_or("api-send needs --route http://127.0.0.1:P")?;
            let (addr, host, base_path) = parse_http_url(&route)?;
            let path = format!("{}/api/send", base_path.trim_end_matches('/'));
            let users = args.users;
            senders.push(tokio::spawn(async move {
                let mut conn = match HttpConn::open(addr, &host).await {
                    Ok(c) => c,
                    Err(e) => {
                        errors.record(e);
                        return;
                    }
                };
                while turns.next().await {
                    let m = next_msg.fetch_add(1, Ordering::Relaxed);
                    let body =
                        json!({"uid": format!("{prefix}{}", m % users), "data": {"t": now_ns()}})
                            .to_string();
                    match conn.request("POST", &path, body.as_bytes()).await {
                        Ok((200, _)) => sent(&flow),
                        Ok((s, b)) => {
                            window.add_permits(1);
                            errors.record(format!(
                                "HTTP {s} {}",
                                String::from_utf8_lossy(&b)
                                    .chars()
                                    .take(80)
                                    .collect::<String>()
                            ));
                        }
                        Err(e) => {
                            window.add_permits(1);
                            errors.record(e);
                            return;
                        }
                    }
                }
            }));
        }
    }
    for s in senders {
        let _ = s.await;
    }
    let _ = markers.await;
    // Let what is in flight arrive, then stop the readers.
    let drain_until = Instant::now() + Duration::from_secs(3);
    while flow.received.load(Ordering::Relaxed) < flow.sent.load(Ordering::Relaxed)
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    drop(sinks);

    let mut samples = std::mem::take(&mut *flow.samples());
    samples.sort_unstable();
    let (sent_total, recv_total) = (
        flow.sent.load(Ordering::Relaxed),
        flow.received.load(Ordering::Relaxed),
    );
    let sent_rate = flow.sent_in_window.load(Ordering::Relaxed) as f64 / args.duration;
    let recv_rate = flow.received_in_window.load(Ordering::Relaxed) as f64 / args.duration;
    let (p50, p99, max) = (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        measure::max(&samples),
    );
    let lost = sent_total.saturating_sub(recv_total);
    let n_errors = errors.total();
    println!(
        "{}: sent {sent_rate:.0} msg/s, received {recv_rate:.0} msg/s; end-to-end p50 {p50} us, p99 {p99} us, max {max} us; {sent_total} sent, {recv_total} received, {lost} not received; {n_errors} errors",
        if u2u { "u2u" } else { "api-send" }
    );
    errors.print();
    Ok(json!({
        "mode": if u2u { "u2u" } else { "api-send" },
        "users": args.users,
        "window": args.window,
        "senders": nsenders,
        "rate_cap": args.rate,
        "duration_s": args.duration,
        "sent_per_s": sent_rate.round() as u64,
        "received_per_s": recv_rate.round() as u64,
        "sent": sent_total,
        "received": recv_total,
        "lost": lost,
        "p50_us": p50,
        "p99_us": p99,
        "max_us": max,
        "samples": samples.len(),
        "errors": n_errors,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_senders_are_spread_over_one_period() {
        let t0 = Instant::now();
        let pace = Some(Duration::from_millis(256)); // 256 senders at 1,000 msg/s
        assert_eq!(first_turn(t0, pace, 0, 256), t0);
        assert_eq!(first_turn(t0, pace, 1, 256), t0 + Duration::from_millis(1));
        assert_eq!(
            first_turn(t0, pace, 255, 256),
            t0 + Duration::from_millis(255)
        );
        assert_eq!(first_turn(t0, None, 7, 256), t0); // saturation: no pacing
    }
}
