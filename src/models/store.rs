//! Catalog models on this PC: fetching them into the Hugging Face cache (sized first,
//! resumable, cancellable, verified), telling which are ready, verifying and removing them.
//!
//! A model counts as ready only when its manifest (`<data>/models/<id>.json`, written last,
//! atomically) exists and every file it lists is in the cache with its size. The manifest
//! holds each file's hash, so `verify` works offline, and a worker with a complete cache
//! starts without any network. A download lists its files first (`<id>.fetching.json`), so
//! a removal finds what one that stopped part way fetched; and one process at a time
//! downloads, verifies or removes a model (`<id>.lock`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha1::Digest as _;
use tokio_util::sync::CancellationToken;

use super::catalog::{self, CatalogEntry};
use super::hub::{HubClient, HubError, RepoFile};
use super::hub_cache::{self, HubCache};

/// Room left on the disk after a download, so the system does not run dry.
const DISK_MARGIN: u64 = 200 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(
        "not enough free disk space: the download needs {} more and {} is free in {}",
        crate::human::bytes(*needed),
        crate::human::bytes(*available),
        folder.display()
    )]
    DiskShort {
        needed: u64,
        available: u64,
        folder: PathBuf,
    },
    #[error("{path} was corrupt twice in a row (its hash does not match the hub's)")]
    Corrupt { path: String },
    #[error("the downloaded model cannot be used: {0}")]
    Unusable(String),
    #[error("cannot write the model files: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "{path} is damaged and could not be deleted ({source}); another program has it open: \
         once it is closed, verify again"
    )]
    Undeletable {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{} could not be deleted ({source}); another program has it open: once it is \
         closed, remove the model again",
        path.display()
    )]
    Held {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another studio-worker process (the running worker, or a `models` command) is \
         downloading, verifying or removing {0} now; try again once it is done"
    )]
    Busy(String),
}

/// Where a download is, for the window and the terminal.
#[derive(Clone, Debug, PartialEq)]
pub struct DownloadProgress {
    pub model_id: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_second: f64,
    pub eta: Option<Duration>,
    /// The file being fetched now.
    pub file: String,
}

/// What is on disk for a catalog model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelState {
    Ready {
        path: PathBuf,
        bytes: u64,
    },
    /// Some files (or parts of files) are here; a pull resumes from them.
    Partial {
        bytes: u64,
    },
    Absent,
}

/// The right to download or remove one model, until dropped (the OS lets go of the lock
/// with the file, a crashed process's too).
struct ModelClaim {
    _file: Option<std::fs::File>,
}

/// A catalog model's own files on this PC (see [`ModelStore::own_files`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnFiles {
    pub bytes: u64,
    /// Every file is in place (else a download stopped part way or is under way).
    pub complete: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    repo: String,
    revision: String,
    commit: String,
    files: Vec<ManifestFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ManifestFile {
    path: String,
    size: u64,
    sha256: Option<String>,
    blob_id: String,
}

impl From<&RepoFile> for ManifestFile {
    fn from(file: &RepoFile) -> Self {
        Self {
            path: file.path.clone(),
            size: file.size,
            sha256: file.sha256.clone(),
            blob_id: file.blob_id.clone(),
        }
    }
}

impl ManifestFile {
    /// The same name as [`RepoFile::blob_name`].
    fn blob_name(&self) -> &str {
        self.sha256.as_deref().unwrap_or(&self.blob_id)
    }

    fn as_repo_file(&self) -> RepoFile {
        RepoFile {
            path: self.path.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
            blob_id: self.blob_id.clone(),
        }
    }
}

/// A file that failed `verify`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadFile {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct ModelStore {
    cache: HubCache,
    manifests: PathBuf,
    /// Tests stand in for the disk's free space.
    free_space_override: Option<u64>,
}

impl ModelStore {
    pub fn new(cache: HubCache, data_dir: &Path) -> Self {
        Self {
            cache,
            manifests: data_dir.join("models"),
            free_space_override: None,
        }
    }

    /// Over the standard Hugging Face cache (`None` without a home folder).
    pub fn standard(data_dir: &Path) -> Option<Self> {
        HubCache::from_env().map(|cache| Self::new(cache, data_dir))
    }

