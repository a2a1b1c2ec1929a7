//! The model manager: the catalog of models this worker can fetch ([`catalog`]), the
//! Hugging Face cache they live in ([`hub_cache`]), the hub they come from ([`hub`]), and
//! what is on this PC ([`store`]: pull, ready, verify, remove).

pub mod catalog;
pub mod commands;
pub mod hub;
pub mod hub_cache;
pub mod local;
pub mod store;
