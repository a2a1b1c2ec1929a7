//! When the worker steps aside by itself, so the PC's owner never has to think of it: a game
//! (a program using the GPU heavily, a full-screen window, a program on the person's list),
//! the person at the keyboard when "only while I am away" is on, hours outside the schedule, a
//! hot GPU, battery power.
//!
//! [`Policy::decide`] turns the probes' readings into one decision: a pure function of the
//! settings, the readings over time (what the policy remembers: when a game was last seen,
//! whether the GPU is hot, what the person overrode), the person's overrides and the time.
//! The runtime's policy task reads the probes (`platform::probes`) and acts on the decision
//! through the pause path every pause takes. [`rest_after_step`] is the GPU-share cap.

mod decide;

pub use decide::{AutoPause, Decision, Policy, Readings, Signal, rest_after_step};

#[cfg(test)]
mod timeline_tests;
