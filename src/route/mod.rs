//! The Route: the IM cluster's registry of live IM servers (the seed's
//! duties 1, 2, 4, 5 and 7), on the framework.
//!
//! - [`registry`]: the Redis data model and its atomic scripts.
//! - [`cache`]: each worker's in-memory copy, kept current over pub/sub.
//! - [`app`]: the hooks: register, heartbeats, liveness sweep.
//! - [`api`]: the HTTP endpoints.
//! - [`settings`]: the Route's own settings keys.
//! - [`stats`]: the Route's counters (scoreboard indices for `/metrics`).
//! - [`status`]: the Route's section of `swocloud status`.

pub mod api;
pub mod app;
pub mod balancer;
pub mod cache;
pub mod delivery;
pub mod registry;
pub mod settings;
pub mod stats;
pub mod status;

pub use app::RouteApp;
