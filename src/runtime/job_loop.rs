//! The job loop (studio-api.md §3): claim a job when the worker may, validate it, run it on the
//! engine (on its own thread, so heartbeats go on), and hand the images to delivery, or
//! report the job back with the right `fail`.
//!
//! A job is stopped at its next denoising step when the studio cancels it or takes the lease
//! back (discarded), or when the person pauses or the worker quits (handed back `paused`).
//!
//! A job that leaves the GPU unusable (`EngineError::DeviceLost`) is failed, and the loop
//! asks its host to start the worker again, or stops claiming ([`super::gpu_recovery`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::delivery::{Delivery, Keepsakes};
use super::engine_thread::EngineThread;
use super::gpu_recovery::{GpuRecovery, Next};
use super::outage::OutageLog;
use super::progress;
use super::session::{Session, report_fail};
use super::signals::{
    HostRequestSender, MAX_WAITING_BYTES, MAX_WAITING_RESULTS, OutboxState, RestartRequest,
    StopRequest, Tally,
};
use super::status::{CurrentJob, FinishedJob, JobOutcome};
use super::{StatusSender, changed, pause_reason};
use crate::backoff::Backoff;
use crate::config::SharedConfig;
use crate::engine::{CancelToken, Engine, EngineError, Generated, StopReason};
use crate::policy::{Decision, rest_after_step};
use crate::studio::job::read_job;
use crate::studio::protocol::{ClaimRequest, FailCode};
use crate::studio::{StudioClient, StudioError};
use crate::timing::{FAILURES_BEFORE_BACKOFF, Timing};
use crate::vocab::job::{JobSpec, MAX_SEED};
use crate::vocab::progress::{JobProgress, Stage};

pub(super) struct JobLoop {
    pub client: StudioClient,
    pub config: SharedConfig,
    pub engine: Option<Arc<dyn Engine>>,
    pub delivery: Delivery,
    /// Owner: the policy task. Its automatic pause stops claims and the running job.
    pub policy: watch::Receiver<Decision>,
    /// Owner: the uploader. Claims wait while it says so (results first, a full outbox).
    pub outbox_state: watch::Receiver<OutboxState>,
    /// Owner: the downloads task. Changes when a model finished downloading (and can run).
    pub models_coming: watch::Receiver<Vec<String>>,
    /// Rung after a result went into the outbox (wakes the uploader).
    pub outbox_changed: Arc<Notify>,
    /// The running job's id, for the heartbeat.
    pub current_job: watch::Sender<Option<String>>,
    /// Asked to restart the worker when the GPU stops working.
    pub host: HostRequestSender,
    /// The restarts for a lost GPU that led to this run.
    pub gpu_recovery: GpuRecovery,
    pub tally: Arc<Tally>,
    pub status: StatusSender,
    pub timing: Timing,
    pub shutdown: CancellationToken,
    /// Results stored but maybe not yet counted by the uploader: each one's store number
    /// and bytes.
    pub unlisted: std::sync::Mutex<Vec<(u64, u64)>>,
}

/// How a claimed job ended, for the failure streak.
enum JobEnd {
    /// Images are in the outbox.
    Delivered,
    /// The engine failed on a valid job.
    EngineFailed,
    /// The engine failed, and its GPU no longer works in this process; why.
    DeviceLost(String),
    /// Not run (invalid), cancelled, lease lost, or handed back: says nothing about the engine.
    Neutral,
    /// The studio sent a job that cannot even be answered (no usable id): a studio error, so
    /// the next claim backs off as after any other.
    Unanswerable(String),
}

