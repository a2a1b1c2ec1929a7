//! The headless worker: the background tasks, who owns which state, and the one door in.
//!
//! [`Runtime::start`] spawns, on the caller's tokio runtime:
//!
//! | task | owns (only writer) | wakes on |
//! |---|---|---|
//! | `registration` | registration fields of the config, `registration_problem` | its timer, config changes (reset) |
//! | `heartbeat` | `connection`, `pause.by_studio`, `access_revoked` | its timer, approval, pause changes |
//! | `commands` | `pause.by_user`, resets | [`Command`]s from the UI, tray, CLI |
//! | `mirror` | `registration`, `paused` in [`WorkerStatus`] | every saved config change |
//! | `status_file` | `status.json` in the data folder | status changes (at most 1/s) |
//!
//! Everything a view needs is in [`RuntimeHandle`]: a status snapshot, the config, and a
//! command sender. Views never wait on the runtime and the runtime never waits on a view.

mod commands;
mod heartbeat;
mod outage;
mod registration_task;
mod status;
pub mod status_file;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use commands::Command;
pub use status::{ConnectionStatus, WorkerStatus, pause_reason};

use crate::config::{Config, SharedConfig};
use crate::platform::host;
use crate::registration::Registrar;
use crate::studio::protocol::Capabilities;
use crate::studio::{ApiBase, ApiBaseError, StudioClient, StudioError};
use crate::timing::Timing;

#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    pub timing: Timing,
    /// Where `status.json` goes (the data folder).
    pub data_dir: PathBuf,
    /// Talk to this studio instead of the config's `api_base_url`, for this run only.
    pub api_base_override: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    ApiBase(#[from] ApiBaseError),
    #[error(transparent)]
    Client(#[from] StudioError),
}

/// What the UI, tray and CLI hold: cheap to clone, never blocks.
#[derive(Clone)]
pub struct RuntimeHandle {
    config: SharedConfig,
    status: watch::Receiver<WorkerStatus>,
    commands: mpsc::Sender<Command>,
}

impl RuntimeHandle {
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
        let api_base = ApiBase::parse(
            options
                .api_base_override
                .as_deref()
                .unwrap_or(&snapshot.api_base_url),
        )?;
        let timing = options.timing;
        let client = StudioClient::with_timeout(api_base.clone(), timing.request_timeout)?;
        let capabilities = current_capabilities();

        let mut initial = WorkerStatus::new(&snapshot);
        initial.api_base_url = api_base.to_string();
        let (status_sender, status) = watch::channel(initial);
        let status_sender = Arc::new(status_sender);
        let (command_sender, command_receiver) = mpsc::channel(32);
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        tasks.spawn(mirror(
            config.clone(),
            status_sender.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(registration_task::run(
            Registrar::new(client.clone(), config.clone(), timing),
            config.clone(),
            status_sender.clone(),
            capabilities.clone(),
            timing,
            shutdown.clone(),
        ));
        tasks.spawn(heartbeat::run(
            client,
            config.clone(),
            status_sender.clone(),
            capabilities,
            timing,
            shutdown.clone(),
        ));
        tasks.spawn(commands::run(
            command_receiver,
            config.clone(),
            status_sender.clone(),
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
            },
            shutdown,
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

/// What this worker can do, as §4 describes it.
pub fn current_capabilities() -> Capabilities {
    Capabilities {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        os: host::os_name().to_owned(),
        arch: host::arch_name().to_owned(),
        device: host::cpu_device(),
        // The model manager fills these in; until then nothing is ready and no job is claimed.
        models: Vec::new(),
        max_width: 1024,
        max_height: 1024,
        max_images: 4,
        kinds: vec!["txt2img".to_owned()],
    }
}

/// Keeps the config-derived parts of the status (registration state, pause) in step with
/// every saved change, whoever made it.
async fn mirror(
    config: SharedConfig,
    status: Arc<watch::Sender<WorkerStatus>>,
    shutdown: CancellationToken,
) {
    let mut changes = config.subscribe();
    loop {
        {
            let config = changes.borrow_and_update().clone();
            let registration = crate::registration::RegistrationState::from_config(&config);
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
