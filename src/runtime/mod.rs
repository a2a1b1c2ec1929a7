//! The worker's background tasks, who owns which state, and the one door in.
//!
//! [`Runtime::start`] spawns, on the caller's tokio runtime:
//!
//! | task | owns (only writer) | wakes on |
//! |---|---|---|
//! | `registration` | registration fields of the config, `registration_problem`, fatal stops | its timer, config changes (reset) |
//! | `heartbeat` | `connection`, `pause.by_studio` | its timer, approval, pause changes |
//! | `job_loop` | `jobs.current/recent/claim_blocked`, the running job's id; writes the outbox; asks for a restart when the GPU stops working ([`gpu_recovery`]) | claims, pause, config and outbox changes |
//! | `uploader` | [`signals::OutboxState`], the waiting results; removes from the outbox | new outbox entries, its backoffs, Retry now, Discard |
//! | `lease keeper` | — (renews the leases of waiting results; tells the uploader what the studio no longer wants) | its timer, the waiting results |
//! | `downloads` | `downloads`, `models_ready`, `models_refused`, `models_on_disk`, the models still coming | enabled models changing |
//! | `commands` | `pause.by_user`, resets, Settings, `settings_problem`, [`HostRequests`]; `models_ready`, `models_refused` when a local folder joins; `models_ready` when a saved untick stops a model's serving; `models_on_disk` after a removal | [`Command`]s from the UI, tray, CLI |
//! | `control` | — (turns local `pause`/`resume`/`quit` requests into [`Command`]s) | connections on 127.0.0.1 |
//! | `mirror` | `registration`, `paused` in [`WorkerStatus`] | every saved config change |
//! | `status_file` | `status.json` in the data folder | status changes (at most 1/s) |
//!
//! Tasks talk to each other through channels with one owner each ([`signals`]), never
//! through [`WorkerStatus`], which is only what the views show. Each task is given exactly
//! what it uses. The engine runs on tokio's blocking pool, one job at a time, driven by
//! `job_loop`.
//!
//! Everything a view needs is in [`RuntimeHandle`]: a status snapshot, the config, the
//! runtime's requests of its host, and a command sender (with an outcome to poll, for the
//! clicks whose result the window shows). Views never wait on the runtime and
//! the runtime never waits on a view.

mod capabilities;
mod commands;
pub mod control;
mod delivery;
mod downloads;
mod engine_thread;
pub mod gpu_recovery;
mod heartbeat;
mod job_loop;
mod os_signals;
mod outage;
mod policy_task;
mod progress;
mod registration_task;
mod session;
mod setup;
pub mod signals;
mod status;
pub mod status_file;
mod uploader;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use commands::{AskedCommand, Command, CommandOutcome, SettingsChange};
pub use downloads::ModelSupply;
pub use os_signals::ShutdownSignal;
pub use setup::Launch;
pub use signals::{HostRequests, RestartRequest, StopRequest, host_requests};
pub use status::{
    ConnectionStatus, CurrentJob, Delivery, FinishedJob, JobCounters, JobOutcome, JobsStatus,
    ModelDownload, ModelOnDisk, WaitingResult, WaitingState, WorkerStatus, pause_reason,
};

use self::capabilities::CapabilitySource;
use self::signals::{OutboxState, Tally};
use crate::config::{Config, SharedConfig};
use crate::engine::Engine;
use crate::outbox::Outbox;
use crate::platform::host;
use crate::platform::probes::Probes;
use crate::policy::Decision;
use crate::registration::{Registrar, RegistrationState};
use crate::studio::{ApiBase, ApiBaseError, StudioClient, StudioError};
use crate::thumbnails::Thumbnails;
use crate::timing::Timing;

