//! `status.json` in the data folder: the running worker's [`WorkerStatus`], rewritten (at most
//! once a second) whenever it changes, so that `studio-worker status` in another terminal can
//! show what the worker is doing. It holds nothing secret.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::WorkerStatus;

pub const FILE_NAME: &str = "status.json";
const MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusFile {
    pub pid: u32,
    pub written_at: DateTime<Utc>,
    /// `false` once the worker has shut down cleanly.
    pub running: bool,
    pub status: WorkerStatus,
}

pub fn read(path: &Path) -> Option<StatusFile> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(super) async fn run(
    path: PathBuf,
    mut status: watch::Receiver<WorkerStatus>,
    shutdown: CancellationToken,
) {
    loop {
        let snapshot = status.borrow_and_update().clone();
        write(&path, snapshot, true).await;
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(MIN_INTERVAL) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = status.changed() => if changed.is_err() { break },
        }
    }
    let snapshot = status.borrow().clone();
    write(&path, snapshot, false).await;
}

async fn write(path: &Path, status: WorkerStatus, running: bool) {
    let file = StatusFile {
        pid: std::process::id(),
        written_at: Utc::now(),
        running,
        status,
    };
    let path = path.to_path_buf();
    let written = tokio::task::spawn_blocking(move || {
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        crate::files::write_atomic(&path, &bytes)
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        // Only `status` reads this file; the worker goes on without it.
        Ok(Err(err)) => tracing::debug!("cannot write the status file: {err}"),
        Err(err) => tracing::debug!("status file writer stopped: {err}"),
    }
}
