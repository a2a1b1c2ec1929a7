//! The headless worker: the background tasks, who owns which state, and the one door in.
//!
//! [`Runtime::start`] spawns, on the caller's tokio runtime:
//!
//! | task | owns (only writer) | wakes on |
//! |---|---|---|
//! | `registration` | registration fields of the config, `registration_problem` | its timer, config changes (reset) |
//! | `heartbeat` | `connection`, `pause.by_studio`, `access_revoked` | its timer, approval, pause changes |
//! | `job_loop` | `jobs.current/recent/counters/claim_blocked`; writes the outbox | claims, pause, config and status changes |
//! | `uploader` | `jobs.outbox_len`, delivered counters; deletes from the outbox | new outbox entries, its backoff |
//! | `commands` | `pause.by_user`, resets, Settings, `settings_problem`, `window_raise_requests` | [`Command`]s from the UI, tray, CLI |
//! | `control` | — (turns local `pause`/`resume` requests into [`Command`]s) | connections on 127.0.0.1 |
//! | `mirror` | `registration`, `paused` in [`WorkerStatus`] | every saved config change |
//! | `status_file` | `status.json` in the data folder | status changes (at most 1/s) |
//!
//! The engine runs on tokio's blocking pool, one job at a time, driven by `job_loop`.
//!
//! Everything a view needs is in [`RuntimeHandle`]: a status snapshot, the config, and a
//! command sender. Views never wait on the runtime and the runtime never waits on a view.

mod commands;
pub mod control;
mod downloads;
mod heartbeat;
mod job_loop;
mod outage;
mod progress;
mod registration_task;
mod setup;
mod status;
pub mod status_file;
mod uploader;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use commands::{Command, SettingsChange};
pub use downloads::ModelSupply;
pub use setup::Launch;
pub use status::{
    ConnectionStatus, CurrentJob, FinishedJob, JobCounters, JobOutcome, JobsStatus, ModelDownload,
    WorkerStatus, pause_reason,
};

use crate::config::{Config, SharedConfig};
use crate::engine::Engine;
use crate::outbox::Outbox;
use crate::platform::host;
use crate::registration::{Registrar, RegistrationState};
use crate::studio::protocol::{Capabilities, ModelReadiness};
use crate::studio::{ApiBase, ApiBaseError, Credentials, StudioClient, StudioError};
use crate::timing::Timing;
use crate::vocab::device::DeviceInfo;
use crate::vocab::job::EngineLimits;

#[derive(Clone)]
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
    /// The app: a studio URL in the settings that does not parse does not stop the start.
    /// Nothing talks to the studio, the status says why, and Settings can fix it. Headless
    /// runs (`false`) fail instead, with the reason on stderr.
    pub tolerate_invalid_studio_url: bool,
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

/// What every background task gets: the studio, the config, the status, the engine.
#[derive(Clone)]
pub(crate) struct TaskContext {
    pub client: StudioClient,
    pub config: SharedConfig,
    pub status: Arc<watch::Sender<WorkerStatus>>,
    pub engine: Option<Arc<dyn Engine>>,
    pub outbox: Outbox,
    /// Rung by the job loop after it put a result in the outbox.
    pub outbox_changed: Arc<tokio::sync::Notify>,
    /// Rung (to current waiters only) when the person asks to retry uploads now.
    pub retry_uploads: Arc<tokio::sync::Notify>,
    pub device: DeviceInfo,
    pub thumbnails: crate::thumbnails::Thumbnails,
    pub timing: Timing,
    pub shutdown: CancellationToken,
}

impl TaskContext {
    fn limits(&self) -> EngineLimits {
        self.engine.as_ref().map_or(
            EngineLimits {
                max_width: 0,
                max_height: 0,
                max_images: 0,
            },
            |engine| engine.limits(),
        )
    }

    fn ready_models(&self) -> Vec<String> {
        self.engine
            .as_ref()
            .map_or_else(Vec::new, |engine| engine.ready_models())
    }