pub(super) async fn run(mut task: JobLoop) {
    let Some(engine) = task.engine.clone() else {
        task.status.send_modify(|s| {
            s.jobs.claim_blocked = Some("this build has no image engine yet".to_owned());
        });
        task.shutdown.cancelled().await;
        return;
    };
    let engine_thread = match EngineThread::start() {
        Ok(engine_thread) => engine_thread,
        Err(err) => {
            tracing::error!("cannot start the engine's thread: {err}");
            task.status.send_modify(|s| {
                s.jobs.claim_blocked = Some(format!("cannot start the engine's thread: {err}"));
            });
            task.shutdown.cancelled().await;
            return;
        }
    };
    if engine.needs_preparing() && !prepare(&task, &engine_thread, &engine).await {
        return;
    }
    let mut config_changes = task.config.subscribe();
    let mut claim_backoff = Backoff::new(task.timing.backoff);
    let mut claim_outage = OutageLog::new("claim");
    let mut failure_backoff = Backoff::new(task.timing.failure_backoff);
    let mut failures_in_a_row = 0_u32;
    let mut not_before: Option<(Instant, String)> = None;
    let mut unloaded_for_pause = false;
    // Set when the GPU stopped working and no restart is left: no more claims this run.
    let mut halted: Option<String> = None;

    loop {
        let gate = match &halted {
            Some(why) => Err(why.clone()),
            None => task.claim_gate(engine.as_ref(), not_before.as_ref()),
        };
        task.status.send_if_modified(|s| {
            let blocked = gate.as_ref().err().cloned();
            let changed = s.jobs.claim_blocked != blocked;
            s.jobs.claim_blocked = blocked;
            changed
        });
        let config = task.config.snapshot();
        if pause_reason(&config, &task.policy.borrow()).is_some() {
            if config.engine.unload_when_paused && !unloaded_for_pause {
                unloaded_for_pause = true;
                let engine = engine.clone();
                // The person wants the GPU for something else: give its memory back.
                if let Err(err) = engine_thread.run(move || engine.unload()).await {
                    tracing::error!("unloading the model stopped: {err}");
                }
                tracing::info!("paused: model unloaded from memory");
            }
        } else {
            unloaded_for_pause = false;
        }
        let session = match gate {
            Ok(session) => session,
            Err(_) => {
                let wake_at = not_before.as_ref().map(|(at, _)| *at);
                let go_on = tokio::select! {
                    () = task.shutdown.cancelled() => false,
                    changed = config_changes.changed() => changed.is_ok(),
                    () = changed(&mut task.outbox_state) => true,
                    () = changed(&mut task.policy) => true,
                    () = changed(&mut task.models_coming) => true,
                    () = sleep_until_or_forever(wake_at) => true,
                };
                if !go_on {
                    return;
                }
                if not_before
                    .as_ref()
                    .is_some_and(|(at, _)| *at <= Instant::now())
                {
                    not_before = None;
                }
                continue;
            }
        };

        let limits = engine.limits();
        let request = ClaimRequest {
            models: engine.ready_models(),
            max_width: limits.max_width,
            max_height: limits.max_height,
            wait_s: task.timing.claim_wait.as_secs().max(1),
        };
        let asked_at = Instant::now();
        let claimed = tokio::select! {
            () = task.shutdown.cancelled() => return,
            claimed = session.claim(&request) => claimed,
        };
        let raw_job = match claimed {
            // The backoff is reset once the job proves answerable (below).
            Ok(Some(raw_job)) => raw_job,
            Ok(None) => {
                claim_backoff.reset();
                claim_outage.recovered();
                // A studio that answers 204 at once (no long-poll) is not asked again at once.
                if asked_at.elapsed() < task.timing.claim_wait / 2 {
                    not_before = Some((
                        Instant::now() + task.timing.empty_claim_pause,
                        "no jobs waiting".to_owned(),
                    ));
                }
                continue;
            }
            // Revoked (recorded by the session): the gate now says so.
            Err(StudioError::Unauthorized) => continue,
            Err(err) => {
                let delay = claim_backoff.next_delay(err.retry_after());
                claim_outage.failed(&err, delay);
                not_before = Some((
                    Instant::now() + delay,
                    format!("cannot reach the studio: {err}"),
                ));
                continue;
            }
        };

        let end = task
            .run_job(&engine_thread, &engine, &session, raw_job)
            .await;
        if !matches!(end, JobEnd::Unanswerable(_)) {
            claim_backoff.reset();
            claim_outage.recovered();
        }
        match end {
            JobEnd::Delivered => {
                failures_in_a_row = 0;
                failure_backoff.reset();
            }
            JobEnd::EngineFailed => {
                failures_in_a_row += 1;
                if failures_in_a_row >= FAILURES_BEFORE_BACKOFF {
                    let delay = failure_backoff.next_delay(None);
                    let why = format!(
                        "{failures_in_a_row} jobs failed in a row; waiting {} before taking another",
                        crate::human::duration(delay.max(Duration::from_secs(1)))
                    );
                    tracing::warn!("{why}");
                    not_before = Some((Instant::now() + delay, why));
                }
            }
            JobEnd::DeviceLost(why) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs());
                match task.gpu_recovery.next(now, &why) {
                    Next::Restart(variables) => {
                        tracing::warn!(
                            "the GPU stopped working ({why}); studio-worker starts again to \
                             use it"
                        );
                        task.host.stop(StopRequest::Restart(RestartRequest {
                            reason: format!("the GPU stopped working: {why}"),
                            variables,
                        }));
                        // The host stops the runtime, then starts the worker again.
                        task.shutdown.cancelled().await;
                        return;
                    }
                    Next::Stop(reason) => {
                        tracing::error!("{reason}");
                        halted = Some(reason);
                    }
                }
            }
            JobEnd::Neutral => {}
            JobEnd::Unanswerable(why) => {
                let delay = claim_backoff.next_delay(None);
                claim_outage.failed(&why, delay);
                not_before = Some((Instant::now() + delay, why));
            }
        }
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Makes the engine's device ready before the first claim (the GPU's kernels compiled once,
/// not in the middle of a job), saying so in the status. `false`: shutting down.
async fn prepare(task: &JobLoop, engine_thread: &EngineThread, engine: &Arc<dyn Engine>) -> bool {
    task.status.send_modify(|s| {
        s.jobs.claim_blocked = Some(preparing_message(None));
    });
    let started = Instant::now();
    let preparing = {
        let engine = engine.clone();
        let status = task.status.clone();
        engine_thread.run(move || {
            engine.prepare(&mut |left| {
                status.send_modify(|s| s.jobs.claim_blocked = Some(preparing_message(Some(left))));
            })
        })
    };
    let prepared = tokio::select! {
        () = task.shutdown.cancelled() => return false,
        prepared = preparing => prepared,
    };
    match prepared {
        Ok(Ok(())) => tracing::info!(
            "the GPU is ready ({:.1} s to prepare)",
            started.elapsed().as_secs_f64()
        ),
        // The first job then compiles what it needs, as it would have anyway.
        Ok(Err(err)) => tracing::warn!("{err}; going on without it"),
        Err(err) => tracing::error!("preparing the GPU stopped: {err}"),
    }
    true
}

