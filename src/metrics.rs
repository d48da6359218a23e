//! `/metrics`: the Prometheus text exposition format (version 0.0.4) of a
//! server's scoreboard, for any application built on the framework.
//!
//! This module owns the metric names of the framework and the renderer.
//! Every figure is read from the shared scoreboard, so whichever worker
//! answers the scrape, the totals cover ALL processes of the server: live
//! rows plus the retired counters of processes that have exited (counters
//! never go backwards when a worker is replaced).
//!
//! An application adds its own counters by naming indices of the rows'
//! `app` array in an [`AppCounter`] table (the Route's is
//! `route::stats::COUNTERS`), and its own gauges with
//! [`Exposition::gauge`]:
//!
//! ```no_run
//! # use swocloud::metrics::{AppCounter, Exposition};
//! # fn demo(sb: &swocloud::process::scoreboard::Scoreboard, table: &[AppCounter]) {
//! let mut m = Exposition::new();
//! m.framework(sb);
//! m.app_counters(sb, table);
//! m.gauge("myapp_things", "Things this worker knows of.", &[], 3);
//! let text = m.finish();
//! # }
//! ```
//!
//! Naming follows Prometheus' conventions: `swocloud_` prefix, `_total`
//! for counters, base units (`_bytes`, `_seconds`). Per-process series are
//! labelled `worker` (slot id) and `pid`: during a rolling reload a slot
//! briefly has two processes, told apart by `pid`.
//!
//! Known limit: a process's counters move from its row to the retired
//! totals when the manager reaps it; a scrape landing between the two
//! stores may count them twice or not at all for that one scrape.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use crate::process::scoreboard::{Retired, Role, Row, Scoreboard};
use crate::reactor::Response;

/// Reads one figure of a scoreboard row.
type RowField = fn(&Row) -> u64;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets only when the server restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// An application counter: one index of the scoreboard rows' `app` array,
/// exported as `name{label}`. Several entries may share a name with
/// different label values (e.g. removals by cause).
#[derive(Debug, Clone, Copy)]
pub struct AppCounter {
    /// Index into `Row::app`.
    pub index: usize,
    /// Metric name (ends in `_total`).
    pub name: &'static str,
    /// HELP text (the first entry of a name gives it).
    pub help: &'static str,
    /// One optional label (name, value).
    pub label: Option<(&'static str, &'static str)>,
}

/// A metrics document being written. Families are written whole, each
/// with its HELP and TYPE lines.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    declared: Vec<String>, // family names written so far
}