    /// The ready models, then the ones still downloading (`ready: false`), so the studio
    /// knows what is coming.
    fn model_readiness(&self) -> Vec<ModelReadiness> {
        let ready = self.ready_models();
        let coming: Vec<String> = self
            .status
            .borrow()
            .downloads
            .iter()
            .map(|download| download.model_id.clone())
            .filter(|model_id| !ready.contains(model_id))
            .collect();
        ready
            .into_iter()
            .map(|id| ModelReadiness { id, ready: true })
            .chain(
                coming
                    .into_iter()
                    .map(|id| ModelReadiness { id, ready: false }),
            )
            .collect()
    }

    /// What this worker can do, as §4 describes it.
    fn capabilities(&self) -> Capabilities {
        let limits = self.limits();
        Capabilities {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            os: host::os_name().to_owned(),
            arch: host::arch_name().to_owned(),
            device: self.device.clone(),
            models: self.model_readiness(),
            max_width: limits.max_width,
            max_height: limits.max_height,
            max_images: limits.max_images,
            kinds: vec!["txt2img".to_owned()],
        }
    }

    /// Records a 401: the studio no longer accepts this worker. Every loop then waits for a
    /// reset (the heartbeat task says so to the person).
    fn revoked(&self, worker_id: &str) {
        if let Err(err) = self.config.update(|c| {
            if c.worker_id.as_deref() == Some(worker_id) {
                c.access_revoked = true;
            }
        }) {
            tracing::error!("cannot record the revocation: {err}");
        }
    }
}

/// The worker's identity while it is approved and not revoked.
pub(crate) fn approved_credentials(config: &Config) -> Option<Credentials> {
    match (RegistrationState::from_config(config), &config.auth_token) {
        (RegistrationState::Approved { worker_id }, Some(auth_token)) => Some(Credentials {
            worker_id,
            auth_token: auth_token.clone(),
        }),
        _ => None,
    }
}

/// What the UI, tray and CLI hold: cheap to clone, never blocks.
#[derive(Clone)]
pub struct RuntimeHandle {
    config: SharedConfig,
    status: watch::Receiver<WorkerStatus>,
    commands: mpsc::Sender<Command>,
}

