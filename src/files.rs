//! Writing files so that a crash or a power cut at any instant leaves the old file or the new
//! one, never half of one, and so that nobody but the person can read them.
//!
//! Every file the worker keeps (settings, the outbox, `status.json`, `control.json`, previews,
//! the start-at-login entry) is written through here.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a rename over a file that another program holds open is tried again (Windows):
/// a reader holds a settings file for well under a millisecond, a virus scan of a small file
/// for milliseconds. A refusal that lasts (a read-only folder) costs this much once.
const HELD_FILE_PATIENCE: Duration = Duration::from_millis(500);

/// Writes `bytes` to `path` atomically, readable by the owner only: a temp file in the same
/// folder (so the rename cannot cross file systems), fsync, rename over the target, fsync the
/// folder so the rename itself survives a power cut.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let folder = parent_folder(path);
    create_private_dir_all(&folder)?;
    let file_name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let temp_path = folder.join(format!(
        "{}{}-{:016x}",
        temp_prefix(&file_name),
        std::process::id(),
        fastrand::u64(..)
    ));

    let result = (|| {
        let mut file = private_file_options().open(&temp_path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        rename_when_free(&temp_path, path)?;
        sync_folder(&folder)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp_path); // best effort: the error that matters is `result`
    }
    result
}

/// Renames `from` to `to`, replacing a file there. Windows refuses to replace a file that
/// another program has open at that moment (a reader such as `studio-worker status`, an
/// antivirus scan, a sync client) wherever it cannot rename with POSIX semantics (FAT and
/// network drives, older Windows, Wine), and to move a folder while a file in it is open (an
/// antivirus scanning the images just written). Such a hold passes within moments, so there
/// the rename is tried again for up to [`HELD_FILE_PATIENCE`] before its error is returned.
pub fn rename_when_free(from: &Path, to: &Path) -> std::io::Result<()> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match std::fs::rename(from, to) {
            Err(error) if held_by_another(&error, to) && started.elapsed() < HELD_FILE_PATIENCE => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// Whether `error` may be Windows refusing a file that another handle holds: access denied
/// (5) or a sharing violation (32), where `to` is not a folder (nothing replaces a folder:
/// that refusal is for good, and returned at once).
fn held_by_another(error: &std::io::Error, to: &Path) -> bool {
    cfg!(windows) && matches!(error.raw_os_error(), Some(5 | 32)) && !to.is_dir()
}

/// The prefix of the temp files [`write_atomic`] makes for `file_name` (followed by the
/// writer's pid and a random suffix), so a reader can clean up after a killed writer.
pub fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.tmp-")
}

/// Creates (or replaces) `path` with `bytes` and flushes it to the disk before returning.
/// Not atomic: for files inside a folder that is itself renamed into place.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Creates missing folders owner-only (0700 on Unix); existing ones are left as they are.
pub fn create_private_dir_all(folder: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(folder)
}

/// Flushes a folder's entries (a rename or a delete in it) to the disk.
#[cfg(unix)]
pub fn sync_folder(folder: &Path) -> std::io::Result<()> {
    std::fs::File::open(folder)?.sync_all()
}

/// Flushes a folder's entries (a rename or a delete in it) to the disk.
#[cfg(not(unix))]
pub fn sync_folder(_folder: &Path) -> std::io::Result<()> {
    Ok(()) // NTFS journals the rename; there is no folder handle to flush.
}

/// The folder `path` is in (`.` for a bare file name).
pub fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn private_file_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_whole_files_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/settings.toml");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temp file left behind");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let folder = std::fs::metadata(path.parent().unwrap()).unwrap();
            assert_eq!(folder.permissions().mode() & 0o777, 0o700);
        }
    }

    /// Wine, like FAT and network drives, refuses to rename over a file that is open; the
    /// settings saved while the worker's own watch, or `studio-worker status`, reads them
    /// failed so (seen under Wine as a lost setting).
    #[cfg(windows)]
    #[test]
    fn a_file_held_open_for_a_moment_is_still_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.toml");
        write_atomic(&path, b"first").unwrap();
        let held = std::fs::File::open(&path).unwrap();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        write_atomic(&path, b"second").expect("replaced once the reader lets go");
        reader.join().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
    }
}
