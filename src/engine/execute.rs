//! Running a pipeline: stages in topological order, each either taken from the cache or
//! computed under its key's lock and committed; a failure skips only its dependents (or stops
//! everything with `fail_fast`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use super::material::stage_material;
use super::outputs::{Failure, LockEntry, publish, published_intact, update_lock};
use super::workspace::Workspace;
use crate::cache::store::STAGES;
use crate::cache::{FileHasher, Record, Store, atomic_write};
use crate::control::CancelToken;
use crate::control::Progress;
use crate::control::error_chain::{describe_anyhow, is_environment_failure};
use crate::pipeline::Pipeline;
use crate::stages::{Cancelled, StageContext};

/// The stage running now and its cancel token (watch cancels it when its key changes).
pub type RunningSlot = Arc<Mutex<Option<(String, String, CancelToken)>>>;

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stages (instance or base names) to recompute even if cached.
    pub force: BTreeSet<String>,
    /// Stop at the first failure instead of finishing independent branches.
    pub fail_fast: bool,
    /// Where the running stage is published (for `watch`).
    pub running: Option<RunningSlot>,
    /// Stages `watch` found invalidated while this run was going: not started if not yet.
    pub invalidated: Option<Arc<Mutex<BTreeSet<String>>>>,
    /// `watch`: check each run's train stages against the available memory first and skip a
    /// run that will not fit (`run` checks once, before calling [`execute`]).
    pub memory_check: bool,
    /// A pause at each yield point of every stage (see [`CancelToken::with_pause`]); the CLI
    /// sets it from `SDPIPE_TEST_ITEM_DELAY_MS`, which tests use to interrupt stages mid-way.
    pub pause: Option<std::time::Duration>,
}

/// What happened to one stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "status", content = "detail")]
pub enum Outcome {
    /// Computed now.
    Computed,
    /// Taken from the cache.
    Cached,
    /// Failed with this error.
    Failed(String),
    /// Not run because an upstream stage failed or was cancelled.
    Skipped(String),
    /// Stopped (Ctrl-C or watch).
    Cancelled,
    /// Not run (fail-fast or interrupted before it).
    NotRun,
}

/// One stage of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageOutcome {
    /// Instance name.
    pub stage: String,
    /// Kind.
    pub kind: String,
    /// What happened.
    pub outcome: Outcome,
    /// Its key, when computed.
    pub key: Option<String>,
    /// Wall time spent on it now.
    pub duration_s: f64,
    /// The stage's one-line summary.
    pub summary: String,
    /// The friendly outputs folder.
    pub outputs: Option<PathBuf>,
    /// Figures of the computation.
    pub stats: serde_json::Value,
    /// Resolved parameters.
    pub params: serde_json::Value,
    /// Output digest.
    pub output_digest: Option<String>,
    /// The failure was the machine's (a full disk, a read-only folder), not the stage's: the
    /// run exits 3, and rerunning once it is fixed resumes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub environment_failure: bool,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Pipeline name.
    pub pipeline: String,
    /// The pipeline file.
    pub file: PathBuf,
    /// sdpipe version.
    pub tool_version: String,
    /// Seconds since the epoch at start.
    pub started_unix: u64,
    /// Total wall time.
    pub duration_s: f64,
    /// Per stage, in run order.
    pub stages: Vec<StageOutcome>,
}

impl RunReport {
    /// Whether any stage failed (or was skipped/cancelled because of one).
    pub fn failed(&self) -> bool {
        self.stages
            .iter()
            .any(|s| !matches!(s.outcome, Outcome::Computed | Outcome::Cached))
    }

    /// Whether a stage failed because of the machine (full disk, read-only folder): exit 3.
    pub fn environment_failed(&self) -> bool {
        self.stages.iter().any(|s| s.environment_failure)
    }

    /// Whether the run was interrupted.
    pub fn cancelled(&self) -> bool {
        self.stages.iter().any(|s| s.outcome == Outcome::Cancelled)
    }
}

