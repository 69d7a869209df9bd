//! Mixed-precision training (`precision = "f16"`): the UNet computes in
//! [`Half`](crate::diffusion::nn::Half) while every trained tensor keeps an f32 master copy
//! that the optimiser updates.
//!
//! One step, as PyTorch's AMP with its `GradScaler` does it:
//! 1. the forward and backward passes run in f16 storage (f32 arithmetic inside each op) with
//!    the loss multiplied by the [`LossScaler`]'s scale, so small gradients do not flush to
//!    zero in f16;
//! 2. the trained tensors' gradients are copied to f32 on the host and divided by the scale;
//! 3. if any is not finite (an f16 overflow) the step is skipped and the scale halved, else
//!    the optimiser updates the f32 masters ([`Masters`]) and the model's f16 tensors are refreshed from
//!    them; after `growth_interval` good steps in a row the scale doubles.
//!
//! With `f32` as the element type the scale is 1 and the masters are the model's own tensors'
//! values, so the same code gives the plain f32 step.

use std::collections::BTreeMap;

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::diffusion::nn::elem::Elem;
use crate::diffusion::nn::{Conv2d, Linear};
use crate::diffusion::nn::{Tensor2, Tensor3, Tensor4};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::unet::UNet;
use crate::formats::HostTensor;
use crate::formats::lora::{LoraComponent, LoraNetwork, NetworkModule};
use crate::train::lora::{Adaptable, LoraTarget, LoraTrainError};
use crate::train::objective;
use crate::train::optim::{OptimError, Optimizer, ParamOptimizer, Pass};

/// Dynamic loss scaling (PyTorch `GradScaler`'s defaults: start at 2^16, halve on an
/// overflow, double after 2000 good steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The factor the loss is multiplied by before the backward pass.
    pub scale: f32,
    /// Good (finite) steps since the last change of the scale.
    pub good_steps: u32,
    /// Good steps after which the scale doubles.
    pub growth_interval: u32,
    /// Steps skipped because a gradient overflowed.
    pub skipped: u64,
}

impl LossScaler {
    /// The scaler for element type `E`: 2^16 for f16, a fixed 1 for f32 (no scaling).
    pub fn for_elem<E: Elem>() -> Self {
        Self {
            scale: if E::HALF { 65536.0 } else { 1.0 },
            good_steps: 0,
            growth_interval: if E::HALF { 2000 } else { u32::MAX },
            skipped: 0,
        }
    }

    /// Divides `grads` by the scale; `false` when a value is not finite (skip the step).
    pub fn unscale(&self, grads: &mut BTreeMap<String, HostTensor>) -> bool {
        let inv = 1.0 / self.scale;
        let mut finite = true;
        for g in grads.values_mut() {
            for v in &mut g.data {
                *v *= inv;
                finite &= v.is_finite();
            }
        }
        finite
    }

    /// Records a step: `applied` (finite gradients, update made) or skipped (overflow).
    pub fn update(&mut self, applied: bool) {
        if self.growth_interval == u32::MAX {
            return;
        }
        if applied {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale = (self.scale * 2.0).min(f32::MAX / 4.0);
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
        }
    }
}

/// A run's [`LossScaler`] with the overflow flag of the step in progress: every method's
/// micro-batches unscale through it, and its update is skipped on an f16 overflow.
#[derive(Debug, Clone, Copy)]
pub struct StepScaler {
    /// The scaler (saved in checkpoints).
    pub scaler: LossScaler,
    /// Whether every gradient of the step's micro-batches so far was finite.
    finite: bool,
}

impl StepScaler {
    /// Resumes `saved`, or starts [`LossScaler::for_elem`].
    pub fn new<E: Elem>(saved: Option<LossScaler>) -> Self {
        Self {
            scaler: saved.unwrap_or_else(LossScaler::for_elem::<E>),
            finite: true,
        }
    }

    /// The factor the loss is multiplied by before the backward pass.
    pub fn scale(&self) -> f32 {
        self.scaler.scale
    }