/// What the Status tab says while the GPU is prepared, with the engine's estimate of the
/// time left once it has one.
pub(super) fn preparing_message(left: Option<Duration>) -> String {
    const PREPARING: &str = "Preparing the GPU, once: compiling its kernels";
    match left {
        None => format!(
            "{PREPARING} (after an install or a driver update this takes up to half a minute)"
        ),
        Some(left) if left < Duration::from_secs(1) => format!("{PREPARING}, almost done"),
        Some(left) => {
            // Whole seconds, rounded up: "1 s left" until it is done.
            let left = Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0));
            format!("{PREPARING}, {} left", crate::human::duration(left))
        }
    }
}

impl JobLoop {
    /// `Ok(session)` when a job may be claimed now; otherwise why not, in words.
    fn claim_gate(
        &self,
        engine: &dyn Engine,
        not_before: Option<&(Instant, String)>,
    ) -> Result<Session, String> {
        let config = self.config.snapshot();
        let Some(session) = Session::current(&self.client, &self.config) else {
            return Err("not approved by the studio".to_owned());
        };
        if let Some(reason) = pause_reason(&config, &self.policy.borrow()) {
            return Err(reason.describe().to_owned());
        }
        let outbox = self.outbox_state.borrow().clone();
        if let Some(why) = outbox.hold_claims {
            return Err(why);
        }
        // The uploader's count, plus what was stored since its last listing began.
        let (count, bytes) = {
            let mut unlisted = self
                .unlisted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            unlisted.retain(|(number, _)| *number > outbox.stores_counted);
            (
                outbox.waiting + unlisted.len(),
                outbox.bytes + unlisted.iter().map(|(_, bytes)| bytes).sum::<u64>(),
            )
        };
        if count >= MAX_WAITING_RESULTS || bytes >= MAX_WAITING_BYTES {
            return Err(format!(
                "{count} finished results ({}) are waiting for the studio; new jobs wait until \
                 some are delivered",
                crate::human::bytes(bytes)
            ));
        }
        if engine.ready_models().is_empty() {
            return Err("no model is ready".to_owned());
        }
        if let Some((at, why)) = not_before
            && *at > Instant::now()
        {
            return Err(why.clone());
        }
        Ok(session)
    }

