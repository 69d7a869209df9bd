//! The step loop every fine-tuning method shares, and the one optimiser step inside it: per
//! step, the gradients of `gradient_accumulation` seeded micro-batches are averaged, clipped
//! by global norm and applied at the scheduled rate; a resumable checkpoint is written every
//! `checkpoint_every` steps. What differs between methods is a [`TrainMethod`].

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;

use super::batch::{Batch, Item, Sampling};
use super::ema::{Ema, EmaConfig};
use super::lr::LrSchedule;
use super::objective::ObjectiveError;
use super::optim::clip_coefficient;
use super::resume::{self, TrainState};
use crate::control::{CancelToken, Progress};
use crate::diffusion::host_tensor::HostTensor;

/// Gradients of the trained tensors, by parameter name, on the host.
pub type Grads = BTreeMap<String, HostTensor>;

/// The two halves of one optimiser step, which [`step`] drives: the gradients of a
/// micro-batch, and the update with their average. Every fine-tuning method, `pretrain`'s two
/// phases and `bench`'s train tasks implement it.
pub trait TrainStep<D: Device<f32>> {
    /// One micro-batch.
    type Batch;
    /// The loss of one micro-batch and the gradients of the trained tensors, by name.
    fn grads(&mut self, batch: &Self::Batch) -> anyhow::Result<(f32, Grads)>;
    /// One optimiser update with the averaged, clipped gradients.
    fn apply(&mut self, grads: &Grads, lr: f64) -> anyhow::Result<()>;
}

/// What differs between fine-tuning methods inside the shared loop ([`LoopConfig::run`]): one
/// file per method in [`super::methods`].
pub trait TrainMethod<D: Device<f32>>: TrainStep<D, Batch = Batch<D>> {
    /// Writes a resumable checkpoint of the trained tensors and the optimiser after `state`.
    fn checkpoint(&mut self, state: &TrainState) -> anyhow::Result<()>;
    /// Writes the method's artifact (what a finished run publishes) after `step` to `file`:
    /// of its current weights as they are evaluated (`save_every`), or of `weights` by the
    /// trained tensors' names (the EMA's).
    fn write_artifact(
        &mut self,
        file: &Path,
        weights: Option<&Grads>,
        step: u64,
    ) -> anyhow::Result<()>;
    /// The trained tensors' current values, by the names their gradients have (for the EMA).
    fn trained(&mut self) -> anyhow::Result<Grads>;
    /// The evaluation loss ([`super::eval::eval_loss_with`]) of `items` with the current
    /// weights (the validation loss during training).
    fn validation_loss(&mut self, items: &[Item], scaling: f32, seed: u64) -> anyhow::Result<f32>;
    /// The keys to change when the loss diverges after some updates.
    fn divergence_advice(&self) -> &'static str {
        "lower `lr`, or set `max_grad_norm`"
    }
}

/// The loop's settings (the train stage's keys of the same names).
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Optimiser steps.
    pub steps: u64,
    /// Base learning rate (the schedule scales it).
    pub lr: f64,
    /// Micro-batches whose gradients are averaged per step.
    pub gradient_accumulation: usize,
    /// Global gradient-norm clipping; 0 turns it off.
    pub max_grad_norm: f64,
    /// Steps between resumable checkpoints; 0 writes none.
    pub checkpoint_every: u64,
    /// Steps between saved intermediate artifacts ([`snapshot_dir`]); 0 saves none.
    pub save_every: u64,
    /// Keep an EMA of the trained weights, written at the end as [`ema_artifact`].
    pub ema: Option<EmaConfig>,
    /// Steps between validation losses on [`LoopData::validation`]; 0 computes none.
    pub validate_every: u64,
    /// How micro-batches are drawn.
    pub sampling: Sampling,
}

/// What the loop trains on: the items, the latent scaling factor and the run's seed.
#[derive(Clone, Copy)]
pub struct LoopData<'a> {
    /// The latent items.
    pub items: &'a [Item],
    /// The VAE's latent scaling factor.
    pub scaling: f32,
    /// The seed every draw derives from.
    pub seed: u64,
    /// Held-out items the validation loss is computed on (never trained on).
    pub validation: &'a [Item],
}

/// Where the loop reports and what stops it.
pub struct LoopEnv<'a> {
    /// Progress display.
    pub progress: &'a Progress,
    /// The progress bar's label (`train@method=lora lora`).
    pub label: String,
    /// Checked before every step.
    pub cancel: &'a CancelToken,
    /// The run's scratch folder (checkpoints).
    pub scratch: &'a Path,
    /// The file name of the method's artifact, which snapshots are written under.
    pub artifact: &'static str,
}

/// Where the artifact of the EMA weights lives in the run's scratch folder after the run.
pub fn ema_artifact(scratch: &Path, artifact: &str) -> std::path::PathBuf {
    scratch.join("ema").join("final").join(artifact)
}

