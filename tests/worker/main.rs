//! The integration tests: the real library against the in-process studio over real sockets,
//! and the real binary as a child process. One test binary, so CI links once.

// Test and tool code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod config_file;
mod crash;
#[cfg(target_os = "linux")]
mod gpu_build;
mod jobs;
mod models;
mod outbox;
mod policy;
#[cfg(target_os = "linux")]
mod policy_desktop;
mod registration;
mod runtime;
mod soak;
#[cfg(target_os = "linux")]
mod tray;
mod ui;
