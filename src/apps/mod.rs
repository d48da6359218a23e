//! Applications that ship with the framework.

pub mod health;
