//! The IM server: holds end users' WebSocket connections, registers with
//! the Route, and delivers messages (the seed's `swoole_work` app with its
//! `StareListen` registration, and duties 3 and 6 of the seed's Route on the
//! user's side).
//!
//! - [`app`]: the hooks: user connections, presence, delivery, draining.
//! - [`registrar`]: worker 0's link to the Route (register, heartbeat,
//!   redial with backoff and jitter).
//! - [`presence`]: who is online where, in Redis, by instance epoch.
//! - [`protocol`]: user, Route and worker-to-worker frames as closed enums.
//! - [`settings`]: the IM server's settings keys.

pub mod app;
pub mod presence;
pub mod protocol;
pub mod registrar;
pub mod settings;

pub use app::ImApp;
