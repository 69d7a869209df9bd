//! `plan`: each stage instance as fresh or stale, with the reason, writing nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::material::stage_material;
use super::outputs::{LockEntry, RunLock, published_intact};
use super::workspace::Workspace;
use crate::cache::{FileHasher, KeyMaterial, Store, store::STAGES};
use crate::names::folder_name;
use crate::pipeline::{Pipeline, StageInstance};
use crate::stages::input_noun;

/// The status of one instance in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanStatus {
    /// Its key is in the cache: nothing to do.
    Fresh,
    /// It will run.
    Stale,
    /// It will run because of `--force`.
    Forced,
    /// The last attempt at this same key failed; it will run again.
    Failed,
    /// Its key cannot be computed (an input cannot be read).
    Error,
}

/// One line of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    /// Instance name.
    pub stage: String,
    /// Its kind.
    pub kind: String,
    /// Fresh, stale, ...
    pub status: PlanStatus,
    /// Why, in words (`caption.template "a" → "b"; 2 images added`).
    pub reason: String,
    /// The key when it can be known before running (upstream fresh).
    pub key: Option<String>,
}

/// The stages of a plan that will compute (everything not fresh).
pub fn stages_to_run(entries: &[PlanEntry]) -> std::collections::BTreeSet<&str> {
    entries
        .iter()
        .filter(|e| e.status != PlanStatus::Fresh)
        .map(|e| e.stage.as_str())
        .collect()
}

/// Plans `pipeline` against the cache and run lock of `ws` without writing anything: the
/// cache is not created and the hash memo is read but never saved.
pub fn plan_readonly(
    pipeline: &Pipeline,
    ws: &Workspace,
    force: &BTreeSet<String>,
) -> Vec<PlanEntry> {
    let store = Store::open_existing(&ws.cache_root).map(Store::without_repair);
    let hasher = match &store {
        Some(s) => FileHasher::with_memo(s.memo_path()),
        None => FileHasher::without_memo(),
    };
    let out_dir = ws.pipeline_outputs(pipeline.name());
    let lock = RunLock::load(&out_dir);
    plan(pipeline, store.as_ref(), &hasher, &lock, &out_dir, force)
}

/// Plans `pipeline` against the cache (`store`, if it exists), the last run lock and what is
/// published in `out_dir`.
pub fn plan(
    pipeline: &Pipeline,
    store: Option<&Store>,
    hasher: &FileHasher,
    previous: &RunLock,
    out_dir: &Path,
    force: &BTreeSet<String>,
) -> Vec<PlanEntry> {
    let mut entries: Vec<PlanEntry> = Vec::with_capacity(pipeline.stages.len());
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    for instance in &pipeline.stages {
        let mut known = BTreeMap::new();
        let mut stale_upstream = Vec::new();
        for need in &instance.needs {
            match digests.get(need) {
                Some(d) => {
                    known.insert(need.clone(), d.clone());
                }
                None => stale_upstream.push(need.clone()),
            }
        }
        let prev = previous.stages.get(&instance.name);
        let material = match stage_material(pipeline, instance, hasher, known) {
            Ok(m) => m,
            Err(e) => {
                entries.push(PlanEntry {
                    stage: instance.name.clone(),
                    kind: instance.params.kind().into(),
                    status: PlanStatus::Error,
                    reason: crate::control::error_chain::describe_anyhow(&e),
                    key: None,
                });
                continue;
            }
        };
        let forced = force.contains(&instance.name) || force.contains(&instance.base);
        let mut reasons = Vec::new();
        let (status, key) = if stale_upstream.is_empty() {
            let key = material.key();
            let record = store.and_then(|s| s.record(STAGES, &key).ok().flatten());
            if let (Some(record), Some(store)) = (record.filter(|_| !forced), store) {
                digests.insert(instance.name.clone(), record.output_digest());
                let stage_dir = out_dir.join(folder_name(&instance.name));
                if prev.is_some_and(|p| p.key == key)
                    && let Err(file) = published_intact(store, hasher, &stage_dir, &record.outputs)
                {
                    reasons.push(format!(
                        "{} was deleted or changed: it is restored from the cache",
                        file.display()
                    ));
                }
                (PlanStatus::Fresh, Some(key))
            } else {
                reasons = diff_reasons(instance, &material, &[], prev);
                let failed = previous
                    .failures
                    .get(&instance.name)
                    .filter(|f| f.key == key);
                if forced {
                    reasons.insert(0, "forced".into());
                    (PlanStatus::Forced, Some(key))
                } else if let Some(f) = failed {
                    let error: Vec<&str> = f
                        .error
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect();
                    reasons = vec![format!("last run failed: {}", error.join(" "))];
                    (PlanStatus::Failed, Some(key))
                } else {
                    (PlanStatus::Stale, Some(key))
                }
            }
        } else {
            reasons = diff_reasons(instance, &material, &stale_upstream, prev);
            if forced {
                reasons.insert(0, "forced".into());
            }
            (
                if forced {
                    PlanStatus::Forced
                } else {
                    PlanStatus::Stale
                },
                None,
            )
        };
        entries.push(PlanEntry {
            stage: instance.name.clone(),
            kind: instance.params.kind().into(),
            status,
            reason: reasons.join("; "),
            key,
        });
    }
    entries
}

