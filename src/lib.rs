//! studio-worker: lends this PC's GPU to the minis.gg studio.
//!
//! The binary (`src/main.rs`) is a thin shell over [`cli::main`]; tests drive the same code.
//! Start reading at `ARCHITECTURE.md`, then [`runtime`].

pub mod backoff;
pub mod cli;
pub mod config;
pub mod crash;
pub mod engine;
pub mod files;
pub mod human;
pub mod image_file;
pub mod logging;
pub mod models;
pub mod outbox;
pub mod platform;
pub mod registration;
pub mod runtime;
pub mod secret;
pub mod studio;
pub mod thumbnails;
pub mod timing;
pub mod tray;
pub mod ui;
pub mod vocab;
