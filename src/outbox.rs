//! The outbox: finished results on disk, waiting for the studio to take them (§3.3).
//!
//! One folder per job, `<outbox>/<created>-<hash of job id>/`, holding `image-N.png` and
//! `meta.json`. An entry is written into a temp folder, every file fsync'd, then the folder is
//! renamed into place and the outbox folder fsync'd: an entry that is listed is complete, and
//! a crash at any instant leaves either a complete entry or a temp folder that the next start
//! deletes. Entries are removed only after the studio answered `2xx`/`409`/`410`.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::files::{create_private_dir_all, sync_folder, write_synced};
use crate::studio::protocol::ResultMeta;

const META_FILE: &str = "meta.json";
const TEMP_PREFIX: &str = ".tmp-";

/// What is kept with the images: everything needed to upload them after a restart, and what
/// the Jobs tab shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxMeta {
    pub job_id: String,
    pub result: ResultMeta,
    pub image_count: usize,
    pub prompt: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    pub folder: PathBuf,
    pub meta: OutboxMeta,
}

impl OutboxEntry {
    pub fn image_path(&self, index: usize) -> PathBuf {
        self.folder.join(format!("image-{index}.png"))
    }
}

#[derive(Clone, Debug)]
pub struct Outbox {
    folder: PathBuf,
}

impl Outbox {
    /// The outbox in `folder`, with the temp folders of interrupted writes removed.
    pub fn open(folder: PathBuf) -> std::io::Result<Self> {
        create_private_dir_all(&folder)?;
        for entry in std::fs::read_dir(&folder)?.filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(Self { folder })
    }

    /// Stores a result durably; when this returns `Ok` the result survives a crash or a
    /// power cut.
    pub fn put(&self, meta: &OutboxMeta, pngs: &[Vec<u8>]) -> std::io::Result<OutboxEntry> {
        create_private_dir_all(&self.folder)?;
        let name = format!(
            "{}-{}",
            meta.created_at.format("%Y%m%dT%H%M%S%3fZ"),
            &hex::encode(Sha256::digest(meta.job_id.as_bytes()))[..16]
        );
        let temp = self.folder.join(format!("{TEMP_PREFIX}{name}"));
        let folder = self.folder.join(&name);

        let written = (|| {
            if temp.exists() {
                std::fs::remove_dir_all(&temp)?;
            }
            create_private_dir_all(&temp)?;
            for (index, png) in pngs.iter().enumerate() {
                write_synced(&temp.join(format!("image-{index}.png")), png)?;
            }
            let meta_json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
            write_synced(&temp.join(META_FILE), &meta_json)?;
            sync_folder(&temp)?;
            if folder.exists() {
                std::fs::remove_dir_all(&folder)?;
            }
            std::fs::rename(&temp, &folder)?;
            sync_folder(&self.folder)
        })();
        if let Err(err) = written {
            let _ = std::fs::remove_dir_all(&temp); // best effort; `open` also cleans up
            return Err(err);
        }
        Ok(OutboxEntry {
            folder,
            meta: meta.clone(),
        })
    }

    /// The complete entries, oldest first. An entry whose metadata cannot be read is logged
    /// and skipped (it is kept for a person to look at).
    pub fn list(&self) -> std::io::Result<Vec<OutboxEntry>> {
        let entries = match std::fs::read_dir(&self.folder) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let mut found = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) || !entry.path().is_dir() {
                continue;
            }
            let meta_path = entry.path().join(META_FILE);
            match std::fs::read(&meta_path)
                .map_err(|err| err.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<OutboxMeta>(&bytes).map_err(|err| err.to_string())
                }) {
                Ok(meta) => found.push(OutboxEntry {
                    folder: entry.path(),
                    meta,
                }),
                Err(err) => tracing::warn!("skipping outbox entry {name}: {err}"),
            }
        }
        found.sort_by(|a, b| (a.meta.created_at, &a.folder).cmp(&(b.meta.created_at, &b.folder)));
        Ok(found)
    }

    /// The entry's PNG files, in order.
    pub fn images(&self, entry: &OutboxEntry) -> std::io::Result<Vec<Vec<u8>>> {
        (0..entry.meta.image_count)
            .map(|index| std::fs::read(entry.image_path(index)))
            .collect()
    }

    pub fn remove(&self, entry: &OutboxEntry) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&entry.folder) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => sync_folder(&self.folder),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(job_id: &str, seconds: i64) -> OutboxMeta {
        OutboxMeta {
            job_id: job_id.to_owned(),
            result: ResultMeta {
                worker_id: "w_1".into(),
                seed: 42,
                elapsed_ms: 10,
                model: "sd-turbo".into(),
                width: 64,
                height: 64,
                steps: 1,
            },
            image_count: 2,
            prompt: "p".into(),
            created_at: DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap(),
        }
    }

    #[test]
    fn put_list_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let second = outbox
            .put(&meta("j/2\u{e9}", 5), &[b"b0".to_vec(), b"b1".to_vec()])
            .unwrap();
        let first = outbox
            .put(&meta("j_1", 1), &[b"a0".to_vec(), b"a1".to_vec()])
            .unwrap();

        let listed = outbox.list().unwrap();
        assert_eq!(listed, vec![first.clone(), second.clone()], "oldest first");
        assert_eq!(
            outbox.images(&second).unwrap(),
            vec![b"b0".to_vec(), b"b1".to_vec()]
        );

        outbox.remove(&first).unwrap();
        assert_eq!(outbox.list().unwrap(), vec![second]);
    }

    #[test]
    fn interrupted_writes_are_invisible_and_cleaned_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("outbox");
        let outbox = Outbox::open(folder.clone()).unwrap();
        // What a crash mid-`put` leaves: a temp folder with some images and no rename.
        let torn = folder.join(".tmp-20260101T000000000Z-abcdef");
        std::fs::create_dir_all(&torn).unwrap();
        std::fs::write(torn.join("image-0.png"), b"half").unwrap();
        assert!(outbox.list().unwrap().is_empty());

        Outbox::open(folder.clone()).unwrap();
        assert!(!torn.exists());
    }

    #[test]
    fn an_unreadable_entry_is_skipped_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let entry = outbox
            .put(&meta("j_1", 1), &[b"a".to_vec(), b"b".to_vec()])
            .unwrap();
        std::fs::write(entry.folder.join(META_FILE), b"{not json").unwrap();
        assert!(outbox.list().unwrap().is_empty());
        assert!(entry.folder.exists());
    }
}
