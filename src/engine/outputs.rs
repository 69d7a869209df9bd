//! What a run leaves under `outputs/<pipeline>/`: the run lock (last successful key, material
//! and outputs of every stage, read by `plan`), one record per run, and friendly paths
//! `outputs/<pipeline>/<stage>/…` to the current artifacts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::cache::{BlobRef, KeyLock, KeyMaterial, Store, atomic_write};

/// File name of the run lock.
pub const LOCK_FILE: &str = "sdpipe.lock.json";

/// `outputs/<pipeline>/sdpipe.lock.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunLock {
    /// sdpipe version that last wrote it.
    pub tool_version: String,
    /// Per stage instance: its last successful result.
    pub stages: BTreeMap<String, LockEntry>,
    /// Per stage instance: the last attempt, if it failed.
    #[serde(default)]
    pub failures: BTreeMap<String, Failure>,
}

/// The last result of one stage instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockEntry {
    /// Key of the last successful result.
    pub key: String,
    /// Its key material.
    pub material: KeyMaterial,
    /// The resolved parameters (with paths).
    pub params: serde_json::Value,
    /// Its outputs.
    pub outputs: BTreeMap<String, BlobRef>,
    /// The digest downstream keys chain on.
    pub output_digest: String,
}

/// A failed attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    /// The key that failed.
    pub key: String,
    /// The error.
    pub error: String,
}

impl RunLock {
    /// Reads the lock of the pipeline whose outputs are in `dir` (missing = empty).
    pub fn load(dir: &Path) -> RunLock {
        std::fs::read(dir.join(LOCK_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Every key named by the run locks under `outputs_root` (the gc roots).
    pub fn all_keys(outputs_root: &Path) -> std::collections::BTreeSet<String> {
        let mut keys = std::collections::BTreeSet::new();
        if let Ok(dirs) = std::fs::read_dir(outputs_root) {
            for d in dirs.flatten() {
                let lock = RunLock::load(&d.path());
                keys.extend(lock.stages.into_values().map(|e| e.key));
            }
        }
        keys
    }
}

/// Read-modify-write of the run lock of `dir`, serialised between processes.
pub fn update_lock(
    dir: &Path,
    f: impl FnOnce(&mut RunLock) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _guard = KeyLock::acquire(&dir.join(".sdpipe.lock.lock"), |_| {})
        .with_context(|| format!("cannot lock {}", dir.display()))?;
    let mut lock = RunLock::load(dir);
    f(&mut lock)?;
    lock.tool_version = env!("CARGO_PKG_VERSION").into();
    let bytes = serde_json::to_vec_pretty(&lock)?;
    atomic_write(&dir.join(LOCK_FILE), &bytes)
        .with_context(|| format!("cannot write {}", dir.join(LOCK_FILE).display()))
}

/// Call inside [`update_lock`], which serialises it between processes.
///
/// Makes `dir/<stage>/` hold exactly `outputs` (hard links to the blobs, copies where links
/// fail). The new folder is built beside the old one and renamed over it.
pub fn publish(
    store: &Store,
    dir: &Path,
    stage: &str,
    outputs: &BTreeMap<String, BlobRef>,
) -> anyhow::Result<PathBuf> {
    let target = dir.join(stage);
    let staging = dir.join(format!(".{stage}.new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    for (name, blob) in outputs {
        let dest = staging.join(name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let src = store.blob_path(&blob.digest);
        if std::fs::hard_link(&src, &dest).is_err() {
            std::fs::copy(&src, &dest)
                .with_context(|| format!("cannot copy {} to {}", src.display(), dest.display()))?;
        }
    }
    std::fs::create_dir_all(&staging)?;
    let old = dir.join(format!(".{stage}.old-{}", std::process::id()));
    if target.exists() {
        std::fs::rename(&target, &old)
            .with_context(|| format!("cannot replace {}", target.display()))?;
    }
    std::fs::rename(&staging, &target)
        .with_context(|| format!("cannot write {}", target.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(target)
}
