//! `studio-worker models …`: list the catalog and local folders, pull (with a terminal
//! progress line, resumable, Ctrl-C stops it), remove, verify, and add a local folder.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::UsageError;
use crate::config::{self, Paths};
use crate::engine::sd::model_folder::ModelFolder;
use crate::human;
use crate::models::catalog::{self, CATALOG, CatalogEntry};
use crate::models::hub::{HubClient, HubError};
use crate::models::store::{DownloadProgress, ModelState, ModelStore, PullError};
use crate::runtime::control::ControlCommand;

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// The catalog and the local folders, with sizes and what is on this PC.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Download a catalog model (resumes a download that stopped; Ctrl-C stops it).
    Pull { model_id: String },
    /// Delete a catalog model's files (a running worker unticks it and stops serving it
    /// first), or stop serving a model folder (its files stay).
    Remove { model_id: String },
    /// Check every file of a downloaded model against the hub's hashes.
    Verify { model_id: String },
    /// Serve a diffusers-layout folder on this PC as a model.
    Add {
        #[arg(long = "id", value_name = "NAME")]
        model_id: String,
        folder: PathBuf,
    },
}

pub fn run(paths: &Paths, command: ModelsCommand) -> anyhow::Result<()> {
    let store = store(paths)?;
    match command {
        ModelsCommand::List { json } => list(paths, &store, json),
        ModelsCommand::Pull { model_id } => pull(&store, entry(&model_id)?),
        ModelsCommand::Remove { model_id } => remove(paths, &store, &model_id),
        ModelsCommand::Verify { model_id } => {
            let entry = entry(&model_id)?;
            let bad = store.verify(entry)?;
            if bad.is_empty() {
                println!("{}: every file matches the hub's hashes.", entry.id);
                return Ok(());
            }
            for file in &bad {
                println!("{}: {} ({})", entry.id, file.path, file.reason);
            }
            bail!(
                "{} file(s) of {} were bad and are deleted; `studio-worker models pull {}` fetches them again",
                bad.len(),
                entry.id,
                entry.id
            )
        }
        ModelsCommand::Add { model_id, folder } => add(paths, &model_id, &folder),
    }
}

/// Deletes a catalog model's files, or leaves a model folder out of `[models.local]` (its
/// files are the person's). A running worker does either itself: it stops serving the model
/// first, and it is the settings' one writer.
fn remove(paths: &Paths, store: &ModelStore, model_id: &str) -> anyhow::Result<()> {
    let settings = super::read_settings(paths).ok();
    let local = settings
        .as_ref()
        .and_then(|settings| settings.models.local.get(model_id).cloned());
    // A model folder first: it is what the worker serves under that id.
    let removing = match (local, catalog::find(model_id)) {
        (Some(folder), _) => Removing::Folder(folder),
        (None, Some(entry)) => Removing::Catalog(entry),
        (None, None) => {
            let known: Vec<&str> = CATALOG.iter().map(|entry| entry.id).collect();
            let folders: Vec<&str> = settings
                .iter()
                .flat_map(|settings| settings.models.local.keys().map(String::as_str))
                .collect();
            return Err(anyhow::Error::new(UsageError(format!(
                "no catalog model or model folder is called {model_id:?} (the catalog has: \
                 {}; the model folders: {})",
                known.join(", "),
                if folders.is_empty() {
                    "none".to_owned()
                } else {
                    folders.join(", ")
                }
            ))));
        }
    };
    let command = ControlCommand::RemoveModel {
        model_id: model_id.to_owned(),
    };
    if let Some(said) = super::ask_running_worker(paths, &command)? {
        println!("{}", said.unwrap_or_else(|| format!("Removed {model_id}.")));
        return Ok(());
    }
    match removing {
        Removing::Folder(folder) => {
            let mut settings = config::load(&paths.config_file)?.config;
            settings.models.local.remove(model_id);
            config::save(&paths.config_file, &settings)?;
            println!(
                "Stopped serving {model_id} from the worker's next start; its folder {} stays \
                 as it is.",
                folder.display()
            );
        }
        Removing::Catalog(entry) => {
            let freed = store.remove(entry)?;
            println!("Removed {} ({} freed).", entry.id, human::bytes(freed));
            // Read-only: the settings have one writer, the worker when one runs.
            if settings.is_some_and(|settings| settings.models.enables(entry.id)) {
                println!(
                    "{} is still enabled, so the worker downloads it again when it next \
                     starts; untick it in Settings → Models to keep it off this PC.",
                    entry.id
                );
            }
        }
    }
    Ok(())
}

