//! blake3 hashing of input files with a stat memo: an unchanged file (same device, inode,
//! size, mtime and ctime) is not read again. The memo only saves time: stages that read a
//! file check the bytes they read against the digest they were given.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::atomic::atomic_write;

/// blake3 of `bytes`, hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemoEntry {
    stat: Stat,
    hash: String,
}

/// Hashes files, remembering (stat → hash) in a memo file under the cache root.
#[derive(Debug)]
pub struct FileHasher {
    memo_path: Option<PathBuf>,
    memo: Mutex<BTreeMap<PathBuf, MemoEntry>>,
    dirty: Mutex<bool>,
}

impl FileHasher {
    /// A hasher whose memo lives at `memo_path` (missing or unreadable memo = empty).
    pub fn with_memo(memo_path: PathBuf) -> Self {
        let memo = std::fs::read(&memo_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        FileHasher {
            memo_path: Some(memo_path),
            memo: Mutex::new(memo),
            dirty: Mutex::new(false),
        }
    }

    /// A hasher without a memo.
    pub fn without_memo() -> Self {
        FileHasher {
            memo_path: None,
            memo: Mutex::new(BTreeMap::new()),
            dirty: Mutex::new(false),
        }
    }

    /// The blake3 hex digest of the file at `path`.
    pub fn hash_file(&self, path: &Path) -> io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let stat = stat_of(&meta);
        let key = std::path::absolute(path)?;
        if let Some(stat) = &stat
            && let Some(entry) = lock(&self.memo).get(&key)
            && &entry.stat == stat
        {
            return Ok(entry.hash.clone());
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap(path)?;
        let hash = hasher.finalize().to_hex().to_string();
        if let Some(stat) = stat {
            lock(&self.memo).insert(
                key,
                MemoEntry {
                    stat,
                    hash: hash.clone(),
                },
            );
            *lock(&self.dirty) = true;
        }
        Ok(hash)
    }

    /// Records that the bytes of `path` hash to `hash` (after a stage read them).
    pub fn remember(&self, path: &Path, hash: &str) {
        if let (Ok(meta), Ok(key)) = (std::fs::metadata(path), std::path::absolute(path))
            && let Some(stat) = stat_of(&meta)
        {
            lock(&self.memo).insert(
                key,
                MemoEntry {
                    stat,
                    hash: hash.to_string(),
                },
            );
            *lock(&self.dirty) = true;
        }
    }

    /// Writes the memo back (atomically) if it changed; entries for vanished files are dropped.
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.memo_path else {
            return Ok(());
        };
        if !*lock(&self.dirty) {
            return Ok(());
        }
        let mut memo = lock(&self.memo);
        memo.retain(|p, _| p.exists());
        let bytes = serde_json::to_vec(&*memo).map_err(io::Error::other)?;
        atomic_write(path, &bytes)?;
        *lock(&self.dirty) = false;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(unix)]
fn stat_of(meta: &std::fs::Metadata) -> Option<Stat> {
    use std::os::unix::fs::MetadataExt;
    Some(Stat {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
    })
}

#[cfg(not(unix))]
fn stat_of(_meta: &std::fs::Metadata) -> Option<Stat> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_is_invalidated_by_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.bin");
        std::fs::write(&file, b"one").unwrap();
        let hasher = FileHasher::with_memo(dir.path().join("memo.json"));
        let h1 = hasher.hash_file(&file).unwrap();
        assert_eq!(h1, hash_bytes(b"one"));
        hasher.save().unwrap();
        std::fs::write(&file, b"two!").unwrap();
        let hasher = FileHasher::with_memo(dir.path().join("memo.json"));
        assert_eq!(hasher.hash_file(&file).unwrap(), hash_bytes(b"two!"));
    }
}
