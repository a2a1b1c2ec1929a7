//! The model manager: the catalog of models this worker can fetch ([`catalog`]), the
//! Hugging Face cache they live in ([`hub_cache`]), the hub they come from ([`hub`]), what is
//! on this PC ([`store`]: pull, ready, verify, remove), local folders' ids ([`local`]), and
//! which folder serves which id ([`served`]).

pub mod catalog;
pub mod hub;
pub mod hub_cache;
pub(crate) mod local;
pub(crate) mod served;
pub mod store;
