//! The Route's own counters: named indices into the scoreboard rows' `app`
//! array, so `/metrics` sums them over every worker (and over workers that
//! have exited), whichever worker answers the scrape.
//!
//! Each worker bumps its own row with [`count`] (one relaxed atomic add,
//! no syscall). [`COUNTERS`] names them for [`crate::metrics`]. Indices
//! 0..=8 are taken; new counters take the next free index (below
//! `scoreboard::APP_COUNTERS`) and an entry in [`COUNTERS`].

use std::sync::atomic::Ordering::Relaxed;

use crate::metrics::AppCounter;
use crate::process::scoreboard::Row;

/// Registrations stored in Redis.
pub const REGISTRATIONS: usize = 0;
/// Entries re-registered after Redis lost them (restarted empty).
pub const REBUILT: usize = 1;
/// Frames refused (bad JSON, unknown method, wrong fields, binary).
pub const PROTOCOL_ERRORS: usize = 2;
/// Registrations refused for a bad token.
pub const AUTH_FAILURES: usize = 3;
/// Removals whose peer closed its connection.
pub const REMOVED_CLOSED: usize = 4;
/// Removals of peers that fell silent.
pub const REMOVED_SILENT: usize = 5;
/// Removals by lease expiry (the holding worker or node died).
pub const REMOVED_LEASE: usize = 6;
/// Removals because the same connection re-registered under another address.
pub const REMOVED_REPLACED: usize = 7;
/// Silent IM servers re-admitted because they spoke again within
/// `heartbeat_grace_time`.
pub const READMISSIONS: usize = 8;
/// `/api/send` messages stored in an inbox.
pub const STORED: usize = 9;
/// `/api/send` messages verified after a Redis disruption.
pub const AUDITED: usize = 10;
/// Of those, the ones Redis had lost (their recipient starts a new epoch).
pub const AUDIT_LOST: usize = 11;

const REMOVALS_HELP: &str = "IM servers removed from the registry, by cause.";

/// The Route's counters as `/metrics` exports them.
pub const COUNTERS: &[AppCounter] = &[
    AppCounter {
        index: REGISTRATIONS,
        name: "swocloud_route_registrations_total",
        help: "IM server registrations stored in Redis.",
        label: None,
    },
    AppCounter {
        index: REMOVED_CLOSED,
        name: "swocloud_route_removals_total",
        help: REMOVALS_HELP,
        label: Some(("cause", "closed")),
    },
    AppCounter {
        index: REMOVED_SILENT,
        name: "swocloud_route_removals_total",
        help: REMOVALS_HELP,
        label: Some(("cause", "silent")),
    },
    AppCounter {
        index: REMOVED_LEASE,
        name: "swocloud_route_removals_total",
        help: REMOVALS_HELP,
        label: Some(("cause", "lease")),
    },
    AppCounter {
        index: REMOVED_REPLACED,
        name: "swocloud_route_removals_total",
        help: REMOVALS_HELP,
        label: Some(("cause", "replaced")),
    },
    AppCounter {
        index: PROTOCOL_ERRORS,
        name: "swocloud_route_protocol_errors_total",
        help: "Frames refused with an error frame.",
        label: None,
    },
    AppCounter {
        index: AUTH_FAILURES,
        name: "swocloud_route_auth_failures_total",
        help: "Registrations refused for a missing or bad token.",
        label: None,
    },
    AppCounter {
        index: READMISSIONS,
        name: "swocloud_route_readmissions_total",
        help: "Silent IM servers re-admitted under their old registration after they spoke again within heartbeat_grace_time.",
        label: None,
    },
    AppCounter {
        index: REBUILT,
        name: "swocloud_route_rebuilt_entries_total",
        help: "Entries re-registered after Redis lost them.",
        label: None,
    },
    AppCounter {
        index: STORED,
        name: "swocloud_route_messages_stored_total",
        help: "/api/send messages stored in the user's inbox.",
        label: None,
    },
    AppCounter {
        index: AUDITED,
        name: "swocloud_route_audited_total",
        help: "/api/send messages this node verified in Redis after a disruption (a link broke, a failover).",
        label: None,
    },
    AppCounter {
        index: AUDIT_LOST,
        name: "swocloud_route_audit_lost_total",
        help: "Audited messages Redis had lost (asynchronous replication): their recipients were moved to a new epoch and told resync.",
        label: None,
    },
];

/// Adds one to counter `index` of this worker's row.
pub fn count(row: &Row, index: usize) {
    if let Some(c) = row.app.get(index) {
        c.fetch_add(1, Relaxed);
    }
}

/// Counts a removal by cause (`closed`, `silent`, `lease`, anything else:
/// `replaced`).
pub fn removed(row: &Row, cause: &str) {
    count(
        row,
        match cause {
            "closed" => REMOVED_CLOSED,
            "silent" => REMOVED_SILENT,
            "lease" => REMOVED_LEASE,
            _ => REMOVED_REPLACED,
        },
    );
}