/// Where the EMA saved beside the checkpoint of `step` lives.
fn ema_state(scratch: &Path, step: u64) -> std::path::PathBuf {
    scratch.join("ema").join(format!("step={step}.safetensors"))
}

/// Where the artifact saved after `step` lives in the run's scratch folder.
pub fn snapshot_dir(scratch: &Path, step: u64) -> std::path::PathBuf {
    scratch.join("snapshots").join(format!("step={step}"))
}

/// Writes `method`'s snapshot after `step` into a fresh folder and renames it into place, so
/// a kill never leaves a half-written one under its final name.
fn save_snapshot<D: Device<f32>>(
    env: &LoopEnv<'_>,
    step: u64,
    method: &mut dyn TrainMethod<D>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = snapshot_dir(env.scratch, step);
    let parent = dir.parent().context("a snapshot folder has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".step={step}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    method.write_artifact(&tmp.join(env.artifact), None, step)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("publishing {}", dir.display()))?;
    Ok(())
}

/// The result of one optimiser step.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// The mean loss of its micro-batches (NaN or infinite when training diverged: then
    /// nothing was applied).
    pub loss: f32,
}

impl LoopConfig {
    /// One optimiser step of `method` at rate `lr` (see [`step`]).
    pub fn step<D: Device<f32>>(
        &self,
        method: &mut dyn TrainMethod<D>,
        draw: impl FnMut(u64) -> Batch<D>,
        lr: f64,
    ) -> anyhow::Result<StepOutcome> {
        step(
            method,
            draw,
            lr,
            self.gradient_accumulation,
            self.max_grad_norm,
        )
    }

