//! The job loop (studio-api.md §3): claim a job when the worker may, validate it, run it on the
//! engine (on the blocking pool, so heartbeats go on), and put the images in the outbox, or
//! hand the job back with the right `fail`.
//!
//! A job is stopped at its next denoising step when the studio cancels it or takes the lease
//! back (discarded), or when the person pauses or the worker quits (handed back `paused`).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use super::outage::OutageLog;
use super::progress;
use super::status::{CurrentJob, FinishedJob, JobOutcome};
use super::{TaskContext, approved_credentials, pause_reason};
use crate::backoff::Backoff;
use crate::engine::{CancelToken, Engine, EngineError, Generated, StopReason};
use crate::outbox::OutboxMeta;
use crate::studio::job::read_job;
use crate::studio::protocol::{ClaimRequest, FailCode, FailRequest, ResultMeta};
use crate::studio::{Credentials, StudioError};
use crate::timing::FAILURES_BEFORE_BACKOFF;
use crate::vocab::job::{JobSpec, MAX_SEED};
use crate::vocab::progress::{JobProgress, Stage};

/// How a claimed job ended, for the failure streak.
enum JobEnd {
    /// Images are in the outbox.
    Delivered,
    /// The engine failed on a valid job.
    EngineFailed,
    /// Not run (invalid), cancelled, lease lost, or handed back: says nothing about the engine.
    Neutral,
}

