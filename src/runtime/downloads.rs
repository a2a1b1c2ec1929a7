//! The downloads task: fetches the enabled catalog models that are not on this PC yet, one
//! at a time, with progress in `WorkerStatus.downloads`, and hands each finished model to
//! the engine. It never blocks heartbeats or jobs; a network failure is retried with
//! backoff, a lasting one (gated repository, full disk) is shown and left until restart.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::StatusSender;
use super::status::{ModelDownload, ModelOnDisk};
use crate::backoff::{Backoff, BackoffPolicy};
use crate::config::SharedConfig;
use crate::engine::Engine;
use crate::models::catalog::CatalogEntry;
use crate::models::hub::HubClient;
use crate::models::store::{DownloadProgress, ModelStore, PullError};
use crate::timing::Timing;

/// Where catalog models come from and go to.
#[derive(Clone)]
pub struct ModelSupply {
    pub store: ModelStore,
    pub hub: HubClient,
    /// The catalog to take enabled ids from (the real one, or a test's).
    pub catalog: Vec<CatalogEntry>,
}

impl ModelSupply {
    /// The real catalog from the real hub (`HF_ENDPOINT`, `HF_TOKEN` honoured) into `store`;
    /// `None` (logged) when either is unavailable.
    pub fn standard(store: Option<ModelStore>) -> Option<Self> {
        let Some(store) = store else {
            tracing::warn!("no home folder for the Hugging Face cache: models are not downloaded");
            return None;
        };
        match HubClient::from_env() {
            Ok(hub) => Some(Self {
                store,
                hub,
                catalog: crate::models::catalog::CATALOG.to_vec(),
            }),
            Err(error) => {
                tracing::warn!("models are not downloaded: {error}");
                None
            }
        }
    }
}

pub(super) struct Downloads {
    pub supply: ModelSupply,
    pub engine: Arc<dyn Engine>,
    pub config: SharedConfig,
    /// The models being fetched, for capabilities (`ready: false`) and the job loop.
    pub coming: watch::Sender<Vec<String>>,
    pub status: StatusSender,
    pub timing: Timing,
    pub shutdown: CancellationToken,
}

pub(super) async fn run(task: Downloads) {
    let mut changes = task.config.subscribe();
    loop {
        // What is on disk now (at start, and after the last pass fetched, stopped or failed).
        publish_models_on_disk(&task.supply, &task.status).await;
        let enabled = changes.borrow_and_update().models.enabled.clone();
        let wanted: Vec<CatalogEntry> = enabled
            .iter()
            .filter_map(|model_id| {
                task.supply
                    .catalog
                    .iter()
                    .find(|entry| entry.id == model_id)
            })
            .filter(|entry| {
                !task
                    .engine
                    .ready_models()
                    .iter()
                    .any(|ready| ready == entry.id)
            })
            .copied()
            .collect();
        for entry in wanted {
            if !task.fetch(&entry).await {
                return;
            }
            publish_models_on_disk(&task.supply, &task.status).await;
        }
        // Wait until the person enables another model (Settings or `config.toml`); a model
        // that could not be fetched is tried again then too, and one unticked is shown no more.
        loop {
            tokio::select! {
                () = task.shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                // What a `models pull` or `models remove` from the terminal changed
                // meanwhile (a lookup of a few folders).
                () = tokio::time::sleep(task.timing.models_on_disk_refresh) => {
                    publish_models_on_disk(&task.supply, &task.status).await;
                    continue;
                }
            }
            let now_enabled = changes.borrow().models.enabled.clone();
            for model_id in enabled.iter().filter(|id| !now_enabled.contains(id)) {
                task.forget_download(model_id);
            }
            if now_enabled != enabled {
                break;
            }
        }
    }
}

