//! Logging an outage without flooding the log: one warning when a loop starts failing, quiet
//! retries while it keeps failing, one line when it recovers.

use std::fmt::Display;

use tokio::time::Instant;

pub(super) struct OutageLog {
    what: &'static str,
    failing_since: Option<Instant>,
    failures: u32,
}

impl OutageLog {
    pub(super) fn new(what: &'static str) -> Self {
        Self {
            what,
            failing_since: None,
            failures: 0,
        }
    }

    pub(super) fn failed(&mut self, err: &dyn Display, retry_in: std::time::Duration) {
        self.failures += 1;
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            tracing::warn!(
                "{}: {err}; retrying with backoff (next try in {})",
                self.what,
                crate::human::duration(retry_in)
            );
        } else {
            tracing::debug!(
                failures = self.failures,
                "{}: still failing: {err}; next try in {:?}",
                self.what,
                retry_in
            );
        }
    }

    pub(super) fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                "{}: the studio answers again after {} failed attempts over {}",
                self.what,
                self.failures,
                crate::human::duration(since.elapsed())
            );
        }
        self.failures = 0;
    }
}
