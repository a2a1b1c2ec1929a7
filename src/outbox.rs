//! The outbox: finished results on disk, waiting for the studio to take them (§3.3).
//!
//! One folder per job, `<outbox>/<created>-<hash of job id>/`, holding `image-N.png`,
//! `meta.json`, and (once the studio refused it) `delivery.json`. An entry is written into a
//! temp folder, every file fsync'd, then the folder is renamed into place and the outbox
//! folder fsync'd: an entry that is listed is complete, and a crash at any instant leaves
//! either a complete entry or a temp folder that the next start deletes.
//!
//! Removal is the same in reverse: the entry is renamed out of the listing (`.trash-…`) and
//! the folder fsync'd before a file of it is deleted, so a crash mid-way never leaves a half
//! entry that would later read as damaged. The uploader removes an entry only after the
//! studio answered `2xx`/`409`/`410`, or when it gave up on it (it says so with `fail`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::files::{
    create_private_dir_all, rename_when_free, sync_folder, write_atomic, write_synced,
};
use crate::studio::protocol::ResultMeta;

const META_FILE: &str = "meta.json";
const DELIVERY_FILE: &str = "delivery.json";
const TEMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";

/// A job's lease when an entry written before leases were kept says none (§3.2's example).
fn default_lease_s() -> u64 {
    120
}

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
    /// The job's lease: renewed while the result waits (§3.2).
    #[serde(default = "default_lease_s")]
    pub lease_s: u64,
}

/// What the studio said when it refused the upload (`delivery.json`): kept across restarts,
/// since the worker gives up on a refused result only after days.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusals {
    /// The first refusal (404, 400, …), when the clock of giving up started.
    pub since: Option<DateTime<Utc>>,
    pub count: u32,
    /// The studio's last answer, in one line (`404: no such job`).
    pub last_answer: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    pub folder: PathBuf,
    pub meta: OutboxMeta,
    /// The bytes of its images.
    pub bytes: u64,
    pub refusals: Refusals,
}

impl OutboxEntry {
    pub fn image_path(&self, index: usize) -> PathBuf {
        self.folder.join(format!("image-{index}.png"))
    }

    /// The entry's folder name (stable, unique in the outbox).
    pub fn name(&self) -> String {
        self.folder
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// A folder in the outbox whose metadata cannot be read: kept for a person to look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedEntry {
    pub folder: PathBuf,
    pub reason: String,
}

/// What the outbox holds, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    pub entries: Vec<OutboxEntry>,
    pub damaged: Vec<DamagedEntry>,
    /// Every result this outbox stored in this process up to this number ([`Put::number`])
    /// is in the listing: they were in place before the folder was read. Later ones may be
    /// in it too, or not.
    pub stores_counted: u64,
}

/// A result [`Outbox::put`] stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Put {
    pub entry: OutboxEntry,
    /// Which of this outbox's stores it was, counting from 1 in this process: a listing
    /// holds it once its [`Listing::stores_counted`] is at least this.
    pub number: u64,
}

#[derive(Clone, Debug)]
pub struct Outbox {
    folder: PathBuf,
    /// Results stored so far in this process, through this handle and its clones.
    stores: Arc<AtomicU64>,
}

