//! swocloud: a Swoole-style multi-process server framework, and the IM cluster built on it.

pub mod apps;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod event;
pub mod im;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod reactor;
pub mod route;
