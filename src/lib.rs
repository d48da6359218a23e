//! swocloud: a Swoole-style multi-process server framework, and the IM cluster built on it.

pub mod config;
pub mod event;
pub mod process;
pub mod reactor;