    async fn run_job(
        &self,
        engine_thread: &EngineThread,
        engine: &Arc<dyn Engine>,
        session: &Session,
        raw_job: serde_json::Value,
    ) -> JobEnd {
        let spec = match read_job(&raw_job, &engine.limits(), &engine.ready_models(), || {
            fastrand::u64(..=MAX_SEED)
        }) {
            Ok(spec) => spec,
            Err(rejection) => {
                match rejection.job_id {
                    None => {
                        return JobEnd::Unanswerable(format!(
                            "the studio sent a job that cannot be answered: {}",
                            rejection.message
                        ));
                    }
                    Some(job_id) => {
                        tracing::warn!(job_id = %job_id, "not running this job: {}", rejection.message);
                        report_fail(
                            session,
                            &self.timing,
                            &job_id,
                            rejection.code,
                            &rejection.message,
                            false,
                        )
                        .await;
                        self.tally.failed();
                        self.status.send_modify(|s| {
                            s.jobs.counters = self.tally.counters();
                            s.jobs.remember(FinishedJob::rejected(
                                &job_id,
                                &raw_job,
                                rejection.code,
                                &rejection.message,
                            ));
                        });
                    }
                }
                return JobEnd::Neutral;
            }
        };

        tracing::info!(
            job_id = %spec.job_id, model = %spec.model, width = spec.width, height = spec.height,
            steps = spec.steps, images = spec.num_images, "job started"
        );
        let current = CurrentJob::new(&spec);
        self.current_job.send_replace(Some(spec.job_id.clone()));
        self.status
            .send_modify(|s| s.jobs.current = Some(current.clone()));

        let cancel = CancelToken::new();
        let (progress_sender, progress_receiver) = watch::channel(JobProgress {
            stage: Stage::LoadingModel,
            step: 0,
            total_steps: spec.steps,
        });
        let reporter = tokio::spawn(progress::report(
            session.clone(),
            self.timing,
            spec.job_id.clone(),
            spec.lease,
            progress_receiver,
            cancel.clone(),
        ));

        let started = Instant::now();
        let generated = self
            .run_engine(engine_thread, engine, &spec, progress_sender, &cancel)
            .await;
        let engine_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        reporter.abort();

        match (generated, cancel.reason()) {
            (_, Some(StopReason::CancelledByStudio)) => {
                tracing::info!(job_id = %spec.job_id, "the studio cancelled the job; output discarded");
                self.finish(&current, JobOutcome::Cancelled);
                JobEnd::Neutral
            }
            (_, Some(StopReason::LeaseLost)) => {
                tracing::warn!(job_id = %spec.job_id, "the studio gave the job to another worker; output discarded");
                self.finish(&current, JobOutcome::LeaseLost);
                JobEnd::Neutral
            }
            // Finished before the pause reached a step boundary: the work is done, deliver it.
            (Ok(generated), _) => {
                self.deliver(session, &spec, current, generated, engine_ms)
                    .await
            }
            (
                Err(EngineError::Cancelled),
                Some(reason @ (StopReason::Paused | StopReason::ShuttingDown)),
            ) => {
                let message = if reason == StopReason::Paused {
                    "the person using this PC paused the worker"
                } else {
                    "the worker is shutting down"
                };
                tracing::info!(job_id = %spec.job_id, "handing the job back: {message}");
                let handed_back = report_fail(
                    session,
                    &self.timing,
                    &spec.job_id,
                    FailCode::Paused,
                    message,
                    true,
                );
                if reason == StopReason::ShuttingDown {
                    // Quitting must not hang on a studio that does not answer.
                    let _ = tokio::time::timeout(self.timing.handback_timeout, handed_back).await;
                } else {
                    handed_back.await;
                }
                self.finish(&current, JobOutcome::HandedBack);
                JobEnd::Neutral
            }
            (Err(err), _) => {
                let (code, message) = match &err {
                    EngineError::OutOfMemory(detail) => {
                        (FailCode::Oom, format!("out of memory: {detail}"))
                    }
                    EngineError::ModelUnavailable(detail) => {
                        (FailCode::ModelUnavailable, detail.clone())
                    }
                    EngineError::Internal(detail) => (FailCode::Internal, detail.clone()),
                    EngineError::DeviceLost(_) => (FailCode::Internal, err.to_string()),
                    EngineError::Cancelled => (
                        FailCode::Internal,
                        "the engine stopped on its own".to_owned(),
                    ),
                };
                tracing::error!(job_id = %spec.job_id, "job failed: {message}");
                // Another worker (more memory, a different model store) may well succeed.
                report_fail(session, &self.timing, &spec.job_id, code, &message, true).await;
                self.count_failure();
                self.finish(&current, JobOutcome::Failed { code, message });
                match err {
                    EngineError::DeviceLost(why) => JobEnd::DeviceLost(why),
                    _ => JobEnd::EngineFailed,
                }
            }
        }
    }

