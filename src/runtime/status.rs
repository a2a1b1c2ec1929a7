//! The runtime's state as the window, the tray and `studio-worker status` see it.
//!
//! One [`WorkerStatus`] value behind a `watch` channel. Each field has one writer (named on
//! the field); readers clone a snapshot and never hold the channel while drawing or doing I/O.
//! It is a view only: no task reads it to decide anything (they have their own channels, see
//! `runtime::signals`), so a field added for the window cannot change the worker's behaviour.
//! It holds nothing secret, so it can be written to `status.json` and shown as it is.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use std::collections::VecDeque;

use crate::config::Config;
use crate::policy::Decision;
use crate::registration::RegistrationState;
use crate::studio::protocol::FailCode;
use crate::vocab::job::JobSpec;
use crate::vocab::pause::PauseReason;
use crate::vocab::progress::Stage;

/// How many finished jobs the status keeps for the Jobs tab.
pub const RECENT_JOBS: usize = 50;

/// A model download in progress, for the window and `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDownload {
    pub model_id: String,
    pub done_bytes: u64,
    /// 0 until the hub said how much there is.
    pub total_bytes: u64,
    pub bytes_per_second: f64,
    pub eta: Option<std::time::Duration>,
    /// Why it is not moving (waiting to resume, or stopped for good), in one line.
    pub problem: Option<String>,
}

impl ModelDownload {
    /// Its progress in the words every view uses.
    pub fn words(&self) -> crate::human::DownloadWords {
        crate::human::download_words(
            self.done_bytes,
            self.total_bytes,
            self.bytes_per_second,
            self.eta,
        )
    }
}

/// A catalog model's files on this PC, for the Settings tab's "Delete files".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelOnDisk {
    pub model_id: String,
    /// What its files take: the whole model once complete, what a stopped download fetched
    /// so far otherwise.
    pub bytes: u64,
    /// Every file is in place (else a download stopped part way, to resume from).
    pub complete: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub started_at: DateTime<Utc>,
    pub api_base_url: String,
    /// Writer: the mirror task (derived from every config change).
    pub registration: RegistrationState,
    /// Writer: the registration task. The last problem while registering, in one line.
    pub registration_problem: Option<String>,
    /// Writer: the registration task.
    pub next_registration_poll_at: Option<DateTime<Utc>>,
    /// Writer: the heartbeat task.
    pub connection: ConnectionStatus,
    /// Writer: the mirror task (from the config's pause section and the policy's decision).
    pub paused: Option<PauseReason>,
    /// Writer: the policy task. Its automatic pause (with what holds and when it ends), the
    /// reasons the person overrode, and the signals this PC cannot give.
    #[serde(default)]
    pub policy: Decision,
    /// Writers: the job loop (current, recent, counters, claim_blocked) and the uploader
    /// (outbox, delivered counters).
    pub jobs: JobsStatus,
    /// Writer: the runtime at start. What the engine runs on.
    pub device: Option<crate::vocab::device::DeviceInfo>,
    /// Why the engine runs on the CPU although a GPU was wanted (no driver, the CUDA build
    /// could not start, the GPU did not open…), or why a GPU runs the models in f32.
    pub device_note: Option<String>,
    /// Writer: the runtime at start. This worker was started again because the GPU stopped
    /// working in the one before (`gpu_recovery`).
    pub restarted: Option<super::gpu_recovery::Restarted>,
    /// Writers: the runtime at start, the downloads task when a model joins. The models
    /// that can run now (`None`: no engine).
    pub models_ready: Option<Vec<String>>,
    /// Writers: the runtime at start, the downloads task when a downloaded model is served
    /// or refused, the commands task when a local folder is served. The models given to
    /// serve that cannot run, and why (a broken folder, or weights the memory budget cannot
    /// hold).
    #[serde(default)]
    pub models_refused: Vec<crate::engine::RefusedModel>,
    /// Writer: the downloads task. Catalog models being fetched (or that could not be).
    pub downloads: Vec<ModelDownload>,
    /// Writers: the downloads task (at start, when a download ends or stops, and every
    /// minute while none runs), the commands task (after a removal). The catalog models with files of their own on this
    /// PC (what a removal deletes: not another tool's download), in catalog order.
    #[serde(default)]
    pub models_on_disk: Vec<ModelOnDisk>,
    /// Set at start when the settings file could not be read and was kept aside: where it
    /// went and why, for the person to see (the reason never quotes the file).
    pub settings_recovered: Option<String>,
    /// Writer: the runtime at start (app only). The settings' studio URL does not parse, so
    /// no studio task runs until it is fixed and the worker restarted.
    pub studio_url_problem: Option<String>,
    /// Writer: the command task. Set when a change could not be saved.
    pub settings_problem: Option<String>,
    /// Writer: the mirror task. Why the settings in memory are not on disk (the settings
    /// folder is not writable): they hold until the worker restarts.
    #[serde(default)]
    pub settings_unsaved: Option<String>,
    /// Set at start: the names in the settings file this version does not know (kept in the
    /// file, not used; a misspelt name most likely).
    #[serde(default)]
    pub settings_unknown: Vec<String>,
    /// Writer: the registration task, when it cannot go on at all (no entropy).
    pub fatal: Option<String>,
}

