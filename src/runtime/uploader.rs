//! The uploader (studio-api.md §3.3): takes results out of the outbox, oldest first, until
//! the studio has them. A result leaves the outbox only on the studio's word:
//!
//! | the studio answers the upload | the result |
//! |---|---|
//! | `2xx` | delivered: removed |
//! | `409`, `410` (or the lease keeper heard `cancel`, `409`, `410`) | not wanted: removed |
//! | `413` | too large: reported `fail internal`, removed |
//! | `404`, another `4xx` | kept, retried with backoff up to an hour, for 7 days; then `fail internal`, removed |
//! | transient (network, `5xx`, `429`…) | kept, retried with backoff, forever |
//!
//! The person can retry every waiting result now, or discard one (reported `fail internal`).
//! A result whose files cannot be read back, or a folder whose metadata cannot, is kept and
//! shown, never failed and deleted by itself.
//!
//! The results found at start (from before a crash, or a day offline) are each offered once
//! before the job loop claims anything new; later results upload while the next job runs.
//! Claims stop while the outbox cannot be listed
//! ([`OutboxState::hold_claims`]) or is full (the job loop counts: 20 results or 500 MB). The lease of each waiting result is
//! renewed by the lease keeper ([`keep_leases`]), also while a slow upload is in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::outage::OutageLog;
use super::session::{Session, report_fail};
use super::signals::{OutboxState, Tally};
use super::status::{Delivery, JobOutcome, WaitingResult, WaitingState};
use super::{StatusSender, changed};
use crate::backoff::Backoff;
use crate::config::SharedConfig;
use crate::outbox::{DamagedEntry, Outbox, OutboxEntry};
use crate::studio::protocol::{FailCode, ProgressRequest};
use crate::studio::{StudioClient, StudioError};
use crate::timing::Timing;
use crate::vocab::progress::Stage;

/// A waiting result's lease, for the lease keeper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Lease {
    /// The entry's folder name.
    pub key: String,
    pub job_id: String,
    pub lease: Duration,
    pub steps: u32,
}

/// The studio no longer wants a waiting result (`cancel`, `409` or `410` to a renewal).
#[derive(Clone, Debug)]
pub(super) struct NotWanted {
    pub key: String,
    pub why: String,
}

pub(super) struct Uploader {
    pub client: StudioClient,
    pub config: SharedConfig,
    pub outbox: Outbox,
    pub outbox_state: watch::Sender<OutboxState>,
    /// Rung by the job loop after it put a result in the outbox.
    pub outbox_changed: Arc<Notify>,
    /// Rung (to current waiters only) when the person asks to retry uploads now.
    pub retry_uploads: Arc<Notify>,
    /// Entries (by folder name) the person discarded (the commands task).
    pub discards: mpsc::Receiver<String>,
    /// Results the studio no longer wants (the lease keeper).
    pub not_wanted: mpsc::Receiver<NotWanted>,
    /// The waiting results' leases, for the lease keeper.
    pub leases: watch::Sender<Vec<Lease>>,
    pub tally: Arc<Tally>,
    pub status: StatusSender,
    pub timing: Timing,
    pub shutdown: CancellationToken,
}

/// One waiting result, as the uploader tracks it.
struct Waiting {
    entry: OutboxEntry,
    /// In the outbox when the worker started: offered before anything new is claimed.
    goes_first: bool,
    /// Offered to the studio since start.
    offered: bool,
    next_try: Instant,
    /// Transient failures (studio down, 5xx) and refusals (4xx) back off separately.
    backoff: Backoff,
    refused_backoff: Backoff,
    /// The studio's last transient problem, for the Jobs tab.
    problem: Option<String>,
    /// The studio's `Retry-After`: not before this, even when the person says "now".
    studio_floor: Option<Instant>,
    /// The files cannot be read back: kept and shown, not tried until the person retries.
    unreadable: Option<String>,
    /// Delivered, but it could not be taken out of the outbox: never uploaded again.
    delivered: bool,
}

impl Waiting {
    fn new(entry: OutboxEntry, timing: &Timing, goes_first: bool) -> Self {
        Self {
            entry,
            goes_first,
            offered: false,
            next_try: Instant::now(),
            backoff: Backoff::new(timing.backoff),
            refused_backoff: Backoff::new(timing.refused_upload_backoff),
            problem: None,
            studio_floor: None,
            unreadable: None,
            delivered: false,
        }
    }

    fn due(&self, now: Instant) -> bool {
        self.unreadable.is_none() && !self.delivered && self.next_try <= now
    }
}

