//! Exponential backoff with full jitter, shared by every loop that talks to the studio.
//!
//! The n-th consecutive failure waits a uniformly random time in `[0, min(cap, base·2ⁿ)]`
//! (the "full jitter" of the AWS architecture blog), and never less than a `Retry-After`
//! the studio asked for. A success resets it.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub base: Duration,
    pub cap: Duration,
}

impl BackoffPolicy {
    /// studio-api.md, Conventions: start 1 s, cap 5 min.
    pub const STUDIO: Self = Self {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(5 * 60),
    };
}

#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let jittered = ceiling.mul_f64(fastrand::f64());
        jittered.max(retry_after.unwrap_or_default())
    }

    /// The upper bound of the next delay: `min(cap, base·2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 2_u32.saturating_pow(self.failures.min(30));
        self.policy
            .base
            .checked_mul(factor)
            .unwrap_or(self.policy.cap)
            .min(self.policy.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_within_it() {
        let mut backoff = Backoff::new(BackoffPolicy::STUDIO);
        let mut ceilings = Vec::new();
        for _ in 0..40 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay(None);
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            ceilings.push(ceiling.as_secs());
        }
        assert_eq!(&ceilings[..4], &[1, 2, 4, 8]);
        assert_eq!(*ceilings.last().unwrap(), 300);
        assert!(ceilings.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut delays = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut backoff = Backoff::new(BackoffPolicy::STUDIO);
            for _ in 0..8 {
                backoff.next_delay(None);
            }
            delays.insert(backoff.next_delay(None).as_millis());
        }
        assert!(
            delays.len() > 10,
            "full jitter should rarely repeat: {delays:?}"
        );
    }

    #[test]
    fn retry_after_is_a_floor_and_success_resets() {
        let mut backoff = Backoff::new(BackoffPolicy::STUDIO);
        assert!(backoff.next_delay(Some(Duration::from_secs(42))) >= Duration::from_secs(42));
        assert_eq!(backoff.failures(), 1);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
    }
}