impl RuntimeHandle {
    /// A handle over channels the caller owns: for views under test, which play the runtime
    /// themselves (set the status, read the commands).
    pub fn new(
        config: SharedConfig,
        status: watch::Receiver<WorkerStatus>,
        commands: mpsc::Sender<Command>,
    ) -> Self {
        Self {
            config,
            status,
            commands,
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

    /// Queues a command. Returns `false` when the runtime has stopped or is hopelessly
    /// behind (32 queued commands): a click is dropped rather than the UI blocked.
    pub fn send(&self, command: Command) -> bool {
        self.commands.try_send(command).is_ok()
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

        let device = options
            .engine
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
        initial.device_note = options
            .engine
            .as_ref()
            .and_then(|engine| engine.device_note());
        initial.engine = options
            .engine
            .as_ref()
            .map(|engine| engine_summary(&engine.ready_models()));
        initial.settings_recovered = options.recovered_config.map(|broken| {
            format!(
                "the settings file could not be read ({}); it was kept as {} and default settings are in use",
                broken.reason,
                broken.kept_at.display()
            )
        });
        let (status_sender, status) = watch::channel(initial);
        let (command_sender, command_receiver) = mpsc::channel(32);
        let context = TaskContext {
            client,
            config: config.clone(),
            status: Arc::new(status_sender),
            engine: options.engine,
            outbox,
            outbox_changed: Arc::new(tokio::sync::Notify::new()),
            retry_uploads: Arc::new(tokio::sync::Notify::new()),
            device,
            thumbnails: crate::thumbnails::Thumbnails::new(options.data_dir.join("thumbnails")),
            timing,
            shutdown: CancellationToken::new(),
        };
        let capabilities = context.capabilities();

        let mut tasks = JoinSet::new();
        tasks.spawn(mirror(context.clone()));
        if url_problem.is_none() {
            tasks.spawn(registration_task::run(
                Registrar::new(context.client.clone(), config.clone(), timing),
                capabilities,
                context.clone(),
            ));
            tasks.spawn(heartbeat::run(context.clone()));
            tasks.spawn(job_loop::run(context.clone()));
            tasks.spawn(uploader::run(context.clone()));
        }
        if let Some(supply) = options.model_supply {
            tasks.spawn(downloads::run(supply, context.clone()));
        }
        tasks.spawn(commands::run(command_receiver, context.clone()));
        tasks.spawn(control::serve(
            options.data_dir.clone(),
            command_sender.clone(),
            context.clone(),
        ));
        tasks.spawn(status_file::run(
            options.data_dir.join(status_file::FILE_NAME),
            status.clone(),
            context.shutdown.clone(),
        ));

        tracing::info!(studio = %api_base, "worker started");
        Ok(Self {
            handle: RuntimeHandle {
                config,
                status,
                commands: command_sender,
            },
            shutdown: context.shutdown,
            tasks,
        })
    }

    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Resolves when a task hit something it cannot get past (no entropy, say), with the
    /// reason; never resolves otherwise.
    pub async fn fatal(&self) -> String {
        let mut status = self.handle.subscribe();
        loop {
            if let Some(reason) = status.borrow_and_update().fatal.clone() {
                return reason;
            }
            if status.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when `studio-worker quit` asked this worker to stop.
    pub async fn quit_requested(&self) {
        let mut status = self.handle.subscribe();
        loop {
            if status.borrow_and_update().quit_requested {
                return;
            }
            if status.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops every task at its next await point and waits for them.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(err) = joined
                && err.is_panic()
            {
                tracing::error!("a background task panicked: {err}");
            }
        }
        tracing::info!("worker stopped");
    }
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

/// Ctrl-C, or SIGTERM on Unix (what `kill`, systemd and a logout send).
///
/// [`ShutdownSignal::install`] registers the handlers at once, so call it before any work
/// starts: a signal that arrives before anyone waits is kept, not met by the default action
/// (which would kill the process without handing back a running job).
pub struct ShutdownSignal {
    #[cfg(unix)]
    unix: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignal {
    /// Must be called inside a tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let unix = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(terminate), Ok(interrupt)) => Some((terminate, interrupt)),
                (Err(err), _) | (_, Err(err)) => {
                    tracing::warn!("cannot watch for SIGTERM/SIGINT: {err}");
                    None
                }
            };
            Self { unix }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves when a shutdown signal arrived (or at once, if one already did).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        match &mut self.unix {
            Some((terminate, interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("stopping");
    }
}

/// `WorkerStatus.engine`: which models can run now.
fn engine_summary(ready_models: &[String]) -> String {
    if ready_models.is_empty() {
        "no model ready yet".to_owned()
    } else {
        format!("models ready: {}", ready_models.join(", "))
    }
}

/// What a worker without an engine can do, as §4 describes it (for registration).
pub fn current_capabilities() -> Capabilities {
    Capabilities {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        os: host::os_name().to_owned(),
        arch: host::arch_name().to_owned(),
        device: host::cpu_device(),
        models: Vec::new(),
        max_width: 0,
        max_height: 0,
        max_images: 0,
        kinds: vec!["txt2img".to_owned()],
    }
}

/// Keeps the config-derived parts of the status (registration state, pause) in step with
/// every saved change, whoever made it.
async fn mirror(context: TaskContext) {
    let TaskContext {
        config,
        status,
        shutdown,
        ..
    } = context;
    let mut changes = config.subscribe();
    loop {
        {
            let config = changes.borrow_and_update().clone();
            let registration = RegistrationState::from_config(&config);
            let paused = pause_reason(&config);
            status.send_if_modified(|status| {
                let changed = status.registration != registration || status.paused != paused;
                status.registration = registration;
                status.paused = paused;
                changed
            });
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
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