/// What an upload attempt came to.
enum Attempt {
    /// Handled (delivered, dropped, backed off…): go on with the next.
    Done,
    /// The worker is not approved: results wait for a new approval.
    NotApproved,
    /// Shutting down.
    Stop,
}

/// What the uploader knows of the outbox: the results waiting in it, the folders that are
/// damaged, and whether it could be listed.
#[derive(Default)]
struct Ledger {
    waiting: BTreeMap<String, Waiting>,
    damaged: Vec<DamagedEntry>,
    list_error: Option<String>,
    /// The outbox's stores the last good listing covers (each result stored before it
    /// began: [`crate::outbox::Listing::stores_counted`]).
    stores_counted: u64,
    /// Whether the outbox was listed since start (what it held then goes first).
    listed_once: bool,
}

impl Ledger {
    /// Lists the outbox again, keeping what is known of the results still in it.
    async fn relist(&mut self, outbox: &Outbox, timing: &Timing) {
        let outbox = outbox.clone();
        match tokio::task::spawn_blocking(move || outbox.list()).await {
            Ok(Ok(listing)) => {
                if self.list_error.take().is_some() {
                    tracing::info!("the outbox can be read again");
                }
                let mut listed = BTreeMap::new();
                for entry in listing.entries {
                    let key = entry.name();
                    let tracked = match self.waiting.remove(&key) {
                        Some(mut known) => {
                            known.entry = entry;
                            known
                        }
                        None => Waiting::new(entry, timing, !self.listed_once),
                    };
                    listed.insert(key, tracked);
                }
                self.waiting = listed;
                self.listed_once = true;
                self.stores_counted = listing.stores_counted;
                for damage in &listing.damaged {
                    if !self
                        .damaged
                        .iter()
                        .any(|known| known.folder == damage.folder)
                    {
                        tracing::warn!(
                            "outbox entry {} is damaged and kept: {}",
                            damage.folder.display(),
                            damage.reason
                        );
                    }
                }
                self.damaged = listing.damaged;
            }
            Ok(Err(err)) => {
                if self.list_error.is_none() {
                    tracing::error!("cannot read the outbox: {err}");
                }
                self.list_error = Some(err.to_string());
            }
            Err(err) => self.list_error = Some(format!("the outbox reader stopped: {err}")),
        }
    }
}

pub(super) async fn run(mut task: Uploader) {
    let mut ledger = Ledger::default();
    let mut outage = OutageLog::new("upload");
    let mut config_changes = task.config.subscribe();
    let mut relist = true;

    loop {
        if relist {
            relist = false;
            ledger.relist(&task.outbox, &task.timing).await;
        }
        // The person's discards and the studio's "not wanted" verdicts, as they came.
        while let Ok(key) = task.discards.try_recv() {
            task.discard(&key, &mut ledger).await;
        }
        while let Ok(verdict) = task.not_wanted.try_recv() {
            task.not_wanted(&verdict, &mut ledger.waiting).await;
        }
        task.publish(&ledger);

        let now = Instant::now();
        let due = ledger
            .waiting
            .iter()
            .filter(|(_, tracked)| tracked.due(now))
            .min_by_key(|(_, tracked)| (tracked.entry.meta.created_at, tracked.entry.name()))
            .map(|(key, _)| key.clone());
        let Some(key) = due else {
            let next = ledger
                .waiting
                .values()
                .filter(|tracked| tracked.unreadable.is_none() && !tracked.delivered)
                .map(|tracked| tracked.next_try)
                .min();
            tokio::select! {
                () = task.shutdown.cancelled() => return,
                () = task.outbox_changed.notified() => relist = true,
                () = task.retry_uploads.notified() => {
                    tracing::info!("retrying uploads now, as asked");
                    retry_now(&mut ledger.waiting);
                    task.remove_delivered(&mut ledger.waiting).await;
                    relist = true;
                }
                () = sleep_until_or_forever(next) => {}
                key = task.discards.recv() => if let Some(key) = key {
                    task.discard(&key, &mut ledger).await;
                },
                verdict = task.not_wanted.recv() => if let Some(verdict) = verdict {
                    task.not_wanted(&verdict, &mut ledger.waiting).await;
                },
            }
            continue;
        };

        let Some(session) = Session::current(&task.client, &task.config) else {
            // Not approved (yet, or any more): results wait on disk.
            tokio::select! {
                () = task.shutdown.cancelled() => return,
                () = changed(&mut config_changes) => {}
                () = task.outbox_changed.notified() => relist = true,
            }
            continue;
        };
        match task.attempt(&session, &key, &mut ledger, &mut outage).await {
            Attempt::Done => {}
            Attempt::NotApproved => {}
            Attempt::Stop => return,
        }
    }
}