    /// Trains `method` from `state` to `self.steps`; returns the wall time of this process's
    /// part. Stops with [`crate::control::Cancelled`] when `env.cancel` is set.
    pub fn run<D: Device<f32>>(
        &self,
        data: LoopData<'_>,
        dev: &D,
        sched: &LrSchedule,
        state: &mut TrainState,
        method: &mut dyn TrainMethod<D>,
        env: &LoopEnv<'_>,
    ) -> anyhow::Result<f64> {
        use anyhow::Context as _;
        let started = std::time::Instant::now();
        // The EMA: fresh, or the one saved beside the checkpoint this run resumes from.
        let mut ema =
            match self.ema {
                None => None,
                Some(config) if state.step == 0 => Some(Ema::new(config)),
                Some(config) => {
                    let path = ema_state(env.scratch, state.step);
                    Some(Ema::load(&path, config).with_context(|| {
                        format!("the EMA of the checkpoint at step {}", state.step)
                    })?)
                }
            };
        let validates = self.validate_every > 0 && !data.validation.is_empty();
        if validates && state.step == 0 && state.validation.is_empty() {
            let loss = method.validation_loss(data.validation, data.scaling, data.seed)?;
            state.validation.push((0, loss));
        }
        let bar = env.progress.bar(self.steps, &env.label);
        bar.set_position(state.step);
        while state.step < self.steps {
            env.cancel.check()?;
            let step = state.step;
            let lr = sched.lr_at(self.lr, step);
            let outcome = self
                .step(
                    method,
                    |micro| {
                        self.sampling
                            .draw(data.items, data.scaling, data.seed, step, micro, dev)
                    },
                    lr,
                )
                .map_err(|e| e.context(format!("step {}", step + 1)))?;
            if !outcome.loss.is_finite() {
                return Err(divergence(
                    outcome.loss,
                    step,
                    method.divergence_advice(),
                    env.scratch,
                ));
            }
            state.losses.push(outcome.loss);
            state.step += 1;
            if let Some(ema) = ema.as_mut() {
                ema.update(&method.trained()?);
            }
            if validates
                && (state.step.is_multiple_of(self.validate_every) || state.step == self.steps)
            {
                let loss = method.validation_loss(data.validation, data.scaling, data.seed)?;
                state.validation.push((state.step, loss));
            }
            bar.set_position(state.step);
            bar.set_message(format!("{} loss {:.4}", env.label, outcome.loss));
            // The snapshot first: a checkpoint at a step means its snapshot exists, so a run
            // resumed from it never has to write one it skipped.
            if self.save_every > 0
                && state.step.is_multiple_of(self.save_every)
                && state.step < self.steps
            {
                save_snapshot(env, state.step, method)?;
            }
            if self.checkpoint_every > 0
                && state.step.is_multiple_of(self.checkpoint_every)
                && state.step < self.steps
            {
                // The EMA first, so every checkpoint has its EMA.
                if let Some(ema) = &ema {
                    let path = ema_state(env.scratch, state.step);
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    ema.save(&path)?;
                }
                method.checkpoint(state)?;
            }
        }
        bar.finish_and_clear();
        if let Some(ema) = &ema {
            let file = ema_artifact(env.scratch, env.artifact);
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            method.write_artifact(&file, Some(ema.weights()), self.steps)?;
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

/// One optimiser step of `method` at rate `lr` on the `micro_batches` micro-batches
/// `draw(micro)` gives: gradients summed and averaged, clipped to a global norm of
/// `max_grad_norm` (0: no clipping), applied. A micro-batch whose loss is not finite makes the
/// step's loss NaN and nothing is applied.
pub fn step<D: Device<f32>, M: TrainStep<D> + ?Sized>(
    method: &mut M,
    mut draw: impl FnMut(u64) -> M::Batch,
    lr: f64,
    micro_batches: usize,
    max_grad_norm: f64,
) -> anyhow::Result<StepOutcome> {
    let mut summed = Grads::new();
    let mut loss_sum = 0.0f32;
    for micro in 0..micro_batches {
        let batch = draw(micro as u64);
        let (loss, grads) = match method.grads(&batch) {
            Ok(found) => found,
            Err(e) if is_non_finite(&e) => (f32::NAN, Grads::new()),
            Err(e) => return Err(e),
        };
        loss_sum += loss;
        for (name, g) in grads {
            match summed.get_mut(&name) {
                Some(acc) => acc.data.iter_mut().zip(&g.data).for_each(|(a, b)| *a += b),
                None => {
                    summed.insert(name, g);
                }
            }
        }
    }
    let k = micro_batches as f32;
    if k > 1.0 {
        summed
            .values_mut()
            .for_each(|g| g.data.iter_mut().for_each(|v| *v /= k));
    }
    clip_by_global_norm(&mut summed, max_grad_norm);
    let loss = loss_sum / k;
    if loss.is_finite() {
        method.apply(&summed, lr)?;
    }
    Ok(StepOutcome { loss })
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (0 turns it off), as
/// `torch.nn.utils.clip_grad_norm_` does.
pub fn clip_by_global_norm(grads: &mut Grads, max_norm: f64) {
    if max_norm <= 0.0 {
        return;
    }
    let norms: Vec<f32> = grads
        .values()
        .map(|g| g.data.iter().map(|v| v * v).sum::<f32>().sqrt())
        .collect();
    let (_, coef) = clip_coefficient(&norms, max_norm as f32);
    if coef < 1.0 {
        grads
            .values_mut()
            .for_each(|g| g.data.iter_mut().for_each(|v| *v *= coef));
    }
}

/// Whether `e` is the objective's non-finite loss, from whichever method's error type.
fn is_non_finite(e: &anyhow::Error) -> bool {
    use super::hypernetwork::HyperTrainError;
    use super::lora::LoraTrainError;
    let objective = e
        .downcast_ref::<ObjectiveError>()
        .or_else(|| match e.downcast_ref::<LoraTrainError>() {
            Some(LoraTrainError::Objective(o)) => Some(o),
            _ => None,
        })
        .or_else(|| match e.downcast_ref::<HyperTrainError>() {
            Some(HyperTrainError::Objective(o)) => Some(o),
            _ => None,
        });
    matches!(objective, Some(ObjectiveError::NonFinite(_)))
}

/// The error of a loss that became NaN or infinite at 0-based `step`: why (at the first step no
/// update has happened, so the rate is not the cause), what to change, and the last checkpoint
/// left in `scratch`, only if one exists.
pub fn divergence(loss: f32, step: u64, advice: &str, scratch: &Path) -> anyhow::Error {
    let why = if step == 0 {
        "before any update, so the base model, the latents or the method's own settings produce          it, not the learning rate"
            .to_string()
    } else {
        format!("training diverged ({advice})")
    };
    let checkpoint = match resume::dirs(scratch).last() {
        Some(dir) => format!("the last good checkpoint is kept in {}", dir.display()),
        None => "no checkpoint had been written yet".into(),
    };
    anyhow::anyhow!(
        "the loss became {loss} at step {}: {why}; {checkpoint}",
        step + 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_divergence_names_only_a_checkpoint_that_exists() {
        let scratch = tempfile::tempdir().unwrap();
        let first = divergence(f32::NAN, 0, "lower `lr`", scratch.path()).to_string();
        assert!(first.contains("at step 1: before any update"), "{first}");
        assert!(!first.contains("lower `lr`"), "{first}");
        assert!(
            first.contains("no checkpoint had been written yet"),
            "{first}"
        );

        let step = std::path::PathBuf::from("checkpoints/step-00000004");
        std::fs::create_dir_all(scratch.path().join(&step)).unwrap();
        let later = divergence(f32::INFINITY, 6, "lower `lora.alpha`", scratch.path()).to_string();
        assert!(later.contains("the loss became inf at step 7"), "{later}");
        assert!(later.contains("diverged (lower `lora.alpha`)"), "{later}");
        assert!(later.contains("step-00000004"), "{later}");
    }
}
