//! The standard Hugging Face cache on disk, laid out exactly as `huggingface_hub` lays it out,
//! so files a person already fetched with other tools are reused, and ours are theirs:
//!
//! ```text
//! $HF_HUB_CACHE/models--owner--name/
//!     blobs/<sha256 or git blob id>            the file contents, once per content
//!     blobs/<…>.incomplete                     a download in progress (resumed from its length)
//!     snapshots/<commit>/<path in the repo>    links to ../../blobs/<…> (see [`HubCache::link`])
//!     refs/<revision>                          the commit a revision last resolved to
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct HubCache {
    root: PathBuf,
}

impl HubCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub` (the same on every
    /// OS, as `huggingface_hub` does).
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
        if let Some(cache) = var("HF_HUB_CACHE") {
            return Some(Self::new(cache.into()));
        }
        if let Some(home) = var("HF_HOME") {
            return Some(Self::new(PathBuf::from(home).join("hub")));
        }
        let base = match var("XDG_CACHE_HOME") {
            Some(cache) => PathBuf::from(cache),
            None => directories::BaseDirs::new()?.home_dir().join(".cache"),
        };
        Some(Self::new(base.join("huggingface").join("hub")))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    pub fn snapshot_dir(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_dir(repo).join("snapshots").join(commit)
    }

    pub fn blob_path(&self, repo: &str, blob: &str) -> PathBuf {
        self.repo_dir(repo).join("blobs").join(blob)
    }

    pub fn incomplete_path(&self, repo: &str, blob: &str) -> PathBuf {
        self.repo_dir(repo)
            .join("blobs")
            .join(format!("{blob}.incomplete"))
    }

    /// The commit `revision` last resolved to, if it ever did here.
    pub fn read_ref(&self, repo: &str, revision: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.repo_dir(repo).join("refs").join(revision)).ok()?;
        let commit = text.trim();
        (!commit.is_empty()).then(|| commit.to_owned())
    }

    pub fn write_ref(&self, repo: &str, revision: &str, commit: &str) -> std::io::Result<()> {
        let refs = self.repo_dir(repo).join("refs");
        std::fs::create_dir_all(&refs)?;
        let temporary = refs.join(format!(".{revision}.tmp"));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(commit.as_bytes())?;
        file.sync_all()?;
        crate::files::rename_when_free(&temporary, &refs.join(revision))
    }

    /// Makes `snapshots/<commit>/<path>` read as the blob: a relative symlink, as
    /// `huggingface_hub` makes; where the system refuses one (Windows without developer
    /// mode) or makes one that leads nowhere (some network drives; Wine), a hard link (the
    /// blob's data under a second name: NTFS allows it to everyone, and nothing is stored
    /// twice); else (FAT drives) a copy.
    pub fn link(&self, repo: &str, commit: &str, path: &str, blob: &str) -> std::io::Result<()> {
        let target = self.snapshot_dir(repo, commit).join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if target.symlink_metadata().is_ok() {
            std::fs::remove_file(&target)?;
        }
        let depth = path.split('/').count() + 1;
        let relative: PathBuf = std::iter::repeat_n("..", depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(blob);
        let blob_path = self.blob_path(repo, blob);
        if symlink(&relative, &target).is_ok() {
            if leads_to(&target, &blob_path) {
                return Ok(());
            }
            if let Err(err) = std::fs::remove_file(&target)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                return Err(err);
            }
        }
        if std::fs::hard_link(&blob_path, &target).is_ok() {
            return Ok(());
        }
        std::fs::copy(&blob_path, &target)?;
        Ok(())
    }
}

/// Whether `link` opens a file as long as the blob (a link that leads nowhere does not open).
fn leads_to(link: &Path, blob: &Path) -> bool {
    match (std::fs::metadata(link), std::fs::metadata(blob)) {
        (Ok(through_link), Ok(blob)) => through_link.len() == blob.len(),
        _ => false,
    }
}

/// How many names the file at `path` has (its hard links; a symlink to it is not one). A blob
/// with more than one is still read by a snapshot that holds it as a hard link.
#[cfg(unix)]
pub fn link_count(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)?.nlink())
}

/// How many names the file at `path` has (its hard links; a symlink to it is not one). A blob
/// with more than one is still read by a snapshot that holds it as a hard link.
#[cfg(windows)]
pub fn link_count(path: &Path) -> std::io::Result<u64> {
    use std::os::windows::io::AsRawHandle as _;
    use windows_sys::Win32::Storage::FileSystem::{
        BY_HANDLE_FILE_INFORMATION, GetFileInformationByHandle,
    };
    let file = std::fs::File::open(path)?;
    // SAFETY: all-zero bytes are a valid value of this plain C struct.
    let mut info: BY_HANDLE_FILE_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: the handle stays open for the call, and `info` is a valid place to write.
    if unsafe { GetFileInformationByHandle(file.as_raw_handle(), &mut info) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(info.nNumberOfLinks))
}

#[cfg(not(any(unix, windows)))]
pub fn link_count(path: &Path) -> std::io::Result<u64> {
    std::fs::metadata(path).map(|_| 1)
}

#[cfg(unix)]
fn symlink(original: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(original, link)
}

#[cfg(windows)]
fn symlink(original: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(original, link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_huggingface_hubs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HubCache::new(dir.path().to_owned());
        assert_eq!(
            cache.repo_dir("stabilityai/sd-turbo"),
            dir.path().join("models--stabilityai--sd-turbo")
        );
        std::fs::create_dir_all(cache.blob_path("a/b", "x").parent().unwrap()).unwrap();
        std::fs::write(cache.blob_path("a/b", "abc123"), b"weights").unwrap();
        cache
            .link("a/b", "c0ffee", "unet/model.safetensors", "abc123")
            .unwrap();
        let linked = cache
            .snapshot_dir("a/b", "c0ffee")
            .join("unet/model.safetensors");
        assert_eq!(std::fs::read(&linked).unwrap(), b"weights");
        // Linking again (a re-fetch) replaces the link.
        cache
            .link("a/b", "c0ffee", "unet/model.safetensors", "abc123")
            .unwrap();
        assert_eq!(cache.read_ref("a/b", "main"), None);
        cache.write_ref("a/b", "main", "c0ffee").unwrap();
        assert_eq!(cache.read_ref("a/b", "main").as_deref(), Some("c0ffee"));
    }
}
