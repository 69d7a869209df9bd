//! Resumable training: a run writes its state every `checkpoint_every` steps into the scratch
//! folder of its cache key (`checkpoints/step-N/`: the method's tensors, the optimiser, and
//! `state.json`); rerunning the same key resumes from the newest readable one. Only the final
//! artifact enters the store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use dfdx::prelude::*;

use serde::{Deserialize, Serialize};

use super::mixed::LossScaler;
use crate::diffusion::params::{Layers, ParamMut, try_for_each_named_param};
use crate::formats::HostTensor;

/// The `state.json` of a fine-tuning run: where the loop is and what it has measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: u64,
    /// The training loss of every step done.
    pub losses: Vec<f32>,
    /// The evaluation loss before the first step.
    pub eval_loss_before: f32,
    /// The loss scaler of a mixed-precision run (absent in f32 runs and older checkpoints).
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
    /// The validation loss after each `validate_every` steps, as (step, loss); step 0 is
    /// before training.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation: Vec<(u64, f32)>,
}

impl TrainState {
    /// Step 0 of a fresh run.
    pub fn fresh() -> Self {
        TrainState {
            step: 0,
            losses: Vec::new(),
            eval_loss_before: f32::NAN,
            loss_scaler: None,
            validation: Vec::new(),
        }
    }
}

/// What a checkpoint's `state.json` holds: at least the step it was written at.
pub trait ResumeState: Serialize {
    /// Steps done when the checkpoint was written.
    fn step(&self) -> u64;
}

impl ResumeState for TrainState {
    fn step(&self) -> u64 {
        self.step
    }
}

/// Writes a checkpoint (`write` fills the method's files, then `state.json`) into a temp dir
/// renamed to `checkpoints/step-N` (atomic), keeping the two newest.
pub fn save(
    scratch: &Path,
    state: &impl ResumeState,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let root = scratch.join("checkpoints");
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new().prefix(".tmp-").tempdir_in(&root)?;
    write(tmp.path())?;
    std::fs::write(tmp.path().join("state.json"), serde_json::to_vec(state)?)?;
    let dir = root.join(format!("step-{:08}", state.step()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(tmp.keep(), &dir)?;
    crate::cache::sync_dir(&root)?;
    // Keep the two newest: if the newest turns out unreadable, the previous one is there.
    let mut all = dirs(scratch);
    while all.len() > 2 {
        let _ = std::fs::remove_dir_all(all.remove(0));
    }
    Ok(())
}

/// The checkpoint folders of `scratch`, oldest first.
pub fn dirs(scratch: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(scratch.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The newest checkpoint `read` accepts (newest first); one it rejects is reported through
/// `warn` and the previous one tried, so a checkpoint corrupted by a crash costs only the steps
/// since the one before it.
pub fn newest<T>(
    scratch: &Path,
    mut warn: impl FnMut(&str),
    mut read: impl FnMut(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    for dir in dirs(scratch).into_iter().rev() {
        match read(&dir) {
            Ok(found) => return Ok(Some(found)),
            Err(e) => warn(&format!(
                "warning: checkpoint {} is unreadable ({e:#}); trying the previous one",
                dir.display()
            )),
        }
    }
    Ok(None)
}

/// The `state.json` of a checkpoint directory.
pub fn read_state<S: serde::de::DeserializeOwned>(dir: &Path) -> anyhow::Result<S> {
    Ok(serde_json::from_slice(&std::fs::read(
        dir.join("state.json"),
    )?)?)
}

/// Replaces every parameter of `model` by the tensor of the same name in `weights`.
pub fn load_weights<D: Device<f32>, M: Layers<D>>(
    model: &mut M,
    weights: &BTreeMap<String, HostTensor>,
) -> anyhow::Result<()> {
    try_for_each_named_param(model, |key, param| {
        let w = weights
            .get(key)
            .with_context(|| format!("the checkpoint has no tensor `{key}`"))?;
        let bad = || anyhow::anyhow!("tensor `{key}` has shape {:?}", w.shape);
        fn replace<S: Shape, D: Device<f32>>(
            t: &mut Tensor<S, f32, D>,
            n: Option<Tensor<S, f32, D>>,
            bad: impl Fn() -> anyhow::Error,
        ) -> anyhow::Result<()> {
            let n = n.ok_or_else(&bad)?;
            if n.shape() != t.shape() {
                return Err(bad());
            }
            *t = n;
            Ok(())
        }
        match param {
            ParamMut::T1(t) => {
                let n = w.to_tensor::<(usize,), D>(t.device());
                replace(t, n, bad)
            }
            ParamMut::T2(t) => {
                let n = w.to_tensor::<(usize, usize), D>(t.device());
                replace(t, n, bad)
            }
            ParamMut::T4(t) => {
                let n = w.to_tensor::<(usize, usize, usize, usize), D>(t.device());
                replace(t, n, bad)
            }
        }
    })
}
