//! Steady traffic across a Redis fault, and the figures it yields: the
//! clients of `inbox_client.rs` (users messaging each other, resuming,
//! acking) plus a stream of `/api/send` calls through every Route node, a
//! watcher polling every node's `/ready`, and per fault ([`Outage`]): how
//! long until a node's `/ready` went red (detection), until every user was
//! reachable again, until `/ready` was green for good, and the ledger's
//! accepted / delivered / resynced / lost for the messages accepted
//! meanwhile. Included beside `inbox_client.rs` with `#[path]`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::http_get;
use crate::inbox_client::{send_api, spawn_user, Accepted, Fate, Ledger};

/// Pause between two `/api/send` calls of the sender.
const SEND_EVERY: Duration = Duration::from_millis(40);
/// How often each node's `/ready` is asked.
const READY_EVERY: Duration = Duration::from_millis(50);
/// How long [`Traffic::finish`] waits for every `/ready` to be green.
const GREEN_WAIT: Duration = Duration::from_secs(10);
/// A message accepted this shortly before a fault counts in its row.
const IN_FLIGHT: Duration = Duration::from_millis(250);
/// Once sending stops, each accepted message is received or resynced
/// within this.
const SETTLE: Duration = Duration::from_secs(20);
/// How long a sender's `sent` is waited for once sending stopped.
const ANSWER: Duration = Duration::from_secs(5);
/// Pause between two probes of a user not reachable yet.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// One `/api/send` of the sender: to which node, when, accepted or not.
#[derive(Clone, Copy, Debug)]
struct Try {
    node: usize,
    start: Instant,
    end: Instant,
    ok: bool,
}

/// One `/ready` answer (status 0: no answer).
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    node: usize,
    green: bool,
}

/// Users `u0`… and their traffic through every Route node.
pub struct Traffic {
    pub sh: Arc<Ledger>,
    routes: Vec<String>,
    users: usize,
    threads: Vec<JoinHandle<()>>,
    tries: Arc<Mutex<Vec<Try>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    watching: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    probes: Arc<std::sync::atomic::AtomicU64>,
    pub t0: Instant,
}

/// A fault and what was measured around it.
#[derive(Clone, Debug)]
pub struct Outage {
    pub name: String,
    pub kill: Instant,
    /// The Redis side's own recovery as the harness saw it: a replica
    /// promoted (failover), a node back on its new port (restart).
    pub redis: Option<Duration>,
    /// Until each user had a probe delivered (the last of them).
    pub reachable: Duration,
}

impl Outage {
    fn end(&self) -> Instant {
        self.kill + self.reachable
    }
}

/// An outage's figures, computed once traffic ended.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Kill → the first red `/ready` on a node.
    pub detect: Option<Duration>,
    /// Kill → every node's `/ready` green for good (until the next fault).
    pub ready_green: Option<Duration>,
    /// Whether a node's `/ready` was red at some point while the sender's
    /// `/api/send` calls failed (between the first failure's start and the
    /// last one's end, or the first red sample if that came later: calls
    /// in flight at the kill fail before it can be seen), or there was no
    /// failure.
    pub red_while_failing: bool,
    pub accepted: usize,
    pub delivered: usize,
    pub resynced: usize,
    pub lost: usize,
    /// The sender's `/api/send` calls refused or unanswered in the outage.
    pub api_failed: usize,
    /// Of those, the ones during which their node's `/ready` stayed green.
    pub api_failed_green: usize,
    /// Every refusal in the outage: a user's send answered with an error
    /// frame, an `/api/send` (sender or probe) not accepted.
    pub refused: usize,
}

