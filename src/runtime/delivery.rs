//! A finished job's images on their way out: encoded as PNGs that carry their parameters,
//! stored durably in the outbox (before the studio hears of them); then, off the job's path,
//! a preview for the Jobs tab and the person's copies. All of it is file work, done on the
//! blocking pool.

use std::path::{Path, PathBuf};

use chrono::Utc;

use crate::engine::Generated;
use crate::image_file;
use crate::outbox::{Outbox, OutboxMeta};
use crate::studio::protocol::ResultMeta;
use crate::thumbnails::Thumbnails;
use crate::vocab::job::JobSpec;

/// Where finished images go.
#[derive(Clone)]
pub(super) struct Delivery {
    outbox: Outbox,
    thumbnails: Thumbnails,
}

/// A result safe in the outbox.
pub(super) struct Stored {
    /// The bytes of the images in the outbox.
    pub bytes: u64,
    /// Its number among the outbox's stores ([`crate::outbox::Put::number`]).
    pub number: u64,
    /// What the person keeps of it, made by [`Delivery::keep`].
    pub keepsakes: Keepsakes,
}

/// A stored result's preview and the person's copies, still to be written. They are extras:
/// the next job does not wait for them, and their failure is logged, never the job's.
pub(super) struct Keepsakes {
    job_id: String,
    first_image: Option<image::RgbImage>,
    pngs: Vec<Vec<u8>>,
    copy_stem: String,
    copies_folder: Option<PathBuf>,
}

/// What the keepsakes left for the Jobs tab.
pub(super) struct Kept {
    pub job_id: String,
    pub thumbnail: Option<PathBuf>,
    pub copies: Vec<PathBuf>,
}

impl Delivery {
    pub(super) fn new(outbox: Outbox, thumbnails: Thumbnails) -> Self {
        Self { outbox, thumbnails }
    }

    /// Encodes and stores the job's images. When this returns `Ok` the result survives a
    /// crash or a power cut.
    pub(super) async fn store(
        &self,
        spec: &JobSpec,
        generated: Generated,
        worker_id: &str,
        engine_ms: u64,
        copies_folder: Option<PathBuf>,
    ) -> std::io::Result<Stored> {
        let mut spec = spec.clone();
        spec.seed = generated.seed;
        let meta = OutboxMeta {
            job_id: spec.job_id.clone(),
            result: ResultMeta {
                worker_id: worker_id.to_owned(),
                seed: generated.seed,
                elapsed_ms: engine_ms,
                model: spec.model.clone(),
                width: spec.width,
                height: spec.height,
                steps: spec.steps,
            },
            image_count: generated.images.len(),
            prompt: spec.prompt.clone(),
            created_at: Utc::now(),
            lease_s: spec.lease.as_secs(),
        };
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || {
            let parameters = image_file::parameters_text(&spec, generated.sampler);
            let pngs = image_file::encode_pngs(&generated.images, &parameters)
                .map_err(std::io::Error::other)?;
            let stored = outbox.put(&meta, &pngs)?;
            Ok(Stored {
                bytes: stored.entry.bytes,
                number: stored.number,
                keepsakes: Keepsakes {
                    copy_stem: copy_stem(&spec),
                    job_id: spec.job_id,
                    first_image: generated.images.into_iter().next(),
                    pngs,
                    copies_folder,
                },
            })
        })
        .await
        .unwrap_or_else(|err| Err(std::io::Error::other(err.to_string())))
    }

    /// Writes a stored result's preview and the person's copies.
    pub(super) async fn keep(&self, keepsakes: Keepsakes) -> Kept {
        let job_id = keepsakes.job_id.clone();
        let thumbnails = self.thumbnails.clone();
        tokio::task::spawn_blocking(move || {
            let Keepsakes {
                job_id,
                first_image,
                pngs,
                copy_stem,
                copies_folder,
            } = keepsakes;
            let thumbnail = first_image.zip(pngs.first()).and_then(|(image, png)| {
                thumbnails
                    .save(&job_id, &image, png)
                    .map_err(|err| tracing::debug!("no preview for {job_id}: {err}"))
                    .ok()
            });
            let copies = copies_folder.map_or_else(Vec::new, |folder| {
                save_copies(&folder, &copy_stem, &pngs)
                    .map_err(|err| tracing::warn!("no copy saved in {}: {err}", folder.display()))
                    .unwrap_or_default()
            });
            Kept {
                job_id,
                thumbnail,
                copies,
            }
        })
        .await
        .unwrap_or_else(|err| {
            tracing::warn!("no preview or copies of {job_id}: {err}");
            Kept {
                job_id,
                thumbnail: None,
                copies: Vec::new(),
            }
        })
    }

    /// Keeps the previews of the listed jobs only (off the async threads).
    pub(super) fn keep_previews_of(&self, job_ids: Vec<String>) {
        let thumbnails = self.thumbnails.clone();
        tokio::task::spawn_blocking(move || {
            thumbnails.keep_only(&job_ids.iter().map(String::as_str).collect::<Vec<_>>());
        });
    }
}

/// `2026-11-27 14.03.12 sd-turbo 42`: sorts by time, says what made it.
fn copy_stem(spec: &JobSpec) -> String {
    let model: String = spec
        .model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!(
        "{} {model} {}",
        chrono::Local::now().format("%Y-%m-%d %H.%M.%S"),
        spec.seed
    )
}

/// Writes the PNGs as `<stem>.png` (or `<stem>-N.png` for several), never over a file.
fn save_copies(folder: &Path, stem: &str, pngs: &[Vec<u8>]) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(folder)?;
    let mut saved = Vec::new();
    for (index, png) in pngs.iter().enumerate() {
        let base = if pngs.len() == 1 {
            stem.to_owned()
        } else {
            format!("{stem}-{}", index + 1)
        };
        let mut path = folder.join(format!("{base}.png"));
        let mut attempt = 1;
        while path.exists() {
            attempt += 1;
            path = folder.join(format!("{base} ({attempt}).png"));
        }
        std::fs::write(&path, png)?;
        saved.push(path);
    }
    Ok(saved)
}
