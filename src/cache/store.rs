//! The two-level store: immutable content-addressed blobs, then one record per key.
//!
//! Layout under the versioned root (`.sdpipe/cache-v1/`):
//! `blobs/ab/abcdef…` (read-only files named by their blake3), `records/<ns>/<key>.json`,
//! `locks/<key>.lock`, `scratch/<key>/`, `hash-memo.json`, `blob-memo.json`, `quarantine/`. A
//! blob is written to a temp file in its directory, synced and renamed; a record is written last
//! and is the commit point, so a crash leaves at worst unreferenced temp files, never a record
//! pointing at missing data.
//!
//! Nothing is served unverified: a record counts only when every blob it names hashes to its
//! digest. Re-hashing is skipped while a blob's stat (device, inode, size, mtime, ctime) is the
//! one it had when last verified (`blob-memo.json`), so an edit through a hard-linked output is
//! caught on the next lookup; silent bit rot, which changes no stat, is what `cache verify`
//! (a full re-hash) is for. A blob or record that fails its check is moved to `quarantine/`
//! (never deleted: it is evidence) and the lookup is a miss, so the stage recomputes it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::atomic::{atomic_write, sync_dir};
use super::hash::FileHasher;
use super::key::KeyMaterial;
use super::lock::{KeyLock, StoreLock};

/// A cache failure, naming the file involved.
#[derive(Debug, Error)]
pub enum CacheError {
    /// Reading or writing a cache file failed.
    #[error("cache I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cache file does not hold what it should.
    #[error("corrupt cache entry {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A blob in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// blake3 hex of the content.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// The committed result of one key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The key.
    pub key: String,
    /// Stage kind (or item kind for per-item records).
    pub kind: String,
    /// The instance that computed it.
    pub stage: String,
    /// What the key hashes (stage records).
    #[serde(default)]
    pub material: Option<KeyMaterial>,
    /// Output files: relative name → blob.
    pub outputs: BTreeMap<String, BlobRef>,
    /// Stage-specific figures (items computed / reused, ...).
    #[serde(default)]
    pub stats: serde_json::Value,
    /// One line for the summary table.
    #[serde(default)]
    pub summary: String,
    /// Seconds since the epoch at commit.
    pub created_unix: u64,
    /// Wall time of the computation.
    pub duration_s: f64,
    /// sdpipe version that wrote it.
    pub tool_version: String,
}

impl Record {
    /// Digest of the outputs (names and blob digests): what downstream keys chain on.
    pub fn output_digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        for (name, blob) in &self.outputs {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(blob.digest.as_bytes());
            h.update(&[0]);
        }
        h.finalize().to_hex().to_string()
    }
}

/// Sizes of what the store holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreUsage {
    /// Number of blobs.
    pub blobs: u64,
    /// Bytes in blobs.
    pub blob_bytes: u64,
    /// Number of records (all namespaces).
    pub records: u64,
    /// Bytes in scratch dirs (training checkpoints).
    pub scratch_bytes: u64,
    /// Leftover temp files from interrupted writes.
    pub temp_files: u64,
}

/// What `gc` removed (or would remove with `dry_run`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Records removed.
    pub records: u64,
    /// Blobs removed.
    pub blobs: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Temp files, scratch dirs and quarantined files removed.
    pub other: u64,
}

/// The cache store rooted at one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Blob path → digest of the bytes last verified there, by stat.
    verified: Arc<FileHasher>,
    /// Whether a damaged entry is moved to `quarantine/` (false for `plan`, which writes
    /// nothing: the entry is only reported and treated as a miss).
    repair: bool,
}