impl Outbox {
    /// The outbox in `folder`, with the leftovers of interrupted writes and removals deleted.
    pub fn open(folder: PathBuf) -> std::io::Result<Self> {
        create_private_dir_all(&folder)?;
        for entry in std::fs::read_dir(&folder)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if (name.starts_with(TEMP_PREFIX) || name.starts_with(TRASH_PREFIX))
                && let Err(err) = std::fs::remove_dir_all(entry.path())
            {
                // Not listed either way; tried again at the next start.
                tracing::warn!("cannot delete {name} from the outbox: {err}");
            }
        }
        Ok(Self {
            folder,
            stores: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Stores a result durably; when this returns `Ok` the result survives a crash or a
    /// power cut, and every listing begun after it holds it.
    pub fn put(&self, meta: &OutboxMeta, pngs: &[Vec<u8>]) -> std::io::Result<Put> {
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
            rename_when_free(&temp, &folder)?;
            sync_folder(&self.folder)
        })();
        if let Err(err) = written {
            let _ = std::fs::remove_dir_all(&temp); // best effort; `open` also cleans up
            return Err(err);
        }
        // Counted once the entry is in place: a listing that reads this count reads the
        // folder after it.
        let number = self.stores.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Put {
            entry: OutboxEntry {
                folder,
                meta: meta.clone(),
                bytes: pngs.iter().map(|png| png.len() as u64).sum(),
                refusals: Refusals::default(),
            },
            number,
        })
    }

    /// The complete entries, oldest first, and the folders whose metadata cannot be read
    /// (kept and reported, never deleted). An outbox folder that cannot be read at all is
    /// an error: the caller must not take it for an empty one.
    pub fn list(&self) -> std::io::Result<Listing> {
        // Read before the folder: each store counted here is in place already.
        let stores_counted = self.stores.load(Ordering::SeqCst);
        let folders = match std::fs::read_dir(&self.folder) {
            Ok(folders) => folders,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Listing {
                    stores_counted,
                    ..Listing::default()
                });
            }
            Err(err) => return Err(err),
        };
        let mut listing = Listing {
            stores_counted,
            ..Listing::default()
        };
        for folder in folders {
            let folder = folder?;
            let name = folder.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX)
                || name.starts_with(TRASH_PREFIX)
                || !folder.path().is_dir()
            {
                continue;
            }
            match read_entry(&folder.path()) {
                Ok(entry) => listing.entries.push(entry),
                Err(reason) => listing.damaged.push(DamagedEntry {
                    folder: folder.path(),
                    reason,
                }),
            }
        }
        listing
            .entries
            .sort_by(|a, b| (a.meta.created_at, &a.folder).cmp(&(b.meta.created_at, &b.folder)));
        listing.damaged.sort_by(|a, b| a.folder.cmp(&b.folder));
        Ok(listing)
    }

    /// The entry's PNG files, in order.
    pub fn images(&self, entry: &OutboxEntry) -> std::io::Result<Vec<Vec<u8>>> {
        (0..entry.meta.image_count)
            .map(|index| std::fs::read(entry.image_path(index)))
            .collect()
    }

    /// Remembers the studio's refusals of this entry (atomically, in the entry).
    pub fn save_refusals(&self, entry: &OutboxEntry, refusals: &Refusals) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(refusals).map_err(std::io::Error::other)?;
        write_atomic(&entry.folder.join(DELIVERY_FILE), &json)
    }

    /// Takes an entry (or a damaged folder) out of the outbox: renamed out of the listing
    /// first, so it is gone at once and whole; its files are deleted after. A failure to
    /// delete them leaves a `.trash-…` folder that the next start deletes.
    pub fn remove(&self, folder: &Path) -> std::io::Result<()> {
        let Some(name) = folder.file_name() else {
            return Err(std::io::Error::other("not an outbox entry"));
        };
        let trash = self
            .folder
            .join(format!("{TRASH_PREFIX}{}", name.to_string_lossy()));
        match rename_when_free(folder, &trash) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        }
        sync_folder(&self.folder)?;
        if let Err(err) = std::fs::remove_dir_all(&trash) {
            tracing::warn!(
                "a delivered result's files stay in {} until the next start: {err}",
                trash.display()
            );
        }
        Ok(())
    }
}

