//! What this computer is, and the operating-system integrations that differ per platform.

pub mod autostart;
pub mod gpu_build;
pub mod host;
pub mod open;
pub mod single_instance;