    /// Divides `grads` by the scale and notes whether they are finite.
    pub fn unscale(&mut self, grads: &mut BTreeMap<String, HostTensor>) {
        self.finite &= self.scaler.unscale(grads);
    }

    /// Notes whether gradients computed outside the scaled pass (in f32) are finite.
    pub fn note_finite<'a>(&mut self, grads: impl IntoIterator<Item = &'a HostTensor>) {
        self.finite &= grads
            .into_iter()
            .all(|g| g.data.iter().all(|v| v.is_finite()));
    }

    /// Whether the step's update should be applied: `false` after an f16 overflow, when the
    /// scale is halved and the step skipped (GradScaler). Call once per step; after applying,
    /// call [`Self::applied`].
    pub fn begin_update<E: Elem>(&mut self) -> bool {
        let finite = std::mem::replace(&mut self.finite, true);
        if !finite && E::HALF {
            self.scaler.update(false);
            return false;
        }
        true
    }

    /// Records an applied update (the scale grows after enough of them).
    pub fn applied(&mut self) {
        self.scaler.update(true);
    }

    /// What a checkpoint saves: the scaler of a mixed-precision run, nothing in f32.
    pub fn saved<E: Elem>(&self) -> Option<LossScaler> {
        E::HALF.then_some(self.scaler)
    }
}

/// The loss of one batch and the gradients (of the loss times `loss_scale`) with the UNet
/// computing in `E` ([`objective::loss_and_grads`]); `context` joins the tape, so
/// `grads.get(context)` is its gradient.
pub fn loss_and_grads<E: Elem, D: Device<f32> + Device<E>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    context: &Tensor3<D, NoneTape, E>,
    loss_scale: f32,
) -> Result<(f32, Gradients<E, D>), LoraTrainError> {
    Ok(objective::loss_and_grads(
        unet,
        ddpm,
        latents,
        noise,
        timesteps,
        context.retaped(),
        loss_scale,
    )?)
}

/// `t` as rows: `[d0, d1·d2·…]` (a conv adapter's `[r, in, kh, kw]` becomes `[r, in·kh·kw]`;
/// a matrix stays as it is).
fn as_rows(t: &HostTensor) -> HostTensor {
    let rows = t.shape.first().copied().unwrap_or(0);
    let cols = t.numel().checked_div(rows).unwrap_or(0);
    HostTensor {
        shape: vec![rows, cols],
        data: t.data.clone(),
    }
}

/// f32 master copies of trained tensors, by parameter name.
#[derive(Debug, Clone)]
pub struct Masters<D: Device<f32>> {
    /// `name → [rows, cols]` (LoRA `down`/`up`, embedding vectors, MLP weights).
    pub tensors: BTreeMap<String, Tensor2<D>>,
}

impl<D: Device<f32>> Masters<D> {
    /// The trained tensors of `network` (by parameter name: PEFT's `<module>.lora_A.weight` /
    /// `.lora_B.weight`, LyCORIS' `<module>.hada_w1_a`, …) in f32 on `dev`.
    pub fn of_lora(network: &LoraNetwork, dev: &D) -> Result<Self, LoraTrainError> {
        let mut tensors = BTreeMap::new();
        for (_, name, module) in network.iter() {
            for (suffix, t) in module.params() {
                let key = format!("{name}.{suffix}");
                let tensor = as_rows(t)
                    .to_tensor::<(usize, usize), D>(dev)
                    .ok_or_else(|| LoraTrainError::Shape {
                        name: key.clone(),
                        reason: format!("shape {:?} has no rows", t.shape),
                    })?;
                tensors.insert(key, tensor);
            }
        }
        Ok(Self { tensors })
    }

