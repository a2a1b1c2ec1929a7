//! Everything about talking to the studio: its base URL, the protocol's JSON bodies, and the
//! HTTP client that turns each endpoint of `studio-api.md` into one async method.

mod api_base;
mod client;
pub mod job;
pub mod protocol;

pub use api_base::{ApiBase, ApiBaseError};
pub use client::{Credentials, StudioClient, StudioError, USER_AGENT};
