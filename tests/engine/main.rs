//! The image engine against the reference (diffusers), on the tiny fixtures in
//! `tests/fixtures/models/` (made by `tests/fixtures/make_fixtures.py`).

// Test and tool code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/files.rs"]
mod files;
mod generate;
mod hostile_configs;
mod memory_paths;
mod non_finite;
mod parity;
mod support;
mod widened_weights;