/// Record namespaces.
pub const STAGES: &str = "stages";
/// Per-item records (e.g. one preprocessed image).
pub const ITEMS: &str = "items";

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, CacheError> {
        for sub in [
            "blobs",
            "records/stages",
            "records/items",
            "locks",
            "scratch",
        ] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Store::at(root))
    }

    /// Opens the existing store at `root` without creating anything. `None` if absent.
    pub fn open_existing(root: &Path) -> Option<Store> {
        root.join("records").is_dir().then(|| Store::at(root))
    }

    fn at(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            verified: Arc::new(FileHasher::with_memo(root.join(BLOB_MEMO))),
            repair: true,
        }
    }

    /// This store, looking only: a damaged entry is a miss and a warning, but nothing is moved
    /// and the verification memo is not saved.
    pub fn without_repair(mut self) -> Store {
        self.repair = false;
        self
    }

    /// Saves what was verified this session, so the next one does not re-hash it.
    pub fn save_memo(&self) {
        if !self.repair {
            return;
        }
        if let Err(e) = self.verified.save() {
            tracing::warn!(
                "could not save {}: {e}",
                self.root.join(BLOB_MEMO).display()
            );
        }
    }

    /// Whether the blob is present and its bytes hash to its digest (through the stat memo).
    /// A blob that does not is quarantined (when repairing) and reported once.
    pub fn blob_intact(&self, blob: &BlobRef) -> bool {
        let path = self.blob_path(&blob.digest);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == blob.size => {}
            Ok(m) => {
                self.damaged(
                    &path,
                    &format!("{} bytes where {} were stored", m.len(), blob.size),
                );
                return false;
            }
            Err(_) => return false,
        }
        match self.verified.hash_file(&path) {
            Ok(digest) if digest == blob.digest => true,
            Ok(_) => {
                self.damaged(
                    &path,
                    "its bytes no longer hash to its name (edited, or bit rot)",
                );
                false
            }
            Err(e) => {
                tracing::warn!("cannot read cached blob {}: {e}", path.display());
                false
            }
        }
    }

    /// Reports a damaged cache file and, when repairing, moves it to `quarantine/`.
    fn damaged(&self, path: &Path, what: &str) {
        if !self.repair {
            tracing::warn!(
                "cache file {} is damaged: {what}; the next run recomputes it",
                path.display()
            );
            return;
        }
        let name = format!(
            "{}-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let dest = self.root.join(QUARANTINE).join(name);
        let moved = std::fs::create_dir_all(self.root.join(QUARANTINE))
            .and_then(|()| std::fs::rename(path, &dest));
        match moved {
            Ok(()) => tracing::warn!(
                "cache file {} is damaged: {what}; moved to {} and recomputed",
                path.display(),
                dest.display()
            ),
            // Another process may have moved it already.
            Err(e) if !path.exists() => {
                tracing::debug!("{} already moved: {e}", path.display())
            }
            Err(e) => tracing::warn!(
                "cache file {} is damaged: {what}; it could not be moved aside ({e})",
                path.display()
            ),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let prefix = digest.get(..2).unwrap_or("00");
        self.root.join("blobs").join(prefix).join(digest)
    }

    /// Stores `bytes` and returns its reference (a no-op if already present).
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<BlobRef, CacheError> {
        let digest = blake3::hash(bytes).to_hex().to_string();
        let blob = BlobRef {
            digest,
            size: bytes.len() as u64,
        };
        let path = self.blob_path(&blob.digest);
        // A damaged blob of the same name is quarantined here and written again.
        if path.exists() && self.blob_intact(&blob) {
            return Ok(blob);
        }
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        tmp.write_all(bytes).map_err(io_err(&path))?;
        tmp.as_file().sync_all().map_err(io_err(&path))?;
        set_readonly(tmp.path());
        tmp.persist(&path).map_err(|e| CacheError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        sync_dir(&dir).map_err(io_err(&dir))?;
        self.verified.remember(&path, &blob.digest);
        Ok(blob)
    }

    /// Stores the content of the file at `src`.
    pub fn put_file(&self, src: &Path) -> Result<BlobRef, CacheError> {
        let bytes = std::fs::read(src).map_err(io_err(src))?;
        self.put_bytes(&bytes)
    }

    /// Reads a blob, checking its size and digest.
    pub fn read_blob(&self, blob: &BlobRef) -> Result<Vec<u8>, CacheError> {
        let path = self.blob_path(&blob.digest);
        let mut bytes = Vec::with_capacity(blob.size as usize);
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io_err(&path))?;
        if bytes.len() as u64 != blob.size || blake3::hash(&bytes).to_hex().as_str() != blob.digest
        {
            return Err(CacheError::Corrupt {
                path,
                reason: "content does not match its digest".into(),
            });
        }
        Ok(bytes)
    }

    fn record_path(&self, ns: &str, key: &str) -> PathBuf {
        self.root
            .join("records")
            .join(ns)
            .join(format!("{key}.json"))
    }

    /// The record of `key` in namespace `ns`, if committed and every blob it names is intact.
    /// An unreadable record or a damaged blob is a miss (and is quarantined when repairing).
    pub fn record(&self, ns: &str, key: &str) -> Result<Option<Record>, CacheError> {
        let path = self.record_path(ns, key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Io { path, source: e }),
        };
        let record: Record = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                self.damaged(&path, &format!("not a record ({e})"));
                return Ok(None);
            }
        };
        // Every blob is checked (not only up to the first damaged one), so one run repairs all.
        let damaged = record
            .outputs
            .values()
            .filter(|b| !self.blob_intact(b))
            .count();
        let intact = damaged == 0;
        Ok(intact.then_some(record))
    }

    /// Empties the scratch directory of `key` (`--force` starts training over).
    pub fn clear_scratch(&self, key: &str) -> Result<(), CacheError> {
        let path = self.root.join("scratch").join(key);
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(CacheError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Marks a record as used now (for age-based gc). Best effort.
    pub fn touch(&self, ns: &str, key: &str) {
        let path = self.record_path(ns, key);
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Commits `record` under `key`: the last write of a computation.
    pub fn put_record(&self, ns: &str, key: &str, record: &Record) -> Result<(), CacheError> {
        let path = self.record_path(ns, key);
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| CacheError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        atomic_write(&path, &bytes).map_err(io_err(&path))
    }

    /// Takes the lock of `key`; `on_wait` is told who holds it if we must wait.
    pub fn lock(&self, key: &str, on_wait: impl FnOnce(&str)) -> Result<KeyLock, CacheError> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        KeyLock::acquire(&path, on_wait).map_err(io_err(&path))
    }

    /// The store-wide lock, shared: held by a run from start to end.
    pub fn use_lock(&self, on_wait: impl FnOnce()) -> Result<StoreLock, CacheError> {
        let path = self.root.join("locks").join(STORE_LOCK);
        StoreLock::shared(&path, on_wait).map_err(io_err(&path))
    }

    /// The store-wide lock, exclusive: held by `cache gc` while it deletes.
    pub fn gc_lock(&self, on_wait: impl FnOnce()) -> Result<StoreLock, CacheError> {
        let path = self.root.join("locks").join(STORE_LOCK);
        StoreLock::exclusive(&path, on_wait).map_err(io_err(&path))
    }

    /// The scratch directory of `key` (created), for checkpoints of long stages.
    pub fn scratch(&self, key: &str) -> Result<PathBuf, CacheError> {
        let path = self.root.join("scratch").join(key);
        std::fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(path)
    }

    /// Path of the hash memo.
    pub fn memo_path(&self) -> PathBuf {
        self.root.join("hash-memo.json")
    }

    /// Counts what the store holds.
    pub fn usage(&self) -> StoreUsage {
        let mut u = StoreUsage::default();
        for entry in walk(&self.root.join("blobs")) {
            if is_temp(&entry) {
                u.temp_files += 1;
            } else {
                u.blobs += 1;
                u.blob_bytes += file_size(&entry);
            }
        }
        for entry in walk(&self.root.join("records")) {
            if is_temp(&entry) {
                u.temp_files += 1;
            } else {
                u.records += 1;
            }
        }
        u.scratch_bytes = walk(&self.root.join("scratch"))
            .iter()
            .map(|p| file_size(p))
            .sum();
        u
    }

    /// Removes records that are neither in `roots` nor used within `max_age`, then every blob
    /// no remaining record references, leftover temp files and scratch dirs of finished keys.
    /// Hold [`Store::gc_lock`] while calling it (and while reading `roots`) unless `dry_run`.
    pub fn gc(
        &self,
        roots: &BTreeSet<String>,
        max_age: Duration,
        dry_run: bool,
    ) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        let now = SystemTime::now();
        let old = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > max_age)
                .unwrap_or(true)
        };
        let mut live = BTreeSet::new();
        let mut finished = BTreeSet::new();
        let mut items: Vec<(PathBuf, Record)> = Vec::new();
        for ns in [STAGES, ITEMS] {
            for path in walk(&self.root.join("records").join(ns)) {
                if is_temp(&path) {
                    continue;
                }
                let key = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let record: Option<Record> = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                let Some(record) = record else {
                    report.records += 1;
                    remove(&path, dry_run);
                    continue;
                };
                if ns == ITEMS {
                    items.push((path, record));
                    continue;
                }
                if roots.contains(&key) || !old(&path) {
                    live.extend(record.outputs.values().map(|b| b.digest.clone()));
                    finished.insert(key);
                } else {
                    report.records += 1;
                    remove(&path, dry_run);
                }
            }
        }
        // Per-item records live while a kept stage uses their blobs, or while young.
        for (path, record) in items {
            let used = record.outputs.values().all(|b| live.contains(&b.digest));
            if used || !old(&path) {
                live.extend(record.outputs.values().map(|b| b.digest.clone()));
            } else {
                report.records += 1;
                remove(&path, dry_run);
            }
        }
        let hour = Duration::from_secs(3600);
        for path in walk(&self.root.join("blobs")) {
            let name = path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if is_temp(&path) {
                let stale = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() > hour)
                    .unwrap_or(true);
                if stale {
                    report.other += 1;
                    remove(&path, dry_run);
                }
            } else if !live.contains(&name) {
                report.blobs += 1;
                report.bytes += file_size(&path);
                remove(&path, dry_run);
            }
        }
        for path in walk(&self.root.join(QUARANTINE)) {
            if old(&path) {
                report.other += 1;
                report.bytes += file_size(&path);
                remove(&path, dry_run);
            }
        }
        if let Ok(dirs) = std::fs::read_dir(self.root.join("scratch")) {
            for dir in dirs.flatten() {
                let key = dir.file_name().to_string_lossy().into_owned();
                let path = dir.path();
                if finished.contains(&key) || (!roots.contains(&key) && old(&path)) {
                    report.other += 1;
                    report.bytes += walk(&path).iter().map(|p| file_size(p)).sum::<u64>();
                    if !dry_run {
                        let _ = std::fs::remove_dir_all(&path);
                    }
                }
            }
        }
        Ok(report)
    }

    /// Re-hashes every blob that a record references (ignoring the memo: this is what finds bit
    /// rot); returns one line per problem. Damaged blobs and records are quarantined when
    /// repairing, so the next run recomputes them.
    pub fn verify(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut checked = BTreeSet::new();
        for ns in [STAGES, ITEMS] {
            for path in walk(&self.root.join("records").join(ns)) {
                if is_temp(&path) {
                    continue;
                }
                let record: Result<Record, String> = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
                match record {
                    Err(e) => {
                        problems.push(format!("{}: unreadable record: {e}", path.display()));
                        self.damaged(&path, "unreadable record");
                    }
                    Ok(record) => {
                        for (name, blob) in &record.outputs {
                            if !checked.insert(blob.digest.clone()) {
                                continue;
                            }
                            match self.read_blob(blob) {
                                Ok(_) => self
                                    .verified
                                    .remember(&self.blob_path(&blob.digest), &blob.digest),
                                Err(e) => {
                                    problems.push(format!("{} ({name}): {e}", path.display()));
                                    if let CacheError::Corrupt { path, .. } = &e {
                                        self.damaged(path, "content does not match its digest");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        self.save_memo();
        problems
    }
}

/// The store-wide lock's file name under `locks/`.
const STORE_LOCK: &str = "store.lock";
/// The verification memo's file name under the store root.
const BLOB_MEMO: &str = "blob-memo.json";
/// Where damaged blobs and records are moved.
pub const QUARANTINE: &str = "quarantine";

fn set_readonly(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mut perms = meta.permissions();
        perms.set_readonly(true);
        let _ = std::fs::set_permissions(path, perms);
    }
}

fn is_temp(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn remove(path: &Path, dry_run: bool) {
    if !dry_run {
        let _ = std::fs::remove_file(path);
    }
}

/// Every file under `dir`, recursively (missing dir = none).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, outputs: BTreeMap<String, BlobRef>) -> Record {
        Record {
            key: key.into(),
            kind: "test".into(),
            stage: "t".into(),
            material: None,
            outputs,
            stats: serde_json::Value::Null,
            summary: String::new(),
            created_unix: 0,
            duration_s: 0.0,
            tool_version: "0".into(),
        }
    }

    #[test]
    fn blobs_round_trip_and_records_need_their_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = store.put_bytes(b"hello").unwrap();
        assert_eq!(store.read_blob(&blob).unwrap(), b"hello");
        let mut outputs = BTreeMap::new();
        outputs.insert("a.txt".to_string(), blob.clone());
        store
            .put_record(STAGES, "k1", &record("k1", outputs))
            .unwrap();
        assert!(store.record(STAGES, "k1").unwrap().is_some());
        // A record whose blob vanished is not a valid entry.
        let path = store.blob_path(&blob.digest);
        std::fs::remove_file(&path).unwrap();
        assert!(store.record(STAGES, "k1").unwrap().is_none());
    }

    #[test]
    fn gc_keeps_roots_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.put_bytes(b"a").unwrap();
        let b = store.put_bytes(b"b").unwrap();
        store
            .put_record(
                STAGES,
                "ka",
                &record("ka", [("a".to_string(), a.clone())].into()),
            )
            .unwrap();
        store
            .put_record(
                STAGES,
                "kb",
                &record("kb", [("b".to_string(), b.clone())].into()),
            )
            .unwrap();
        let roots: BTreeSet<String> = ["ka".to_string()].into();
        let dry = store.gc(&roots, Duration::ZERO, true).unwrap();
        assert_eq!((dry.records, dry.blobs), (1, 1));
        assert!(
            store.record(STAGES, "kb").unwrap().is_some(),
            "dry run removes nothing"
        );
        store.gc(&roots, Duration::ZERO, false).unwrap();
        assert!(store.record(STAGES, "ka").unwrap().is_some());
        assert!(store.record(STAGES, "kb").unwrap().is_none());
        assert!(!store.blob_path(&b.digest).exists());
        assert!(store.verify().is_empty());
    }
}
