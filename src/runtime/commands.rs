//! What a person (window, tray, CLI) can ask of the runtime, and the task that applies it.
//!
//! Commands flow one way: every view sends the same [`Command`] values, this task saves the
//! change through [`SharedConfig::update`], and the change reaches every view (and the other
//! tasks) through the config and status channels. There is one place where "pause" means
//! something.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::StatusSender;
use super::downloads::ModelSupply;
use super::signals::{HostRequestSender, StopRequest};
use crate::config::{ConfigError, SharedConfig};
use crate::engine::Engine;
use crate::models::local::ModelIdError;
use crate::models::store::PullError;
use crate::platform::autostart::{self, AutostartError};
use crate::studio::{ApiBase, ApiBaseError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// The person wants the GPU back: stop taking jobs.
    Pause,
    /// Take jobs again, also over an automatic pause (a game, the schedule, …) until its
    /// reason next starts again. A pause the studio asked for stays until the studio lifts it.
    Resume,
    /// Forget the studio's side of the registration and ask for approval again.
    ResetRegistration,
    /// Save what the Settings tab changed (validated there; checked again here).
    SaveSettings(SettingsChange),
    /// Remember that the "still running in the tray" hint was shown.
    CloseHintShown,
    /// Serve a diffusers folder on this PC under `model_id`, at once and from every start
    /// after (checked first, tensor by tensor).
    AddLocalModel {
        model_id: String,
        folder: std::path::PathBuf,
    },
    /// Delete a catalog model's files (`studio-worker models remove`, Settings' "Delete
    /// files…"): unticked and no longer served first, so it is neither claimed meanwhile nor
    /// downloaded again. For a model folder: stop serving it (`[models.local]`); its files
    /// are the person's and stay.
    RemoveModel { model_id: String },
    /// Another launch wants this instance's window brought forward.
    ShowWindow,
    /// Stop: finish or hand back the running job, then exit (`studio-worker quit`, which
    /// installers run before replacing the program).
    Quit,
    /// Try the waiting uploads now instead of at the end of the backoff (a `Retry-After`
    /// from the studio is still honoured).
    RetryUploads,
    /// Give up on a result waiting in the outbox (`key`: its folder name, as the Jobs tab
    /// lists it): the studio hears `fail internal`, and the result is removed.
    DiscardResult { key: String },
}

/// What became of a command that waits for its outcome: `Ok(note)` when it took effect (the
/// note says what it did, or what is not quite as asked: a pause that cannot be saved holds
/// until a restart), `Err` why it did not, in words.
pub type CommandOutcome = Result<Option<String>, String>;

/// A command with where its outcome goes: from the terminal (the control channel), or a click
/// whose outcome the window shows (a model's files deleted, a model folder added).
pub type AskedCommand = (Command, oneshot::Sender<CommandOutcome>);

/// The settings a person can change in the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingsChange {
    pub api_base_url: String,
    pub worker_name: String,
    pub unload_when_paused: bool,
    /// Which device the engine uses (from the next start).
    pub device: crate::vocab::device::DevicePreference,
    /// Catalog models to download and serve (`[models] enabled`).
    pub enabled_models: Vec<String>,
    pub close_to_tray: bool,
    /// Start the worker (in the tray) when the person logs in.
    pub start_at_login: bool,
    /// Keep a copy of every finished image here (`None`: no copies).
    pub save_copies_to: Option<std::path::PathBuf>,
    /// Report crashes to minis.gg (from the next start).
    pub send_crash_reports: bool,
    /// When the worker steps aside by itself (`[policy]`).
    pub policy: crate::config::PolicySection,
}

pub(super) struct CommandsTask {
    pub commands: mpsc::Receiver<Command>,
    /// Commands waiting for their outcome: the terminal's (the control channel) and the
    /// window's.
    pub asked: mpsc::Receiver<AskedCommand>,
    pub config: SharedConfig,
    pub engine: Option<Arc<dyn Engine>>,
    /// Where catalog models are kept (`None`: this worker downloads none).
    pub model_supply: Option<ModelSupply>,
    /// The models the downloads task is fetching: a removal waits for its transfer to stop.
    pub models_coming: watch::Receiver<Vec<String>>,
    /// Wakes the uploader's current wait.
    pub retry_uploads: Arc<Notify>,
    /// Results the person discarded, for the uploader (the outbox's owner).
    pub discards: mpsc::Sender<String>,
    /// Tells the policy task the person pressed Resume (it lifts its automatic pauses).
    pub resumed: Arc<Notify>,
    pub host: HostRequestSender,
    pub status: StatusSender,
    pub shutdown: CancellationToken,
}

