//! The words every part of the worker shares: a job and what it may ask for ([`job`]), where
//! a running job is ([`progress`]), the device it runs on ([`device`]), and why the worker is
//! paused ([`pause`]).
//!
//! This module imports nothing of ours, so every other module can depend on it without a
//! cycle (ARCHITECTURE.md, "Layers"). The wire names of these types (their serde attributes)
//! are the protocol's; `studio::protocol` uses them as they are.

pub mod device;
pub mod job;
pub mod pause;
pub mod progress;
pub mod schedule;