impl WorkerStatus {
    pub fn new(config: &Config) -> Self {
        Self {
            started_at: Utc::now(),
            api_base_url: config.api_base_url.clone(),
            registration: RegistrationState::from_config(config),
            registration_problem: None,
            next_registration_poll_at: None,
            connection: ConnectionStatus::default(),
            paused: pause_reason(config, &Decision::default()),
            policy: Decision::default(),
            jobs: JobsStatus::default(),
            device: None,
            device_note: None,
            restarted: None,
            models_ready: None,
            models_refused: Vec::new(),
            downloads: Vec::new(),
            models_on_disk: Vec::new(),
            settings_recovered: None,
            settings_problem: None,
            settings_unsaved: None,
            settings_unknown: config.unknown.names(),
            studio_url_problem: None,
            fatal: None,
        }
    }

    /// Why the worker is paused, in the one line the tray, the Status tab and `status` show:
    /// "Paused: Cyberpunk 2077 is running — resumes 2 min after it closes".
    pub fn pause_line(&self) -> Option<String> {
        let reason = self.paused?;
        Some(match &self.policy.pause {
            Some(pause) if pause.reason == reason => {
                format!("Paused: {} — {}", pause.detail, pause.resumes)
            }
            _ => crate::human::capitalise(reason.describe()),
        })
    }

    /// Which models can run, in one line (`None`: no engine).
    pub fn models_summary(&self) -> Option<String> {
        self.models_ready.as_ref().map(|ready| {
            if ready.is_empty() {
                "no model ready yet".to_owned()
            } else {
                format!("models ready: {}", ready.join(", "))
            }
        })
    }
}

/// The job queue and history as the Jobs tab and the heartbeat see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobsStatus {
    pub current: Option<CurrentJob>,
    /// The last [`RECENT_JOBS`] jobs, newest first.
    pub recent: VecDeque<FinishedJob>,
    /// Writer: the uploader. Results on disk waiting for the studio.
    pub outbox_len: usize,
    /// Writer: the uploader. Each waiting result (and damaged outbox folder), and where it
    /// stands with the studio.
    #[serde(default)]
    pub waiting: Vec<WaitingResult>,
    /// Writers: the job loop and the uploader, each after adding to the tally.
    pub counters: JobCounters,
    /// Why no job is being claimed right now, in words (none while claiming or working).
    pub claim_blocked: Option<String>,
}

impl JobsStatus {
    pub fn remember(&mut self, finished: FinishedJob) {
        self.recent.retain(|job| job.job_id != finished.job_id);
        self.recent.push_front(finished);
        self.recent.truncate(RECENT_JOBS);
    }

    /// A delivered job's preview and the person's copies, written after it was listed.
    pub fn attach_keepsakes(
        &mut self,
        job_id: &str,
        thumbnail: Option<std::path::PathBuf>,
        saved_copies: Vec<std::path::PathBuf>,
    ) {
        if let Some(job) = self.recent.iter_mut().find(|job| job.job_id == job_id) {
            job.thumbnail = thumbnail;
            job.saved_copies = saved_copies;
        }
    }

    pub fn set_outcome(&mut self, job_id: &str, outcome: JobOutcome) {
        if let Some(job) = self.recent.iter_mut().find(|job| job.job_id == job_id) {
            job.outcome = outcome;
        }
    }
}

