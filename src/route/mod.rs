//! The Route: the IM cluster's registry of live IM servers (the seed's
//! duties 1, 2, 4, 5 and 7), on the framework.
//!
//! - [`registry`]: the Redis data model and its atomic scripts.
//! - [`cache`]: each worker's in-memory copy, kept current over pub/sub.
//! - [`app`]: [`RouteApp`], which wires the framework's hooks to the
//!   components below.
//! - [`registrations`]: the IM-server connections and the registry writes.
//! - [`liveness`]: the sweep; silent IM servers leave the registry, and
//!   come back within `heartbeat_grace_time`.
//! - [`groups`]: the group API, users' group messages and the fan-out to
//!   the servers holding members.
//! - [`messages`]: `/api/send`'s store-then-deliver and `/api/message`'s status.
//! - [`delivery`]: locating users and relaying frames between Route workers.
//! - [`locations`]: where users are, cached, and the messages waiting for a lookup.
//! - [`directory`]: the live-server list (cache, balancer) for the API.
//! - [`api`]: the HTTP endpoints; [`answers`]: their answer documents.
//! - [`balancer`]: picking an IM server for a user (a picker rebuilt once
//!   per cache generation, picks without allocation).
//!
//! The wire protocol, the key schema and the shared record formats are
//! [`crate::cluster`]'s; nothing here imports [`crate::im`].
//! - [`settings`]: the Route's own settings keys.
//! - [`stats`]: the Route's counters (scoreboard indices for `/metrics`).
//! - [`status`]: the Route's section of `swocloud status`.

pub mod answers;
pub mod api;
pub mod app;
pub mod balancer;
pub mod cache;
pub mod delivery;
pub mod directory;
pub mod groups;
pub mod liveness;
pub mod locations;
pub mod messages;
pub mod registrations;
pub mod registry;
pub mod settings;
pub mod stats;
pub mod status;

pub use app::RouteApp;
