//! The uploader (studio-api.md §3.3): takes results out of the outbox, oldest first, and
//! uploads them until the studio has them. An entry is deleted only after `2xx`, `409` or
//! `410` (or a `413`/other refusal, which is reported with `fail`); anything transient is
//! retried with backoff for as long as it takes. On start, the job loop claims nothing until
//! this task has emptied the outbox once.

use tokio::time::Instant;

use super::job_loop::hand_back;
use super::outage::OutageLog;
use super::status::JobOutcome;
use super::{TaskContext, approved_credentials};
use crate::backoff::Backoff;
use crate::outbox::OutboxEntry;
use crate::studio::protocol::FailCode;
use crate::studio::{Credentials, StudioError};

pub(super) async fn run(context: TaskContext) {
    let mut backoff = Backoff::new(context.timing.backoff);
    let mut outage = OutageLog::new("upload");
    let mut config_changes = context.config.subscribe();

    loop {
        let outbox = context.outbox.clone();
        let entries = match tokio::task::spawn_blocking(move || outbox.list()).await {
            Ok(Ok(entries)) => entries,
            Ok(Err(err)) => {
                tracing::error!("cannot read the outbox: {err}");
                Vec::new()
            }
            Err(err) => {
                tracing::error!("outbox reader stopped: {err}");
                Vec::new()
            }
        };
        context.status.send_if_modified(|s| {
            let before = (s.jobs.outbox_len, s.jobs.outbox_drained_since_start);
            s.jobs.outbox_len = entries.len();
            s.jobs.outbox_drained_since_start |= entries.is_empty();
            before != (s.jobs.outbox_len, s.jobs.outbox_drained_since_start)
        });

        let Some(entry) = entries.into_iter().next() else {
            tokio::select! {
                () = context.shutdown.cancelled() => return,
                () = context.outbox_changed.notified() => {}
            }
            continue;
        };
        let Some(credentials) = approved_credentials(&context.config.snapshot()) else {
            // Not approved (yet, or any more): results wait on disk.
            tokio::select! {
                () = context.shutdown.cancelled() => return,
                _ = config_changes.changed() => {}
            }
            continue;
        };

        let outbox = context.outbox.clone();
        let reading = entry.clone();
        let images = match tokio::task::spawn_blocking(move || outbox.images(&reading)).await {
            Ok(Ok(images)) => images,
            Ok(Err(err)) => {
                // The files are damaged: nothing can be delivered; give the job back.
                tracing::error!(job_id = %entry.meta.job_id, "outbox entry unreadable ({err}); reporting the job as failed");
                give_up(
                    &context,
                    &credentials,
                    &entry,
                    "the finished images were lost on this PC".to_owned(),
                    true,
                )
                .await;
                continue;
            }
            Err(err) => {
                tracing::error!("outbox reader stopped: {err}");
                continue;
            }
        };

        let mut meta = entry.meta.result.clone();
        meta.worker_id.clone_from(&credentials.worker_id);
        let uploaded = tokio::select! {
            () = context.shutdown.cancelled() => return,
            uploaded = context.client.upload_result(&credentials, &entry.meta.job_id, &meta, images) => uploaded,
        };
        match uploaded {
            Ok(()) => {
                backoff.reset();
                outage.recovered();
                tracing::info!(job_id = %entry.meta.job_id, images = entry.meta.image_count, "result delivered");
                drop_entry(&context, &entry, JobOutcome::Delivered);
            }
            Err(StudioError::NotFound { .. } | StudioError::Conflict { .. }) => {
                backoff.reset();
                tracing::info!(job_id = %entry.meta.job_id, "the studio no longer wants this result; dropped");
                drop_entry(&context, &entry, JobOutcome::LeaseLost);
            }
            Err(StudioError::Unauthorized) => context.revoked(&credentials.worker_id),
            Err(StudioError::Refused { status, message }) => {
                // Retrying cannot help, here or elsewhere: the same job gives the same result
                // (a 413 stays a 413). Say so with a final `fail`.
                let reason = if status == 413 {
                    "the result is too large for the studio".to_owned()
                } else {
                    format!("the studio refused the result ({status}): {message}")
                };
                tracing::error!(job_id = %entry.meta.job_id, "{reason}");
                give_up(&context, &credentials, &entry, reason, false).await;
            }
            Err(err) => {
                let delay = backoff.next_delay(err.retry_after());
                let studio_floor = err.retry_after().map(|wait| Instant::now() + wait);
                outage.failed(&err, delay);
                tokio::select! {
                    () = context.shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(Instant::now() + delay) => {}
                    () = context.retry_uploads.notified() => {
                        // The person asked: go now, but never before the studio's Retry-After.
                        if let Some(floor) = studio_floor {
                            tokio::select! {
                                () = context.shutdown.cancelled() => return,
                                () = tokio::time::sleep_until(floor) => {}
                            }
                        }
                        tracing::info!("retrying uploads now, as asked");
                        backoff.reset();
                    }
                }
            }
        }
    }
}

/// The entry cannot be delivered: tell the studio with `fail` and drop it.
async fn give_up(
    context: &TaskContext,
    credentials: &Credentials,
    entry: &OutboxEntry,
    reason: String,
    retryable: bool,
) {
    hand_back(
        context,
        credentials,
        &entry.meta.job_id,
        FailCode::Internal,
        &reason,
        retryable,
    )
    .await;
    drop_entry(
        context,
        entry,
        JobOutcome::Failed {
            code: FailCode::Internal,
            message: reason,
        },
    );
}

fn drop_entry(context: &TaskContext, entry: &OutboxEntry, outcome: JobOutcome) {
    if let Err(err) = context.outbox.remove(entry) {
        // Left on disk, it would be uploaded again: the studio answers 200 or 409 then.
        tracing::error!(job_id = %entry.meta.job_id, "cannot remove the delivered result: {err}");
    }
    // One status update, so no reader sees the counters and the outbox disagree.
    context.status.send_modify(|s| {
        s.jobs.outbox_len = s.jobs.outbox_len.saturating_sub(1);
        match &outcome {
            JobOutcome::Delivered => {
                s.jobs.counters.jobs_completed += 1;
                s.jobs.counters.images_generated += entry.meta.image_count as u64;
            }
            JobOutcome::Failed { .. } => s.jobs.counters.jobs_failed += 1,
            _ => {}
        }
        s.jobs.set_outcome(&entry.meta.job_id, outcome);
    });
}