impl Traffic {
    /// `users` clients (`u{i}` connects through `routes[i % n]`), the
    /// `/api/send` sender (each call to the next node) and the `/ready`
    /// watcher; returns once every user was reached through the API.
    #[track_caller]
    pub fn start(routes: Vec<String>, users: usize) -> Traffic {
        let sh = Arc::new(Ledger::default());
        let mut threads: Vec<JoinHandle<()>> = (0..users)
            .map(|i| {
                let route = routes[i % routes.len()].clone();
                spawn_user(format!("u{i}"), users, route, sh.clone())
            })
            .collect();
        let tries = Arc::new(Mutex::new(Vec::new()));
        {
            let (sh, routes, tries) = (sh.clone(), routes.clone(), tries.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0usize;
                while !sh.stop_sending.load(Relaxed) {
                    n += 1;
                    let node = n % routes.len();
                    let start = Instant::now();
                    let uid = format!("u{}", n % users);
                    let ok = send_api(&sh, &routes[node], &uid, &format!("a-{n}")).is_some();
                    let end = Instant::now();
                    tries.lock().unwrap().push(Try {
                        node,
                        start,
                        end,
                        ok,
                    });
                    std::thread::sleep(SEND_EVERY);
                }
            }));
        }
        let samples = Arc::new(Mutex::new(Vec::new()));
        let watching = Arc::new(AtomicBool::new(true));
        let watcher = {
            let (routes, samples, watching) = (routes.clone(), samples.clone(), watching.clone());
            std::thread::spawn(move || {
                while watching.load(Relaxed) {
                    for (node, addr) in routes.iter().enumerate() {
                        let green = http_get(addr, "/ready").is_ok_and(|r| r.0 == 200);
                        let at = Instant::now();
                        samples.lock().unwrap().push(Sample { at, node, green });
                    }
                    std::thread::sleep(READY_EVERY);
                }
            })
        };
        let t = Traffic {
            sh,
            routes,
            users,
            threads,
            tries,
            samples,
            watching,
            watcher: Some(watcher),
            probes: Arc::new(Default::default()),
            t0: Instant::now(),
        };
        let mut last = String::new();
        crate::common::wait_until(Duration::from_secs(20), "every user online", || {
            t.all_reachable().map_err(|e| last = e).is_ok()
        });
        t
    }

    /// The uids.
    pub fn uids(&self) -> Vec<String> {
        (0..self.users).map(|i| format!("u{i}")).collect()
    }

    /// One probe per user through `/api/send` (nodes in turn), each
    /// answered `delivered`; the first that is not, as text.
    pub fn all_reachable(&self) -> Result<(), String> {
        for uid in self.uids() {
            match self.probe(&uid).as_deref() {
                Some("delivered") => {}
                other => return Err(format!("{uid} unreachable ({other:?})")),
            }
        }
        Ok(())
    }

    fn probe(&self, uid: &str) -> Option<String> {
        let n = self.probes.fetch_add(1, Relaxed) + 1;
        let route = &self.routes[n as usize % self.routes.len()];
        send_api(&self.sh, route, uid, &format!("probe-{n}"))
    }

    /// After a fault at `kill`: probes every user at once, each again every
    /// 50 ms until one is `delivered`; once all were, one more round must
    /// reach every user. Returns the time from `kill` to the last user's
    /// first delivered probe; panics after `timeout` naming who was not
    /// reached.
    #[track_caller]
    pub fn wait_reachable(&self, name: &str, kill: Instant, timeout: Duration) -> Duration {
        let deadline = kill + timeout;
        let firsts: Vec<(String, Option<Instant>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .uids()
                .into_iter()
                .map(|uid| {
                    s.spawn(move || {
                        while Instant::now() < deadline {
                            if self.probe(&uid).as_deref() == Some("delivered") {
                                return (uid, Some(Instant::now()));
                            }
                            std::thread::sleep(PROBE_EVERY);
                        }
                        (uid, None)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let never: Vec<&String> = firsts
            .iter()
            .filter(|(_, t)| t.is_none())
            .map(|(u, _)| u)
            .collect();
        assert!(
            never.is_empty(),
            "{name}: not reachable within {timeout:?} of the fault: {never:?}"
        );
        let last = firsts.iter().filter_map(|(_, t)| *t).max().unwrap_or(kill);
        let mut why = String::new();
        crate::common::wait_until(
            deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2),
            &format!("{name}: one round reaching every user"),
            || self.all_reachable().map_err(|e| why = e).is_ok(),
        );
        last - kill
    }

    /// Whether each node's newest `/ready` sample is green.
    fn all_green_now(&self) -> bool {
        let samples = self.samples.lock().unwrap();
        (0..self.routes.len()).all(|node| {
            samples
                .iter()
                .rev()
                .find(|s| s.node == node)
                .is_some_and(|s| s.green)
        })
    }

    /// Lets traffic run `d` (steady state between faults; nothing to wait
    /// for).
    pub fn steady(&self, d: Duration) {
        std::thread::sleep(d);
    }

    /// Lets traffic run until every node's `/ready` is green (at most
    /// [`GREEN_WAIT`]), stops sending, waits until each accepted message is received or
    /// resynced away (at most [`SETTLE`]), ends every thread, and computes
    /// each outage's figures. Prints a `FIGURES <test>_<outage> …` line per
    /// outage and one for the whole run, and every lost message with its
    /// user's history.
    pub fn finish(mut self, test: &str, outages: &[Outage]) -> Report {
        // Traffic runs on until every node's `/ready` is green again (at
        // most GREEN_WAIT): the last outage's figures need its end.
        let t_wait = Instant::now();
        while t_wait.elapsed() < GREEN_WAIT && !self.all_green_now() {
            std::thread::sleep(READY_EVERY);
        }
        self.sh.stop_sending.store(true, Relaxed);
        let t_stop = Instant::now();
        // The `/api/send` sender (the last thread) ends with its last call
        // answered: a message accepted after the clients quit would be
        // counted lost.
        if let Some(api) = self.threads.pop() {
            let _ = api.join();
        }
        while t_stop.elapsed() < SETTLE {
            let answered = self.sh.pending.load(Relaxed) <= 0 || t_stop.elapsed() > ANSWER;
            if answered && self.sh.fates().iter().all(|(_, f)| *f != Fate::Lost) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let settle = t_stop.elapsed();
        self.sh.quit.store(true, Relaxed);
        self.watching.store(false, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let fates = self.sh.fates();
        let samples = self.samples.lock().unwrap().clone();
        let tries = self.tries.lock().unwrap().clone();
        let refused = self.sh.refused.lock().unwrap().clone();
        let row_of = |t: Instant| {
            outages
                .iter()
                .position(|o| t + IN_FLIGHT >= o.kill && t <= o.end())
        };
        let mut figures = vec![Figures::default(); outages.len()];
        for (i, o) in outages.iter().enumerate() {
            let f = &mut figures[i];
            let until = outages.get(i + 1).map_or(t_stop, |n| n.kill);
            let red = |s: &&Sample| !s.green && s.at >= o.kill && s.at <= until;
            f.detect = samples.iter().find(red).map(|s| s.at - o.kill);
            // Each node green from its last red sample on: the first green
            // sample after it.
            f.ready_green = (0..self.routes.len())
                .map(|node| {
                    let mine = samples.iter().filter(|s| s.node == node);
                    let last_red = mine.clone().filter(red).map(|s| s.at).max();
                    match last_red {
                        None => Some(o.kill),
                        Some(r) => mine.filter(|s| s.green && s.at > r).map(|s| s.at).min(),
                    }
                })
                .try_fold(o.kill, |acc, t| t.map(|t| acc.max(t)))
                .map(|t| t - o.kill);
            let failed: Vec<&Try> = tries
                .iter()
                .filter(|t| !t.ok && t.end >= o.kill && t.start <= o.end())
                .collect();
            f.api_failed = failed.len();
            let red_between = |node: Option<usize>, a: Instant, b: Instant| {
                samples.iter().any(|s| {
                    !s.green
                        && node.map_or(true, |n| n == s.node)
                        && s.at + READY_EVERY >= a
                        && s.at <= b + 2 * READY_EVERY
                })
            };
            f.api_failed_green = failed
                .iter()
                .filter(|t| !red_between(Some(t.node), t.start, t.end))
                .count();
            let span = (
                failed.iter().map(|t| t.start).min(),
                failed.iter().map(|t| t.end).max(),
            );
            // A call in flight when the master died fails at once, before
            // anyone can see it (that lag is `detect`, reported): the span
            // reaches at least to the first red sample. Calls that fail
            // later must overlap red.
            let seen = f.detect.map(|d| o.kill + d);
            f.red_while_failing = match span {
                (Some(a), Some(b)) => red_between(None, a, seen.map_or(b, |s| b.max(s))),
                _ => true,
            };
            f.refused = refused.iter().filter(|&&t| row_of(t) == Some(i)).count();
        }
        let mut steady = [0usize; 4];
        for (a, fate) in &fates {
            let n = match row_of(a.at) {
                Some(i) => {
                    let f = &mut figures[i];
                    f.accepted += 1;
                    match fate {
                        Fate::Delivered => &mut f.delivered,
                        Fate::Resynced => &mut f.resynced,
                        Fate::Lost => &mut f.lost,
                    }
                }
                None => {
                    steady[0] += 1;
                    &mut steady[1 + *fate as usize]
                }
            };
            *n += 1;
        }
        let ms = |d: Option<Duration>| d.map_or("never".to_string(), |d| d.as_millis().to_string());
        for (o, f) in outages.iter().zip(&figures) {
            eprintln!(
                "FIGURES {test}_{} detect_ms={} redis_ms={} reachable_ms={} ready_green_ms={} \
                 accepted={} delivered={} resynced={} lost={} api_failed={} api_failed_while_green={} \
                 refused={} red_while_failing={}",
                o.name,
                ms(f.detect),
                ms(o.redis),
                o.reachable.as_millis(),
                ms(f.ready_green),
                f.accepted,
                f.delivered,
                f.resynced,
                f.lost,
                f.api_failed,
                f.api_failed_green,
                f.refused,
                f.red_while_failing
            );
        }
        let count = |want: Fate| fates.iter().filter(|(_, f)| *f == want).count();
        let resyncs = self.sh.resyncs.lock().unwrap().clone();
        let violations = self.sh.violations.lock().unwrap().clone();
        eprintln!(
            "FIGURES {test}_total accepted={} delivered={} resynced={} lost={} steady_accepted={} \
             resyncs={} violations={} unanswered={} reconnects={} settle_ms={} traffic_s={:.1}",
            fates.len(),
            count(Fate::Delivered),
            count(Fate::Resynced),
            count(Fate::Lost),
            steady[0],
            resyncs.len(),
            violations.len(),
            self.sh.unanswered.load(Relaxed),
            self.sh.reconnects.load(Relaxed),
            settle.as_millis(),
            self.t0.elapsed().as_secs_f64()
        );
        let secs = |t: Instant| t.saturating_duration_since(self.t0).as_secs_f64();
        let received = self.sh.received.lock().unwrap().clone();
        let mut shown = HashSet::new();
        for (a, _) in fates.iter().filter(|(_, f)| *f == Fate::Lost) {
            let key = (a.to.clone(), a.epoch.clone(), a.seq);
            eprintln!(
                "LOST {} (id {}) → {} epoch {} seq {}, accepted at {:.2}s; the client kept {:?} there",
                a.data,
                a.id,
                a.to,
                a.epoch,
                a.seq,
                secs(a.at),
                received.get(&key)
            );
            if shown.len() < 3 && shown.insert(a.to.clone()) {
                let events = self.sh.events.lock().unwrap();
                for (t, _, e) in events.iter().filter(|(_, u, _)| *u == a.to) {
                    eprintln!("    {:.2}s {}: {e}", secs(*t), a.to);
                }
            }
        }
        for o in outages {
            eprintln!("{}: killed at {:.2}s", o.name, secs(o.kill));
        }
        for v in &violations {
            eprintln!("VIOLATION {v}");
        }
        Report {
            figures,
            fates,
            resyncs: resyncs
                .iter()
                .map(|r| (r.uid.clone(), r.old.clone(), r.new.clone()))
                .collect(),
            violations,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // A test that panicked half-way: the threads end by themselves.
        self.sh.stop_sending.store(true, Relaxed);
        self.sh.quit.store(true, Relaxed);
        self.watching.store(false, Relaxed);
    }
}

/// What [`Traffic::finish`] found.
pub struct Report {
    /// Per outage, in order.
    pub figures: Vec<Figures>,
    pub fates: Vec<(Accepted, Fate)>,
    /// (uid, old epoch, new epoch) of every `resync` a client was told.
    pub resyncs: Vec<(String, String, String)>,
    pub violations: Vec<String>,
}

impl Report {
    /// Each `(uid, epoch)` of `told` was told `resync` away from that
    /// epoch, and nobody outside `only` was told `resync` at all (`what`:
    /// what happened to their inboxes, for the messages).
    #[track_caller]
    pub fn assert_resynced<'a>(
        &self,
        told: impl IntoIterator<Item = (&'a str, &'a str)>,
        only: &std::collections::BTreeSet<String>,
        what: &str,
    ) {
        for (u, epoch) in told {
            assert!(
                (self.resyncs.iter()).any(|(x, old, new)| x == u && old == epoch && new != old),
                "{u}'s inbox {what} (epoch {epoch}) and {u} was never told: {:?}",
                self.resyncs
            );
        }
        for (u, old, _) in &self.resyncs {
            assert!(
                only.contains(u),
                "{u} resynced from {old}, and its inbox was not the one that {what}"
            );
        }
    }

    /// The assertions every fault under traffic shares: no protocol
    /// violation; nothing accepted is lost (a loss must be reported by
    /// `resync`); per outage, `/ready` went red and was red while
    /// deliveries failed, and came back green.
    #[track_caller]
    pub fn assert_nothing_silently_lost(&self, outages: &[Outage]) {
        assert!(
            self.violations.is_empty(),
            "protocol violations: {:?}",
            self.violations
        );
        let lost: Vec<String> = (self.fates.iter())
            .filter(|(_, f)| *f == Fate::Lost)
            .map(|(a, _)| format!("{} → {} seq {} of {}", a.data, a.to, a.seq, a.epoch))
            .collect();
        assert!(
            lost.is_empty(),
            "accepted, neither received nor resynced away: {lost:?}"
        );
        for (o, f) in outages.iter().zip(&self.figures) {
            assert!(
                f.detect.is_some(),
                "{}: no node's /ready went red after the kill",
                o.name
            );
            assert!(
                f.red_while_failing,
                "{}: /ready stayed green on every node while {} /api/send calls failed",
                o.name, f.api_failed
            );
            assert!(
                f.ready_green.is_some(),
                "{}: /ready not green again on every node",
                o.name
            );
            assert!(f.accepted > 0, "{}: no traffic accepted meanwhile", o.name);
        }
        assert!(
            self.fates.iter().any(|(a, _)| a.data.starts_with("p-")),
            "user↔user traffic flowed"
        );
    }
}
