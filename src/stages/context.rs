//! What a running stage sees: its instance, the store, its upstream records, progress and
//! cancellation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::cache::{BlobRef, FileHasher, Record, Store};
use crate::control::{CancelToken, Progress};
use crate::settings::PipelineSettings;

use super::StageInstance;

pub use crate::control::Cancelled;

/// Everything a stage run can use.
pub struct StageContext<'a> {
    /// The `[pipeline]` settings.
    pub settings: &'a PipelineSettings,
    /// The pipeline file (absolute).
    pub pipeline_file: &'a Path,
    /// The instance being run.
    pub instance: &'a StageInstance,
    /// Its key.
    pub key: &'a str,
    /// The cache store.
    pub store: &'a Store,
    /// Hasher with the stat memo.
    pub hasher: &'a FileHasher,
    /// Records of the instances it needs, in `needs` order.
    pub upstream: Vec<(&'a StageInstance, Record)>,
    /// Progress display.
    pub progress: &'a Progress,
    /// Set when the stage should stop (Ctrl-C, or `watch` saw its key change).
    pub cancel: &'a CancelToken,
    /// `--force`: per-item results are recomputed too, not reused.
    pub forced: bool,
}

impl StageContext<'_> {
    /// The one upstream instance of `kind` and its record.
    pub fn upstream_of_kind(&self, kind: &str) -> anyhow::Result<(&StageInstance, &Record)> {
        self.upstream
            .iter()
            .find(|(i, _)| i.params.kind() == kind)
            .map(|(i, r)| (*i, r))
            .with_context(|| format!("stage `{}` needs a `{kind}` stage", self.instance.name))
    }

    /// Reads and parses the JSON output `name` of an upstream record.
    pub fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        record: &Record,
        name: &str,
    ) -> anyhow::Result<T> {
        let blob = record
            .outputs
            .get(name)
            .with_context(|| format!("upstream stage `{}` has no output `{name}`", record.stage))?;
        let bytes = self.store.read_blob(blob)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("reading `{name}` of stage `{}`", record.stage))
    }

    /// The per-item record of `key` (one image, one latent, one grid cell), or `None` to
    /// compute it: absent, damaged, or the stage is forced.
    pub fn item_record(&self, key: &str) -> Result<Option<Record>, crate::cache::CacheError> {
        if self.forced {
            return Ok(None);
        }
        self.store.record(crate::cache::store::ITEMS, key)
    }

    /// The lock of one item's key, for work two runs may share (a grid cell, a class image):
    /// the second waits, then finds the first one's record instead of computing it again.
    pub fn item_lock(&self, key: &str) -> Result<crate::cache::KeyLock, crate::cache::CacheError> {
        let stage = &self.instance.name;
        self.store.lock(key, |holder| {
            self.progress.message(&format!(
                "{stage}: waiting for {holder}, which is computing the same item"
            ));
        })
    }

    /// Fails with [`Cancelled`] if the stage should stop.
    pub fn check_cancelled(&self) -> anyhow::Result<()> {
        Ok(self.cancel.check()?)
    }

    /// The scratch directory of this key (for checkpoints).
    pub fn scratch(&self) -> anyhow::Result<PathBuf> {
        Ok(self.store.scratch(self.key)?)
    }
}

/// A finished stage: its output files, figures for the record and a line for the summary.
#[derive(Debug, Default)]
pub struct StageResult {
    /// Output files: relative name → blob.
    pub outputs: BTreeMap<String, BlobRef>,
    /// Figures kept in the record (e.g. items computed / reused).
    pub stats: serde_json::Map<String, serde_json::Value>,
    /// One line for the summary table.
    pub summary: String,
}
