//! Progress reports for the running job (studio-api.md §3.2): at every stage change, as steps
//! advance, and at least every `leaseS / 3` so the lease never runs out; never more than
//! twice a second. The studio's answer can stop the job: `cancel: true`, `409` or `410`.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::session::Session;
use crate::backoff::Backoff;
use crate::engine::{CancelToken, StopReason};
use crate::studio::StudioError;
use crate::studio::protocol::ProgressRequest;
use crate::timing::Timing;
use crate::vocab::job::JobSpec;
use crate::vocab::progress::{JobProgress, Stage};

/// Runs until the job's progress channel closes or the studio stops the job.
pub(super) async fn report(
    session: Session,
    timing: Timing,
    job_id: String,
    mut lease: Duration,
    mut progress: watch::Receiver<JobProgress>,
    cancel: CancelToken,
) {
    let min_gap = timing.progress_min_gap;
    let mut backoff = Backoff::new(timing.backoff);
    let mut last_sent: Option<(Instant, JobProgress)> = None;
    let mut retry_at: Option<Instant> = None;

    loop {
        let now = Instant::now();
        let current = *progress.borrow_and_update();
        let due_at = match last_sent {
            None => now,
            Some((sent_at, sent)) => {
                let renew_at = sent_at + lease / 3;
                if sent == current {
                    renew_at
                } else {
                    // New stage or step: as soon as the rate limit allows.
                    (sent_at + min_gap).min(renew_at)
                }
            }
        };
        let due_at = retry_at.map_or(due_at, |retry_at| due_at.max(retry_at));

        if due_at <= now {
            let body = ProgressRequest {
                worker_id: session.worker_id().to_owned(),
                stage: current.stage,
                step: current.step,
                total_steps: current.total_steps,
            };
            match session.progress(&job_id, &body).await {
                Ok(answer) if answer.cancel => {
                    cancel.cancel(StopReason::CancelledByStudio);
                    return;
                }
                Ok(answer) => {
                    if let Some(lease_s) = answer.lease_s {
                        lease = Duration::from_secs(lease_s.clamp(10, 3600));
                    }
                    backoff.reset();
                    retry_at = None;
                    last_sent = Some((Instant::now(), current));
                }
                Err(StudioError::NotFound { .. } | StudioError::Conflict { .. }) => {
                    cancel.cancel(StopReason::LeaseLost);
                    return;
                }
                Err(StudioError::Unauthorized) => {
                    // Revoked (recorded by the session): the job is no longer ours either.
                    cancel.cancel(StopReason::LeaseLost);
                    return;
                }
                Err(err) => {
                    // The job goes on; the lease has slack (we renew at a third of it).
                    let delay = backoff.next_delay(err.retry_after()).max(min_gap);
                    tracing::debug!(
                        job_id,
                        "progress not delivered ({err}); next try in {delay:?}"
                    );
                    retry_at = Some(Instant::now() + delay);
                }
            }
            continue;
        }

        tokio::select! {
            () = tokio::time::sleep_until(due_at) => {}
            changed = progress.changed() => {
                if changed.is_err() {
                    return; // the engine is done with this job
                }
            }
        }
    }
}

/// The last report of a job whose images are safely in the outbox. A cancel or a lost lease
/// now means the studio does not want the result; the uploader hears the same `409`/`410`
/// and drops it, so this only needs to be tried once.
pub(super) async fn send_uploading(session: &Session, spec: &JobSpec) {
    let body = ProgressRequest {
        worker_id: session.worker_id().to_owned(),
        stage: Stage::Uploading,
        step: spec.steps,
        total_steps: spec.steps,
    };
    if let Err(err) = session.progress(&spec.job_id, &body).await {
        tracing::debug!(job_id = %spec.job_id, "upload progress not delivered: {err}");
    }
}
