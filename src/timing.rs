//! Every interval the background loops use, in one place.
//!
//! [`Timing::PRODUCTION`] is what studio-api.md asks for. Tests run the very same loops with
//! shorter intervals (see `tests/support`), so nothing about the flow changes between a test
//! and a real run but the clock.

use std::time::Duration;

use crate::backoff::BackoffPolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Retries after transient studio errors.
    pub backoff: BackoffPolicy,
    /// Registration poll interval when the studio does not say (§1.2: 30 s).
    pub poll_default: Duration,
    /// `pollAfterS` is clamped to `poll_floor..=poll_cap`; `poll_floor` is also the pause
    /// after creating a request before its first poll.
    pub poll_floor: Duration,
    pub poll_cap: Duration,
    /// Heartbeat interval when the studio does not say (§2: 30 s).
    pub heartbeat_default: Duration,
    /// `nextHeartbeatS` is clamped to `heartbeat_floor..=heartbeat_cap` (§2: 5…300 s).
    pub heartbeat_floor: Duration,
    pub heartbeat_cap: Duration,
    /// How long a refused registration request (a 4xx) waits before it is tried again.
    pub refused_retry: Duration,
    /// Per-request timeout (Conventions: 30 s).
    pub request_timeout: Duration,
}

impl Timing {
    pub const PRODUCTION: Self = Self {
        backoff: BackoffPolicy::STUDIO,
        poll_default: Duration::from_secs(30),
        poll_floor: Duration::from_secs(1),
        poll_cap: Duration::from_secs(10 * 60),
        heartbeat_default: Duration::from_secs(30),
        heartbeat_floor: Duration::from_secs(5),
        heartbeat_cap: Duration::from_secs(300),
        refused_retry: Duration::from_secs(30),
        request_timeout: crate::studio::DEFAULT_TIMEOUT,
    };
}

impl Default for Timing {
    fn default() -> Self {
        Self::PRODUCTION
    }
}
