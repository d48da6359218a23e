//! The IM server: holds end users' WebSocket connections, registers with
//! the Route, and delivers messages (the seed's `swoole_work` app with its
//! `StareListen` registration, and duties 3 and 6 of the seed's Route on the
//! user's side).
//!
//! - [`app`]: the hooks: user connections, presence, delivery, draining.
//! - [`registrar`]: worker 0's link to the Route (register, heartbeat,
//!   redial with backoff and jitter).
//! - [`workers`]: the messages this server's workers hand each other.
//! - [`settings`]: the IM server's settings keys.

pub mod app;
pub mod registrar;
pub mod settings;
pub mod workers;

pub use app::ImApp;
