//! Fault injection under steady traffic, asserting exactly-once delivery
//! (bounded: about two minutes, all on loopback). A cluster — a Route with
//! 2 workers, two IM servers with 2 workers each, a private Redis — carries
//! a few dozen users messaging each other plus a stream of `/api/send`
//! calls. One fault at a time:
//!
//! kill a Route worker · kill an IM worker · kill a whole IM server (then
//! start it again) · freeze an IM server (SIGSTOP) and thaw it · restart
//! Redis empty · Redis down 10 s (it shuts down saving its data and comes
//! back with it: an outage, not a loss) · reload the Route and the IMs.
//!
//! After each fault the test measures *detection* (the first sign the
//! system reacted: a respawned worker, a registry change) and *recovery*
//! (every invariant holds and every user is reachable again), each within
//! [`DEADLINE`]. Invariants: the registry (`SMEMBERS im_server` and
//! `{im_server}:details`) is exactly the live, unfrozen servers; no orphan or
//! zombie process of our daemons; each daemon's total fd count within
//! [`FD_SLACK`] of its start; and every user can be sent to (`/api/send`
//! answers `delivered`).
//!
//! Delivery (the inbox protocol of `src/cluster/user.rs`). Each user is a
//! real client: it keeps the `epoch` and `last` seq it has, resumes through
//! `/route` with `&since=last&epoch=E`, drops what it already has (seq ≤
//! last: counted, not an error), follows `resync`, close codes and drain
//! hints, and acks now and then. A message is *accepted* when `/api/send`
//! answers 200 with its seq, or its sender gets `sent` for its `ref`; a
//! 503 or an error frame is *refused* and promises nothing. **Every
//! accepted message reaches its recipient exactly once (after the client's
//! dedupe by seq), across every fault.** The one exception is "restart
//! Redis empty": the stored history is gone, every affected user must be
//! told `resync` from the epoch it held, and the messages of that epoch it
//! had not received count as *resynced*. Once sending stops the test waits
//! (up to [`SETTLE`]) until each accepted message is received or resynced
//! away, then asserts lost = accepted − delivered − resynced = 0, that
//! only the epochs Redis lost were resynced, and that no client saw a gap,
//! a silent epoch change or a frame before `welcome`. A message counts in
//! the row of the fault it was accepted during (from [`IN_FLIGHT`] before
//! the fault to its recovery), else in "steady". Sends that never got an
//! answer (no `sent`, no error) are listed, with the fault they fell in.
//! The clients and their ledger are in `common/inbox_client.rs`.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/inbox_client.rs"]
mod inbox_client;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::daemon::Daemon;
use common::{descendants_of, http_get, proc_cmdline};
use inbox_client::{send_api, spawn_user, Accepted, Fate, Ledger};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

/// Users connected throughout.
const USERS: usize = 24;
/// Each fault must be detected and recovered from within this.
const DEADLINE: Duration = Duration::from_secs(20);
/// Allowed growth of a daemon's total open fds over its start (users move
/// between servers, so an IM server may hold all of them).
const FD_SLACK: usize = 2 * USERS + 24;
/// Pause between an `/api/send` call and the next.
const SEND_EVERY: Duration = Duration::from_millis(40);
/// Once sending stops, each accepted message is received or resynced within this.
const SETTLE: Duration = Duration::from_secs(30);
/// How long a sender waits for its `sent` once sending stopped.
const ANSWER: Duration = Duration::from_secs(5);
/// A message accepted this shortly before a fault counts in its row: it
/// may still be on its way when the fault strikes.
const IN_FLIGHT: Duration = Duration::from_millis(250);

/// `/api/send` to each user in turn, each with its own `data.id`.
fn sender_thread(route: String, sh: Arc<Ledger>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !sh.stop_sending.load(Relaxed) {
            n += 1;
            let uid = format!("u{}", n as usize % USERS);
            send_api(&sh, &route, &uid, &format!("a-{n}"));
            std::thread::sleep(SEND_EVERY);
        }
    })
}

fn route_addr(c: &Cluster) -> String {
    c.route.addr()
}

// ---- invariants -------------------------------------------------------------

