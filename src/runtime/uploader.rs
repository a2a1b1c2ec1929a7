//! The uploader (studio-api.md §3.3): takes results out of the outbox, oldest first, and
//! uploads them until the studio has them. An entry is deleted only after `2xx`, `409` or
//! `410` (or a `413`/other refusal, which is reported with `fail`); anything transient is
//! retried with backoff for as long as it takes. On start, the job loop claims nothing until
//! this task has emptied the outbox once ([`OutboxState::drained_once`]).

use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::StatusSender;
use super::outage::OutageLog;
use super::session::Session;
use super::session::report_fail;
use super::signals::{OutboxState, Tally};
use super::status::{Delivery, JobOutcome};
use crate::backoff::Backoff;
use crate::config::SharedConfig;
use crate::outbox::{Outbox, OutboxEntry};
use crate::studio::protocol::FailCode;
use crate::studio::{StudioClient, StudioError};
use crate::timing::Timing;

pub(super) struct Uploader {
    pub client: StudioClient,
    pub config: SharedConfig,
    pub outbox: Outbox,
    pub outbox_state: watch::Sender<OutboxState>,
    /// Rung by the job loop after it put a result in the outbox.
    pub outbox_changed: Arc<Notify>,
    /// Rung (to current waiters only) when the person asks to retry uploads now.
    pub retry_uploads: Arc<Notify>,
    pub tally: Arc<Tally>,
    pub status: StatusSender,
    pub timing: Timing,
    pub shutdown: CancellationToken,
}

pub(super) async fn run(task: Uploader) {
    let mut backoff = Backoff::new(task.timing.backoff);
    let mut outage = OutageLog::new("upload");
    let mut config_changes = task.config.subscribe();

    loop {
        let outbox = task.outbox.clone();
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
        task.outbox_state.send_if_modified(|state| {
            let before = *state;
            state.waiting = entries.len();
            state.drained_once |= entries.is_empty();
            before != *state
        });
        task.status.send_if_modified(|s| {
            let changed = s.jobs.outbox_len != entries.len();
            s.jobs.outbox_len = entries.len();
            changed
        });

        let Some(entry) = entries.into_iter().next() else {
            tokio::select! {
                () = task.shutdown.cancelled() => return,
                () = task.outbox_changed.notified() => {}
            }
            continue;
        };
        let Some(session) = Session::current(&task.client, &task.config) else {
            // Not approved (yet, or any more): results wait on disk.
            tokio::select! {
                () = task.shutdown.cancelled() => return,
                _ = config_changes.changed() => {}
            }
            continue;
        };

        let outbox = task.outbox.clone();
        let reading = entry.clone();
        let images = match tokio::task::spawn_blocking(move || outbox.images(&reading)).await {
            Ok(Ok(images)) => images,
            Ok(Err(err)) => {
                // The files are damaged: nothing can be delivered; give the job back.
                tracing::error!(job_id = %entry.meta.job_id, "outbox entry unreadable ({err}); reporting the job as failed");
                task.give_up(
                    &session,
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
        meta.worker_id = session.worker_id().to_owned();
        let uploaded = tokio::select! {
            () = task.shutdown.cancelled() => return,
            uploaded = session.upload_result(&entry.meta.job_id, &meta, images) => uploaded,
        };
        match uploaded {
            Ok(()) => {
                backoff.reset();
                outage.recovered();
                tracing::info!(job_id = %entry.meta.job_id, images = entry.meta.image_count, "result delivered");
                task.drop_entry(&entry, JobOutcome::DELIVERED);
            }
            Err(StudioError::NotFound { .. } | StudioError::Conflict { .. }) => {
                backoff.reset();
                tracing::info!(job_id = %entry.meta.job_id, "the studio no longer wants this result; dropped");
                task.drop_entry(
                    &entry,
                    JobOutcome::Finished {
                        delivery: Delivery::NotWanted,
                    },
                );
            }
            // Revoked (recorded by the session): results wait on disk for a new approval.
            Err(StudioError::Unauthorized) => {}
            Err(StudioError::Refused { status, message }) => {
                // Retrying cannot help, here or elsewhere: the same job gives the same result
                // (a 413 stays a 413). Say so with a final `fail`.
                let reason = if status == 413 {
                    "the result is too large for the studio".to_owned()
                } else {
                    format!("the studio refused the result ({status}): {message}")
                };
                tracing::error!(job_id = %entry.meta.job_id, "{reason}");
                task.give_up(&session, &entry, reason, false).await;
            }
            Err(err) => {
                let delay = backoff.next_delay(err.retry_after());
                let studio_floor = err.retry_after().map(|wait| Instant::now() + wait);
                outage.failed(&err, delay);
                tokio::select! {
                    () = task.shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(Instant::now() + delay) => {}
                    () = task.retry_uploads.notified() => {
                        // The person asked: go now, but never before the studio's Retry-After.
                        if let Some(floor) = studio_floor {
                            tokio::select! {
                                () = task.shutdown.cancelled() => return,
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

impl Uploader {
    /// The entry cannot be delivered: tell the studio with `fail` and drop it.
    async fn give_up(
        &self,
        session: &Session,
        entry: &OutboxEntry,
        reason: String,
        retryable: bool,
    ) {
        report_fail(
            session,
            &self.timing,
            &entry.meta.job_id,
            FailCode::Internal,
            &reason,
            retryable,
        )
        .await;
        self.drop_entry(
            entry,
            JobOutcome::Failed {
                code: FailCode::Internal,
                message: reason,
            },
        );
    }

    fn drop_entry(&self, entry: &OutboxEntry, outcome: JobOutcome) {
        if let Err(err) = self.outbox.remove(entry) {
            // Left on disk, it would be uploaded again: the studio answers 200 or 409 then.
            tracing::error!(job_id = %entry.meta.job_id, "cannot remove the delivered result: {err}");
        }
        match &outcome {
            JobOutcome::Finished {
                delivery: Delivery::Delivered,
            } => self.tally.delivered(entry.meta.image_count as u64),
            JobOutcome::Failed { .. } => self.tally.failed(),
            _ => {}
        }
        self.outbox_state
            .send_modify(|state| state.waiting = state.waiting.saturating_sub(1));
        // One status update, so no reader sees the counters and the outbox disagree.
        self.status.send_modify(|s| {
            s.jobs.outbox_len = s.jobs.outbox_len.saturating_sub(1);
            // Read under the status lock, so the last writer always leaves the latest counts.
            s.jobs.counters = self.tally.counters();
            s.jobs.set_outcome(&entry.meta.job_id, outcome);
        });
    }
}