    pub fn with_free_space(mut self, bytes: u64) -> Self {
        self.free_space_override = Some(bytes);
        self
    }

    pub fn cache(&self) -> &HubCache {
        &self.cache
    }

    /// Held by whoever downloads, verifies or removes the model, one at a time across
    /// processes: two transfers appending to the same partial file would spoil it for both,
    /// and a removal under a download would leave its next file behind.
    fn claim(&self, model_id: &str) -> Result<ModelClaim, PullError> {
        std::fs::create_dir_all(&self.manifests)?;
        let path = self.manifests.join(format!("{model_id}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(ModelClaim { _file: Some(file) }),
            Err(std::fs::TryLockError::WouldBlock) => Err(PullError::Busy(model_id.to_owned())),
            // A file system without locks: go on unguarded, as before locks were taken.
            Err(std::fs::TryLockError::Error(error)) => {
                tracing::debug!("no lock on {}: {error}", path.display());
                Ok(ModelClaim { _file: None })
            }
        }
    }

    fn manifest_path(&self, model_id: &str) -> PathBuf {
        self.manifests.join(format!("{model_id}.json"))
    }

    /// The files a download of the model fetches, written before its first byte: a removal
    /// of a download that stopped part way finds its blobs by it (they are linked into the
    /// snapshot only at the end). Gone once the model is complete.
    fn fetching_path(&self, model_id: &str) -> PathBuf {
        self.manifests.join(format!("{model_id}.fetching.json"))
    }

    fn read_manifest(&self, model_id: &str) -> Option<Manifest> {
        Self::read_manifest_at(&self.manifest_path(model_id))
    }

    fn read_manifest_at(path: &Path) -> Option<Manifest> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The model's folder when every file it needs is in place.
    pub fn ready_path(&self, entry: &CatalogEntry) -> Option<PathBuf> {
        match self.state(entry) {
            ModelState::Ready { path, .. } => Some(path),
            _ => None,
        }
    }

    /// What a removal of the model would delete (the files its manifest, or the list of a
    /// download under way or stopped, names, and partial files), and whether the model is
    /// complete; `None` when that is nothing. Another tool's download of the same repository
    /// is not the worker's to delete, so it is not counted.
    pub fn own_files(&self, entry: &CatalogEntry) -> Option<OwnFiles> {
        if let ModelState::Ready { bytes, .. } = self.state(entry) {
            return Some(OwnFiles {
                bytes,
                complete: true,
            });
        }
        let lists = [
            self.read_manifest(entry.id),
            Self::read_manifest_at(&self.fetching_path(entry.id)),
        ];
        let mut blob_names: Vec<&str> = lists
            .iter()
            .flatten()
            .flat_map(|list| list.files.iter().map(ManifestFile::blob_name))
            .collect();
        blob_names.sort_unstable();
        blob_names.dedup();
        let size = |path: PathBuf| path.metadata().map_or(0, |metadata| metadata.len());
        let listed: u64 = blob_names
            .iter()
            .map(|name| size(self.cache.blob_path(entry.repo, name)))
            .sum();
        let partial: u64 = self
            .partial_files(entry.repo)
            .iter()
            .map(|(_, bytes)| bytes)
            .sum();
        let bytes = listed + partial;
        (bytes > 0).then_some(OwnFiles {
            bytes,
            complete: false,
        })
    }

    /// The repository's partly fetched files (`.incomplete`, as `huggingface_hub` names
    /// them too) and their sizes.
    fn partial_files(&self, repo: &str) -> Vec<(PathBuf, u64)> {
        std::fs::read_dir(self.cache.repo_dir(repo).join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|item| item.file_name().to_string_lossy().ends_with(".incomplete"))
            .map(|item| {
                let bytes = item.metadata().map_or(0, |metadata| metadata.len());
                (item.path(), bytes)
            })
            .collect()
    }

    pub fn state(&self, entry: &CatalogEntry) -> ModelState {
        if let Some(manifest) = self.read_manifest(entry.id) {
            let snapshot = self.cache.snapshot_dir(&manifest.repo, &manifest.commit);
            let complete = manifest.files.iter().all(|file| {
                std::fs::metadata(snapshot.join(&file.path))
                    .is_ok_and(|metadata| metadata.len() == file.size)
            });
            if complete {
                return ModelState::Ready {
                    path: snapshot,
                    bytes: manifest.files.iter().map(|file| file.size).sum(),
                };
            }
        }
        let blobs = self.cache.repo_dir(entry.repo).join("blobs");
        let bytes: u64 = std::fs::read_dir(blobs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|item| item.metadata().ok())
            .map(|metadata| metadata.len())
            .sum();
        if bytes > 0 {
            ModelState::Partial { bytes }
        } else {
            ModelState::Absent
        }
    }

    /// Fetches what `entry` needs that is not here yet, and returns its folder.
    pub async fn pull(
        &self,
        hub: &HubClient,
        entry: &CatalogEntry,
        on_progress: &mut (dyn FnMut(&DownloadProgress) + Send),
        cancel: &CancellationToken,
    ) -> Result<PathBuf, PullError> {
        let _claim = self.claim(entry.id)?;
        let info = hub.repo_info(entry.repo, entry.revision).await?;
        let paths: Vec<&str> = info.files.iter().map(|file| file.path.as_str()).collect();
        let needed_paths = catalog::needed_files(&paths, entry.prefer_fp16);
        if !needed_paths.iter().any(|path| path == "model_index.json") {
            return Err(PullError::Unusable(format!(
                "{} is not a diffusers pipeline (no model_index.json)",
                entry.repo
            )));
        }
        let needed: Vec<RepoFile> = info
            .files
            .iter()
            .filter(|file| needed_paths.contains(&file.path))
            .cloned()
            .collect();
        let total_bytes: u64 = needed.iter().map(|file| file.size).sum();
        let manifest = Manifest {
            repo: entry.repo.to_owned(),
            revision: entry.revision.to_owned(),
            commit: info.commit.clone(),
            files: needed.iter().map(ManifestFile::from).collect(),
        };

        // What is already here (whole blobs, or partial ones to resume).
        let mut already = 0;
        let mut missing = 0;
        for file in &needed {
            let blob = self.cache.blob_path(entry.repo, file.blob_name());
            if blob
                .metadata()
                .is_ok_and(|metadata| metadata.len() == file.size)
            {
                already += file.size;
            } else {
                let partial = self
                    .cache
                    .incomplete_path(entry.repo, file.blob_name())
                    .metadata()
                    .map_or(0, |metadata| metadata.len().min(file.size));
                already += partial;
                missing += file.size - partial;
            }
        }
        let folder = self.cache.root().to_owned();
        let available = self
            .off_runtime({
                let folder = folder.clone();
                move |store| {
                    std::fs::create_dir_all(&folder)?;
                    Ok(store.free_space(&folder))
                }
            })
            .await?;
        if let Some(available) = available
            && missing + DISK_MARGIN > available
        {
            return Err(PullError::DiskShort {
                needed: missing + DISK_MARGIN,
                available,
                folder,
            });
        }

        let fetching = (self.fetching_path(entry.id), manifest.clone());
        self.off_runtime(move |_| {
            write_manifest_at(&fetching.0, &fetching.1)?;
            Ok(())
        })
        .await?;
        tracing::info!(
            "{}: {} to download ({} of {} already here){}",
            entry.id,
            crate::human::bytes(missing),
            crate::human::bytes(already),
            crate::human::bytes(total_bytes),
            available.map_or_else(String::new, |free| format!(
                ", {} free in {}",
                crate::human::bytes(free),
                folder.display()
            ))
        );
        let started = Instant::now();
        let mut meter = SpeedMeter::new(already);
        let mut done_before_file = 0;
        for file in &needed {
            let blob = self.cache.blob_path(entry.repo, file.blob_name());
            if !blob
                .metadata()
                .is_ok_and(|metadata| metadata.len() == file.size)
            {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    self.fetch(hub, entry, &info.commit, file, cancel, &mut |on_disk| {
                        let done = done_before_file + on_disk;
                        let rate = meter.update(done);
                        on_progress(&DownloadProgress {
                            model_id: entry.id.to_owned(),
                            done_bytes: done,
                            total_bytes,
                            bytes_per_second: rate,
                            eta: (rate > 0.0).then(|| {
                                Duration::from_secs_f64(
                                    total_bytes.saturating_sub(done) as f64 / rate,
                                )
                            }),
                            file: file.path.clone(),
                        });
                    })
                    .await?;
                    // Hashing gigabytes takes seconds: never on the runtime's threads.
                    let settled = self
                        .off_runtime({
                            let (repo, file) = (entry.repo, file.clone());
                            move |store| store.settle_download(repo, &file)
                        })
                        .await?;
                    if settled {
                        break;
                    }
                    tracing::warn!("{} arrived corrupt; fetching it again", file.path);
                    if attempts >= 2 {
                        return Err(PullError::Corrupt {
                            path: file.path.clone(),
                        });
                    }
                }
            }
            done_before_file += file.size;
        }

        let (model_id, revision) = (entry.id, entry.revision);
        let snapshot = self
            .off_runtime(move |store| store.complete(model_id, revision, &manifest))
            .await?;
        tracing::info!(
            "{} is ready ({} in {:.0} s)",
            entry.id,
            crate::human::bytes(total_bytes),
            started.elapsed().as_secs_f64()
        );
        Ok(snapshot)
    }

