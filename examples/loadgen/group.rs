//! `group`: one group of `--users` members over the IM servers `--ims`
//! (issue 14). The members connect (alternating over the IM servers), are
//! joined to `--group` through the Route's `POST /api/groups/join`, and
//! once the Route counts them all online (`GET /api/groups/members`),
//! `--messages` group messages go through `POST /api/groups/send`, at most
//! `--window` in flight (a message is complete when every member has it).
//! Then, in the same run, the comparison: one `POST /api/send` to each of
//! `--sample` of the same members (`--http-conns` in flight), until all
//! arrived.
//!
//! Figures: deliveries/s (member frames over the phase, first send to last
//! receipt), per group message the latency from the API call to its last
//! member (p50, p99, max), lost and duplicated frames, the `servers` each
//! send answered, and the IM servers' `swocloud_im_group_messages_received_total`
//! around the measured messages (internal messages per group send).
//! `MEASURE_START`/`MEASURE_END` bracket the measured group messages and
//! `SEND_START`/`SEND_END` the one-by-one sends, each followed by
//! `--settle-ms` of quiet so a script can sample Redis there.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::StreamExt;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::now_ns;
use crate::connect::{bounded, Connector, ErrorLog};
use crate::httpc::{http_error, post_pool, Client};
use crate::measure::{self, percentile, say};
use crate::{GroupArgs, Target, Ws};

/// The counter each IM server keeps per group message it receives.
const IM_COUNTER: &str = "swocloud_im_group_messages_received_total";

/// One group message's progress.
#[derive(Default)]
struct Slot {
    sent_ns: AtomicU64, // when its API call started (0: not sent)
    ok: AtomicUsize,    // 1 once the API answered 200
    got: AtomicUsize,   // members that received it
    done_ns: AtomicU64, // when the last member received it
    done: Notify,       // notified then
}

/// What the members' readers and the senders share.
struct Shared {
    users: usize,
    slots: Vec<Slot>,
    dups: AtomicUsize,         // group frames at or below a member's last gseq
    last_group_ns: AtomicU64,  // the last group frame's receipt
    user_rx: AtomicUsize,      // user messages (the one-by-one comparison)
    last_user_ns: AtomicU64,   // the last one's receipt
    user_lat: Mutex<Vec<u32>>, // their latencies (µs)
    errors: Arc<ErrorLog>,
}