pub(super) async fn run(task: CommandsTask) {
    let CommandsTask {
        mut commands,
        mut asked,
        config,
        engine,
        model_supply,
        models_coming,
        retry_uploads,
        discards,
        resumed,
        host,
        status,
        shutdown,
    } = task;
    loop {
        let (command, outcome): (Command, Option<oneshot::Sender<_>>) = tokio::select! {
            () = shutdown.cancelled() => return,
            command = commands.recv() => match command {
                Some(command) => (command, None),
                None => return,
            },
            Some((command, outcome)) = asked.recv() => (command, Some(outcome)),
        };
        // What a command that went as asked has to say (how much a removal freed).
        let mut done_note = None;
        let applied = match &command {
            // A pause that cannot be saved still pauses (and a resume resumes): the person's
            // wish holds in memory, and the window says it is not saved.
            Command::Pause => config
                .apply_even_unsaved(|c| c.pause.by_user = true)
                .await
                .1
                .map_err(CommandError::Unsaved),
            Command::Resume => {
                // The person wins over the policy too, until its reasons next start again.
                resumed.notify_one();
                config
                    .apply_even_unsaved(|c| c.pause.by_user = false)
                    .await
                    .1
                    .map_err(CommandError::Unsaved)
            }
            Command::ResetRegistration => config
                .apply(|c| c.reset_registration())
                .await
                .map_err(CommandError::from),
            Command::SaveSettings(change) => {
                let saved = save_settings(&config, change.clone()).await;
                if let Some(engine) = &engine {
                    stop_serving_unticked(&config, engine, &status).await;
                }
                saved
            }
            Command::CloseHintShown => config
                .apply(|c| c.ui.close_hint_shown = true)
                .await
                .map_err(CommandError::from),
            Command::AddLocalModel { model_id, folder } => {
                let added = add_local_model(&config, engine.clone(), model_id, folder).await;
                if added.is_ok() {
                    tracing::info!("model {model_id} added from {}", folder.display());
                    let ready = engine.as_ref().map(|engine| engine.ready_models());
                    status.send_modify(|s| {
                        s.models_ready = ready;
                        // Refused at start (a folder since fixed), served now.
                        s.models_refused
                            .retain(|refused| refused.model_id != *model_id);
                    });
                }
                added.map_err(CommandError::from)
            }
            Command::RemoveModel { model_id } => remove_model(
                &config,
                engine.as_ref(),
                model_supply.as_ref(),
                models_coming.clone(),
                model_id,
                &status,
            )
            .await
            .map(|note| done_note = Some(note))
            .map_err(CommandError::from),
            Command::RetryUploads => {
                retry_uploads.notify_waiters();
                Ok(())
            }
            Command::DiscardResult { key } => {
                // The uploader may be mid-upload: it takes the discard at its next turn.
                let _ = discards.try_send(key.clone());
                Ok(())
            }
            Command::ShowWindow => {
                host.raise_window();
                Ok(())
            }
            Command::Quit => {
                host.stop(StopRequest::Quit);
                Ok(())
            }
        };
        // Each outcome is handled here once: logged, told to whoever waits for it (a
        // terminal, a tab), and shown in the window until the next command succeeds. The
        // status change comes last: it wakes the window, which then finds the outcome there.
        let (told, problem) = match applied {
            Ok(()) => {
                tracing::info!(?command, "applied");
                (Ok(done_note), None)
            }
            Err(err @ CommandError::Unsaved(_)) => {
                tracing::error!(?command, "applied, not saved: {err}");
                (Ok(Some(err.to_string())), Some(err.to_string()))
            }
            Err(err) => {
                tracing::error!(?command, "not applied: {err}");
                (Err(err.to_string()), Some(err.to_string()))
            }
        };
        if let Some(outcome) = outcome {
            let _ = outcome.send(told);
        }
        status.send_modify(|s| s.settings_problem = problem);
    }
}