/// The registry's members, from the set and from the details hash.
fn registry(c: &Cluster) -> Option<(HashSet<String>, HashSet<String>)> {
    let mut con = redis::Client::open(c.redis.url())
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    let set: Vec<String> = redis::cmd("SMEMBERS")
        .arg("im_server")
        .query(&mut con)
        .ok()?;
    let det: Vec<String> = redis::cmd("HKEYS")
        .arg("{im_server}:details")
        .query(&mut con)
        .ok()?;
    Some((set.into_iter().collect(), det.into_iter().collect()))
}

fn member_of(im: &Daemon) -> String {
    json!({"ip": im.host, "port": im.port}).to_string()
}

/// Every process whose command line names one of our settings files.
fn our_processes(daemons: &[&Daemon]) -> Vec<(i32, String)> {
    let configs: Vec<String> = daemons
        .iter()
        .map(|d| d.config.display().to_string())
        .collect();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|p| {
                    let cmd = proc_cmdline(p)?;
                    configs
                        .iter()
                        .any(|c| cmd.contains(c.as_str()))
                        .then_some((p, cmd))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn tree(d: &Daemon) -> Vec<i32> {
    d.master_pid()
        .filter(|&m| common::pid_alive(m))
        .map(|m| std::iter::once(m).chain(descendants_of(m)).collect())
        .unwrap_or_default()
}

fn fds(pids: &[i32]) -> usize {
    pids.iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum()
}

struct World {
    c: Cluster,
    sh: Arc<Ledger>,
    frozen: Option<usize>,
    /// When a fault that takes a while to inject saw the system react.
    noticed: Option<Instant>,
    fd_base: HashMap<String, usize>,
    /// Each user's epoch when Redis was restarted empty, and when.
    lost_epochs: HashMap<String, String>,
    emptied: Option<Instant>,
    probes: u64,
}

impl World {
    fn daemons(&self) -> Vec<&Daemon> {
        std::iter::once(&self.c.route).chain(&self.c.ims).collect()
    }

    /// Every invariant; the first that fails, as text.
    fn check(&self) -> Result<(), String> {
        let want: HashSet<String> = self
            .c
            .ims
            .iter()
            .enumerate()
            .filter(|(i, im)| Some(*i) != self.frozen && !tree(im).is_empty())
            .map(|(_, im)| member_of(im))
            .collect();
        let (set, det) = registry(&self.c).ok_or("Redis unreachable")?;
        if set != want || det != want {
            return Err(format!("registry {set:?} / details {det:?}, live {want:?}"));
        }
        let daemons = self.daemons();
        let expected: HashSet<i32> = daemons.iter().flat_map(|d| tree(d)).collect();
        for (pid, cmd) in our_processes(&daemons) {
            match proc_state(pid) {
                Some('Z') => return Err(format!("zombie {pid}: {cmd}")),
                Some(_) if !expected.contains(&pid) => {
                    return Err(format!("orphan {pid} outside the trees: {cmd}"))
                }
                _ => {}
            }
        }
        for d in daemons {
            let t = tree(d);
            let n = fds(&t);
            let base = self.fd_base.get(&d.addr()).copied().unwrap_or(n);
            if n > base + FD_SLACK {
                return Err(format!("{} holds {n} fds (start: {base})", d.addr()));
            }
        }
        Ok(())
    }

    /// Every user can be sent to: a probe (accepted like any message) is
    /// pushed to a connection of it.
    fn all_reachable(&mut self) -> Result<(), String> {
        for i in 0..USERS {
            let uid = format!("u{i}");
            self.probes += 1;
            let probe = format!("probe-{}", self.probes);
            match send_api(&self.sh, &route_addr(&self.c), &uid, &probe).as_deref() {
                Some("delivered") => {}
                other => return Err(format!("{uid} unreachable ({other:?})")),
            }
        }
        Ok(())
    }
}

/// One row of the report.
struct Row {
    fault: &'static str,
    start: Instant,
    injected: Duration, // how long the injection itself took (freeze, outage)
    detected: Option<Duration>,
    recovered: Option<Duration>,
    why_not: String,
}

fn signal_tree(d: &Daemon, sig: Signal) {
    for p in tree(d) {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

fn workers(d: &Daemon) -> Vec<i32> {
    d.master_pid()
        .and_then(|m| common::children_of(m).first().copied())
        .map(common::children_of)
        .unwrap_or_default()
}

#[test]
fn faults_one_at_a_time_under_traffic() {
    let t_start = Instant::now();
    let c = Cluster::start(2, 2, 2, "");
    let sh = Arc::new(Ledger::default());
    let mut w = World {
        c,
        sh: sh.clone(),
        frozen: None,
        noticed: None,
        fd_base: HashMap::new(),
        lost_epochs: HashMap::new(),
        emptied: None,
        probes: 0,
    };
    let mut threads: Vec<JoinHandle<()>> = (0..USERS)
        .map(|i| spawn_user(format!("u{i}"), USERS, route_addr(&w.c), sh.clone()))
        .collect();
    common::wait_until(Duration::from_secs(15), "every user online", || {
        w.all_reachable().is_ok()
    });
    threads.push(sender_thread(route_addr(&w.c), sh.clone()));
    // Deliberately lets traffic run 2 s before the fd baseline is taken, so
    // it counts the steady state, not the start-up.
    std::thread::sleep(Duration::from_secs(2));
    let base: HashMap<String, usize> = w
        .daemons()
        .iter()
        .map(|d| (d.addr(), fds(&tree(d))))
        .collect();
    w.fd_base = base;
    w.check().expect("invariants before any fault");
    // The steady window before any fault: traffic only, nothing to wait on.
    std::thread::sleep(Duration::from_secs(3));

    type Fault = (&'static str, fn(&mut World) -> Box<dyn Fn(&World) -> bool>);
    let faults: Vec<Fault> = vec![
        ("kill a Route worker", |w| {
            let before = workers(&w.c.route);
            let _ = kill(Pid::from_raw(before[0]), Signal::SIGKILL);
            Box::new(move |w| {
                let now = workers(&w.c.route);
                now.len() == before.len() && now != before
            })
        }),
        ("kill an IM worker", |w| {
            let before = workers(&w.c.ims[0]);
            let _ = kill(Pid::from_raw(before[1]), Signal::SIGKILL);
            Box::new(move |w| {
                let now = workers(&w.c.ims[0]);
                now.len() == before.len() && now != before
            })
        }),
        ("kill a whole IM server", |w| {
            signal_tree(&w.c.ims[1], Signal::SIGKILL);
            let m = member_of(&w.c.ims[1]);
            common::wait_until(DEADLINE, "IM_1 out of the registry", || {
                registry(&w.c).is_some_and(|(s, _)| !s.contains(&m))
            });
            // Started again: its users went to IM_0 meanwhile.
            w.c.ims[1].start();
            Box::new(|_| true)
        }),
        ("freeze an IM server 4 s", |w| {
            signal_tree(&w.c.ims[1], Signal::SIGSTOP);
            w.frozen = Some(1);
            let m = member_of(&w.c.ims[1]);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(4) {
                if w.noticed.is_none() && registry(&w.c).is_some_and(|(s, _)| !s.contains(&m)) {
                    w.noticed = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            signal_tree(&w.c.ims[1], Signal::SIGCONT);
            w.frozen = None;
            Box::new(|w| w.noticed.is_some())
        }),
        ("restart Redis empty", |w| {
            w.lost_epochs = w.sh.epochs.lock().unwrap().clone();
            w.emptied = Some(Instant::now());
            w.c.redis.restart();
            Box::new(|w| registry(&w.c).is_some_and(|(s, _)| !s.is_empty()))
        }),
        ("Redis down 10 s", |w| {
            // Down, not emptied: it saves its data as it shuts down (no
            // write after the save) and loads it when it comes back.
            let mut con = w.c.redis.client();
            redis::cmd("SET")
                .arg("chaos:kept")
                .arg(1)
                .query::<()>(&mut con)
                .unwrap();
            let _ = redis::cmd("SHUTDOWN").arg("SAVE").query::<()>(&mut con);
            common::wait_until(Duration::from_secs(5), "Redis down", || !w.c.redis.is_up());
            w.c.redis.stop(); // reaps it
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if w.noticed.is_none()
                    && http_get(route_addr(&w.c), "/ready").is_ok_and(|r| r.0 == 503)
                {
                    w.noticed = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            w.c.redis.restart();
            let kept: Option<u64> = redis::cmd("GET")
                .arg("chaos:kept")
                .query(&mut w.c.redis.client())
                .unwrap();
            assert_eq!(kept, Some(1), "Redis came back with its data");
            Box::new(|w| w.noticed.is_some())
        }),
        ("reload Route + IMs", |w| {
            let before: Vec<Vec<i32>> = w.daemons().iter().map(|d| workers(d)).collect();
            for d in w.daemons() {
                let out = d.run("reload", &[]);
                assert!(out.status.success(), "reload {}", d.addr());
            }
            Box::new(move |w| {
                w.daemons()
                    .iter()
                    .zip(&before)
                    .all(|(d, b)| workers(d).iter().all(|p| !b.contains(p)))
            })
        }),
    ];

    let mut rows: Vec<Row> = Vec::new();
    for (name, inject) in faults {
        let start = Instant::now();
        w.noticed = None;
        let detected_when = inject(&mut w);
        let mut row = Row {
            fault: name,
            start,
            injected: start.elapsed(),
            detected: None,
            recovered: None,
            why_not: String::new(),
        };
        while start.elapsed() < row.injected + DEADLINE {
            if row.detected.is_none() && detected_when(&w) {
                row.detected = Some(w.noticed.unwrap_or_else(Instant::now) - start);
            }
            if row.detected.is_some() {
                match w.check().and_then(|_| w.all_reachable()) {
                    Ok(()) => {
                        row.recovered = Some(start.elapsed());
                        break;
                    }
                    Err(e) => row.why_not = e,
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "chaos: {name}: detected {:?}, recovered {:?} {}",
            row.detected, row.recovered, row.why_not
        );
        rows.push(row);
        // Steady traffic between faults.
        std::thread::sleep(Duration::from_secs(3));
    }

    // Sending stops; every accepted message must then reach its user or be
    // resynced away (what is still on its way is waited for).
    sh.stop_sending.store(true, Relaxed);
    let t_stop = Instant::now();
    while t_stop.elapsed() < SETTLE {
        // A `sent` still due is waited for a while (it makes a message accepted).
        let answered = sh.pending.load(Relaxed) <= 0 || t_stop.elapsed() > ANSWER;
        let settled = answered && sh.fates().iter().all(|(_, f)| *f != Fate::Lost);
        if settled {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let settle = t_stop.elapsed();
    sh.quit.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }

    // Each accepted message in the row of the fault it was accepted during.
    let row_of = |t: Instant| {
        (rows.iter())
            .position(|r| {
                let end = r.start + r.recovered.unwrap_or(r.injected + DEADLINE);
                t + IN_FLIGHT >= r.start && t <= end
            })
            .unwrap_or(rows.len())
    };
    let name = |i: usize| rows.get(i).map_or("steady", |r| r.fault);
    let fates = sh.fates();
    // accepted, delivered, resynced, lost, refused
    let mut tally = vec![[0usize; 5]; rows.len() + 1];
    for (a, f) in &fates {
        let t = &mut tally[row_of(a.at)];
        t[0] += 1;
        t[1 + *f as usize] += 1;
    }
    for t in sh.refused.lock().unwrap().iter() {
        tally[row_of(*t)][4] += 1;
    }
    eprintln!();
    eprintln!("times from each fault's start; recovery = invariants hold and every user reachable");
    let line = |c: [&str; 9]| {
        eprintln!(
            "{:<24} {:>7} {:>8} {:>9} {:>8} {:>9} {:>8} {:>5} {:>7}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        )
    };
    let head = "fault lasted detected recovered accepted delivered resynced lost refused";
    line(head.split(' ').collect::<Vec<_>>().try_into().unwrap());
    let f = |d: Option<Duration>| d.map_or("never".into(), |d| format!("{:.1}s", d.as_secs_f64()));
    for (i, t) in tally.iter().enumerate() {
        let times: [String; 3] = rows.get(i).map_or(Default::default(), |r| {
            [f(Some(r.injected)), f(r.detected), f(r.recovered)]
        });
        let [x, y, z] = &times;
        let n = t.map(|n| n.to_string());
        line([name(i), x, y, z, &n[0], &n[1], &n[2], &n[3], &n[4]]);
    }
    let received = sh.received.lock().unwrap().clone();
    let resyncs = sh.resyncs.lock().unwrap().clone();
    let from_users = fates
        .iter()
        .filter(|(a, _)| a.data.starts_with("p-"))
        .count();
    let confirmed: HashSet<&str> = fates.iter().map(|(a, _)| a.data.as_str()).collect();
    let unconfirmed: Vec<&String> = (received.values())
        .filter(|d| !confirmed.contains(d.as_str()))
        .collect();
    eprintln!(
        "accepted: {} ({from_users} user↔user); kept by the clients: {} ({} never confirmed to a sender); \
         unanswered sends: {}; dropped by the clients' dedupe: {}; {} resyncs ({} users, {} trimmed); \
         {} reconnects; settled {:.1}s after sending stopped; {:.0}s total",
        fates.len(),
        received.len(),
        unconfirmed.len(),
        sh.unanswered.load(Relaxed),
        sh.dropped.load(Relaxed),
        resyncs.len(),
        resyncs.iter().map(|r| &r.uid).collect::<HashSet<_>>().len(),
        resyncs.iter().filter(|r| r.reason == "trimmed").count(),
        sh.reconnects.load(Relaxed),
        settle.as_secs_f64(),
        t_start.elapsed().as_secs_f64()
    );
    let errors = sh.errors.lock().unwrap();
    eprintln!(
        "error frames without a ref: {} {:?}",
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
    eprintln!("kept by a client, never confirmed to their sender: {unconfirmed:?}");
    let secs = |t: Instant| t.duration_since(t_start).as_secs_f64();
    for (t, uid, e) in sh.silent.lock().unwrap().iter() {
        eprintln!("{uid} sent at {:.2}s ({}): {e}", secs(*t), name(row_of(*t)));
    }
    // Every lost message, with what the inbox says and its user's history.
    // (A resync only excuses what the Redis restart was in time to lose.)
    let excused = |a: &Accepted| name(row_of(a.at)) == "restart Redis empty";
    let lost: Vec<(&Accepted, &Fate)> = (fates.iter())
        .filter(|(a, f)| *f == Fate::Lost || (*f == Fate::Resynced && !excused(a)))
        .map(|(a, f)| (a, f))
        .collect();
    let mut shown = HashSet::new();
    for (a, fate) in &lost {
        let (st, status) = w.c.message_status(&a.to, a.seq);
        let key = (a.to.clone(), a.epoch.clone(), a.seq);
        eprintln!(
            "{fate:?}: {} (id {}) → {} epoch {} seq {}, accepted at {:.2}s ({}); the client kept {:?} there; /api/message: {st} {status}",
            a.data, a.id, a.to, a.epoch, a.seq, secs(a.at), name(row_of(a.at)), received.get(&key)
        );
        if shown.len() < 4 && shown.insert(a.to.clone()) {
            for (t, _, e) in sh
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, u, _)| *u == a.to)
            {
                eprintln!("    {:.2}s {}: {e}", secs(*t), a.to);
            }
        }
    }
    for r in &rows {
        assert!(
            r.detected.is_some_and(|d| d <= r.injected + DEADLINE),
            "{}: not detected within {DEADLINE:?}",
            r.fault
        );
        assert!(
            r.recovered.is_some_and(|d| d <= r.injected + DEADLINE),
            "{}: not recovered within {DEADLINE:?} of the fault's end: {}",
            r.fault,
            r.why_not
        );
    }
    let violations = sh.violations.lock().unwrap();
    assert!(violations.is_empty(), "protocol violations: {violations:?}");
    let ids: Vec<&str> = lost.iter().map(|(a, _)| a.data.as_str()).collect();
    assert!(
        lost.is_empty(),
        "accepted, never received (or resynced outside the Redis restart): {ids:?}"
    );
    // Only the epochs Redis lost were resynced, and every user was told.
    let emptied = w.emptied.expect("Redis was restarted empty");
    for r in &resyncs {
        let lost_epoch = w.lost_epochs.get(&r.uid) == Some(&r.old);
        assert!(
            lost_epoch && r.at >= emptied,
            "a resync of an epoch Redis still held: {r:?}"
        );
    }
    for (uid, old) in &w.lost_epochs {
        let told = resyncs
            .iter()
            .any(|r| &r.uid == uid && &r.old == old && r.new != *old);
        assert!(told, "{uid} was never told its epoch {old} is gone");
    }
    assert!(
        fates.len() > 500,
        "traffic flowed: {} accepted",
        fates.len()
    );
    assert!(
        from_users > 100,
        "user↔user traffic flowed: {from_users} accepted"
    );
}