impl Shared {
    fn user_lat(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.user_lat.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fields of a frame a member reads that matter here.
#[derive(Deserialize)]
struct Frame {
    method: Option<IgnoredAny>,
    group: Option<IgnoredAny>,
    error: Option<Value>,
    data: Option<Payload>,
    gseq: Option<u64>,
}

/// Our messages' `data`.
#[derive(Deserialize)]
struct Payload {
    t: u64,
    k: usize,
}

/// Runs the mode; the `RESULT` object.
pub async fn run(args: GroupArgs) -> Result<Value, String> {
    let ims: Vec<String> = args.ims.split(',').map(|s| s.trim().to_string()).collect();
    Client::new(&args.route)?;
    let warm = args.warmup_messages;
    let total = warm + args.messages;
    let shared = Arc::new(Shared {
        users: args.users,
        slots: (0..total).map(|_| Slot::default()).collect(),
        dups: AtomicUsize::new(0),
        last_group_ns: AtomicU64::new(0),
        user_rx: AtomicUsize::new(0),
        last_user_ns: AtomicU64::new(0),
        user_lat: Mutex::new(Vec::new()),
        errors: Arc::default(),
    });

    // 1. Members connect; their readers start at once.
    let t0 = Instant::now();
    let (sinks, streams) = connect(&args, &ims, &shared.errors).await?;
    let connect_s = t0.elapsed().as_secs_f64();
    println!("group: {} members up in {connect_s:.2}s", args.users);
    let (stop_tx, stop_rx) = watch::channel(false);
    let readers: Vec<_> = streams
        .into_iter()
        .map(|st| tokio::spawn(read(st, shared.clone(), stop_rx.clone())))
        .collect();

    // 2. Joins through the Route, then until the Route counts them online.
    let t1 = Instant::now();
    let (g, prefix) = (args.group.clone(), args.uid_prefix.clone());
    let joined = post_pool(
        &args.route,
        args.http_conns,
        args.users,
        &shared.errors,
        move |i| {
            let body = json!({"group": g, "uid": format!("{prefix}{i}")});
            ("/api/groups/join", body.to_string())
        },
    )
    .await;
    let join_s = t1.elapsed().as_secs_f64();
    println!(
        "group: {joined}/{} joins answered in {join_s:.2}s ({:.0}/s)",
        args.users,
        joined as f64 / join_s.max(1e-9)
    );
    if joined < args.users {
        shared.errors.print();
        return Err(format!("only {joined}/{} joins succeeded", args.users));
    }
    let online = wait_online(&args, Duration::from_secs(60)).await?;
    let ready_s = t1.elapsed().as_secs_f64();
    println!(
        "group: {online} members online in the Route's counts {ready_s:.2}s after the first join"
    );

    // 3. Warm-up messages (the first one after the joins has the IM
    //    workers check the membership), then the measured ones.
    send_group(&args, &shared, 0, warm).await;
    let warm_lat = latencies(&shared, 0, warm);
    let grp = measured_group(&args, &ims, &shared, warm).await;
    // 4. The same members, one /api/send each.
    let one = one_by_one(&args, &shared).await;

    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    drop(sinks);
    let ratio = grp["deliveries_per_s"].as_f64().unwrap_or(0.0)
        / one["deliveries_per_s"].as_f64().unwrap_or(0.0).max(1e-9);
    let n_errors = shared.errors.total();
    println!(
        "group: warm-up latencies {:?} ms; group vs one-by-one {ratio:.1}x the deliveries/s; {n_errors} errors",
        warm_lat.iter().map(|us| us / 1000).collect::<Vec<_>>()
    );
    shared.errors.print();
    let sends_total: usize = shared.slots.iter().map(|s| s.ok.load(Relaxed)).sum();
    Ok(json!({
        "mode": "group",
        "users": args.users,
        "ims": ims.len(),
        "group": args.group,
        "window": args.window,
        "http_conns": args.http_conns,
        "connect_s": connect_s,
        "join_s": join_s,
        "joins_per_s": (joined as f64 / join_s.max(1e-9)).round(),
        "ready_s": ready_s,
        "warmup_messages": warm,
        "warmup_latency_us": warm_lat,
        "group_sends_total": sends_total,
        "grp": grp,
        "one_by_one": one,
        "group_vs_one_by_one": ratio,
        "errors": n_errors,
    }))
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1e3
}

/// The measured group messages (slots `warm..`), between the markers and
/// the IM servers' counters; their figures.
async fn measured_group(args: &GroupArgs, ims: &[String], sh: &Arc<Shared>, warm: usize) -> Value {
    let total = sh.slots.len();
    let before = im_counters(ims).await;
    say("MEASURE_START");
    settle(args).await;
    let g0 = now_ns();
    let answers = send_group(args, sh, warm, total).await;
    let g1 = sh.last_group_ns.load(Relaxed).max(g0);
    say("MEASURE_END");
    let after = im_counters(ims).await;
    settle(args).await;
    let lat = latencies(sh, warm, total);
    let slots = &sh.slots[warm..total];
    let sends_ok: usize = slots.iter().map(|s| s.ok.load(Relaxed)).sum();
    let got: usize = slots.iter().map(|s| s.got.load(Relaxed)).sum();
    let expected = sends_ok * args.users;
    let lost = expected.saturating_sub(got);
    let secs = (g1 - g0) as f64 / 1e9;
    let mut answer_us: Vec<u32> = answers.iter().map(|a| a.0).collect();
    answer_us.sort_unstable();
    let k: Vec<u64> = answers.iter().map(|a| a.1).collect();
    let (kmin, kmax) = (k.iter().min(), k.iter().max());
    let im_delta: Vec<Option<u64>> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| Some(a.as_ref().ok()?.saturating_sub(*b.as_ref().ok()?)))
        .collect();
    let internal: Option<u64> = im_delta.iter().copied().sum();
    let per_send = internal.map(|n| n as f64 / sends_ok.max(1) as f64);
    let (p50, p99, max) = (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        measure::max(&lat),
    );
    let dups = sh.dups.load(Relaxed);
    println!(
        "group: {} messages to {} members: {:.0} deliveries/s ({got} in {secs:.2}s), API call to last member p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; lost {lost}, duplicates {dups}, {} incomplete",
        args.messages, args.users, rate(got, secs), ms(p50), ms(p99), ms(max), sends_ok - lat.len()
    );
    println!(
        "group: servers per send {kmin:?}..{kmax:?} (expected {}), IM group messages received {im_delta:?} = {per_send:?} per group send",
        ims.len()
    );
    json!({
        "messages": args.messages,
        "sends_ok": sends_ok,
        "complete": lat.len(),
        "deliveries": got,
        "expected": expected,
        "lost": lost,
        "duplicates": dups,
        "elapsed_s": secs,
        "deliveries_per_s": rate(got, secs).round(),
        "messages_per_s": rate(lat.len(), secs),
        "p50_us": p50,
        "p99_us": p99,
        "max_us": max,
        "api_answer_p50_us": percentile(&answer_us, 50.0),
        "api_answer_p99_us": percentile(&answer_us, 99.0),
        "servers_min": kmin,
        "servers_max": kmax,
        "servers_ok": k.iter().all(|&n| n == ims.len() as u64),
        "im_received_delta": im_delta,
        "internal_per_send": per_send,
    })
}

/// One `/api/send` to each of `--sample` members, `--http-conns` in
/// flight, until all arrived; the figures.
async fn one_by_one(args: &GroupArgs, sh: &Arc<Shared>) -> Value {
    let users = args.users;
    let sample = match args.sample {
        0 => users,
        n => n.min(users),
    };
    say("SEND_START");
    settle(args).await;
    let u0 = now_ns();
    let prefix = args.uid_prefix.clone();
    let sent = post_pool(&args.route, args.http_conns, sample, &sh.errors, move |i| {
        let who = i * users / sample.max(1);
        let body = json!({"uid": format!("{prefix}{who}"), "data": {"t": now_ns(), "k": i}});
        ("/api/send", body.to_string())
    })
    .await;
    let until = Instant::now() + Duration::from_secs_f64(args.msg_timeout);
    while sh.user_rx.load(Relaxed) < sent && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let u1 = sh.last_user_ns.load(Relaxed).max(u0);
    say("SEND_END");
    settle(args).await;
    let got = sh.user_rx.load(Relaxed);
    let secs = (u1 - u0) as f64 / 1e9;
    let mut lat = std::mem::take(&mut *sh.user_lat());
    lat.sort_unstable();
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    println!(
        "one-by-one: {sent}/{sample} /api/send answered, {got} received in {secs:.2}s: {:.0} deliveries/s, p50 {:.1} ms, p99 {:.1} ms",
        rate(got, secs), ms(p50), ms(p99)
    );
    json!({
        "messages": sample,
        "sent_ok": sent,
        "received": got,
        "lost": sent.saturating_sub(got),
        "elapsed_s": secs,
        "deliveries_per_s": rate(got, secs).round(),
        "p50_us": p50,
        "p99_us": p99,
        "max_us": measure::max(&lat),
    })
}

type Sinks = Vec<SplitSink<Ws, Message>>;

/// Connects every member (member i to IM server i mod n); all or an error.
async fn connect(
    args: &GroupArgs,
    ims: &[String],
    errors: &ErrorLog,
) -> Result<(Sinks, Vec<SplitStream<Ws>>), String> {
    let connectors = ims
        .iter()
        .map(|u| {
            let t = Target {
                url: u.clone(),
                src_ips: args.src_ips.clone(),
            };
            Connector::new(&t).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let results = bounded(args.users, args.connect_concurrency, |i, permit| {
        let c = connectors[i % connectors.len()].clone();
        let base = &ims[i % ims.len()];
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}uid={}{i}", args.uid_prefix);
        async move {
            let r = c.connect_url(&url).await;
            drop(permit);
            r
        }
    })
    .await;
    let (mut sinks, mut streams) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(ws) => {
                let (si, st) = ws.split();
                sinks.push(si);
                streams.push(st);
            }
            Err(e) => errors.record(e),
        }
    }
    if sinks.len() < args.users {
        errors.print();
        return Err(format!(
            "only {}/{} members connected; refusing to measure a partial group",
            sinks.len(),
            args.users
        ));
    }
    Ok((sinks, streams))
}