/// What `models remove` takes away.
enum Removing {
    /// A model folder, left out of `[models.local]` (its files stay).
    Folder(PathBuf),
    /// A catalog model's files.
    Catalog(&'static CatalogEntry),
}

/// The model store over the standard Hugging Face cache and this worker's data folder.
pub fn store(paths: &Paths) -> anyhow::Result<ModelStore> {
    ModelStore::standard(&paths.data_dir).context("no home folder for the Hugging Face cache")
}

fn entry(model_id: &str) -> anyhow::Result<&'static CatalogEntry> {
    catalog::find(model_id).ok_or_else(|| {
        let known: Vec<&str> = CATALOG.iter().map(|entry| entry.id).collect();
        anyhow::Error::new(UsageError(format!(
            "no catalog model {model_id:?} (the catalog has: {})",
            known.join(", ")
        )))
    })
}

#[derive(Serialize)]
struct ListedModel {
    id: String,
    name: String,
    source: String,
    /// Bytes on disk when ready; the catalog's estimate otherwise.
    size_bytes: u64,
    state: &'static str,
    downloaded_bytes: u64,
    min_gpu_mb: Option<u64>,
    enabled: bool,
    path: Option<PathBuf>,
}

fn list(paths: &Paths, store: &ModelStore, json: bool) -> anyhow::Result<()> {
    let settings = super::read_settings(paths)?;
    let mut rows = Vec::new();
    for entry in CATALOG {
        let (state, size_bytes, downloaded_bytes, path) = match store.state(entry) {
            ModelState::Ready { path, bytes } => ("ready", bytes, bytes, Some(path)),
            ModelState::Partial { bytes } => ("partial", entry.download_bytes, bytes, None),
            ModelState::Absent => ("not downloaded", entry.download_bytes, 0, None),
        };
        rows.push(ListedModel {
            id: entry.id.to_owned(),
            name: entry.display_name.to_owned(),
            source: format!("hf:{}", entry.repo),
            size_bytes,
            state,
            downloaded_bytes,
            min_gpu_mb: Some(entry.min_gpu_mb),
            enabled: settings.models.enables(entry.id),
            path,
        });
    }
    for (model_id, folder) in &settings.models.local {
        let state = match ModelFolder::open(folder) {
            Ok(_) => "local",
            Err(_) => "local, unusable",
        };
        rows.push(ListedModel {
            id: model_id.clone(),
            name: model_id.clone(),
            source: "local folder".to_owned(),
            size_bytes: folder_size(folder),
            state,
            downloaded_bytes: 0,
            min_gpu_mb: None,
            enabled: true,
            path: Some(folder.clone()),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<15} {:<22} {:>9}  {:<16} {:>8}  SERVED",
        "ID", "NAME", "SIZE", "STATE", "MIN GPU"
    );
    for row in &rows {
        let state = if row.state == "partial" {
            format!(
                "partial {:.0}%",
                100.0 * row.downloaded_bytes as f64 / row.size_bytes.max(1) as f64
            )
        } else {
            row.state.to_owned()
        };
        let size = if row.state == "ready" || row.source == "local folder" {
            human::bytes(row.size_bytes)
        } else {
            format!("~{}", human::bytes(row.size_bytes))
        };
        println!(
            "{:<15} {:<22} {:>9}  {:<16} {:>8}  {}",
            row.id,
            row.name,
            size,
            state,
            row.min_gpu_mb
                .map_or_else(|| "-".to_owned(), |mb| format!("{} GB", mb / 1024)),
            if row.enabled { "yes" } else { "no" }
        );
    }
    println!(
        "\nModels are kept in {} (shared with other Hugging Face tools).",
        store.cache().root().display()
    );
    Ok(())
}

fn folder_size(folder: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![folder.to_owned()];
    while let Some(dir) = pending.pop() {
        for item in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match item.metadata() {
                Ok(metadata) if metadata.is_dir() => pending.push(item.path()),
                Ok(metadata) => total += metadata.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn pull(store: &ModelStore, entry: &'static CatalogEntry) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let hub = HubClient::from_env()?;
    let cancel = CancellationToken::new();
    let interactive = std::io::stderr().is_terminal();
    let mut line = ProgressLine::default();
    let outcome = runtime.block_on(async {
        let stop = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.cancel();
            }
        });
        eprintln!(
            "{} ({}): asking the hub what to fetch…",
            entry.id, entry.repo
        );
        store
            .pull(
                &hub,
                entry,
                &mut |progress| line.show(progress, interactive),
                &cancel,
            )
            .await
    });
    line.finish(interactive);
    match outcome {
        Ok(folder) => {
            println!("{} is ready: {}", entry.id, folder.display());
            Ok(())
        }
        Err(PullError::Hub(HubError::Cancelled)) => {
            bail!("stopped; run the same command again to resume where it stopped")
        }
        Err(error) => Err(error.into()),
    }
}

/// `sd-turbo  1.23 GB of 2.58 GB  47.7%  18.2 MB/s  about 1 min left`, redrawn in place on a
/// terminal and printed every 10 % otherwise.
#[derive(Default)]
struct ProgressLine {
    last_decile: Option<u64>,
    last_drawn: Option<std::time::Instant>,
    finished: bool,
}

impl ProgressLine {
    fn show(&mut self, progress: &DownloadProgress, interactive: bool) {
        let words = human::download_words(
            progress.done_bytes,
            progress.total_bytes,
            progress.bytes_per_second,
            progress.eta,
        );
        let complete = progress.done_bytes >= progress.total_bytes;
        if interactive
            && !complete
            && self
                .last_drawn
                .is_some_and(|at| at.elapsed() < std::time::Duration::from_millis(200))
        {
            return;
        }
        let time_left = if complete {
            Some("done")
        } else {
            words.time_left.as_deref()
        };
        let text = [
            Some(progress.model_id.as_str()),
            Some(words.amount.as_str()),
            Some(words.percent.as_str()),
            words.speed.as_deref(),
            time_left,
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("  ");
        let decile = (100 * progress.done_bytes / progress.total_bytes.max(1)) / 10;
        let mut stderr = std::io::stderr().lock();
        if interactive {
            let _ = write!(stderr, "\r{text:<78}");
            if complete && !self.finished {
                // End the line now, so the log lines after it start on their own.
                let _ = writeln!(stderr);
                self.finished = true;
            }
            let _ = stderr.flush();
            self.last_drawn = Some(std::time::Instant::now());
        } else if self.last_decile != Some(decile) {
            self.last_decile = Some(decile);
            let _ = writeln!(stderr, "{text}");
        }
    }

    fn finish(&mut self, interactive: bool) {
        if interactive && self.last_drawn.is_some() && !self.finished {
            eprintln!();
        }
    }
}

fn add(paths: &Paths, model_id: &str, folder: &Path) -> anyhow::Result<()> {
    crate::models::local::check_model_id(model_id)
        .map_err(|error| UsageError(error.to_string()))?;
    let folder = folder
        .canonicalize()
        .map_err(|error| UsageError(format!("{}: {error}", folder.display())))?;
    crate::engine::sd::open_checked(&folder)
        .map_err(|error| UsageError(format!("{} cannot be served: {error}", folder.display())))?;
    // A running worker owns the settings: it adds the model (and serves it at once).
    let command = ControlCommand::AddModel {
        model_id: model_id.to_owned(),
        folder: folder.clone(),
    };
    if super::tell_running_worker(paths, &command)? {
        println!(
            "Added {model_id} ({}): the running worker serves it now.",
            folder.display()
        );
        return Ok(());
    }
    let mut settings = config::load(&paths.config_file)?.config;
    settings
        .models
        .local
        .insert(model_id.to_owned(), folder.clone());
    config::save(&paths.config_file, &settings)?;
    println!(
        "Added {model_id} ({}): the worker serves it from its next start.",
        folder.display()
    );
    Ok(())
}