pub(super) async fn run(context: TaskContext) {
    let Some(engine) = context.engine.clone() else {
        context.status.send_modify(|s| {
            s.jobs.claim_blocked = Some("this build has no image engine yet".to_owned());
        });
        context.shutdown.cancelled().await;
        return;
    };
    let mut config_changes = context.config.subscribe();
    let mut status_changes = context.status.subscribe();
    let mut claim_backoff = Backoff::new(context.timing.backoff);
    let mut claim_outage = OutageLog::new("claim");
    let mut failure_backoff = Backoff::new(context.timing.failure_backoff);
    let mut failures_in_a_row = 0_u32;
    let mut not_before: Option<(Instant, String)> = None;
    let mut unloaded_for_pause = false;

    loop {
        let config = context.config.snapshot();
        if pause_reason(&config).is_some() {
            if config.engine.unload_when_paused && !unloaded_for_pause {
                unloaded_for_pause = true;
                let engine = engine.clone();
                // The person wants the GPU for something else: give its memory back.
                let _ = tokio::task::spawn_blocking(move || engine.unload()).await;
                tracing::info!("paused: model unloaded from memory");
            }
        } else {
            unloaded_for_pause = false;
        }
        let gate = claim_gate(&context, engine.as_ref(), not_before.as_ref());
        context.status.send_if_modified(|s| {
            let blocked = gate.as_ref().err().cloned();
            let changed = s.jobs.claim_blocked != blocked;
            s.jobs.claim_blocked = blocked;
            changed
        });
        let credentials = match gate {
            Ok(credentials) => credentials,
            Err(_) => {
                let wake_at = not_before.as_ref().map(|(at, _)| *at);
                let go_on = tokio::select! {
                    () = context.shutdown.cancelled() => false,
                    changed = config_changes.changed() => changed.is_ok(),
                    changed = status_changes.changed() => changed.is_ok(),
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
            wait_s: context.timing.claim_wait.as_secs().max(1),
        };
        let asked_at = Instant::now();
        let claimed = tokio::select! {
            () = context.shutdown.cancelled() => return,
            claimed = context.client.claim(&credentials, &request) => claimed,
        };
        let raw_job = match claimed {
            Ok(Some(raw_job)) => {
                claim_backoff.reset();
                claim_outage.recovered();
                raw_job
            }
            Ok(None) => {
                claim_backoff.reset();
                claim_outage.recovered();
                // After a held long-poll, claim again at once; a studio that answered at once
                // is asked again a little later (§3.1).
                if asked_at.elapsed() < context.timing.claim_wait / 2 {
                    not_before = Some((
                        Instant::now() + context.timing.empty_claim_pause,
                        "no jobs waiting".to_owned(),
                    ));
                }
                continue;
            }
            Err(StudioError::Unauthorized) => {
                context.revoked(&credentials.worker_id);
                continue;
            }
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

        match run_job(&context, &engine, &credentials, raw_job).await {
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
            JobEnd::Neutral => {}
        }
    }
}

/// `Ok(credentials)` when a job may be claimed now; otherwise why not, in words.
fn claim_gate(
    context: &TaskContext,
    engine: &dyn Engine,
    not_before: Option<&(Instant, String)>,
) -> Result<Credentials, String> {
    let config = context.config.snapshot();
    let Some(credentials) = approved_credentials(&config) else {
        return Err("not approved by the studio".to_owned());
    };
    if let Some(reason) = pause_reason(&config) {
        return Err(reason.describe().to_owned());
    }
    if !context.status.borrow().jobs.outbox_drained_since_start {
        return Err("delivering finished results first".to_owned());
    }
    if engine.ready_models().is_empty() {
        return Err("no model is ready".to_owned());
    }
    if let Some((at, why)) = not_before
        && *at > Instant::now()
    {
        return Err(why.clone());
    }
    Ok(credentials)
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn run_job(
    context: &TaskContext,
    engine: &Arc<dyn Engine>,
    credentials: &Credentials,
    raw_job: serde_json::Value,
) -> JobEnd {
    let spec = match read_job(&raw_job, &engine.limits(), &engine.ready_models(), || {
        fastrand::u64(..=MAX_SEED)
    }) {
        Ok(spec) => spec,
        Err(rejection) => {
            match rejection.job_id {
                None => tracing::warn!("ignored a job the studio sent: {}", rejection.message),
                Some(job_id) => {
                    tracing::warn!(job_id = %job_id, "not running this job: {}", rejection.message);
                    hand_back(
                        context,
                        credentials,
                        &job_id,
                        rejection.code,
                        &rejection.message,
                        false,
                    )
                    .await;
                    context.status.send_modify(|s| {
                        s.jobs.counters.jobs_failed += 1;
                        s.jobs.remember(rejected_job(
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
    context
        .status
        .send_modify(|s| s.jobs.current = Some(current.clone()));

    let cancel = CancelToken::new();
    let (progress_sender, progress_receiver) = watch::channel(JobProgress {
        stage: Stage::LoadingModel,
        step: 0,
        total_steps: spec.steps,
    });
    let reporter = tokio::spawn(progress::report(
        context.clone(),
        credentials.clone(),
        spec.job_id.clone(),
        spec.lease,
        progress_receiver,
        cancel.clone(),
    ));

    let started = Instant::now();
    let generated = run_engine(context, engine, &spec, progress_sender, &cancel).await;
    let engine_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    match (generated, cancel.reason()) {
        (_, Some(StopReason::CancelledByStudio)) => {
            tracing::info!(job_id = %spec.job_id, "the studio cancelled the job; output discarded");
            reporter.abort();
            finish(context, &current, JobOutcome::Cancelled);
            JobEnd::Neutral
        }
        (_, Some(StopReason::LeaseLost)) => {
            tracing::warn!(job_id = %spec.job_id, "the studio gave the job to another worker; output discarded");
            reporter.abort();
            finish(context, &current, JobOutcome::LeaseLost);
            JobEnd::Neutral
        }
        // Finished before the pause reached a step boundary: the work is done, deliver it.
        (Ok(generated), _) => {
            deliver(
                context,
                credentials,
                &spec,
                &current,
                generated,
                engine_ms,
                reporter,
            )
            .await
        }
        (
            Err(EngineError::Cancelled),
            Some(reason @ (StopReason::Paused | StopReason::ShuttingDown)),
        ) => {
            reporter.abort();
            let message = if reason == StopReason::Paused {
                "the person using this PC paused the worker"
            } else {
                "the worker is shutting down"
            };
            tracing::info!(job_id = %spec.job_id, "handing the job back: {message}");
            let handed_back = hand_back(
                context,
                credentials,
                &spec.job_id,
                FailCode::Paused,
                message,
                true,
            );
            if reason == StopReason::ShuttingDown {
                // Quitting must not hang on a studio that does not answer.
                let _ = tokio::time::timeout(context.timing.handback_timeout, handed_back).await;
            } else {
                handed_back.await;
            }
            finish(context, &current, JobOutcome::HandedBack);
            JobEnd::Neutral
        }
        (Err(err), _) => {
            reporter.abort();
            let (code, message) = match &err {
                EngineError::OutOfMemory(detail) => {
                    (FailCode::Oom, format!("out of memory: {detail}"))
                }
                EngineError::ModelUnavailable(detail) => {
                    (FailCode::ModelUnavailable, detail.clone())
                }
                EngineError::Internal(detail) => (FailCode::Internal, detail.clone()),
                EngineError::Cancelled => (
                    FailCode::Internal,
                    "the engine stopped on its own".to_owned(),
                ),
            };
            tracing::error!(job_id = %spec.job_id, "job failed: {message}");
            // Another worker (more memory, a different model store) may well succeed.
            hand_back(context, credentials, &spec.job_id, code, &message, true).await;
            context
                .status
                .send_modify(|s| s.jobs.counters.jobs_failed += 1);
            finish(context, &current, JobOutcome::Failed { code, message });
            JobEnd::EngineFailed
        }
    }
}

/// Runs the engine on the blocking pool, turning a pause or a shutdown into a stop at the
/// next step; its progress goes to the reporter and the status.
async fn run_engine(
    context: &TaskContext,
    engine: &Arc<dyn Engine>,
    spec: &JobSpec,
    progress_sender: watch::Sender<JobProgress>,
    cancel: &CancelToken,
) -> Result<Generated, EngineError> {
    let mut blocking = {
        let engine = engine.clone();
        let spec = spec.clone();
        let cancel = cancel.clone();
        let status = context.status.clone();
        tokio::task::spawn_blocking(move || {
            let mut on_progress = |progress: JobProgress| {
                progress_sender.send_replace(progress);
                status.send_modify(|s| {
                    if let Some(current) = s.jobs.current.as_mut() {
                        current.stage = progress.stage;
                        current.step = progress.step;
                        current.total_steps = progress.total_steps;
                    }
                });
            };
            engine.generate(&spec, &mut on_progress, &cancel)
        })
    };
    let mut config_changes = context.config.subscribe();
    loop {
        if pause_reason(&config_changes.borrow_and_update()).is_some() {
            cancel.cancel(StopReason::Paused);
        }
        tokio::select! {
            joined = &mut blocking => {
                return joined.unwrap_or_else(|err| {
                    tracing::error!("the engine panicked: {err}");
                    Err(EngineError::Internal("the engine crashed".to_owned()))
                });
            }
            () = context.shutdown.cancelled(), if !cancel.is_cancelled() => {
                cancel.cancel(StopReason::ShuttingDown);
            }
            changed = config_changes.changed() => {
                if changed.is_err() {
                    cancel.cancel(StopReason::ShuttingDown);
                }
            }
        }
    }
}

/// PNG-encodes the images, stores them durably in the outbox, tells the studio the job is
/// uploading, and wakes the uploader.
async fn deliver(
    context: &TaskContext,
    credentials: &Credentials,
    spec: &JobSpec,
    current: &CurrentJob,
    generated: Generated,
    engine_ms: u64,
    reporter: tokio::task::JoinHandle<()>,
) -> JobEnd {
    let meta = OutboxMeta {
        job_id: spec.job_id.clone(),
        result: ResultMeta {
            worker_id: credentials.worker_id.clone(),
            seed: generated.seed,
            elapsed_ms: engine_ms,
            model: spec.model.clone(),
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
        },
        image_count: generated.images.len(),
        prompt: spec.prompt.clone(),
        created_at: Utc::now(),
    };
    let outbox = context.outbox.clone();
    let thumbnails = context.thumbnails.clone();
    let job_id = spec.job_id.clone();
    let copies_folder = context.config.snapshot().images.save_copies_to.clone();
    let copy_stem = copy_stem(spec, generated.seed);
    let stored = tokio::task::spawn_blocking(move || {
        let pngs = generated
            .images
            .iter()
            .map(encode_png)
            .collect::<Result<Vec<_>, _>>()?;
        outbox.put(&meta, &pngs)?;
        // Only for the Jobs tab: a job is delivered with or without it.
        let thumbnail = generated.images.first().and_then(|first| {
            thumbnails
                .save(&job_id, first)
                .map_err(|err| tracing::debug!("no preview for {job_id}: {err}"))
                .ok()
        });
        // Also only for the person: a failed copy never fails the job.
        let copies = copies_folder.map_or_else(Vec::new, |folder| {
            save_copies(&folder, &copy_stem, &pngs)
                .map_err(|err| tracing::warn!("no copy saved in {}: {err}", folder.display()))
                .unwrap_or_default()
        });
        Ok::<_, std::io::Error>((thumbnail, copies))
    })
    .await
    .unwrap_or_else(|err| Err(std::io::Error::other(err.to_string())));

    reporter.abort();
    let mut current = current.clone();
    current.seed = generated.seed;
    match stored {
        Ok((thumbnail, copies)) => {
            tracing::info!(job_id = %spec.job_id, engine_ms, "job finished; result saved for upload");
            context.status.send_modify(|s| {
                s.jobs.counters.last_job_ms = Some(engine_ms);
                s.jobs.outbox_len += 1;
            });
            finish(context, &current, JobOutcome::Uploading);
            context.status.send_modify(|s| {
                if let Some(job) = s.jobs.recent.front_mut() {
                    job.thumbnail = thumbnail;
                    job.saved_copies = copies;
                }
            });
            let thumbnails = context.thumbnails.clone();
            let listed: Vec<String> = context
                .status
                .borrow()
                .jobs
                .recent
                .iter()
                .map(|j| j.job_id.clone())
                .collect();
            tokio::task::spawn_blocking(move || {
                thumbnails.keep_only(&listed.iter().map(String::as_str).collect::<Vec<_>>());
            });
            progress::send_uploading(context, credentials, spec).await;
            context.outbox_changed.notify_one();
            JobEnd::Delivered
        }
        Err(err) => {
            // No path in the message: it goes to the studio.
            let message = format!("cannot store the result on this PC ({})", err.kind());
            tracing::error!(job_id = %spec.job_id, "{message}: {err}");
            hand_back(
                context,
                credentials,
                &spec.job_id,
                FailCode::Internal,
                &message,
                true,
            )
            .await;
            context
                .status
                .send_modify(|s| s.jobs.counters.jobs_failed += 1);
            finish(
                context,
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

/// `2026-11-27 14.03.12 sd-turbo 42`: sorts by time, says what made it.
fn copy_stem(spec: &JobSpec, seed: u64) -> String {
    let model: String = spec
        .model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!(
        "{} {model} {seed}",
        chrono::Local::now().format("%Y-%m-%d %H.%M.%S")
    )
}

/// Writes the PNGs as `<stem>.png` (or `<stem>-N.png` for several), never over a file.
fn save_copies(
    folder: &std::path::Path,
    stem: &str,
    pngs: &[Vec<u8>],
) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(folder)?;
    let mut saved = Vec::new();
    for (index, png) in pngs.iter().enumerate() {
        let base = if pngs.len() == 1 {
            stem.to_owned()
        } else {
            format!("{stem}-{}", index + 1)
        };
        let mut path = folder.join(format!("{base}.png"));
        let mut attempt = 1;
        while path.exists() {
            attempt += 1;
            path = folder.join(format!("{base} ({attempt}).png"));
        }
        std::fs::write(&path, png)?;
        saved.push(path);
    }
    Ok(saved)
}

fn encode_png(image: &image::RgbImage) -> std::io::Result<Vec<u8>> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(std::io::Error::other)?;
    Ok(png)
}

/// Clears the current job and remembers how it ended.
fn finish(context: &TaskContext, current: &CurrentJob, outcome: JobOutcome) {
    context.status.send_modify(|s| {
        s.jobs.current = None;
        s.jobs.remember(FinishedJob::new(current, outcome));
    });
}

fn rejected_job(
    job_id: &str,
    raw_job: &serde_json::Value,
    code: FailCode,
    message: &str,
) -> FinishedJob {
    let text = |field: &str| {
        raw_job
            .get(field)
            .and_then(serde_json::Value::as_str)
            .map(|text| text.chars().take(200).collect())
            .unwrap_or_default()
    };
    let number = |field: &str| {
        raw_job
            .get(field)
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    FinishedJob {
        job_id: job_id.chars().take(200).collect(),
        prompt: text("prompt"),
        model: text("model"),
        width: number("width"),
        height: number("height"),
        steps: number("steps"),
        seed: None,
        outcome: JobOutcome::Rejected {
            code,
            message: message.to_owned(),
        },
        duration_ms: 0,
        finished_at: Utc::now(),
        thumbnail: None,
        saved_copies: Vec::new(),
    }
}

/// §3.4. Retried a few times on transient errors; after that the lease runs out and the
/// studio reassigns the job anyway.
pub(super) async fn hand_back(
    context: &TaskContext,
    credentials: &Credentials,
    job_id: &str,
    code: FailCode,
    message: &str,
    retryable: bool,
) {
    let body = FailRequest {
        worker_id: credentials.worker_id.clone(),
        code,
        error: message.to_owned(),
        retryable,
    };
    let mut backoff = Backoff::new(context.timing.backoff);
    for _ in 0..4 {
        match context.client.fail(credentials, job_id, &body).await {
            Ok(()) | Err(StudioError::NotFound { .. } | StudioError::Conflict { .. }) => return,
            Err(StudioError::Unauthorized) => {
                context.revoked(&credentials.worker_id);
                return;
            }
            Err(err) if err.is_transient() => {
                let delay = backoff.next_delay(err.retry_after());
                tracing::debug!(job_id, "fail not delivered ({err}); retrying in {delay:?}");
                tokio::time::sleep(delay).await;
            }
            Err(err) => {
                tracing::warn!(job_id, "the studio refused the fail report: {err}");
                return;
            }
        }
    }
    tracing::warn!(
        job_id,
        "could not hand the job back; the studio will reassign it when its lease runs out"
    );
}
