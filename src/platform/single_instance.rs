//! One worker per data folder: an exclusive OS file lock on `instance.lock`, held for the
//! life of the process. The OS releases it when the process ends, however it ends, so a
//! crash never leaves a stale lock, and two launches at the same instant cannot both win.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

const FILE_NAME: &str = "instance.lock";

/// Held while this process is the worker for its data folder.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// `Ok(None)` when another process already holds the lock.
pub fn acquire(data_dir: &Path) -> std::io::Result<Option<InstanceLock>> {
    crate::files::create_private_dir_all(data_dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(FILE_NAME))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(InstanceLock { _file: file })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(err)) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap().expect("the first one wins");
        assert!(
            acquire(dir.path()).unwrap().is_none(),
            "the second one is told"
        );
        drop(first);
        assert!(
            acquire(dir.path()).unwrap().is_some(),
            "released with its holder"
        );
    }
}