/// A result waiting in the outbox, for the Jobs tab (Retry now, Discard).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitingResult {
    /// The outbox entry's folder name: what Discard names.
    pub key: String,
    pub job_id: String,
    pub prompt: String,
    pub created_at: DateTime<Utc>,
    pub state: WaitingState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "state",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum WaitingState {
    /// Next in line.
    Queued,
    /// The studio could not be reached or failed (5xx…); retrying with backoff.
    Retrying { problem: String },
    /// The studio refused it (404, 4xx) without saying the job is done or gone: kept and
    /// retried until `gives_up_at`.
    Refused {
        studio_answer: String,
        gives_up_at: DateTime<Utc>,
    },
    /// Its files cannot be read back: kept for the person to look at.
    Unreadable { problem: String },
    /// A folder in the outbox whose metadata cannot be read.
    Damaged { problem: String },
    /// Delivered, but it could not be taken out of the outbox.
    DeliveredNotRemoved,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobCounters {
    /// Results the studio acknowledged.
    pub jobs_completed: u64,
    /// Jobs handed back with `fail`, for any reason but a pause.
    pub jobs_failed: u64,
    pub images_generated: u64,
    /// Engine time of the last finished job.
    pub last_job_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentJob {
    pub job_id: String,
    pub prompt: String,
    pub model: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub num_images: u32,
    pub seed: u64,
    pub stage: Stage,
    pub step: u32,
    pub total_steps: u32,
    pub started_at: DateTime<Utc>,
}

impl CurrentJob {
    pub fn new(spec: &JobSpec) -> Self {
        Self {
            job_id: spec.job_id.clone(),
            prompt: spec.prompt.clone(),
            model: spec.model.clone(),
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
            num_images: spec.num_images,
            seed: spec.seed,
            stage: Stage::LoadingModel,
            step: 0,
            total_steps: spec.steps,
            started_at: Utc::now(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FinishedJob {
    pub job_id: String,
    pub prompt: String,
    pub model: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub seed: Option<u64>,
    pub outcome: JobOutcome,
    pub duration_ms: u64,
    pub finished_at: DateTime<Utc>,
    /// A small preview of the first image, when the job produced one.
    #[serde(default)]
    pub thumbnail: Option<std::path::PathBuf>,
    /// Copies of the images, when `[images] save_copies_to` is set.
    #[serde(default)]
    pub saved_copies: Vec<std::path::PathBuf>,
}

impl FinishedJob {
    /// A job that was never run (it broke a rule), from what its raw JSON says.
    pub(super) fn rejected(
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

    pub fn new(current: &CurrentJob, outcome: JobOutcome) -> Self {
        let duration = Utc::now() - current.started_at;
        Self {
            job_id: current.job_id.clone(),
            prompt: current.prompt.clone(),
            model: current.model.clone(),
            width: current.width,
            height: current.height,
            steps: current.steps,
            seed: Some(current.seed),
            outcome,
            duration_ms: duration.num_milliseconds().max(0).unsigned_abs(),
            finished_at: Utc::now(),
            thumbnail: None,
            saved_copies: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "outcome",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum JobOutcome {
    /// Made on this PC; the images are in the outbox until the studio takes them.
    Finished { delivery: Delivery },
    /// Never run: the job broke a rule.
    Rejected { code: FailCode, message: String },
    /// Ran and failed; handed back with `fail`.
    Failed { code: FailCode, message: String },
    /// Handed back because the worker was paused or quit.
    HandedBack,
    /// The submitter cancelled it.
    Cancelled,
    /// The studio gave it to someone else (409/410) while it ran.
    LeaseLost,
}

impl JobOutcome {
    /// Made here, waiting in the outbox.
    pub const WAITING: Self = Self::Finished {
        delivery: Delivery::Waiting,
    };
    /// Made here and taken by the studio.
    pub const DELIVERED: Self = Self::Finished {
        delivery: Delivery::Delivered,
    };
}

/// Where the images of a finished job are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Delivery {
    /// In the outbox, on their way to the studio.
    Waiting,
    /// The studio has them.
    Delivered,
    /// The studio answered 404/409/410: the job was no longer this worker's; dropped.
    NotWanted,
}

/// The reason to report when the worker is paused, by precedence (see [`PauseReason`]): the
/// person's own pause, then the policy's (a game, the schedule, heat, …), then the studio's.
pub fn pause_reason(config: &Config, policy: &Decision) -> Option<PauseReason> {
    if config.pause.by_user {
        Some(PauseReason::User)
    } else if let Some(pause) = &policy.pause {
        Some(pause.reason)
    } else if config.pause.by_studio {
        Some(PauseReason::Studio)
    } else {
        None
    }
}

/// How the last exchanges with the studio went. Writer: the heartbeat task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub next_heartbeat_at: Option<DateTime<Utc>>,
    pub heartbeats_sent: u64,
    /// Failed heartbeats since the last good one.
    pub consecutive_failures: u32,
    /// The last failure, in one line; cleared by a good heartbeat.
    pub last_error: Option<String>,
}
