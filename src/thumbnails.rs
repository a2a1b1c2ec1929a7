//! Previews of finished jobs for the Jobs tab: one PNG per job (at most 512 px on its longer
//! side: small in the list, large when clicked) in `<data>/thumbnails/`, kept only for the
//! jobs the status still lists.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

pub const MAX_SIDE: u32 = 512;

#[derive(Clone, Debug)]
pub struct Thumbnails {
    folder: PathBuf,
}

impl Thumbnails {
    pub fn new(folder: PathBuf) -> Self {
        Self { folder }
    }

    pub fn path_for(&self, job_id: &str) -> PathBuf {
        let name = &hex::encode(Sha256::digest(job_id.as_bytes()))[..24];
        self.folder.join(format!("{name}.png"))
    }

    /// Writes a preview of `image` for `job_id` and returns its path. `encoded` is `image`'s
    /// own PNG, which is the preview as it stands when the image is no larger than one.
    pub fn save(
        &self,
        job_id: &str,
        image: &image::RgbImage,
        encoded: &[u8],
    ) -> std::io::Result<PathBuf> {
        crate::files::create_private_dir_all(&self.folder)?;
        let (width, height) = image.dimensions();
        let scale = f64::from(MAX_SIDE) / f64::from(width.max(height).max(1));
        let path = self.path_for(job_id);
        if scale < 1.0 {
            let w = ((f64::from(width) * scale).round() as u32).max(1);
            let h = ((f64::from(height) * scale).round() as u32).max(1);
            let preview = image::imageops::thumbnail(image, w, h);
            let png =
                crate::image_file::encode_preview_png(&preview).map_err(std::io::Error::other)?;
            crate::files::write_atomic(&path, &png)?;
        } else {
            crate::files::write_atomic(&path, encoded)?;
        }
        Ok(path)
    }

    /// Deletes the previews of jobs no longer listed.
    pub fn keep_only(&self, job_ids: &[&str]) {
        let keep: HashSet<PathBuf> = job_ids.iter().map(|job_id| self.path_for(job_id)).collect();
        let Ok(entries) = std::fs::read_dir(&self.folder) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "png") && !keep.contains(&path) {
                let _ = std::fs::remove_file(&path); // best effort: a stale preview is harmless
            }
        }
    }
}

/// Decodes a preview for display (called off the UI thread).
pub fn load(path: &Path) -> Option<egui::ColorImage> {
    let bytes = std::fs::read(path).ok()?;
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .ok()?
        .to_rgba8();
    let size = [image.width() as usize, image.height() as usize];
    Some(egui::ColorImage::from_rgba_unmultiplied(
        size,
        image.as_raw(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_bounded_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let thumbnails = Thumbnails::new(dir.path().join("thumbnails"));
        let big = image::RgbImage::from_pixel(2048, 1024, image::Rgb([10, 20, 30]));
        let png_of = |image: &image::RgbImage| crate::image_file::encode_png(image, "").unwrap();
        let path = thumbnails.save("j_1", &big, &png_of(&big)).unwrap();
        let preview = load(&path).unwrap();
        assert_eq!(preview.size, [512, 256]);
        let small = image::RgbImage::from_pixel(64, 48, image::Rgb([10, 20, 30]));
        let small_png = png_of(&small);
        let kept = thumbnails.save("j_3", &small, &small_png).unwrap();
        assert_eq!(load(&kept).unwrap().size, [64, 48], "never enlarged");
        assert_eq!(
            std::fs::read(&kept).unwrap(),
            small_png,
            "a small image's own PNG is its preview, not encoded again"
        );
        let other = thumbnails.save("j_2", &big, &png_of(&big)).unwrap();

        thumbnails.keep_only(&["j_2"]);
        assert!(!path.exists());
        assert!(other.exists());
    }
}