    /// Pass `pass` of the optimiser's step for every master `filter` keeps (each named in
    /// `grads`, unscaled f32 gradients) at `lr`.
    pub fn update(
        &mut self,
        grads: &BTreeMap<String, HostTensor>,
        optimizer: &mut impl ParamOptimizer<D>,
        lr: f64,
        pass: Pass,
        filter: impl Fn(&str) -> bool,
    ) -> Result<(), LoraTrainError> {
        for (name, master) in self.tensors.iter_mut().filter(|(n, _)| filter(n)) {
            let dev = master.device().clone();
            let grad = grads
                .get(name)
                .and_then(|g| as_rows(g).to_tensor::<(usize, usize), D>(&dev))
                .ok_or_else(|| LoraTrainError::Shape {
                    name: name.clone(),
                    reason: "no gradient".into(),
                })?;
            optimizer
                .apply(pass, name, master, &grad, lr)
                .map_err(|e: OptimError| LoraTrainError::from(e))?;
        }
        Ok(())
    }

    /// Host copies of every master, by name.
    pub fn to_host(&self) -> BTreeMap<String, HostTensor> {
        self.tensors
            .iter()
            .map(|(name, t)| (name.clone(), HostTensor::from_tensor(t)))
            .collect()
    }

    /// Replaces every master with its value in `weights` (an EMA's); a master missing there
    /// or of another size is an error naming it.
    pub fn overwrite(&mut self, weights: &BTreeMap<String, HostTensor>) -> anyhow::Result<()> {
        for (name, master) in self.tensors.iter_mut() {
            let w = weights
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("no value for `{name}`"))?;
            *master = overwrite(master, &w.data).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
        }
        Ok(())
    }

    /// Every master as the optimiser evaluates it ([`Optimizer::to_eval`]: schedule-free
    /// AdamW's `x`).
    pub fn to_eval(&mut self, optimizer: &Optimizer<D>) {
        for (name, master) in self.tensors.iter_mut() {
            optimizer.to_eval(name, master);
        }
    }

    /// Copies the masters into the adapters of `model` (rounded to `E`).
    pub fn write_lora<E: Elem, M: LoraTarget<D, E>>(&self, model: &mut M)
    where
        D: Device<E>,
    {
        model.for_each_lora_layer_mut(&mut |name, layer| {
            let master = |suffix: &str| self.tensors.get(&format!("{name}.{suffix}"));
            match layer {
                Adaptable::Linear(Linear { lora: Some(l), .. }) => {
                    if let Some(m) = master("lora_A.weight") {
                        l.down = m.clone().to_dtype::<E>();
                    }
                    if let Some(m) = master("lora_B.weight") {
                        l.up = m.clone().to_dtype::<E>();
                    }
                }
                // the masters are flat rows: [r, in·kh·kw] and [out, r]
                Adaptable::Conv(Conv2d { lora: Some(c), .. }) => {
                    if let Some(m) = master("lora_A.weight") {
                        let shape = *c.down.shape();
                        c.down = m.clone().to_dtype::<E>().reshape_like(&shape);
                    }
                    if let Some(m) = master("lora_B.weight") {
                        let shape = *c.up.shape();
                        c.up = m.clone().to_dtype::<E>().reshape_like(&shape);
                    }
                }
                _ => {}
            }
        });
    }

    /// `network` with the master values of its `component` modules (the exact f32 values,
    /// where the model holds them rounded to f16).
    pub fn into_network(&self, network: &mut LoraNetwork, component: LoraComponent) {
        let modules: &mut BTreeMap<String, NetworkModule> = network.modules_mut(component);
        for (name, module) in modules.iter_mut() {
            for (suffix, t) in module.params_mut() {
                if let Some(m) = self.tensors.get(&format!("{name}.{suffix}")) {
                    // a conv module's down keeps its kernel axes
                    let shape = std::mem::take(&mut t.shape);
                    *t = HostTensor::from_tensor(m);
                    t.shape = shape;
                }
            }
        }
    }
}

/// A tensor of `like`'s shape and device holding `values`; an error when the sizes differ.
pub fn overwrite<S: Shape, D: Device<f32>>(
    like: &Tensor<S, f32, D>,
    values: &[f32],
) -> anyhow::Result<Tensor<S, f32, D>> {
    let shape = *like.shape();
    anyhow::ensure!(
        values.len() == shape.num_elements(),
        "{} values for a tensor of {}",
        values.len(),
        shape.num_elements()
    );
    Ok(like.device().tensor_from_vec(values.to_vec(), shape))
}