impl Exposition {
    /// An empty document.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family (HELP and TYPE lines). A family already started is
    /// not started again; its samples must follow it directly.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        if self.declared.iter().any(|n| n == name) {
            return;
        }
        self.declared.push(name.to_string());
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one sample: a counter.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.family(name, Kind::Counter, help);
        self.sample(name, labels, value);
    }

    /// A family with one sample: a gauge.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, labels, value);
    }

    /// The framework's metrics, summed over every process of the server.
    /// O(rows).
    pub fn framework(&mut self, sb: &Scoreboard) {
        let rows = sb.snapshot();
        let t = sb.totals();
        let retired = |c: Retired| t.retired(c);
        let sum = |f: &dyn Fn(&crate::process::scoreboard::RowSnapshot) -> u64| -> u64 {
            rows.iter().map(f).sum()
        };
        let workers: Vec<_> = rows.iter().filter(|r| r.role == Role::Worker).collect();

        self.gauge(
            "swocloud_connections_open",
            "Connections open now, all workers.",
            &[],
            sum(&|r| r.connections),
        );
        self.counter(
            "swocloud_connections_accepted_total",
            "Connections accepted since the server started.",
            &[],
            sum(&|r| r.accepted) + retired(Retired::Accepted),
        );
        self.counter(
            "swocloud_connections_closed_total",
            "Connections closed since the server started.",
            &[],
            sum(&|r| r.closed) + retired(Retired::Closed),
        );
        self.counter(
            "swocloud_requests_total",
            "HTTP requests plus WebSocket messages handled.",
            &[],
            sum(&|r| r.requests) + retired(Retired::Requests),
        );
        self.counter(
            "swocloud_messages_received_total",
            "WebSocket messages received.",
            &[],
            sum(&|r| r.messages_in) + retired(Retired::MessagesIn),
        );
        self.counter(
            "swocloud_messages_sent_total",
            "WebSocket messages sent.",
            &[],
            sum(&|r| r.messages_out) + retired(Retired::MessagesOut),
        );
        self.family(
            "swocloud_http_responses_total",
            Kind::Counter,
            "HTTP responses by status class.",
        );
        for (class, label) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            self.sample(
                "swocloud_http_responses_total",
                &[("class", label)],
                sb.http_total(class + 1),
            );
        }
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        self.counter(
            "swocloud_worker_restarts_total",
            "Workers respawned after an abnormal exit.",
            &[],
            ld(&t.worker_restarts),
        );
        self.counter(
            "swocloud_worker_replacements_total",
            "Workers replaced by a reload or max_request.",
            &[],
            ld(&t.worker_replacements),
        );
        self.counter(
            "swocloud_reloads_total",
            "Reloads performed.",
            &[],
            ld(&t.reloads),
        );
        let row_sum = |f: &dyn Fn(&crate::process::scoreboard::Row) -> u64| -> u64 {
            rows.iter().map(|r| f(sb.row(r.index))).sum()
        };
        self.counter(
            "swocloud_redis_errors_total",
            "Failed Redis commands and connection attempts of the workers' links.",
            &[],
            row_sum(&|r| ld(&r.redis_errors)) + retired(Retired::RedisErrors),
        );
        self.counter(
            "swocloud_redis_reconnects_total",
            "Times a worker's Redis link came back after an outage.",
            &[],
            row_sum(&|r| ld(&r.redis_reconnects)) + retired(Retired::RedisReconnects),
        );
        let redis: [(&str, Kind, &str, RowField); 7] = [
            ("swocloud_redis_command_errors_total", Kind::Counter,
             "Redis requests of live workers that completed with an error (server error, lost link, timeout).",
             |r| r.redis_cmd_errors.load(Relaxed)),
            ("swocloud_redis_timeouts_total", Kind::Counter,
             "Redis requests of live workers that got no reply within redis_timeout.",
             |r| r.redis_timeouts.load(Relaxed)),
            ("swocloud_redis_retried_total", Kind::Counter,
             "Durable Redis requests (removals, renewals) that reached Redis after waiting out an outage.",
             |r| r.redis_retried.load(Relaxed)),
            ("swocloud_redis_dropped_total", Kind::Counter,
             "Durable Redis requests dropped because their queue was full.",
             |r| r.redis_dropped.load(Relaxed)),
            ("swocloud_redis_probe_failures_total", Kind::Counter,
             "Pub/sub self-probes that did not come back (each forced a resubscribe).",
             |r| r.redis_probe_failures.load(Relaxed)),
            ("swocloud_redis_pending", Kind::Gauge,
             "Redis requests on the wire, waiting for their replies.",
             |r| r.redis_pending.load(Relaxed)),
            ("swocloud_redis_queued", Kind::Gauge,
             "Durable Redis requests waiting for the link to come back.",
             |r| r.redis_queued.load(Relaxed)),
        ];
        for (name, kind, help, f) in redis {
            self.family(name, kind, help);
            self.sample(name, &[], row_sum(&f));
        }
        self.gauge(
            "swocloud_workers",
            "Event worker processes alive (more than worker_num during a reload).",
            &[],
            workers.len() as u64,
        );
        if let Some(m) = rows.iter().find(|r| r.role == Role::Master) {
            self.gauge(
                "swocloud_uptime_seconds",
                "Seconds since the master started.",
                &[],
                m.uptime_s,
            );
        }

        let per_worker: [(&str, Kind, &str); 6] = [
            (
                "swocloud_worker_connections",
                Kind::Gauge,
                "Connections open now, per worker process.",
            ),
            (
                "swocloud_worker_requests_total",
                Kind::Counter,
                "Requests handled by this worker process since it started.",
            ),
            (
                "swocloud_worker_rss_bytes",
                Kind::Gauge,
                "Resident memory of this worker process.",
            ),
            (
                "swocloud_worker_redis_up",
                Kind::Gauge,
                "1 while this worker's Redis link is up.",
            ),
            (
                "swocloud_worker_redis_pubsub_verified",
                Kind::Gauge,
                "1 while this worker's Redis pub/sub link is verified by its probe (or unused).",
            ),
            (
                "swocloud_worker_stopping",
                Kind::Gauge,
                "1 while this worker process drains (reload or stop).",
            ),
        ];
        for (name, kind, help) in per_worker {
            self.family(name, kind, help);
            for w in &workers {
                let (id, pid) = (w.id.to_string(), w.pid.to_string());
                let value = match name {
                    "swocloud_worker_connections" => w.connections,
                    "swocloud_worker_requests_total" => w.requests,
                    "swocloud_worker_rss_bytes" => w.rss_kib * 1024,
                    "swocloud_worker_redis_up" => ld(&sb.row(w.index).redis_up),
                    "swocloud_worker_redis_pubsub_verified" => {
                        ld(&sb.row(w.index).redis_sub_verified)
                    }
                    _ => u64::from(w.stopping),
                };
                self.sample(name, &[("worker", &id), ("pid", &pid)], value);
            }
        }
        self.family(
            "swocloud_process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of each process of the server.",
        );
        for r in &rows {
            let (id, pid) = (r.id.to_string(), r.pid.to_string());
            self.sample(
                "swocloud_process_resident_memory_bytes",
                &[("role", r.role.name()), ("id", &id), ("pid", &pid)],
                r.rss_kib * 1024,
            );
        }
    }

    /// An application's counters from the rows' `app` array, summed over
    /// every process (live and retired). Entries sharing a name form one
    /// family, in the order of their first appearance. Out-of-range
    /// indices are skipped.
    pub fn app_counters(&mut self, sb: &Scoreboard, table: &[AppCounter]) {
        let mut names: Vec<&str> = Vec::new();
        for c in table {
            if !names.contains(&c.name) {
                names.push(c.name);
            }
        }
        for name in names {
            for c in table.iter().filter(|c| c.name == name) {
                if c.index >= crate::process::scoreboard::APP_COUNTERS {
                    continue;
                }
                self.family(c.name, Kind::Counter, c.help);
                let labels: Vec<(&str, &str)> = c.label.into_iter().collect();
                self.sample(c.name, &labels, sb.app_total(c.index));
            }
        }
    }

    /// The finished document.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A `200` answer carrying `text` with the exposition content type.