impl Downloads {
    /// Fetches one model until it is served or cannot be; `false` when the worker is stopping.
    async fn fetch(&self, entry: &CatalogEntry) -> bool {
        let mut backoff = Backoff::new(self.timing.backoff);
        let mut busy = Backoff::new(BackoffPolicy {
            base: self.timing.backoff.base,
            cap: self.timing.backoff.base * 10,
        });
        self.coming.send_modify(|coming| {
            if !coming.iter().any(|model_id| model_id == entry.id) {
                coming.push(entry.id.to_owned());
            }
        });
        loop {
            if !self.wanted(entry.id) {
                self.forget_download(entry.id);
                return true;
            }
            self.set_download(entry.id, |download| download.problem = None);
            let cancel = self.shutdown.child_token();
            // Unticked mid-download: the transfer stops (what it fetched stays, to resume from).
            let untick_watch = tokio::spawn({
                let (config, model_id, cancel) =
                    (self.config.clone(), entry.id.to_owned(), cancel.clone());
                async move {
                    unticked(&config, &model_id).await;
                    cancel.cancel();
                }
            });
            // The callback only keeps the latest progress; `show_progress` publishes it at
            // most 4 times a second (the window redraws on each), the last one before a
            // stalled transfer included.
            let (progress_sender, progress) = watch::channel(None);
            let shower = tokio::spawn(show_progress(progress.clone(), self.status.clone()));
            let pulled = self
                .supply
                .store
                .pull(
                    &self.supply.hub,
                    entry,
                    &mut |latest| {
                        progress_sender.send_replace(Some(latest.clone()));
                    },
                    &cancel,
                )
                .await;
            shower.abort();
            if let Some(last) = progress.borrow().as_ref() {
                show(&self.status, last);
            }
            untick_watch.abort();
            if !self.wanted(entry.id) {
                self.forget_download(entry.id);
                return true;
            }
            match pulled {
                Ok(folder) => {
                    // Serving opens the model's files: on the blocking pool.
                    let engine = self.engine.clone();
                    let model_id = entry.id;
                    let refusal =
                        match tokio::task::spawn_blocking(move || engine.serve(model_id, &folder))
                            .await
                        {
                            Ok(Ok(())) => {
                                tracing::info!("{} downloaded and served", entry.id);
                                None
                            }
                            Ok(Err(reason)) => {
                                tracing::error!("{} cannot be served: {reason}", entry.id);
                                Some(reason.to_string())
                            }
                            Err(error) => {
                                tracing::error!("serving {} broke off: {error}", entry.id);
                                Some(format!("serving it broke off: {error}"))
                            }
                        };
                    let ready = self.engine.ready_models();
                    self.status.send_modify(|status| {
                        status
                            .downloads
                            .retain(|download| download.model_id != entry.id);
                        status.models_ready = Some(ready);
                        status
                            .models_refused
                            .retain(|refused| refused.model_id != entry.id);
                        if let Some(reason) = refusal {
                            status.models_refused.push(crate::engine::RefusedModel {
                                model_id: entry.id.to_owned(),
                                reason,
                            });
                        }
                    });
                    // Served (or refused): no longer coming. Wakes the job loop.
                    self.coming
                        .send_modify(|coming| coming.retain(|model_id| model_id != entry.id));
                    break;
                }
                Err(PullError::Hub(error)) if self.shutdown.is_cancelled() => {
                    tracing::debug!("download of {} stopped: {error}", entry.id);
                    return false;
                }
                Err(PullError::Hub(error)) if error.is_transient() => {
                    let wait = backoff.next_delay(None);
                    // One warning per outage; the retries after it are debug lines.
                    if backoff.failures() == 1 {
                        tracing::warn!(
                            "download of {} interrupted ({error}); it resumes when the hub answers",
                            entry.id
                        );
                    } else {
                        tracing::debug!(
                            "download of {} still interrupted ({error}); next try in {}",
                            entry.id,
                            crate::human::duration(wait)
                        );
                    }
                    if !self
                        .retry_after(entry.id, format!("{error}; resuming soon"), wait)
                        .await
                    {
                        return false;
                    }
                }
                Err(error @ PullError::Busy(_)) => {
                    // Another process has it (`models pull`): tried again soon, since trying
                    // costs only a lock. Once that download is done, this one finds every file
                    // here and serves the model.
                    let wait = busy.next_delay(None);
                    if busy.failures() == 1 {
                        tracing::info!("{error} (this worker waits for it)");
                    }
                    let problem = "another studio-worker process (`models pull`) is \
                                   downloading it; this download waits for it"
                        .to_owned();
                    if !self.retry_after(entry.id, problem, wait).await {
                        return false;
                    }
                }
                Err(error) => {
                    tracing::error!("{} cannot be downloaded: {error}", entry.id);
                    self.set_download(entry.id, |download| {
                        download.problem = Some(error.to_string());
                    });
                    break;
                }
            }
        }
        true
    }