pub struct RuntimeOptions {
    pub timing: Timing,
    /// Where `status.json`, the outbox and the control file go (the data folder).
    pub data_dir: PathBuf,
    /// Talk to this studio instead of the config's `api_base_url`, for this run only.
    pub api_base_override: Option<String>,
    /// What turns jobs into images. `None`: no job is claimed (the heartbeat says `loading`).
    pub engine: Option<Arc<dyn Engine>>,
    /// The settings file that `config::load` found broken and kept aside, to tell the person.
    pub recovered_config: Option<crate::config::BrokenConfig>,
    /// Where enabled catalog models are downloaded from and to; `None`: no downloads.
    pub model_supply: Option<ModelSupply>,
    /// What the good-guest policy watches (games, input, heat, power); `None`: no policy
    /// (the worker pauses only when told to).
    pub probes: Option<Probes>,
    /// The app: a studio URL in the settings that does not parse does not stop the start.
    /// Nothing talks to the studio, the status says why, and Settings can fix it. Headless
    /// runs (`false`) fail instead, with the reason on stderr.
    pub tolerate_invalid_studio_url: bool,
    /// The restarts for a lost GPU that led to this run (none for a fresh start).
    pub gpu_recovery: gpu_recovery::GpuRecovery,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    ApiBase(#[from] ApiBaseError),
    #[error(transparent)]
    Client(#[from] StudioError),
    #[error("cannot open the outbox folder {path}: {source}")]
    Outbox {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The view's side of the status: one writer per field (see [`WorkerStatus`]).
pub(crate) type StatusSender = Arc<watch::Sender<WorkerStatus>>;

/// What the UI, tray and CLI hold: cheap to clone, never blocks.
#[derive(Clone)]
pub struct RuntimeHandle {
    config: SharedConfig,
    status: watch::Receiver<WorkerStatus>,
    commands: mpsc::Sender<Command>,
    /// Commands whose outcome the window shows (shared with the control channel).
    asked: mpsc::Sender<AskedCommand>,
    requests: HostRequests,
}

impl RuntimeHandle {
    /// A handle over channels the caller owns: for views under test, which play the runtime
    /// themselves (set the status and the requests, read the commands).
    pub fn new(
        config: SharedConfig,
        status: watch::Receiver<WorkerStatus>,
        commands: mpsc::Sender<Command>,
        asked: mpsc::Sender<AskedCommand>,
        requests: HostRequests,
    ) -> Self {
        Self {
            config,
            status,
            commands,
            asked,
            requests,
        }
    }

    /// A copy of the current status.
    pub fn status(&self) -> WorkerStatus {
        self.status.borrow().clone()
    }

    /// Notified on every status change.
    pub fn subscribe(&self) -> watch::Receiver<WorkerStatus> {
        self.status.clone()
    }

    pub fn config(&self) -> &SharedConfig {
        &self.config
    }

    /// What the runtime asks of the window (come forward, stop).
    pub fn requests(&self) -> &HostRequests {
        &self.requests
    }

    /// Queues a command. Returns `false` when the runtime has stopped or is hopelessly
    /// behind (32 queued commands): a click is dropped rather than the UI blocked.
    pub fn send(&self, command: Command) -> bool {
        self.commands.try_send(command).is_ok()
    }

    /// Queues a command whose outcome goes to `outcome` (the window polls its receiver).
    /// When the runtime has stopped or is behind, `outcome` is dropped: its receiver hears
    /// that at once, and the click is not lost silently.
    pub fn ask(&self, command: Command, outcome: oneshot::Sender<CommandOutcome>) {
        let _ = self.asked.try_send((command, outcome));
    }
}

pub struct Runtime {
    handle: RuntimeHandle,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Runtime {
    /// Checks the studio URL and starts the background tasks on the current tokio runtime.
    pub fn start(config: SharedConfig, options: RuntimeOptions) -> Result<Self, StartError> {
        let snapshot = config.snapshot();
        let parsed = ApiBase::parse(
            options
                .api_base_override
                .as_deref()
                .unwrap_or(&snapshot.api_base_url),
        );
        // An invalid URL from the settings (never from `--api-url`, which the person just
        // typed) parks the studio tasks when the caller tolerates it.
        let (api_base, url_problem) = match parsed {
            Ok(api_base) => (api_base, None),
            Err(error)
                if options.tolerate_invalid_studio_url && options.api_base_override.is_none() =>
            {
                tracing::error!("the studio URL in the settings is not valid: {error}");
                (
                    ApiBase::parse(crate::config::DEFAULT_API_BASE_URL)?,
                    Some(format!(
                        "the studio URL in the settings is not valid ({error}); fix it in \
                         Settings, then restart studio-worker"
                    )),
                )
            }
            Err(error) => return Err(error.into()),
        };
        let timing = options.timing;
        let client = StudioClient::with_timeout(api_base.clone(), timing.request_timeout)?;
        let outbox_folder = options.data_dir.join("outbox");
        let outbox = Outbox::open(outbox_folder.clone()).map_err(|source| StartError::Outbox {
            path: outbox_folder,
            source,
        })?;
        let engine = options.engine;

        let device = engine
            .as_ref()
            .map_or_else(host::cpu_device, |engine| engine.device_info());
        let mut initial = WorkerStatus::new(&snapshot);
        initial.api_base_url = if url_problem.is_some() {
            snapshot.api_base_url.clone()
        } else {
            api_base.to_string()
        };
        initial.studio_url_problem.clone_from(&url_problem);
        initial.device = Some(device.clone());
        initial.device_note = engine.as_ref().and_then(|engine| engine.device_note());
        initial.restarted = options.gpu_recovery.restarted();
        initial.models_ready = engine.as_ref().map(|engine| engine.ready_models());
        initial.models_refused = engine
            .as_ref()
            .map_or_else(Vec::new, |engine| engine.refused_models());
        initial.settings_recovered = options.recovered_config.map(|broken| {
            format!(
                "the settings file could not be read ({}); it was kept as {} and default settings are in use",
                broken.reason,
                broken.kept_at.display()
            )
        });

        let (status_sender, status) = watch::channel(initial);
        let status_sender: StatusSender = Arc::new(status_sender);
        let (command_sender, command_receiver) = mpsc::channel(32);
        let (host, requests) = host_requests();
        let (coming_sender, coming) = watch::channel(Vec::new());
        // Until the uploader has looked, results from before come first (§3.3).
        let (outbox_state_sender, outbox_state) = watch::channel(OutboxState {
            hold_claims: Some("delivering finished results first".to_owned()),
            ..OutboxState::default()
        });
        let (discard_sender, discards) = mpsc::channel(32);
        let (not_wanted_sender, not_wanted) = mpsc::channel(32);
        let (lease_sender, leases) = watch::channel(Vec::new());
        let (current_job_sender, current_job) = watch::channel(None);
        let (policy_sender, policy) = watch::channel(Decision::default());
        let resumed = Arc::new(Notify::new());
        let tally = Arc::new(Tally::default());
        let outbox_changed = Arc::new(Notify::new());
        let retry_uploads = Arc::new(Notify::new());
        let capabilities = CapabilitySource::new(engine.clone(), device, coming.clone());
        let removals_watch = coming.clone();
        let shutdown = CancellationToken::new();

        let mut tasks = JoinSet::new();
        tasks.spawn(mirror(
            config.clone(),
            policy.clone(),
            status_sender.clone(),
            shutdown.clone(),
        ));
        if let Some(probes) = options.probes {
            tasks.spawn(policy_task::run(policy_task::PolicyTask {
                config: config.clone(),
                probes,
                resumed: resumed.clone(),
                decision: policy_sender,
                status: status_sender.clone(),
                timing,
                shutdown: shutdown.clone(),
            }));
        }
        if url_problem.is_none() {
            tasks.spawn(registration_task::run(
                registration_task::RegistrationTask {
                    registrar: Registrar::new(client.clone(), config.clone(), timing),
                    capabilities: capabilities.clone(),
                    config: config.clone(),
                    status: status_sender.clone(),
                    host: host.clone(),
                    timing,
                    shutdown: shutdown.clone(),
                },
            ));
            tasks.spawn(heartbeat::run(heartbeat::HeartbeatTask {
                client: client.clone(),
                config: config.clone(),
                capabilities: capabilities.clone(),
                current_job,
                policy: policy.clone(),
                tally: tally.clone(),
                status: status_sender.clone(),
                timing,
                shutdown: shutdown.clone(),
            }));
            tasks.spawn(job_loop::run(job_loop::JobLoop {
                client: client.clone(),
                config: config.clone(),
                engine: engine.clone(),
                delivery: delivery::Delivery::new(
                    outbox.clone(),
                    Thumbnails::new(options.data_dir.join("thumbnails")),
                ),
                policy: policy.clone(),
                outbox_state,
                models_coming: coming,
                outbox_changed: outbox_changed.clone(),
                current_job: current_job_sender,
                host: host.clone(),
                gpu_recovery: options.gpu_recovery.clone(),
                unlisted: std::sync::Mutex::new(Vec::new()),
                tally: tally.clone(),
                status: status_sender.clone(),
                timing,
                shutdown: shutdown.clone(),
            }));
            tasks.spawn(uploader::run(uploader::Uploader {
                client: client.clone(),
                config: config.clone(),
                outbox,
                outbox_state: outbox_state_sender,
                outbox_changed,
                retry_uploads: retry_uploads.clone(),
                discards,
                not_wanted,
                leases: lease_sender,
                tally,
                status: status_sender.clone(),
                timing,
                shutdown: shutdown.clone(),
            }));
            tasks.spawn(uploader::keep_leases(
                client.clone(),
                config.clone(),
                leases,
                not_wanted_sender,
                timing,
                shutdown.clone(),
            ));
        }
        let model_supply = options.model_supply;
        if let (Some(supply), Some(engine)) = (model_supply.clone(), engine.clone()) {
            tasks.spawn(downloads::run(downloads::Downloads {
                supply,
                engine,
                config: config.clone(),
                coming: coming_sender,
                status: status_sender.clone(),
                timing,
                shutdown: shutdown.clone(),
            }));
        }
        let (asked_sender, asked_receiver) = mpsc::channel(8);
        tasks.spawn(commands::run(commands::CommandsTask {
            commands: command_receiver,
            asked: asked_receiver,
            config: config.clone(),
            engine,
            model_supply,
            models_coming: removals_watch,
            retry_uploads,
            discards: discard_sender,
            resumed,
            host,
            status: status_sender.clone(),
            shutdown: shutdown.clone(),
        }));
        tasks.spawn(control::serve(
            options.data_dir.clone(),
            asked_sender.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(status_file::run(
            options.data_dir.join(status_file::FILE_NAME),
            status.clone(),
            shutdown.clone(),
        ));

        tracing::info!(studio = %api_base, "worker started");
        Ok(Self {
            handle: RuntimeHandle {
                config,
                status,
                commands: command_sender,
                asked: asked_sender,
                requests,
            },
            shutdown,
            tasks,
        })
    }

    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Resolves when the runtime asks to stop: `studio-worker quit`, or a task that hit
    /// something it cannot get past (no entropy, say).
    pub async fn stop_requested(&self) -> StopRequest {
        self.handle.requests.stopped().await
    }

    /// Stops every task at its next await point and waits for them.
    pub async fn shutdown(mut self) -> Stopped {
        self.shutdown.cancel();
        let mut stopped = Stopped::default();
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(err) = joined
                && err.is_panic()
            {
                tracing::error!("a background task panicked: {err}");
                stopped.panicked_tasks += 1;
            }
        }
        tracing::info!("worker stopped");
        stopped
    }
}

/// How the worker's tasks ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Background tasks that had died of a panic (each was logged).
    pub panicked_tasks: usize,
}

/// The tokio runtime the worker's tasks run on. Two threads are plenty: the tasks only wait
/// on the network and the disk, and the engine runs on tokio's blocking pool.
pub fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("studio-worker")
        .enable_all()
        .build()
}

/// Keeps the derived parts of the status (registration state, the pause reason) in step
/// with every saved config change and every policy decision, whoever made them.
async fn mirror(
    config: SharedConfig,
    mut policy: watch::Receiver<Decision>,
    status: StatusSender,
    shutdown: CancellationToken,
) {
    let mut changes = config.subscribe();
    let mut save_problems = config.save_problems();
    loop {
        {
            let config = changes.borrow_and_update().clone();
            let registration = RegistrationState::from_config(&config);
            let paused = pause_reason(&config, &policy.borrow_and_update());
            let unsaved = save_problems.borrow_and_update().clone();
            status.send_if_modified(|status| {
                let changed = status.registration != registration
                    || status.paused != paused
                    || status.settings_unsaved != unsaved;
                status.registration = registration;
                status.paused = paused;
                status.settings_unsaved = unsaved;
                changed
            });
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            () = changed(&mut policy) => {}
            () = changed(&mut save_problems) => {}
        }
    }
}

/// Resolves when the signal changes; a signal whose owner is gone (no policy, no downloads
/// task) never changes again. For `select!` arms beside a shutdown arm.
async fn changed<T>(signal: &mut watch::Receiver<T>) {
    if signal.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits until `deadline` (`None`: no deadline), until the config (as it is now, or after a
/// later change) makes `wake` true, or until shutdown. Returns `false` on shutdown.
async fn wait_until(
    deadline: Option<Instant>,
    config_changes: &mut watch::Receiver<Arc<Config>>,
    shutdown: &CancellationToken,
    mut wake: impl FnMut(&Config) -> bool,
) -> bool {
    let sleep = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    // A change saved while the caller was busy (a click during a request) counts too.
    if wake(&config_changes.borrow_and_update()) {
        return true;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = &mut sleep => return true,
            changed = config_changes.changed() => {
                if changed.is_err() {
                    return false;
                }
                if wake(&config_changes.borrow_and_update()) {
                    return true;
                }
            }
        }
    }
}

fn deadline_after(delay: Duration) -> (Instant, chrono::DateTime<chrono::Utc>) {
    let wall = chrono::Utc::now()
        + chrono::Duration::from_std(delay).unwrap_or_else(|_| chrono::Duration::zero());
    (Instant::now() + delay, wall)
}