/// One member's socket: counts our group and user messages until `stop`.
async fn read(mut st: SplitStream<Ws>, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut last_gseq = 0u64;
    loop {
        let msg = tokio::select! {
            m = st.next() => m,
            _ = stop.changed() => return,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                sh.errors
                    .record("member connection closed by the server".into());
                return;
            }
        };
        let f: Frame = match serde_json::from_str(&text) {
            Ok(f) => f,
            Err(_) => {
                sh.errors
                    .record(format!("unexpected frame: {:.80}", text.as_str()));
                continue;
            }
        };
        if let Some(e) = f.error {
            sh.errors
                .record(format!("error frame: {:.80}", e.to_string()));
            continue;
        }
        if f.method.is_some() {
            continue; // welcome, a group head, a resync
        }
        let Some(p) = f.data else {
            sh.errors
                .record(format!("unexpected frame: {:.80}", text.as_str()));
            continue;
        };
        let now = now_ns();
        if f.group.is_some() {
            let gseq = f.gseq.unwrap_or(0);
            if gseq <= last_gseq {
                sh.dups.fetch_add(1, Relaxed);
                continue;
            }
            last_gseq = gseq;
            sh.last_group_ns.fetch_max(now, Relaxed);
            let Some(slot) = sh.slots.get(p.k) else {
                continue;
            };
            if slot.got.fetch_add(1, Relaxed) + 1 == sh.users {
                slot.done_ns.store(now, Relaxed);
                slot.done.notify_one();
            }
        } else {
            sh.user_rx.fetch_add(1, Relaxed);
            sh.last_user_ns.fetch_max(now, Relaxed);
            let us = u32::try_from(now.saturating_sub(p.t) / 1000).unwrap_or(u32::MAX);
            sh.user_lat().push(us);
        }
    }
}

