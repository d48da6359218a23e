//! The process model: master → manager → workers, as in Swoole.

pub mod ipc;
pub mod scoreboard;
pub mod signals;