/// "Retry now": every waiting result is due again, and unreadable ones are read again. A
/// `Retry-After` from the studio still holds (the attempt waits it out).
fn retry_now(waiting: &mut BTreeMap<String, Waiting>) {
    let now = Instant::now();
    for tracked in waiting.values_mut() {
        tracked.unreadable = None;
        tracked.next_try = tracked.studio_floor.map_or(now, |floor| floor.max(now));
        tracked.backoff.reset();
        tracked.refused_backoff.reset();
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Uploader {
    /// One upload of the entry `key`, and what its answer means for it.
    async fn attempt(
        &self,
        session: &Session,
        key: &str,
        ledger: &mut Ledger,
        outage: &mut OutageLog,
    ) -> Attempt {
        let Some(tracked) = ledger.waiting.get_mut(key) else {
            return Attempt::Done;
        };
        tracked.offered = true;
        let entry = tracked.entry.clone();
        let outbox = self.outbox.clone();
        let reading = entry.clone();
        let images = match tokio::task::spawn_blocking(move || outbox.images(&reading)).await {
            Ok(Ok(images)) => images,
            Ok(Err(err)) => {
                tracing::error!(job_id = %entry.meta.job_id, "the result's images cannot be read back ({err}); kept for you to look at");
                tracked.unreadable = Some(format!("its images cannot be read: {err}"));
                return Attempt::Done;
            }
            Err(err) => {
                tracked.unreadable = Some(format!("its images could not be read: {err}"));
                return Attempt::Done;
            }
        };

        let mut meta = entry.meta.result.clone();
        meta.worker_id = session.worker_id().to_owned();
        let upload = session.upload_result(&entry.meta.job_id, &meta, images);
        tokio::pin!(upload);
        let uploaded = loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Attempt::Stop,
                uploaded = &mut upload => break uploaded,
                // Results stored while a slow upload is in flight are counted (claims stop
                // at 20) and shown now, not when it ends.
                () = self.outbox_changed.notified() => {
                    ledger.relist(&self.outbox, &self.timing).await;
                    self.publish(ledger);
                }
            }
        };
        let waiting = &mut ledger.waiting;
        let job_id = &entry.meta.job_id;
        match uploaded {
            Ok(()) => {
                outage.recovered();
                tracing::info!(job_id = %job_id, images = entry.meta.image_count, "result delivered");
                self.tally.delivered(entry.meta.image_count as u64);
                if self.take_out(&entry, JobOutcome::DELIVERED).await {
                    waiting.remove(key);
                } else if let Some(tracked) = waiting.get_mut(key) {
                    // Kept aside in memory: never uploaded again in a loop (a restart offers
                    // it once more, and the studio answers a repeat with 200).
                    tracked.delivered = true;
                }
            }
            Err(StudioError::Conflict { .. } | StudioError::NotFound { status: 410, .. }) => {
                outage.recovered();
                tracing::info!(job_id = %job_id, "the studio no longer wants this result; dropped");
                waiting.remove(key);
                self.take_out(
                    &entry,
                    JobOutcome::Finished {
                        delivery: Delivery::NotWanted,
                    },
                )
                .await;
            }
            Err(StudioError::Refused { status: 413, .. }) => {
                outage.recovered();
                // The studio's word: the same job gives the same result, here or elsewhere.
                let reason = "the result is too large for the studio".to_owned();
                tracing::error!(job_id = %job_id, "{reason}");
                waiting.remove(key);
                self.give_up(session, &entry, reason, false).await;
            }
            Err(err @ (StudioError::NotFound { .. } | StudioError::Refused { .. })) => {
                outage.recovered();
                self.refused(session, key, waiting, &err).await;
            }
            // Revoked (recorded by the session): results wait on disk for a new approval.
            Err(StudioError::Unauthorized) => return Attempt::NotApproved,
            Err(err) => {
                let Some(tracked) = waiting.get_mut(key) else {
                    return Attempt::Done;
                };
                let delay = tracked.backoff.next_delay(err.retry_after());
                outage.failed(&err, delay);
                tracked.problem = Some(err.to_string());
                tracked.studio_floor = err.retry_after().map(|wait| Instant::now() + wait);
                tracked.next_try = Instant::now() + delay;
            }
        }
        Attempt::Done
    }

    /// A `404` or another `4xx`: the studio refused without saying the job is done or gone.
    /// Kept and retried (backing off up to an hour) until the give-up time has passed.
    async fn refused(
        &self,
        session: &Session,
        key: &str,
        waiting: &mut BTreeMap<String, Waiting>,
        err: &StudioError,
    ) {
        let Some(tracked) = waiting.get_mut(key) else {
            return;
        };
        let now = Utc::now();
        let refusals = &mut tracked.entry.refusals;
        let since = *refusals.since.get_or_insert(now);
        refusals.count += 1;
        let answer = crate::human::one_line(&err.to_string(), 160);
        refusals.last_answer = Some(answer.clone());
        let first_refusal = refusals.count == 1;
        let entry = tracked.entry.clone();
        let waited = (now - since).to_std().unwrap_or_default();
        if waited >= self.timing.give_up_refused_upload_after {
            let reason = format!(
                "the studio refused the result for {} ({answer})",
                crate::human::duration(waited),
            );
            tracing::error!(job_id = %entry.meta.job_id, "{reason}; giving up on it");
            waiting.remove(key);
            self.give_up(session, &entry, reason, true).await;
            return;
        }
        let delay = tracked.refused_backoff.next_delay(err.retry_after());
        tracked.next_try = Instant::now() + delay;
        tracked.problem = None;
        if first_refusal {
            tracing::warn!(job_id = %entry.meta.job_id, "the studio refused the result ({err}); keeping it and trying again");
        }
        let outbox = self.outbox.clone();
        let saved =
            tokio::task::spawn_blocking(move || outbox.save_refusals(&entry, &entry.refusals))
                .await;
        if let Ok(Err(err)) | Err(err) = saved.map_err(std::io::Error::other) {
            // Only the clock of giving up is lost (it starts again after a restart).
            tracing::debug!("cannot record the refusal: {err}");
        }
    }

    /// The lease keeper heard that the studio no longer wants a result: it is dropped.
    async fn not_wanted(&self, verdict: &NotWanted, waiting: &mut BTreeMap<String, Waiting>) {
        if let Some(dropped) = waiting.remove(&verdict.key) {
            tracing::info!(job_id = %dropped.entry.meta.job_id, "{}; the result is dropped", verdict.why);
            self.take_out(
                &dropped.entry,
                JobOutcome::Finished {
                    delivery: Delivery::NotWanted,
                },
            )
            .await;
        }
    }

    /// The person discarded a waiting result (or a damaged folder): told to the studio as
    /// `fail internal` (another worker may redo the job), then removed.
    async fn discard(&self, key: &str, ledger: &mut Ledger) {
        let Ledger {
            waiting, damaged, ..
        } = ledger;
        if let Some(tracked) = waiting.remove(key) {
            tracing::info!(job_id = %tracked.entry.meta.job_id, "discarding the result, as asked");
            match Session::current(&self.client, &self.config) {
                Some(session) => {
                    self.give_up(
                        &session,
                        &tracked.entry,
                        "the person using this PC discarded the result".to_owned(),
                        true,
                    )
                    .await;
                }
                None => {
                    self.take_out(
                        &tracked.entry,
                        JobOutcome::Failed {
                            code: FailCode::Internal,
                            message: "discarded".to_owned(),
                        },
                    )
                    .await;
                }
            }
        } else if let Some(index) = damaged
            .iter()
            .position(|damage| damage.folder.file_name().is_some_and(|name| name == key))
        {
            let damage = damaged.remove(index);
            tracing::info!(
                "discarding the damaged outbox entry {}, as asked",
                damage.folder.display()
            );
            let outbox = self.outbox.clone();
            let folder = damage.folder.clone();
            let removed = tokio::task::spawn_blocking(move || outbox.remove(&folder)).await;
            if let Ok(Err(err)) | Err(err) = removed.map_err(std::io::Error::other) {
                tracing::error!("cannot remove {}: {err}", damage.folder.display());
            }
        }
    }

    /// Tells the studio with `fail internal` and takes the entry out.
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
        self.tally.failed();
        self.take_out(
            entry,
            JobOutcome::Failed {
                code: FailCode::Internal,
                message: reason,
            },
        )
        .await;
    }

    /// Removes an entry from the outbox (off the async threads: renames and fsyncs) and
    /// records how it ended. `false` when it could not be removed.
    async fn take_out(&self, entry: &OutboxEntry, outcome: JobOutcome) -> bool {
        let outbox = self.outbox.clone();
        let folder = entry.folder.clone();
        let removed = tokio::task::spawn_blocking(move || outbox.remove(&folder))
            .await
            .map_err(std::io::Error::other)
            .and_then(|removed| removed);
        if let Err(err) = &removed {
            tracing::error!(job_id = %entry.meta.job_id, "cannot take the result out of the outbox: {err}");
        }
        let job_id = entry.meta.job_id.clone();
        self.status.send_modify(|s| {
            // Read under the status lock, so the last writer always leaves the latest counts.
            s.jobs.counters = self.tally.counters();
            s.jobs.set_outcome(&job_id, outcome);
        });
        removed.is_ok()
    }

    /// Tries again to take out the results that were delivered but could not be removed
    /// (the person's "Retry now", after they fixed the folder).
    async fn remove_delivered(&self, waiting: &mut BTreeMap<String, Waiting>) {
        let delivered: Vec<(String, OutboxEntry)> = waiting
            .iter()
            .filter(|(_, tracked)| tracked.delivered)
            .map(|(key, tracked)| (key.clone(), tracked.entry.clone()))
            .collect();
        for (key, entry) in delivered {
            if self.take_out(&entry, JobOutcome::DELIVERED).await {
                waiting.remove(&key);
            }
        }
    }

    /// Tells the job loop (claims), the lease keeper and the window what waits.
    fn publish(&self, ledger: &Ledger) {
        let Ledger {
            waiting,
            damaged,
            list_error,
            stores_counted,
            ..
        } = ledger;
        let count = waiting
            .values()
            .filter(|tracked| !tracked.delivered)
            .count();
        let bytes: u64 = waiting
            .values()
            .filter(|tracked| !tracked.delivered)
            .map(|tracked| tracked.entry.bytes)
            .sum();
        let all_offered = waiting
            .values()
            .all(|tracked| tracked.offered || !tracked.goes_first);
        let hold_claims = if let Some(error) = list_error {
            Some(format!("the outbox cannot be read ({error})"))
        } else if !all_offered {
            Some("delivering finished results first".to_owned())
        } else {
            None
        };
        let state = OutboxState {
            waiting: count,
            bytes,
            hold_claims,
            stores_counted: *stores_counted,
        };
        self.outbox_state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state.clone();
            changed
        });
        let leases: Vec<Lease> = waiting
            .iter()
            .filter(|(_, tracked)| !tracked.delivered)
            .map(|(key, tracked)| Lease {
                key: key.clone(),
                job_id: tracked.entry.meta.job_id.clone(),
                lease: Duration::from_secs(tracked.entry.meta.lease_s.clamp(10, 3600)),
                steps: tracked.entry.meta.result.steps,
            })
            .collect();
        self.leases.send_if_modified(|current| {
            let changed = *current != leases;
            if changed {
                current.clone_from(&leases);
            }
            changed
        });
        let give_up_after = chrono::Duration::from_std(self.timing.give_up_refused_upload_after)
            .unwrap_or_else(|_| chrono::Duration::days(7));
        let mut shown: Vec<WaitingResult> = waiting
            .iter()
            .map(|(key, tracked)| WaitingResult {
                key: key.clone(),
                job_id: tracked.entry.meta.job_id.clone(),
                prompt: crate::human::one_line(&tracked.entry.meta.prompt, 200),
                created_at: tracked.entry.meta.created_at,
                state: if tracked.delivered {
                    WaitingState::DeliveredNotRemoved
                } else if let Some(problem) = &tracked.unreadable {
                    WaitingState::Unreadable {
                        problem: problem.clone(),
                    }
                } else if let (Some(since), Some(answer)) = (
                    tracked.entry.refusals.since,
                    &tracked.entry.refusals.last_answer,
                ) {
                    WaitingState::Refused {
                        studio_answer: answer.clone(),
                        gives_up_at: since + give_up_after,
                    }
                } else if let Some(problem) = &tracked.problem {
                    WaitingState::Retrying {
                        problem: problem.clone(),
                    }
                } else {
                    WaitingState::Queued
                },
            })
            .collect();
        shown.extend(damaged.iter().map(|damage| {
            let key = damage
                .folder
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            WaitingResult {
                job_id: key.clone(),
                key,
                prompt: String::new(),
                created_at: Utc::now(),
                state: WaitingState::Damaged {
                    problem: damage.reason.clone(),
                },
            }
        }));
        self.status.send_if_modified(|s| {
            let changed = s.jobs.outbox_len != count || s.jobs.waiting != shown;
            s.jobs.outbox_len = count;
            s.jobs.waiting.clone_from(&shown);
            changed
        });
    }
}

