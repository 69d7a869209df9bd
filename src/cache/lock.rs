//! Per-key locks with `std::fs::File::lock`, and the store-wide lock that keeps `cache gc` and
//! runs apart: the OS releases them when the process dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// An exclusive lock on one cache key, held until dropped.
#[derive(Debug)]
pub struct KeyLock {
    file: File,
    path: PathBuf,
}

impl KeyLock {
    /// Takes the lock at `path`, calling `on_wait` with a description of the holder when another
    /// process has it, then waiting for it.
    pub fn acquire(path: &Path, on_wait: impl FnOnce(&str)) -> io::Result<KeyLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another sdpipe process".to_string()
                } else {
                    holder.to_string()
                };
                on_wait(&holder);
                file.lock()?;
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        // Best effort: say who holds it, for the next waiter.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "sdpipe pid {}", std::process::id());
        Ok(KeyLock {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// The store-wide lock: every run holds it shared for its whole duration, `cache gc` holds it
/// exclusive, so gc never deletes a blob a live run has written but not yet committed.
#[derive(Debug)]
pub struct StoreLock {
    file: File,
}

impl StoreLock {
    fn open(path: &Path) -> io::Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }

    /// Shared: runs hold it together; waits (after `on_wait`) only while gc holds it.
    pub fn shared(path: &Path, on_wait: impl FnOnce()) -> io::Result<StoreLock> {
        Self::take(path, on_wait, File::try_lock_shared, File::lock_shared)
    }

    /// Exclusive: waits (after `on_wait`) until no run holds it.
    pub fn exclusive(path: &Path, on_wait: impl FnOnce()) -> io::Result<StoreLock> {
        Self::take(path, on_wait, File::try_lock, File::lock)
    }

    fn take(
        path: &Path,
        on_wait: impl FnOnce(),
        try_lock: fn(&File) -> Result<(), TryLockError>,
        lock: fn(&File) -> io::Result<()>,
    ) -> io::Result<StoreLock> {
        let file = Self::open(path)?;
        match try_lock(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                on_wait();
                lock(&file)?;
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        Ok(StoreLock { file })
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}
