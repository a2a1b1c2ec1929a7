//! What this computer is, and the operating-system integrations that differ per platform.

pub mod autostart;
pub(crate) mod console;
pub(crate) mod gpu_build;
pub(crate) mod host;
pub(crate) mod open;
pub mod probes;
pub(crate) mod relaunch;
pub(crate) mod single_instance;