    /// Runs the engine on its thread, turning a pause or a shutdown into a stop at the
    /// next step; its progress goes to the reporter and the status.
    async fn run_engine(
        &self,
        engine_thread: &EngineThread,
        engine: &Arc<dyn Engine>,
        spec: &JobSpec,
        progress_sender: watch::Sender<JobProgress>,
        cancel: &CancelToken,
    ) -> Result<Generated, EngineError> {
        let running = {
            let engine = engine.clone();
            let spec = spec.clone();
            let cancel = cancel.clone();
            let status = self.status.clone();
            let gpu_share = self.config.snapshot().policy.max_gpu_share_percent;
            engine_thread.run(move || {
                let mut last_mark = std::time::Instant::now();
                let mut on_progress = |progress: JobProgress| {
                    progress_sender.send_replace(progress);
                    status.send_modify(|s| {
                        if let Some(current) = s.jobs.current.as_mut() {
                            current.stage = progress.stage;
                            current.step = progress.step;
                            current.total_steps = progress.total_steps;
                        }
                    });
                    if progress.stage == Stage::Denoising {
                        // The GPU-share cap: rest in proportion to the step, in short naps
                        // so a pause still stops the job at once.
                        let rest = rest_after_step(last_mark.elapsed(), gpu_share);
                        let until = std::time::Instant::now() + rest;
                        while !cancel.is_cancelled() && std::time::Instant::now() < until {
                            std::thread::sleep(
                                until
                                    .saturating_duration_since(std::time::Instant::now())
                                    .min(std::time::Duration::from_millis(20)),
                            );
                        }
                    }
                    last_mark = std::time::Instant::now();
                };
                engine.generate(&spec, &mut on_progress, &cancel)
            })
        };
        let mut running = std::pin::pin!(running);
        let mut config_changes = self.config.subscribe();
        let mut policy = self.policy.clone();
        loop {
            let paused = pause_reason(
                &config_changes.borrow_and_update(),
                &policy.borrow_and_update(),
            );
            if paused.is_some() {
                cancel.cancel(StopReason::Paused);
            }
            tokio::select! {
                joined = &mut running => {
                    return joined.unwrap_or_else(|err| {
                        tracing::error!("the engine stopped: {err}");
                        Err(EngineError::Internal("the engine crashed".to_owned()))
                    });
                }
                () = self.shutdown.cancelled(), if !cancel.is_cancelled() => {
                    cancel.cancel(StopReason::ShuttingDown);
                }
                changed = config_changes.changed() => {
                    if changed.is_err() {
                        cancel.cancel(StopReason::ShuttingDown);
                    }
                }
                () = changed(&mut policy) => {}
            }
        }
    }