/// Runs `pipeline` with its cache and outputs in `ws`.
pub fn execute(
    pipeline: &Pipeline,
    ws: &Workspace,
    opts: &RunOptions,
    progress: &Progress,
    cancel: &CancelToken,
) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    let store = Store::open(&ws.cache_root)?;
    // Held to the end: `cache gc` waits instead of deleting blobs not yet committed.
    let _in_use = store.use_lock(|| {
        progress.message("waiting for `sdpipe cache gc` to finish with the cache");
    })?;
    let hasher = FileHasher::with_memo(store.memo_path());
    let out_dir = ws.pipeline_outputs(pipeline.name());
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let previous = super::outputs::RunLock::load(&out_dir);

    let mut records: HashMap<String, Record> = HashMap::new();
    let mut broken: BTreeMap<String, String> = BTreeMap::new();
    let mut outcomes = Vec::new();
    let mut stop = false;

    for instance in &pipeline.stages {
        let mut outcome = StageOutcome {
            stage: instance.name.clone(),
            kind: instance.params.kind().into(),
            outcome: Outcome::NotRun,
            key: None,
            duration_s: 0.0,
            summary: String::new(),
            outputs: None,
            stats: serde_json::Value::Null,
            params: serde_json::to_value(&instance.params).unwrap_or_default(),
            output_digest: None,
            environment_failure: false,
        };
        if stop || cancel.is_cancelled() {
            outcomes.push(outcome);
            continue;
        }
        let invalidated = opts.invalidated.as_ref().is_some_and(|i| {
            i.lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&instance.name)
        });
        if invalidated {
            outcome.outcome = Outcome::Cancelled;
            broken.insert(instance.name.clone(), "changed".into());
            outcomes.push(outcome);
            continue;
        }
        if let Some(bad) = instance.needs.iter().find(|n| broken.contains_key(*n)) {
            outcome.outcome = Outcome::Skipped(format!("upstream {bad} did not finish"));
            broken.insert(instance.name.clone(), "skipped".into());
            outcomes.push(outcome);
            continue;
        }
        let stage_started = Instant::now();
        let upstream: BTreeMap<String, String> = instance
            .needs
            .iter()
            .filter_map(|n| records.get(n).map(|r| (n.clone(), r.output_digest())))
            .collect();
        let material = match stage_material(pipeline, instance, &hasher, upstream) {
            Ok(m) => m,
            Err(e) => {
                outcome.environment_failure = is_environment_failure(&e);
                outcome.outcome = Outcome::Failed(describe_anyhow(&e));
                broken.insert(instance.name.clone(), "failed".into());
                outcomes.push(outcome);
                stop = opts.fail_fast;
                continue;
            }
        };
        let key = material.key();
        outcome.key = Some(key.clone());
        let forced = opts.force.contains(&instance.name) || opts.force.contains(&instance.base);

        let mut cached = if forced {
            None
        } else {
            store.record(STAGES, &key)?
        };
        let mut _lock = None;
        if cached.is_none() {
            let short = &key[..12];
            let name = instance.name.clone();
            _lock = Some(store.lock(&key, |holder| {
                progress.message(&format!(
                    "waiting for stage {name} (key {short}): {holder} is computing it"
                ));
            })?);
            if !forced {
                cached = store.record(STAGES, &key)?;
            } else {
                // `--force` recomputes from the start, not from a training checkpoint.
                store.clear_scratch(&key)?;
            }
        }

        let record = if let Some(record) = cached {
            store.touch(STAGES, &key);
            outcome.outcome = Outcome::Cached;
            record
        } else {
            progress.message(&format!(
                "running {} ({})",
                instance.name,
                instance.params.kind()
            ));
            let token = cancel.child().with_pause(opts.pause);
            if let Some(slot) = &opts.running {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((instance.name.clone(), key.clone(), token.clone()));
            }
            let ctx = StageContext {
                settings: &pipeline.settings,
                pipeline_file: &pipeline.path,
                instance,
                key: &key,
                store: &store,
                hasher: &hasher,
                upstream: instance
                    .needs
                    .iter()
                    .filter_map(|n| Some((pipeline.stage(n)?, records.get(n)?.clone())))
                    .collect(),
                progress,
                cancel: &token,
                forced,
            };
            let result = instance.params.run(&ctx);
            if let Some(slot) = &opts.running {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            match result {
                Ok(result) => {
                    let record = Record {
                        key: key.clone(),
                        kind: instance.params.kind().into(),
                        stage: instance.name.clone(),
                        material: Some(material.clone()),
                        outputs: result.outputs,
                        stats: serde_json::Value::Object(result.stats),
                        summary: result.summary,
                        created_unix: now_unix(),
                        duration_s: stage_started.elapsed().as_secs_f64(),
                        tool_version: env!("CARGO_PKG_VERSION").into(),
                    };
                    store.put_record(STAGES, &key, &record)?;
                    outcome.outcome = Outcome::Computed;
                    record
                }
                Err(e) if e.is::<Cancelled>() => {
                    outcome.outcome = Outcome::Cancelled;
                    outcome.duration_s = stage_started.elapsed().as_secs_f64();
                    broken.insert(instance.name.clone(), "cancelled".into());
                    outcomes.push(outcome);
                    continue;
                }
                Err(e) => {
                    let error = describe_anyhow(&e);
                    outcome.environment_failure = is_environment_failure(&e);
                    let failure = Failure {
                        key: key.clone(),
                        error: error.clone(),
                    };
                    let name = instance.name.clone();
                    let _ = update_lock(&out_dir, |lock| {
                        lock.failures.insert(name, failure);
                        Ok(())
                    });
                    outcome.outcome = Outcome::Failed(error);
                    outcome.duration_s = stage_started.elapsed().as_secs_f64();
                    broken.insert(instance.name.clone(), "failed".into());
                    outcomes.push(outcome);
                    stop = opts.fail_fast;
                    continue;
                }
            }
        };
        drop(_lock);

        let stage_dir = out_dir.join(crate::names::folder_name(&instance.name));
        // A published file deleted or replaced since is restored from the cache.
        let unchanged = previous
            .stages
            .get(&instance.name)
            .is_some_and(|e| e.key == key)
            && published_intact(&store, &hasher, &stage_dir, &record.outputs).is_ok();
        if !unchanged || outcome.outcome == Outcome::Computed {
            let entry = LockEntry {
                key: key.clone(),
                material,
                params: outcome.params.clone(),
                outputs: record.outputs.clone(),
                output_digest: record.output_digest(),
            };
            let name = instance.name.clone();
            update_lock(&out_dir, |lock| {
                publish(
                    &store,
                    &out_dir,
                    &name,
                    &entry.outputs,
                    lock.stages.get(&name),
                )?;
                lock.stages.insert(name.clone(), entry);
                lock.failures.remove(&name);
                Ok(())
            })?;
        }
        outcome.outputs = Some(stage_dir);
        outcome.summary = record.summary.clone();
        outcome.stats = record.stats.clone();
        outcome.output_digest = Some(record.output_digest());
        outcome.duration_s = stage_started.elapsed().as_secs_f64();
        records.insert(instance.name.clone(), record);
        outcomes.push(outcome);
    }
    if let Err(e) = hasher.save() {
        tracing::warn!("could not save the hash memo: {e}");
    }
    store.save_memo();

    let report = RunReport {
        pipeline: pipeline.name().to_string(),
        file: pipeline.path.clone(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        started_unix: now_unix().saturating_sub(started.elapsed().as_secs()),
        duration_s: started.elapsed().as_secs_f64(),
        stages: outcomes,
    };
    write_run_record(&out_dir, &report)?;
    Ok(report)
}

/// Writes `runs/<time>-<pid>-<n>.json` and `last-run.json`, keeping the 20 newest runs.
fn write_run_record(out_dir: &std::path::Path, report: &RunReport) -> anyhow::Result<()> {
    let runs = out_dir.join("runs");
    let bytes = serde_json::to_vec_pretty(report)?;
    // Several runs may start within a second (watch): a per-process sequence keeps names unique.
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(
        "{}-{}-{seq:04}.json",
        report.started_unix,
        std::process::id()
    );
    atomic_write(&runs.join(name), &bytes)
        .with_context(|| format!("cannot write a run record in {}", runs.display()))?;
    atomic_write(&out_dir.join("last-run.json"), &bytes)?;
    if let Ok(entries) = std::fs::read_dir(&runs) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        let excess = files.len().saturating_sub(20);
        for old in files.into_iter().take(excess) {
            let _ = std::fs::remove_file(old);
        }
    }
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
