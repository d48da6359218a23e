//! The Route: the IM cluster's registry of live IM servers.

pub mod protocol;
pub mod registry;