/// Renewal attempts after a failed one, within one third of a lease: a renewal that
/// failed (network, `5xx`) is tried again after `leaseS / 3 / RETRIES_PER_THIRD`, so two
/// unlucky requests in a row do not cost the lease.
const RETRIES_PER_THIRD: u32 = 6;

/// The lease keeper: renews the lease of every result waiting in the outbox (an `uploading`
/// progress at least every `leaseS / 3`, sooner after a failed renewal, at most one request
/// per `progress_min_gap`), also while a slow upload is in flight, so the studio does not give
/// a finished job to someone else. A `cancel`, `409` or `410` tells the uploader to drop the
/// result (§3.2).
pub(super) async fn keep_leases(
    client: StudioClient,
    config: SharedConfig,
    mut leases: watch::Receiver<Vec<Lease>>,
    not_wanted: mpsc::Sender<NotWanted>,
    timing: Timing,
    shutdown: CancellationToken,
) {
    // Per waiting result (by entry key): when its lease is next renewed, and how long the
    // studio last said a lease lasts.
    let mut due_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut lease_of: BTreeMap<String, Duration> = BTreeMap::new();
    loop {
        let current = leases.borrow_and_update().clone();
        let now = Instant::now();
        due_at.retain(|key, _| current.iter().any(|lease| lease.key == *key));
        lease_of.retain(|key, _| current.iter().any(|lease| lease.key == *key));
        for lease in &current {
            // A result first seen now was just reported `uploading` by the job loop.
            due_at
                .entry(lease.key.clone())
                .or_insert(now + lease.lease / 3);
            lease_of.entry(lease.key.clone()).or_insert(lease.lease);
        }
        let due = current
            .iter()
            .filter(|lease| due_at.get(&lease.key).is_none_or(|at| *at <= now))
            .min_by_key(|lease| due_at.get(&lease.key).copied())
            .cloned();
        match (due, Session::current(&client, &config)) {
            (Some(lease), Some(session)) => {
                let body = ProgressRequest {
                    worker_id: session.worker_id().to_owned(),
                    stage: Stage::Uploading,
                    step: lease.steps,
                    total_steps: lease.steps,
                };
                let answer = tokio::select! {
                    () = shutdown.cancelled() => return,
                    answer = session.progress(&lease.job_id, &body) => answer,
                };
                let third = lease_of.get(&lease.key).copied().unwrap_or(lease.lease) / 3;
                let (verdict, next) = match answer {
                    Ok(answer) if answer.cancel => (Some("the submitter cancelled the job"), third),
                    Ok(answer) => {
                        let third = match answer.lease_s {
                            Some(lease_s) => {
                                let granted = Duration::from_secs(lease_s.clamp(10, 3600));
                                lease_of.insert(lease.key.clone(), granted);
                                granted / 3
                            }
                            None => third,
                        };
                        (None, third)
                    }
                    Err(
                        StudioError::Conflict { .. } | StudioError::NotFound { status: 410, .. },
                    ) => (Some("the studio gave the job to someone else"), third),
                    // Anything else: the lease has slack; try again soon.
                    Err(err) => {
                        tracing::debug!(job_id = %lease.job_id, "lease not renewed: {err}");
                        (None, third / RETRIES_PER_THIRD)
                    }
                };
                due_at.insert(lease.key.clone(), Instant::now() + next);
                if let Some(why) = verdict {
                    // Never waits for the uploader, which reads verdicts between attempts: a
                    // slow upload would hold every other lease's renewal until it ended. A
                    // verdict that does not fit now is sent again at the next renewal (the
                    // studio answers the same); a closed channel means shutting down.
                    let verdict = NotWanted {
                        key: lease.key.clone(),
                        why: why.to_owned(),
                    };
                    if let Err(mpsc::error::TrySendError::Full(verdict)) =
                        not_wanted.try_send(verdict)
                    {
                        tracing::debug!(
                            "the uploader is busy; the verdict on {} waits for the next renewal",
                            verdict.key
                        );
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(timing.progress_min_gap) => {}
                }
            }
            (due, _) => {
                let next = if due.is_some() {
                    // Not approved now: look again in a while.
                    Some(Instant::now() + Duration::from_secs(1))
                } else {
                    due_at.values().min().copied()
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = changed(&mut leases) => {}
                    () = sleep_until_or_forever(next) => {}
                }
            }
        }
    }
}