/// Why `material` differs from the last successful run of `instance`.
fn diff_reasons(
    instance: &StageInstance,
    material: &KeyMaterial,
    stale_upstream: &[String],
    prev: Option<&LockEntry>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    let Some(prev) = prev else {
        reasons.push("never run".to_string());
        return reasons;
    };
    let old = &prev.material;
    if old.schema != material.schema {
        reasons.push(format!(
            "cache key schema {} → {}",
            old.schema, material.schema
        ));
    }
    if old.kind != material.kind {
        reasons.push(format!("kind {} → {}", old.kind, material.kind));
    } else if old.version != material.version {
        reasons.push(format!(
            "{} implementation v{} → v{}",
            material.kind, old.version, material.version
        ));
    }
    let mut before = BTreeMap::new();
    flatten(&instance.base, &old.params, &mut before);
    let mut after = BTreeMap::new();
    flatten(&instance.base, &material.params, &mut after);
    for (path, new) in &after {
        match before.get(path) {
            Some(was) if was != new => reasons.push(format!("{path} {was} → {new}")),
            None => reasons.push(format!("{path} set to {new}")),
            _ => {}
        }
    }
    for (path, was) in &before {
        if !after.contains_key(path) {
            reasons.push(format!("{path} {was} removed"));
        }
    }
    reasons.extend(input_changes(&old.inputs, &material.inputs));
    for need in &instance.needs {
        if stale_upstream.contains(need) || old.upstream.get(need) != material.upstream.get(need) {
            reasons.push(format!("upstream {need} changed"));
        }
    }
    if reasons.is_empty() {
        reasons.push("not in the cache (removed by `cache gc`?)".to_string());
    }
    reasons
}

/// `2 images added`, `1 caption file changed`, ...
fn input_changes(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let mut counts: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
    for (name, hash) in new {
        match old.get(name) {
            None => *counts.entry((input_noun(name), "added")).or_default() += 1,
            Some(h) if h != hash => *counts.entry((input_noun(name), "changed")).or_default() += 1,
            _ => {}
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            *counts.entry((input_noun(name), "removed")).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|((noun, what), n)| format!("{n} {noun}{} {what}", if n == 1 { "" } else { "s" }))
        .collect()
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_input_changes_by_noun() {
        let old: BTreeMap<String, String> = [("a.png", "1"), ("a.txt", "2"), ("b.png", "3")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let mut new = old.clone();
        new.insert("c.png".into(), "4".into());
        new.insert("d.jpg".into(), "5".into());
        new.insert("a.txt".into(), "9".into());
        new.remove("b.png");
        assert_eq!(
            input_changes(&old, &new),
            vec![
                "1 caption file changed",
                "2 images added",
                "1 image removed"
            ]
        );
    }
}