/// One entry's metadata, image sizes and refusals, or why it cannot be read.
fn read_entry(folder: &Path) -> Result<OutboxEntry, String> {
    let bytes = std::fs::read(folder.join(META_FILE)).map_err(|err| err.to_string())?;
    let meta: OutboxMeta = serde_json::from_slice(&bytes).map_err(|err| err.to_string())?;
    let image_bytes = (0..meta.image_count)
        .map(|index| {
            std::fs::metadata(folder.join(format!("image-{index}.png"))).map_or(0, |m| m.len())
        })
        .sum();
    // A lost or garbled refusal record only restarts the clock of giving up.
    let refusals = std::fs::read(folder.join(DELIVERY_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    Ok(OutboxEntry {
        folder: folder.to_path_buf(),
        meta,
        bytes: image_bytes,
        refusals,
    })
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
            lease_s: 120,
        }
    }

    #[test]
    fn put_list_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let second = outbox
            .put(&meta("j/2\u{e9}", 5), &[b"b0".to_vec(), b"b1".to_vec()])
            .unwrap()
            .entry;
        let first = outbox
            .put(&meta("j_1", 1), &[b"a0".to_vec(), b"a1".to_vec()])
            .unwrap()
            .entry;

        let listed = outbox.list().unwrap();
        assert_eq!(
            listed.entries,
            vec![first.clone(), second.clone()],
            "oldest first"
        );
        assert_eq!(listed.entries.iter().map(|e| e.bytes).sum::<u64>(), 8);
        assert_eq!(
            outbox.images(&second).unwrap(),
            vec![b"b0".to_vec(), b"b1".to_vec()]
        );

        outbox.remove(&first.folder).unwrap();
        assert_eq!(outbox.list().unwrap().entries, vec![second]);
        outbox.remove(&first.folder).unwrap(); // gone already: fine
    }

    #[test]
    fn interrupted_writes_and_removals_are_invisible_and_cleaned_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("outbox");
        let outbox = Outbox::open(folder.clone()).unwrap();
        // What a crash mid-`put` leaves: a temp folder with some images and no rename.
        let torn = folder.join(".tmp-20260101T000000000Z-abcdef");
        std::fs::create_dir_all(&torn).unwrap();
        std::fs::write(torn.join("image-0.png"), b"half").unwrap();
        // What a crash mid-`remove` leaves: the renamed entry, half deleted.
        let half_removed = folder.join(".trash-20260101T000000000Z-123456");
        std::fs::create_dir_all(&half_removed).unwrap();
        std::fs::write(half_removed.join("image-1.png"), b"x").unwrap();
        let listing = outbox.list().unwrap();
        assert!(listing.entries.is_empty() && listing.damaged.is_empty());

        Outbox::open(folder.clone()).unwrap();
        assert!(!torn.exists() && !half_removed.exists());
    }

    #[test]
    fn an_unreadable_entry_is_listed_as_damaged_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let entry = outbox
            .put(&meta("j_1", 1), &[b"a".to_vec(), b"b".to_vec()])
            .unwrap()
            .entry;
        std::fs::write(entry.folder.join(META_FILE), b"{not json").unwrap();
        let listing = outbox.list().unwrap();
        assert!(listing.entries.is_empty());
        assert_eq!(listing.damaged.len(), 1);
        assert!(entry.folder.exists());
    }

    #[test]
    fn refusals_survive_a_restart_and_old_entries_get_a_lease() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let entry = outbox
            .put(&meta("j_1", 1), &[b"a".to_vec(), b"b".to_vec()])
            .unwrap()
            .entry;
        let refusals = Refusals {
            since: Some(Utc::now()),
            count: 3,
            last_answer: Some("404: no such job".into()),
        };
        outbox.save_refusals(&entry, &refusals).unwrap();
        let reopened = Outbox::open(dir.path().join("outbox")).unwrap();
        assert_eq!(reopened.list().unwrap().entries[0].refusals, refusals);

        let mut old: serde_json::Value = serde_json::to_value(meta("j_2", 2)).unwrap();
        old.as_object_mut().unwrap().remove("leaseS");
        let parsed: OutboxMeta = serde_json::from_value(old).unwrap();
        assert_eq!(parsed.lease_s, 120);
    }

    #[test]
    fn a_listing_holds_every_result_stored_before_it_began() {
        // Stores racing listings, as the job loop's and the uploader's do: whatever the
        // interleaving, a listing holds each result numbered up to its count.
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lister = {
            let (outbox, done) = (outbox.clone(), done.clone());
            std::thread::spawn(move || {
                let mut listings = Vec::new();
                while !done.load(Ordering::SeqCst) {
                    let listing = outbox.list().unwrap();
                    let names: Vec<String> =
                        listing.entries.iter().map(OutboxEntry::name).collect();
                    listings.push((listing.stores_counted, names));
                }
                listings
            })
        };
        let mut stored = Vec::new();
        for n in 0..200 {
            let put = outbox
                .put(&meta(&format!("j_{n}"), n), &[b"a".to_vec(), b"b".to_vec()])
                .unwrap();
            stored.push((put.number, put.entry.name()));
        }
        done.store(true, Ordering::SeqCst);
        let listings = lister.join().unwrap();
        let numbers: Vec<u64> = stored.iter().map(|(number, _)| *number).collect();
        assert_eq!(
            numbers,
            (1..=200).collect::<Vec<u64>>(),
            "numbered in order from 1"
        );
        assert!(listings.len() > 1, "the listings ran beside the stores");
        for (counted, names) in &listings {
            for (number, name) in &stored {
                assert!(
                    number > counted || names.contains(name),
                    "result {number} is missing from a listing that counts {counted}"
                );
            }
        }
        assert_eq!(outbox.list().unwrap().stores_counted, 200);
    }

    #[cfg(unix)]
    #[test]
    fn the_outbox_is_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let entry = outbox
            .put(&meta("j_1", 1), &[b"a".to_vec(), b"b".to_vec()])
            .unwrap()
            .entry;
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("outbox")), 0o700);
        assert_eq!(mode(&entry.folder), 0o700);
        assert_eq!(mode(&entry.image_path(0)), 0o600);
        assert_eq!(mode(&entry.folder.join(META_FILE)), 0o600);
    }
}