    /// Shows why `model_id`'s download waits, then waits `wait`, or less if it is unticked
    /// meanwhile; `false` when the worker is stopping.
    async fn retry_after(&self, model_id: &str, problem: String, wait: Duration) -> bool {
        self.set_download(model_id, |download| download.problem = Some(problem));
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
            () = unticked(&self.config, model_id) => true,
        }
    }

    /// Whether the settings still enable `model_id`.
    fn wanted(&self, model_id: &str) -> bool {
        self.config.snapshot().models.enables(model_id)
    }

    /// `model_id` was unticked: no longer coming, its download no longer shown.
    fn forget_download(&self, model_id: &str) {
        let mut shown = false;
        self.status.send_if_modified(|status| {
            let before = status.downloads.len();
            status
                .downloads
                .retain(|download| download.model_id != model_id);
            shown = status.downloads.len() != before;
            shown
        });
        self.coming.send_if_modified(|coming| {
            let before = coming.len();
            coming.retain(|coming_id| coming_id != model_id);
            coming.len() != before
        });
        if shown {
            tracing::info!(
                "the download of {model_id} stopped: unticked in the settings (what it fetched \
                 stays, and a later download resumes from there)"
            );
        }
    }

    /// Changes (or first adds) the model's entry in `WorkerStatus.downloads`.
    fn set_download(&self, model_id: &str, change: impl FnOnce(&mut ModelDownload)) {
        self.status.send_modify(|status| {
            if !status
                .downloads
                .iter()
                .any(|download| download.model_id == model_id)
            {
                status.downloads.push(ModelDownload {
                    model_id: model_id.to_owned(),
                    ..ModelDownload::default()
                });
            }
            if let Some(download) = status
                .downloads
                .iter_mut()
                .find(|download| download.model_id == model_id)
            {
                change(download);
            }
        });
    }
}

/// How long a transfer may go without a byte before its speed and time left are no longer
/// shown (the speed meter's own window): a stalled download does not claim "18 MB/s".
const QUIET: Duration = Duration::from_secs(5);

/// Publishes the download's progress as it changes, at most 4 times a second; after
/// [`QUIET`] without a byte, without its speed and time left.
async fn show_progress(
    mut progress: watch::Receiver<Option<DownloadProgress>>,
    status: StatusSender,
) {
    loop {
        match tokio::time::timeout(QUIET, progress.changed()).await {
            Ok(Err(_)) => return,
            Ok(Ok(())) => {
                let latest = progress.borrow_and_update().clone();
                if let Some(latest) = latest {
                    show(&status, &latest);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(_quiet) => {
                let stalled = progress.borrow().clone().map(|mut stalled| {
                    stalled.bytes_per_second = 0.0;
                    stalled.eta = None;
                    stalled
                });
                if let Some(stalled) = stalled {
                    show(&status, &stalled);
                }
            }
        }
    }
}

/// Writes `progress` into its model's row of `WorkerStatus.downloads` (if it still has one
/// and it says something else).
fn show(status: &StatusSender, progress: &DownloadProgress) {
    status.send_if_modified(|status| {
        let Some(download) = status
            .downloads
            .iter_mut()
            .find(|download| download.model_id == progress.model_id)
        else {
            return false;
        };
        let shown = (
            download.done_bytes,
            download.total_bytes,
            download.bytes_per_second,
            download.eta,
        );
        download.done_bytes = progress.done_bytes;
        download.total_bytes = progress.total_bytes;
        download.bytes_per_second = progress.bytes_per_second;
        download.eta = progress.eta;
        shown
            != (
                download.done_bytes,
                download.total_bytes,
                download.bytes_per_second,
                download.eta,
            )
    });
}

/// Publishes which catalog models have files on this PC (`WorkerStatus.models_on_disk`),
/// looked up on the blocking pool: it reads the cache's folders.
pub(super) async fn publish_models_on_disk(supply: &ModelSupply, status: &StatusSender) {
    let (store, catalog) = (supply.store.clone(), supply.catalog.clone());
    let looked_up = tokio::task::spawn_blocking(move || {
        catalog
            .iter()
            .filter_map(|entry| {
                let own = store.own_files(entry)?;
                Some(ModelOnDisk {
                    model_id: entry.id.to_owned(),
                    bytes: own.bytes,
                    complete: own.complete,
                })
            })
            .collect::<Vec<_>>()
    })
    .await;
    let on_disk = match looked_up {
        Ok(on_disk) => on_disk,
        Err(error) => {
            tracing::error!("looking up the models on this PC broke off: {error}");
            return;
        }
    };
    status.send_if_modified(|status| {
        let changed = status.models_on_disk != on_disk;
        status.models_on_disk = on_disk;
        changed
    });
}

/// Returns once the settings no longer enable `model_id` (never, if the settings go away).
async fn unticked(config: &SharedConfig, model_id: &str) {
    let mut changes = config.subscribe();
    loop {
        if !changes.borrow_and_update().models.enables(model_id) {
            return;
        }
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
