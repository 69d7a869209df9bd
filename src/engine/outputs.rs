//! What a run leaves under `outputs/<pipeline>/`: the run lock (last successful key, material
//! and outputs of every stage, read by `plan`), one record per run, and friendly paths
//! `outputs/<pipeline>/<stage>/…` to the current artifacts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::cache::{BlobRef, FileHasher, KeyLock, KeyMaterial, Store, atomic_write};
use crate::names::{check_output_name, folder_name};

/// File name of the run lock.
pub const LOCK_FILE: &str = "sdpipe.lock.json";
/// The file locked while the run lock or a stage folder of the pipeline is written.
const RUN_LOCK_LOCK: &str = ".sdpipe.lock.lock";

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
    let _guard = KeyLock::acquire(&dir.join(RUN_LOCK_LOCK), |_| {})
        .with_context(|| format!("cannot lock {}", dir.display()))?;
    let mut lock = RunLock::load(dir);
    f(&mut lock)?;
    lock.tool_version = env!("CARGO_PKG_VERSION").into();
    let bytes = serde_json::to_vec_pretty(&lock)?;
    atomic_write(&dir.join(LOCK_FILE), &bytes)
        .with_context(|| format!("cannot write {}", dir.join(LOCK_FILE).display()))
}

/// The file in every published stage folder that lists what sdpipe put there: publishing
/// replaces a folder only when it holds nothing else.
pub const MARKER_FILE: &str = ".sdpipe-outputs.json";

/// Contents of [`MARKER_FILE`].
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The stage instance.
    stage: String,
    /// Relative names of the files published.
    files: Vec<String>,
}

/// Call inside [`update_lock`], which serialises it between processes.
///
/// Makes `dir/<stage folder>/` hold exactly `outputs` (hard links to the blobs, copies where
/// links fail). The new folder is built beside the old one and renamed over it. An existing
/// folder is replaced only when everything in it was published by sdpipe (its marker file,
/// or `previous`, the run lock's entry, lists it): a folder of the user's is never touched.
pub fn publish(
    store: &Store,
    dir: &Path,
    stage: &str,
    outputs: &BTreeMap<String, BlobRef>,
    previous: Option<&LockEntry>,
) -> anyhow::Result<PathBuf> {
    let folder = folder_name(stage);
    let target = dir.join(&folder);
    for name in outputs.keys() {
        check_output_name(name).map_err(|e| anyhow::anyhow!("stage {stage}: {e}"))?;
    }
    check_replaceable(&target, previous)?;
    sweep_staging_in(dir, false);
    let staging = dir.join(format!(".{folder}.new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
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
    let marker = Marker {
        stage: stage.to_string(),
        files: outputs.keys().cloned().collect(),
    };
    atomic_write(
        &staging.join(MARKER_FILE),
        &serde_json::to_vec_pretty(&marker)?,
    )?;
    let old = dir.join(format!(".{folder}.old-{}", std::process::id()));
    if target.symlink_metadata().is_ok() {
        std::fs::rename(&target, &old)
            .with_context(|| format!("cannot replace {}", target.display()))?;
    }
    std::fs::rename(&staging, &target)
        .with_context(|| format!("cannot write {}", target.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(target)
}

/// Whether `name` is one of publish's own temporary folders: `.<folder>.new-<pid>` (being
/// built) or `.<folder>.old-<pid>` (being replaced).
fn is_staging_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    [".new-", ".old-"].iter().any(|tag| {
        rest.rsplit_once(tag).is_some_and(|(folder, pid)| {
            !folder.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

/// Removes publish's temporary folders left in the pipeline folder `dir` by a process that
/// died mid-publish; returns how many. Call holding the run lock of `dir` (publish does all
/// its work under it, so any such folder seen then is stale).
fn sweep_staging_in(dir: &Path, dry_run: bool) -> u64 {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_staging_name(&name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            removed += 1;
            if !dry_run {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    removed
}

/// `sweep_staging_in` for every pipeline folder under `outputs_root` (those holding a run
/// lock), each under its lock; returns how many folders were (or would be) removed.
pub fn sweep_stale_staging(outputs_root: &Path, dry_run: bool) -> u64 {
    let mut removed = 0;
    for entry in std::fs::read_dir(outputs_root)
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = entry.path();
        if !dir.join(LOCK_FILE).is_file() {
            continue;
        }
        if let Ok(_guard) = KeyLock::acquire(&dir.join(RUN_LOCK_LOCK), |_| {}) {
            removed += sweep_staging_in(&dir, dry_run);
        }
    }
    removed
}

/// Whether `stage_dir` still holds every output as it was published: each file the blob
/// itself (same device and inode: the hard link publish made) or, for a copy, bytes that hash
/// to the blob's digest (through the stat memo). `Err` names the first file deleted or
/// changed: the run publishes the folder again, restoring it from the cache.
pub fn published_intact(
    store: &Store,
    hasher: &FileHasher,
    stage_dir: &Path,
    outputs: &BTreeMap<String, BlobRef>,
) -> Result<(), PathBuf> {
    for (name, blob) in outputs {
        let file = stage_dir.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&file) else {
            return Err(file);
        };
        if !meta.is_file() || meta.len() != blob.size {
            return Err(file);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let Ok(b) = std::fs::metadata(store.blob_path(&blob.digest))
                && (b.dev(), b.ino()) == (meta.dev(), meta.ino())
            {
                continue;
            }
        }
        if hasher.hash_file(&file).ok().as_deref() != Some(blob.digest.as_str()) {
            return Err(file);
        }
    }
    Ok(())
}

/// Refuses to replace `target` unless it is absent or a folder holding only what sdpipe
/// published there.
fn check_replaceable(target: &Path, previous: Option<&LockEntry>) -> anyhow::Result<()> {
    let Ok(meta) = target.symlink_metadata() else {
        return Ok(());
    };
    if !meta.is_dir() {
        anyhow::bail!(
            "{} exists and is not a folder sdpipe wrote ({}); move it away, or rename the stage",
            target.display(),
            if meta.is_symlink() {
                "a symbolic link"
            } else {
                "a file"
            }
        );
    }
    let mut ours: std::collections::BTreeSet<String> = previous
        .map(|e| e.outputs.keys().cloned().collect())
        .unwrap_or_default();
    let marker = std::fs::read(target.join(MARKER_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Marker>(&b).ok());
    if let Some(m) = &marker {
        ours.extend(m.files.iter().cloned());
    }
    let mut found = Vec::new();
    list_files(target, "", &mut found)
        .with_context(|| format!("cannot read {}", target.display()))?;
    let foreign: Vec<&String> = found
        .iter()
        .filter(|f| f.as_str() != MARKER_FILE && !ours.contains(*f))
        .collect();
    if !foreign.is_empty() {
        let shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
        anyhow::bail!(
            "{} holds {} file(s) sdpipe did not write ({}{}); it will not replace a folder it \
             did not create: move them away, or rename the stage",
            target.display(),
            foreign.len(),
            shown.join(", "),
            if foreign.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Appends the relative paths (with `/`) of every file and symbolic link under `dir`.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.file_type()?.is_dir() {
            list_files(&entry.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_publish_temporaries_are_swept() {
        for name in [".class.new-123", ".grid@seed=1.old-9", "..x.new-1"] {
            assert!(is_staging_name(name), "{name}");
        }
        for name in [
            "class",
            ".class",
            ".class.new-",
            ".class.new-12a",
            ".new-12",
            "x.new-1",
        ] {
            assert!(!is_staging_name(name), "{name}");
        }
    }
}