/// Polls `GET /api/groups/members` until the Route counts every member
/// online; the count.
async fn wait_online(args: &GroupArgs, limit: Duration) -> Result<u64, String> {
    let mut api = Client::new(&args.route)?;
    let path = format!("/api/groups/members?group={}", args.group);
    let until = Instant::now() + limit;
    let mut online = 0;
    while Instant::now() < until {
        match api.call("GET", &path, "").await {
            Ok((200, b)) => {
                let v: Value = serde_json::from_slice(&b).unwrap_or_default();
                online = v["online"].as_u64().unwrap_or(0);
                if online >= args.users as u64 {
                    return Ok(online);
                }
            }
            Ok((s, b)) => return Err(http_error(s, &b)),
            Err(e) => return Err(format!("members: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "only {online}/{} members online after {limit:?}",
        args.users
    ))
}

/// Sends the group messages `from..to`, at most `--window` in flight (each
/// until its last member got it, or `--msg-timeout`); per answered send
/// (API answer time in µs, its `servers`).
async fn send_group(args: &GroupArgs, sh: &Arc<Shared>, from: usize, to: usize) -> Vec<(u32, u64)> {
    let width = args.window.max(1);
    let window = Arc::new(Semaphore::new(width));
    let next = Arc::new(AtomicUsize::new(from));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let wait = Duration::from_secs_f64(args.msg_timeout);
    let mut tasks = Vec::new();
    for _ in 0..width.min(args.http_conns.max(1)) {
        let (sh, window, next, answers) =
            (sh.clone(), window.clone(), next.clone(), answers.clone());
        let Ok(mut api) = Client::new(&args.route) else {
            break;
        };
        let group = args.group.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(permit) = window.clone().acquire_owned().await else {
                    return;
                };
                let k = next.fetch_add(1, Relaxed);
                if k >= to {
                    return;
                }
                let (slot_sh, slot) = (sh.clone(), &sh.slots[k]);
                let t = now_ns();
                slot.sent_ns.store(t, Relaxed);
                let body = json!({"group": group, "data": {"t": t, "k": k}}).to_string();
                match api.call("POST", "/api/groups/send", &body).await {
                    Ok((200, b)) => {
                        slot.ok.store(1, Relaxed);
                        let us = ((now_ns() - t) / 1000) as u32;
                        let v: Value = serde_json::from_slice(&b).unwrap_or_default();
                        let n = v["servers"].as_u64().unwrap_or(0);
                        answers
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((us, n));
                        // The slot is free once the last member has it.
                        tokio::spawn(async move {
                            if timeout(wait, slot_sh.slots[k].done.notified())
                                .await
                                .is_err()
                            {
                                slot_sh
                                    .errors
                                    .record(format!("group message incomplete after {wait:?}"));
                            }
                            drop(permit);
                        });
                    }
                    Ok((s, b)) => sh.errors.record(http_error(s, &b)),
                    Err(e) => sh.errors.record(e),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    // Every slot back: every message complete or timed out.
    let _ = window.acquire_many(width as u32).await;
    let out = std::mem::take(&mut *answers.lock().unwrap_or_else(PoisonError::into_inner));
    out
}

/// The sorted latencies (API call to last member, µs) of the complete
/// messages `from..to`.
fn latencies(sh: &Shared, from: usize, to: usize) -> Vec<u32> {
    let mut v: Vec<u32> = sh.slots[from..to]
        .iter()
        .filter(|s| s.got.load(Relaxed) >= sh.users && s.ok.load(Relaxed) == 1)
        .map(|s| {
            let d = s
                .done_ns
                .load(Relaxed)
                .saturating_sub(s.sent_ns.load(Relaxed));
            u32::try_from(d / 1000).unwrap_or(u32::MAX)
        })
        .collect();
    v.sort_unstable();
    v
}

/// Each IM server's group-message counter (its `/metrics`, on the
/// WebSocket port).
async fn im_counters(ims: &[String]) -> Vec<Result<u64, String>> {
    let mut out = Vec::new();
    for ws in ims {
        let http = ws.replacen("ws://", "http://", 1);
        let hostport = http
            .trim_start_matches("http://")
            .split(['/', '?'])
            .next()
            .unwrap_or("");
        let r = async {
            let mut api = Client::new(&format!("http://{hostport}"))?;
            match api.call("GET", "/metrics", "").await? {
                (200, b) => String::from_utf8_lossy(&b)
                    .lines()
                    .find_map(|l| l.strip_prefix(IM_COUNTER)?.trim().parse().ok())
                    .ok_or_else(|| format!("{IM_COUNTER} missing on {hostport}")),
                (s, b) => Err(http_error(s, &b)),
            }
        }
        .await;
        out.push(r);
    }
    out
}

async fn settle(args: &GroupArgs) {
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse() {
        let g: Frame = serde_json::from_str(
            r#"{"group":"g","from":"api","data":{"t":5,"k":3},"gseq":7,"id":"x"}"#,
        )
        .unwrap();
        assert!(g.group.is_some() && g.method.is_none());
        assert_eq!(
            (g.gseq, g.data.as_ref().map(|p| (p.t, p.k))),
            (Some(7), Some((5, 3)))
        );
        let u: Frame =
            serde_json::from_str(r#"{"from":"api","data":{"t":1,"k":0},"seq":2,"id":"y"}"#)
                .unwrap();
        assert!(u.group.is_none() && u.data.is_some());
        let h: Frame =
            serde_json::from_str(r#"{"method":"group","group":"g","epoch":"e","gseq":0}"#).unwrap();
        assert!(h.method.is_some());
    }
}