    /// Runs `work` (file system work that may take long: hashing, fsync, deleting) on the
    /// blocking pool, with a copy of this store.
    async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Self) -> Result<T, PullError> + Send + 'static,
    ) -> Result<T, PullError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|error| PullError::Io(std::io::Error::other(error.to_string())))?
    }

    /// A fetched file is hashed; whole and right, it becomes the blob (`true`), otherwise it
    /// is thrown away to be fetched once more, never used (`false`).
    fn settle_download(&self, repo: &str, file: &RepoFile) -> Result<bool, PullError> {
        let partial = self.cache.incomplete_path(repo, file.blob_name());
        if !verify_file(&partial, file)? {
            std::fs::remove_file(&partial)?;
            return Ok(false);
        }
        std::fs::rename(&partial, self.cache.blob_path(repo, file.blob_name()))?;
        Ok(true)
    }

    /// Every blob is here: links the snapshot, records the revision, checks the pipeline
    /// opens, and writes the manifest last (the model is ready from then on).
    fn complete(
        &self,
        model_id: &str,
        revision: &str,
        manifest: &Manifest,
    ) -> Result<PathBuf, PullError> {
        for file in &manifest.files {
            self.cache.link(
                &manifest.repo,
                &manifest.commit,
                &file.path,
                file.blob_name(),
            )?;
        }
        self.cache
            .write_ref(&manifest.repo, revision, &manifest.commit)?;
        let snapshot = self.cache.snapshot_dir(&manifest.repo, &manifest.commit);
        check_usable(&snapshot)?;
        write_manifest_at(&self.manifest_path(model_id), manifest)?;
        match std::fs::remove_file(self.fetching_path(model_id)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                // Harmless: it names this model's own files, which a removal deletes anyway.
                tracing::debug!("{model_id}'s list of files to fetch stays: {error}");
            }
            _ => {}
        }
        Ok(snapshot)
    }

    async fn fetch(
        &self,
        hub: &HubClient,
        entry: &CatalogEntry,
        commit: &str,
        file: &RepoFile,
        cancel: &CancellationToken,
        on_progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), PullError> {
        let partial = self.cache.incomplete_path(entry.repo, file.blob_name());
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent)?;
        }
        hub.download(entry.repo, commit, file, &partial, on_progress, cancel)
            .await?;
        let on_disk = partial.metadata().map_or(0, |metadata| metadata.len());
        if on_disk != file.size {
            return Err(PullError::Hub(HubError::Network(format!(
                "the transfer of {} ended early ({} of {}); it resumes on the next try",
                file.path,
                crate::human::bytes(on_disk),
                crate::human::bytes(file.size)
            ))));
        }
        Ok(())
    }

    /// Re-hashes every file of a ready model. A bad file is deleted (blob and link) and the
    /// model stops counting as ready, so the next pull fetches it again; one that cannot be
    /// deleted is an error, and the model is left as it was.
    pub fn verify(&self, entry: &CatalogEntry) -> Result<Vec<BadFile>, PullError> {
        let _claim = self.claim(entry.id)?;
        let Some(manifest) = self.read_manifest(entry.id) else {
            return Err(PullError::Unusable(format!(
                "{} is not downloaded",
                entry.id
            )));
        };
        let snapshot = self.cache.snapshot_dir(&manifest.repo, &manifest.commit);
        let mut bad = Vec::new();
        for file in &manifest.files {
            let repo_file = file.as_repo_file();
            let blob = self.cache.blob_path(&manifest.repo, repo_file.blob_name());
            // What the pipeline reads: the blob through its link, or the snapshot's own copy
            // where the drive takes no links.
            let read = snapshot.join(&file.path);
            let reason = match verify_file(&read, &repo_file) {
                Ok(true) => continue,
                Ok(false) => "its size or hash does not match the hub's".to_owned(),
                Err(error) => error.to_string(),
            };
            // A damaged blob must be gone before the model stops counting as ready: one left
            // behind would be linked again by the next pull, which reuses a blob of the right
            // size. Windows will not delete a file another program has open (a worker loading
            // the model maps it); then nothing changes, and the person is told.
            for path in [&blob, &read] {
                if let Err(source) = std::fs::remove_file(path)
                    && source.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(PullError::Undeletable {
                        path: file.path.clone(),
                        source,
                    });
                }
            }
            bad.push(BadFile {
                path: file.path.clone(),
                reason,
            });
        }
        // The manifest stays: a model with a file missing is not ready (see `state`), and a
        // removal still finds the rest of its files by it.
        Ok(bad)
    }

    /// Deletes the model's files from the cache (what its snapshot holds of it, the blobs no
    /// other snapshot reads, and what a download that stopped part way fetched) and then its
    /// manifest. Returns the bytes freed: a blob that another snapshot holds as a hard link
    /// stays, and is not counted.
    ///
    /// The manifest goes last. A file that cannot be deleted (on Windows, a file another
    /// program has open) stops the removal with an error that says what to do, and removing
    /// again later finishes it; the model does not count as ready in between. While a worker
    /// runs, it is the one that removes (it stops serving the model first).
    pub fn remove(&self, entry: &CatalogEntry) -> Result<u64, PullError> {
        let _claim = self.claim(entry.id)?;
        let repo_dir = self.cache.repo_dir(entry.repo);
        let delete = |path: &Path| -> Result<(), PullError> {
            match std::fs::remove_file(path) {
                Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                    Err(PullError::Held {
                        path: path.to_owned(),
                        source,
                    })
                }
                _ => Ok(()),
            }
        };
        let mut freed = 0;
        let manifest = self.read_manifest(entry.id);
        let fetching = Self::read_manifest_at(&self.fetching_path(entry.id));
        if let Some(manifest) = &manifest {
            // Only the model's own files: other tools may keep more of the same commit here.
            let snapshot = self.cache.snapshot_dir(&manifest.repo, &manifest.commit);
            for file in &manifest.files {
                let path = snapshot.join(&file.path);
                let Ok(metadata) = path.symlink_metadata() else {
                    continue;
                };
                // A copy (drives without links) is freed with its name; a link is not.
                if metadata.is_file() && hub_cache::link_count(&path).is_ok_and(|count| count == 1)
                {
                    freed += metadata.len();
                }
                delete(&path)?;
            }
            remove_empty_folders(&snapshot);
        }
        // The blobs of the model's files that no snapshot reads any more: the complete
        // model's, and those a download that stopped part way had fetched (not linked yet).
        let still_linked = linked_blobs(&repo_dir.join("snapshots"));
        for listed in [&manifest, &fetching].into_iter().flatten() {
            for file in &listed.files {
                let blob_name = file.blob_name();
                if still_linked.iter().any(|name| name == blob_name) {
                    continue;
                }
                let blob = self.cache.blob_path(&listed.repo, blob_name);
                let Ok(metadata) = blob.metadata() else {
                    continue;
                };
                if hub_cache::link_count(&blob).is_ok_and(|count| count > 1) {
                    continue;
                }
                delete(&blob)?;
                freed += metadata.len();
            }
        }
        // Partial downloads go too.
        for (path, bytes) in self.partial_files(entry.repo) {
            delete(&path)?;
            freed += bytes;
        }
        // The lists last: a removal stopped by a file it could not delete is finished by the
        // next one, which finds them.
        for list in [self.fetching_path(entry.id), self.manifest_path(entry.id)] {
            match std::fs::remove_file(&list) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(error.into());
                }
                _ => {}
            }
        }
        Ok(freed)
    }

    fn free_space(&self, folder: &Path) -> Option<u64> {
        if self.free_space_override.is_some() {
            return self.free_space_override;
        }
        let folder = folder.canonicalize().ok()?;
        let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
        (&disks)
            .into_iter()
            .filter(|disk| folder.starts_with(disk.mount_point()))
            .max_by_key(|disk| disk.mount_point().as_os_str().len())
            .map(sysinfo::Disk::available_space)
    }
}

