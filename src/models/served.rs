//! Which folder serves which model id: the person's `[models.local]` folders, and catalog
//! models downloaded into the store. The worker at start and `studio-worker generate` ask the
//! same question here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::catalog::{self, CATALOG};
use super::store::ModelStore;
use crate::config::Config;

/// Why an id has no folder here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// A catalog model that is not (completely) on this PC: `models pull` fetches it.
    #[error("{0} is not downloaded yet: `studio-worker models pull {0}`")]
    NotDownloaded(String),
    /// Neither a local folder nor a catalog model.
    #[error("no model {model_id:?} (known: {})", known.join(", "))]
    Unknown {
        model_id: String,
        known: Vec<String>,
    },
}

/// The folder that serves `model_id`: a `[models.local]` folder, else a catalog model that is
/// downloaded and complete in `store`.
pub fn folder_for(
    config: &Config,
    store: Option<&ModelStore>,
    model_id: &str,
) -> Result<PathBuf, LookupError> {
    if let Some(folder) = config.models.local.get(model_id) {
        return Ok(folder.clone());
    }
    match catalog::find(model_id) {
        Some(entry) => store
            .and_then(|store| store.ready_path(entry))
            .ok_or_else(|| LookupError::NotDownloaded(model_id.to_owned())),
        None => Err(LookupError::Unknown {
            model_id: model_id.to_owned(),
            known: config
                .models
                .local
                .keys()
                .cloned()
                .chain(CATALOG.iter().map(|entry| entry.id.to_owned()))
                .collect(),
        }),
    }
}

/// Model id → folder for everything the settings ask to serve that is on this PC now: every
/// `[models.local]` folder and every enabled catalog model already downloaded. What is
/// missing is logged (the downloads task fetches it).
pub fn served_models(config: &Config, store: Option<&ModelStore>) -> BTreeMap<String, PathBuf> {
    let mut models = config.models.local.clone();
    for model_id in &config.models.enabled {
        match folder_for(config, store, model_id) {
            Ok(folder) => {
                models.insert(model_id.clone(), folder);
            }
            Err(LookupError::NotDownloaded(_)) => tracing::info!(
                "{model_id} is not downloaded yet (`studio-worker models pull {model_id}`)"
            ),
            Err(LookupError::Unknown { .. }) => {
                tracing::warn!("[models] enabled names {model_id:?}, which is not in the catalog");
            }
        }
    }
    models
}
