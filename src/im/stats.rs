//! The IM server's counters: named indices into the scoreboard rows' `app`
//! array, so `/metrics` and the Route's load figure sum them over every
//! worker.

use std::sync::atomic::Ordering::Relaxed;

use crate::event::App;
use crate::metrics::AppCounter;
use crate::reactor::Server;

/// Users connected to this worker (a gauge).
pub const USERS: usize = 0;
/// Messages delivered to local users.
pub const DELIVERED: usize = 1;
/// Messages forwarded to the Route.
pub const FORWARDED: usize = 2;
/// User connections refused (bad or missing token).
pub const REFUSED: usize = 3;
/// User-to-user messages stored in an inbox by this server.
pub const STORED: usize = 4;
/// Times the Route link moved to the next node of `route_urls`.
pub const ROUTE_FAILOVERS: usize = 5;
/// Group messages this server received from the Route (one per message
/// per server, however many members it holds).
pub const GROUP_IN: usize = 6;
/// Accepted messages this server verified after a Redis disruption.
pub const AUDITED: usize = 7;
/// Of those, the ones Redis had lost (their recipient starts a new epoch).
pub const AUDIT_LOST: usize = 8;

/// The IM server's counters as `/metrics` exports them (summed over workers).
pub const COUNTERS: &[AppCounter] = &[
    AppCounter {
        index: DELIVERED,
        name: "swocloud_im_messages_delivered_total",
        help: "Messages pushed to local users' connections.",
        label: None,
    },
    AppCounter {
        index: FORWARDED,
        name: "swocloud_im_messages_forwarded_total",
        help: "User messages forwarded through the Route to other IM servers.",
        label: None,
    },
    AppCounter {
        index: REFUSED,
        name: "swocloud_im_connections_refused_total",
        help: "User connections refused for a missing uid or a bad token (close 4001) or a malformed resume (4003).",
        label: None,
    },
    AppCounter {
        index: STORED,
        name: "swocloud_im_messages_stored_total",
        help: "User-to-user messages stored in the recipient's inbox by this server.",
        label: None,
    },
    AppCounter {
        index: ROUTE_FAILOVERS,
        name: "swocloud_im_route_failovers_total",
        help: "Times the Route link moved to the next node of route_urls (the node closed, fell silent or could not be dialled).",
        label: None,
    },
    AppCounter {
        index: GROUP_IN,
        name: "swocloud_im_group_messages_received_total",
        help: "Group messages received from the Route (one per message for the whole server).",
        label: None,
    },
    AppCounter {
        index: AUDITED,
        name: "swocloud_im_audited_total",
        help: "Messages this server accepted that it verified in Redis after a disruption (a link broke, a failover).",
        label: None,
    },
    AppCounter {
        index: AUDIT_LOST,
        name: "swocloud_im_audit_lost_total",
        help: "Audited messages Redis had lost (asynchronous replication): their recipients were moved to a new epoch and told resync.",
        label: None,
    },
];

/// Adds `n` to this worker's counter `index`.
pub fn add<A: App>(srv: &Server<A>, index: usize, n: u64) {
    srv.row().app[index].fetch_add(n, Relaxed);
}

/// Sets this worker's users gauge.
pub fn set_users<A: App>(srv: &Server<A>, n: usize) {
    srv.row().app[USERS].store(n as u64, Relaxed);
}

/// Users connected to this server, over all its workers. O(workers).
pub fn load<A: App>(srv: &Server<A>) -> u64 {
    let sb = srv.scoreboard();
    sb.snapshot()
        .iter()
        .filter(|r| r.role == crate::process::scoreboard::Role::Worker)
        .map(|r| sb.row(r.index).app[USERS].load(Relaxed))
        .sum()
}