    /// Stores the result durably, then (beside the next claim) tells the studio the job is
    /// uploading, wakes the uploader and writes the extras; a result that cannot be stored is
    /// reported back.
    async fn deliver(
        &self,
        session: &Session,
        spec: &JobSpec,
        mut current: CurrentJob,
        generated: Generated,
        engine_ms: u64,
    ) -> JobEnd {
        current.seed = generated.seed;
        let copies_folder = self.config.snapshot().images.save_copies_to.clone();
        let stored = self
            .delivery
            .store(
                spec,
                generated,
                session.worker_id(),
                engine_ms,
                copies_folder,
            )
            .await;
        match stored {
            Ok(stored) => {
                tracing::info!(job_id = %spec.job_id, engine_ms, "job finished; result saved for upload");
                self.unlisted
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((stored.number, stored.bytes));
                self.tally.finished_in(engine_ms);
                self.status.send_modify(|s| {
                    s.jobs.counters = self.tally.counters();
                    s.jobs.current = None;
                    s.jobs
                        .remember(FinishedJob::new(&current, JobOutcome::WAITING));
                });
                self.current_job.send_replace(None);
                // The result is safe: the GPU goes on to the next claim while the studio hears
                // of it and while the preview and the copies are written.
                self.announce_upload(session, spec);
                self.keep_extras(stored.keepsakes);
                JobEnd::Delivered
            }
            Err(err) => {
                // No path in the message: it goes to the studio.
                let message = format!("cannot store the result on this PC ({})", err.kind());
                tracing::error!(job_id = %spec.job_id, "{message}: {err}");
                report_fail(
                    session,
                    &self.timing,
                    &spec.job_id,
                    FailCode::Internal,
                    &message,
                    true,
                )
                .await;
                self.count_failure();
                self.finish(
                    &current,
                    JobOutcome::Failed {
                        code: FailCode::Internal,
                        message,
                    },
                );
                JobEnd::EngineFailed
            }
        }
    }

    /// The `uploading` report, then the uploader's wake-up, in that order, off the job loop.
    fn announce_upload(&self, session: &Session, spec: &JobSpec) {
        let session = session.clone();
        let spec = spec.clone();
        let outbox_changed = self.outbox_changed.clone();
        tokio::spawn(async move {
            progress::send_uploading(&session, &spec).await;
            outbox_changed.notify_one();
        });
    }

    /// Writes a stored result's preview and copies off the job loop, lists them with the job,
    /// and prunes the previews of jobs no longer listed.
    fn keep_extras(&self, keepsakes: Keepsakes) {
        let delivery = self.delivery.clone();
        let status = self.status.clone();
        tokio::spawn(async move {
            let kept = delivery.keep(keepsakes).await;
            let mut listed = Vec::new();
            status.send_modify(|s| {
                s.jobs
                    .attach_keepsakes(&kept.job_id, kept.thumbnail, kept.copies);
                listed = s.jobs.recent.iter().map(|job| job.job_id.clone()).collect();
            });
            delivery.keep_previews_of(listed);
        });
    }

    fn count_failure(&self) {
        self.tally.failed();
        self.status
            .send_modify(|s| s.jobs.counters = self.tally.counters());
    }

    /// Clears the current job and remembers how it ended.
    fn finish(&self, current: &CurrentJob, outcome: JobOutcome) {
        self.current_job.send_replace(None);
        self.status.send_modify(|s| {
            s.jobs.current = None;
            s.jobs.remember(FinishedJob::new(current, outcome));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preparing_message_counts_whole_seconds_down() {
        assert!(preparing_message(None).ends_with("this takes up to half a minute)"));
        let left = |seconds: f64| preparing_message(Some(Duration::from_secs_f64(seconds)));
        assert_eq!(
            left(11.2),
            "Preparing the GPU, once: compiling its kernels, 12 s left"
        );
        assert_eq!(
            left(12.0),
            "Preparing the GPU, once: compiling its kernels, 12 s left"
        );
        assert!(left(1.0).ends_with(", 1 s left"));
        assert!(left(0.4).ends_with(", almost done"));
        assert!(left(95.0).ends_with(", 1 min left"));
    }
}