pub fn response(text: String) -> Response {
    Response::new(200, text).with_header("Content-Type", CONTENT_TYPE)
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_row_and_the_retired_ones() {
        let sb = Scoreboard::create(4).unwrap();
        let a = sb.claim(Role::Worker, 0).unwrap();
        let b = sb.claim(Role::Worker, 1).unwrap();
        for (i, pid) in [(a, 10), (b, 11)] {
            let r = sb.row(i);
            r.pid.store(pid, Relaxed);
            r.accepted.store(5, Relaxed);
            r.http_status[1].store(3, Relaxed);
            r.app[2].store(4, Relaxed);
        }
        sb.release(b); // retired: its counts stay in the totals
        let table = [
            AppCounter {
                index: 2,
                name: "x_removals_total",
                help: "Removals.",
                label: Some(("cause", "a\"b")),
            },
            AppCounter {
                index: 99,
                name: "x_bad_total",
                help: "Out of range.",
                label: None,
            },
        ];
        let mut m = Exposition::new();
        m.framework(&sb);
        m.app_counters(&sb, &table);
        let text = m.finish();
        assert!(
            text.contains("swocloud_connections_accepted_total 10\n"),
            "{text}"
        );
        assert!(text.contains("swocloud_http_responses_total{class=\"2xx\"} 6\n"));
        assert!(text.contains("swocloud_worker_connections{worker=\"0\",pid=\"10\"} 0\n"));
        assert!(
            text.contains("x_removals_total{cause=\"a\\\"b\"} 8\n"),
            "{text}"
        );
        assert!(!text.contains("x_bad_total"));
        assert_eq!(
            text.matches("# TYPE swocloud_http_responses_total").count(),
            1
        );
    }
}