/// Why a command did not (fully) take effect, as the person reads it in the window.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    NotSaved(#[from] ConfigError),
    #[error("{0}; it holds until studio-worker restarts")]
    Unsaved(ConfigError),
    #[error("settings not saved: {0}")]
    InvalidStudioUrl(#[from] ApiBaseError),
    #[error("the other settings were saved, but start at login could not be changed: {0}")]
    StartAtLogin(#[from] AutostartError),
    #[error(transparent)]
    Model(#[from] AddModelError),
    #[error(transparent)]
    Remove(#[from] RemoveModelError),
}

/// Why a catalog model's files were not (all) deleted, or a model folder not left out.
#[derive(Debug, thiserror::Error)]
enum RemoveModelError {
    #[error("no catalog model this worker downloads, and no model folder, is called {0}")]
    Unknown(String),
    #[error(transparent)]
    Files(#[from] PullError),
    #[error("the removal stopped before it finished: {0}")]
    Interrupted(String),
    #[error(transparent)]
    NotSaved(#[from] ConfigError),
}

/// Why a local model folder was not added.
#[derive(Debug, thiserror::Error)]
enum AddModelError {
    #[error(transparent)]
    BadId(#[from] ModelIdError),
    #[error("a local model is already called {0}")]
    Taken(String),
    #[error("{path}: {source}")]
    Unreadable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unusable(String),
    #[error("the check stopped before it finished: {0}")]
    Interrupted(String),
    #[error(transparent)]
    NotSaved(#[from] ConfigError),
}

/// Checks the folder (off the async threads: it reads files), serves it, and saves it in
/// `[models.local]`.
async fn add_local_model(
    config: &SharedConfig,
    engine: Option<Arc<dyn Engine>>,
    model_id: &str,
    folder: &std::path::Path,
) -> Result<(), AddModelError> {
    crate::models::local::check_model_id(model_id)?;
    if config.snapshot().models.local.contains_key(model_id) {
        return Err(AddModelError::Taken(model_id.to_owned()));
    }
    let folder = folder.to_owned();
    let id = model_id.to_owned();
    let checked = tokio::task::spawn_blocking(move || {
        let folder = folder
            .canonicalize()
            .map_err(|source| AddModelError::Unreadable {
                path: folder.clone(),
                source,
            })?;
        let served = match &engine {
            Some(engine) => engine
                .serve(&id, &folder)
                .map_err(|error| AddModelError::Unusable(error.to_string())),
            None => crate::engine::sd::open_checked(&folder)
                .map(drop)
                .map_err(|error| AddModelError::Unusable(error.to_string())),
        };
        served.map(|()| folder)
    })
    .await
    .map_err(|error| AddModelError::Interrupted(error.to_string()))??;
    let model_id = model_id.to_owned();
    config
        .apply(move |c| {
            c.models.local.insert(model_id, checked);
        })
        .await?;
    Ok(())
}

/// How long a removal waits for the model's download to stop before deleting anyway (a
/// transfer stops at its next chunk, well within this).
const DOWNLOAD_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Unticks a catalog model, stops serving it and its download, then deletes its files; or
/// leaves a model folder out (its files are the person's, and stay). Returns what was done,
/// in words.
async fn remove_model(
    config: &SharedConfig,
    engine: Option<&Arc<dyn Engine>>,
    supply: Option<&ModelSupply>,
    mut coming: watch::Receiver<Vec<String>>,
    model_id: &str,
    status: &StatusSender,
) -> Result<String, RemoveModelError> {
    if let Some(folder) = config.snapshot().models.local.get(model_id).cloned() {
        let left_out = model_id.to_owned();
        config
            .apply(move |c| {
                c.models.local.remove(&left_out);
            })
            .await?;
        if let Some(engine) = engine {
            stop_serving_unticked(config, engine, status).await;
        }
        // Given to serve no more, so no longer shown as refused either.
        status.send_modify(|s| {
            s.models_refused
                .retain(|refused| refused.model_id != model_id);
        });
        return Ok(format!(
            "Stopped serving {model_id}; its folder {} stays as it is.",
            folder.display()
        ));
    }
    let Some((supply, entry)) = supply.and_then(|supply| {
        let entry = supply.catalog.iter().find(|entry| entry.id == model_id)?;
        Some((supply, *entry))
    }) else {
        return Err(RemoveModelError::Unknown(model_id.to_owned()));
    };
    let unticked = model_id.to_owned();
    config
        .apply(move |c| c.models.enabled.retain(|enabled| *enabled != unticked))
        .await?;
    if let Some(engine) = engine {
        stop_serving_unticked(config, engine, status).await;
    }
    // The downloads task stops a download of it on its own, seeing the untick; deleting
    // under a transfer still writing would leave its next file behind (or, on Windows, fail
    // on the open one).
    let stopped = tokio::time::timeout(
        DOWNLOAD_STOP_WAIT,
        coming.wait_for(|coming| !coming.iter().any(|coming_id| coming_id == model_id)),
    )
    .await
    .is_ok();
    if !stopped {
        tracing::warn!(
            "the download of {model_id} did not stop within {}; deleting its files anyway",
            crate::human::duration(DOWNLOAD_STOP_WAIT)
        );
    }
    let store = supply.store.clone();
    let removed = tokio::task::spawn_blocking(move || store.remove(&entry))
        .await
        .map_err(|error| RemoveModelError::Interrupted(error.to_string()))?
        .map_err(RemoveModelError::from);
    // What is left on disk, a removal that stopped part way included.
    super::downloads::publish_models_on_disk(supply, status).await;
    let freed = removed?;
    Ok(format!(
        "Removed {model_id} ({} freed); it is unticked in Settings, so it is not downloaded \
         again.",
        crate::human::bytes(freed)
    ))
}

/// Stops serving what the saved settings no longer ask for (a catalog model unticked, a
/// model folder left out), so the worker neither advertises nor claims it from now on.
async fn stop_serving_unticked(
    config: &SharedConfig,
    engine: &Arc<dyn Engine>,
    status: &StatusSender,
) {
    let settings = config.snapshot();
    let unticked: Vec<String> = engine
        .ready_models()
        .into_iter()
        .filter(|model_id| {
            !settings.models.enables(model_id) && !settings.models.local.contains_key(model_id)
        })
        .collect();
    if unticked.is_empty() {
        return;
    }
    let engine = engine.clone();
    // Forgetting may wait for a model being loaded: off the async threads.
    let ready = tokio::task::spawn_blocking(move || {
        for model_id in &unticked {
            tracing::info!(
                "{model_id} is no longer served: unticked (or its folder left out) in the settings"
            );
            engine.forget(model_id);
        }
        engine.ready_models()
    })
    .await;
    match ready {
        Ok(ready) => status.send_modify(|s| s.models_ready = Some(ready)),
        Err(error) => tracing::error!("stopping unticked models broke off: {error}"),
    }
}

/// Saves what the Settings tab changed. An invalid studio URL saves nothing; a start-at-login
/// change the OS refuses is reported after the rest is saved.
async fn save_settings(config: &SharedConfig, change: SettingsChange) -> Result<(), CommandError> {
    // The window validated these; a command from elsewhere gets the same rules.
    ApiBase::parse(&change.api_base_url)?;
    let start_at_login = change.start_at_login;
    config
        .apply(move |c| {
            c.api_base_url = change.api_base_url.trim().to_owned();
            let worker_name = change.worker_name.trim();
            if !worker_name.is_empty() {
                c.worker_name = worker_name.to_owned();
            }
            c.engine.unload_when_paused = change.unload_when_paused;
            c.engine.device = change.device;
            c.models.enabled = change.enabled_models;
            c.ui.close_to_tray = change.close_to_tray;
            c.images.save_copies_to = change.save_copies_to;
            c.crash_reports.send = change.send_crash_reports;
            c.policy = change.policy;
        })
        .await?;
    // Writes a file in the person's autostart folder (or the registry): off the async threads.
    tokio::task::spawn_blocking(move || {
        if autostart::is_enabled() != start_at_login {
            autostart::set_enabled(start_at_login)?;
            tracing::info!(enabled = start_at_login, "start at login changed");
        }
        Ok::<(), AutostartError>(())
    })
    .await
    .map_err(|err| CommandError::NotSaved(ConfigError::Interrupted(err.to_string())))??;
    Ok(())
}