/// Written atomically (a crash leaves the old manifest or the new one). Not flushed by
/// reopening it read-only: Windows refuses to flush a handle without write access.
fn write_manifest_at(path: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
    crate::files::write_atomic(path, &json)
}

/// Deletes `folder` and the folders under it that hold nothing (a snapshot's subfolders once
/// the model's files are gone); a folder that still holds something stays.
fn remove_empty_folders(folder: &Path) {
    for item in std::fs::read_dir(folder).into_iter().flatten().flatten() {
        let path = item.path();
        if item.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_empty_folders(&path);
        }
    }
    // Fails, as meant, where something is left.
    let _ = std::fs::remove_dir(folder);
}

/// The blob names the symlinks under `snapshots` point at.
fn linked_blobs(snapshots: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut folders = vec![snapshots.to_owned()];
    while let Some(folder) = folders.pop() {
        for item in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = item.path();
            if let Ok(target) = std::fs::read_link(&path) {
                if let Some(name) = target.file_name() {
                    names.push(name.to_string_lossy().into_owned());
                }
            } else if path.is_dir() {
                folders.push(path);
            }
        }
    }
    names
}

/// Whether the file at `path` has `file`'s size and hash (SHA-256 for LFS files, git's
/// blob SHA-1 for small ones).
fn verify_file(path: &Path, file: &RepoFile) -> std::io::Result<bool> {
    let mut input = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    if input.get_ref().metadata()?.len() != file.size {
        return Ok(false);
    }
    let (digest, expected) = match &file.sha256 {
        Some(expected) => {
            let mut hasher = sha2::Sha256::new();
            std::io::copy(&mut input, &mut hasher)?;
            (hex::encode(hasher.finalize()), expected)
        }
        None => {
            let mut hasher = sha1::Sha1::new();
            hasher.update(format!("blob {}\0", file.size).as_bytes());
            std::io::copy(&mut input, &mut hasher)?;
            (hex::encode(hasher.finalize()), &file.blob_id)
        }
    };
    Ok(digest.eq_ignore_ascii_case(expected))
}

/// The folder parses as a pipeline this engine runs, with every weight file present and
/// every tensor the architecture needs in it.
fn check_usable(folder: &Path) -> Result<(), PullError> {
    crate::engine::sd::open_checked(folder)
        .map(drop)
        .map_err(|error| PullError::Unusable(error.to_string()))
}

/// Bytes per second over the last few seconds.
struct SpeedMeter {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl SpeedMeter {
    const WINDOW: Duration = Duration::from_secs(5);

    fn new(start_bytes: u64) -> Self {
        Self {
            samples: std::collections::VecDeque::from([(Instant::now(), start_bytes)]),
        }
    }

    fn update(&mut self, done: u64) -> f64 {
        let now = Instant::now();
        self.samples.push_back((now, done));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some((first_at, first)), Some((last_at, last))) => {
                let seconds = last_at.duration_since(*first_at).as_secs_f64();
                if seconds > 0.0 {
                    last.saturating_sub(*first) as f64 / seconds
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }
}
