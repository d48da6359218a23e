//! The IM server: holds end users' WebSocket connections, registers with
//! the Route, and delivers messages (the seed's `swoole_work` app with its
//! `StareListen` registration, and duties 3 and 6 of the seed's Route on the
//! user's side).
//!
//! - [`app`]: [`ImApp`], which wires the framework's hooks to the
//!   components below and routes a user's message.
//! - [`sessions`]: this worker's users (admission, pushes, farewell).
//! - [`feeds`]: each user connection's [`feed`] of stored messages
//!   (welcome, replay, gap fill, acks) over the inbox.
//! - [`groups`]: this worker's group members, their feeds of the group
//!   streams and this server's member counts.
//! - [`sweep`]: the paced checks of both (after a `check`, and a
//!   background round once per `inbox_check_interval`).
//! - [`directory`]: which worker of this server holds which user.
//! - [`presence_store`]: this server's Redis calls (presence, registry read).
//! - [`route_link`]: worker 0's link to the Route (register, heartbeat,
//!   redial with backoff and jitter).
//! - [`http`]: `/health`, `/ready`, `/metrics`.
//! - [`stats`]: the IM server's counters.
//! - [`workers`]: the messages this server's workers hand each other.
//! - [`settings`]: the IM server's settings keys.
//!
//! The wire protocol and the shared record formats are [`crate::cluster`]'s;
//! nothing here imports [`crate::route`].

pub mod app;
pub mod directory;
pub mod feed;
pub mod feeds;
pub mod groups;
pub mod http;
pub mod presence_store;
pub mod route_link;
pub mod sessions;
pub mod settings;
pub mod stats;
pub mod sweep;
pub mod workers;

pub use app::ImApp;
