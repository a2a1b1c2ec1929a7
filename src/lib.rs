//! studio-worker: lends this PC's GPU to the minis.gg studio.
//!
//! The binary (`src/main.rs`) is a thin shell over [`cli::main`]; tests drive the same code.
//! Start reading at `ARCHITECTURE.md` (its "Layers" picture says which module may use which),
//! then [`runtime`].
//!
//! Public here is what the binary, the integration tests and the benchmarks use; everything
//! else is private to the crate.

// Leaves: they import nothing of ours (but each other, in this order).
pub mod backoff;
mod files;
mod http_body;
mod human;
pub mod image_file;
mod redact;
pub mod secret;
pub mod timing;
pub mod vocab;

// The machine, the settings, the studio, the engine, the models.
pub mod config;
pub mod engine;
pub mod models;
pub mod platform;
pub mod studio;

// What the worker keeps on disk and how it registers.
mod crash;
mod logging;
mod outbox;
pub mod policy;
pub mod registration;
pub mod thumbnails;

// The tasks, the views, the commands.
pub mod cli;
pub mod runtime;
pub mod tray;
pub mod ui;

// The layer picture above, checked against the source files.
#[cfg(test)]
mod layers;
