//! Where the NVIDIA driver keeps the GPU machine code it compiles from candle's PTX (the
//! 13–20 s of "Preparing the GPU, once"): a folder of the worker's own, 1 GiB at most. The
//! driver's default is shared by every CUDA program in the account (`~/.nv/ComputeCache`,
//! `%APPDATA%\NVIDIA\ComputeCache`) and evicts the least recently used entries when full,
//! so another AI tool could push ours out and make the next start compile again. A driver
//! upgrade still empties it (the driver's rule). `CUDA_CACHE_PATH` / `CUDA_CACHE_MAXSIZE`
//! set by the person (or a bench) win; `CUDA_CACHE_DISABLE` is theirs to set.

use std::ffi::OsString;
use std::path::Path;

/// The driver's variable for the cache folder.
pub const PATH_VARIABLE: &str = "CUDA_CACHE_PATH";
/// The driver's variable for the cache's size, in bytes (at most 4 GiB).
pub const SIZE_VARIABLE: &str = "CUDA_CACHE_MAXSIZE";
/// Room for candle's modules compiled for a card, many times over.
const SIZE_BYTES: u64 = 1 << 30;
/// The folder, under the worker's data folder.
const FOLDER: &str = "gpu-kernel-cache";

/// The variables to set for this process and its children: ours, except those `current`
/// says are already set.
pub fn settings(
    data_dir: &Path,
    current: impl Fn(&str) -> Option<OsString>,
) -> Vec<(&'static str, OsString)> {
    let ours = [
        (PATH_VARIABLE, data_dir.join(FOLDER).into_os_string()),
        (SIZE_VARIABLE, OsString::from(SIZE_BYTES.to_string())),
    ];
    ours.into_iter()
        .filter(|(variable, _)| current(variable).is_none_or(|value| value.is_empty()))
        .collect()
}

/// Points the driver at the worker's own cache (see the module's doc). Where its folder cannot
/// be made, the driver's default stays (what it would be without this; logging is not up yet
/// to say so).
///
/// Call it first thing in `main`, before any other thread starts: changing the environment
/// is only sound while no other thread reads it.
pub fn use_workers_own(data_dir: &Path) {
    let settings = settings(data_dir, |variable| std::env::var_os(variable));
    let folder_made = settings
        .iter()
        .filter(|(variable, _)| *variable == PATH_VARIABLE)
        .all(|(_, folder)| crate::files::create_private_dir_all(Path::new(folder)).is_ok());
    if !folder_made {
        return;
    }
    for (variable, value) in settings {
        // SAFETY: called from `main` before any other thread exists (see above).
        unsafe { std::env::set_var(variable, value) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_cache_is_used_unless_the_person_chose_one() {
        let data_dir = Path::new("/home/someone/.local/share/studio-worker");
        let unset = settings(data_dir, |_| None);
        assert_eq!(
            unset,
            vec![
                (
                    PATH_VARIABLE,
                    data_dir.join("gpu-kernel-cache").into_os_string()
                ),
                (SIZE_VARIABLE, OsString::from("1073741824")),
            ]
        );
        // A path set by the person (or the GPU bench's empty cache) stays; so does a size.
        let chosen = |variable: &str| {
            (variable == PATH_VARIABLE).then(|| OsString::from("/tmp/empty-cache"))
        };
        assert_eq!(
            settings(data_dir, chosen),
            vec![(SIZE_VARIABLE, OsString::from("1073741824"))]
        );
        let both = |_: &str| Some(OsString::from("x"));
        assert!(settings(data_dir, both).is_empty());
        // Set but empty names no folder: ours is used.
        let empty = |_: &str| Some(OsString::new());
        assert_eq!(settings(data_dir, empty), unset);
    }
}
