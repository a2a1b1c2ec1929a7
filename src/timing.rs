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
    /// The claim long-poll's `waitS` (§3.1).
    pub claim_wait: Duration,
    /// After a `204` the studio answered at once (not a held long-poll): wait this long.
    pub empty_claim_pause: Duration,
    /// Progress is sent at most this often (§3.2: at most 2 per second).
    pub progress_min_gap: Duration,
    /// After [`FAILURES_BEFORE_BACKOFF`] engine failures in a row, claiming waits this out.
    pub failure_backoff: BackoffPolicy,
    /// How long a job being handed back on quit may take to say so.
    pub handback_timeout: Duration,
    /// Uploads the studio refused (404, another 4xx) are retried with this backoff…
    pub refused_upload_backoff: BackoffPolicy,
    /// …until this long after the first refusal; then they are reported failed.
    pub give_up_refused_upload_after: Duration,
    /// How often the policy reads its probes while the worker may take jobs (a game must
    /// stop it within 2 s), and while it is paused by the person or the studio anyway.
    pub policy_tick: Duration,
    pub policy_paused_tick: Duration,
    /// How often the models on this PC are looked up again while no download runs (what a
    /// `models pull` or `models remove` from the terminal changed, for Settings).
    pub models_on_disk_refresh: Duration,
}

/// Engine failures in a row after which the worker stops claiming for a while, instead of
/// burning through the studio's queue.
pub const FAILURES_BEFORE_BACKOFF: u32 = 3;

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
        // studio-api.md, Conventions: the default request timeout.
        request_timeout: Duration::from_secs(30),
        claim_wait: Duration::from_secs(20),
        empty_claim_pause: Duration::from_secs(5),
        progress_min_gap: Duration::from_millis(500),
        failure_backoff: BackoffPolicy {
            base: Duration::from_secs(30),
            cap: Duration::from_secs(10 * 60),
        },
        handback_timeout: Duration::from_secs(5),
        refused_upload_backoff: BackoffPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60 * 60),
        },
        give_up_refused_upload_after: Duration::from_secs(7 * 24 * 60 * 60),
        policy_tick: Duration::from_secs(1),
        policy_paused_tick: Duration::from_secs(5),
        models_on_disk_refresh: Duration::from_secs(60),
    };
}

impl Default for Timing {
    fn default() -> Self {
        Self::PRODUCTION
    }
}
