//! DreamBooth inside the shared loop: every UNet weight (and the text encoder's when it
//! trains), with prior preservation `loss = mse(instance) + w · mse(class)`, one class
//! micro-batch drawn beside each instance micro-batch.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use dfdx::prelude::*;

use super::joint::{TextInputs, joint_grads};
use crate::diffusion::host_tensor::HostTensor;
use crate::diffusion::nn::Elem;
use crate::diffusion::params::{copy_params, named_grads};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};
use crate::formats::write_safetensors;
use crate::train::batch::{Batch, Item, Sampling};
use crate::train::mixed::StepScaler;
use crate::train::optim::{Optimizer, ParamOptimizer, layers_to_eval, update_layers as update_all};
use crate::train::resume::{self, TrainState};
use crate::train::run_loop::{TrainMethod, TrainStep};

/// Prefix of the text encoder's parameter names among the trained tensors.
pub const TE: &str = "text_encoder.";

/// Salt of the class (prior) batches' seed.
pub const CLASS_SALT: u64 = 0xC1A5_5EED_0000_0001;

/// Full fine-tuning: every UNet layer trainable.
pub struct DreamboothSteps<'a, D: Device<f32> + Device<E>, E: Elem> {
    /// How the class (prior) batches are drawn.
    pub sampling: Sampling,
    /// The UNet the passes run through (computing in `E`).
    pub unet: &'a mut UNet<D, E>,
    /// The text encoder when it trains too (contexts are then computed per batch).
    pub text_encoder: Option<&'a mut TextEncoder<D>>,
    pub ddpm: &'a Ddpm,
    pub items: &'a [Item],
    pub class_items: &'a [Item],
    /// The captions' token ids and frozen-encoder states (instance and class).
    pub text: TextInputs<'a, D>,
    pub optimizer: &'a mut Optimizer<D>,
    pub scratch: &'a Path,
    pub scaling: f32,
    pub prior_weight: f32,
    /// The pipeline seed (class batches use it with a salt).
    pub seed: u64,
    /// Text-encoder learning rate / UNet learning rate.
    pub te_lr_factor: f64,
    /// The f32 master weights in mixed precision (`None`: `unet` is f32 and is updated).
    pub master: Option<&'a mut UNet<D>>,
    /// Loss scaling (a fixed 1 in f32) and the step's overflow flag.
    pub scaler: StepScaler,
    /// Writes the published checkpoint of the weights after a step (for snapshots).
    pub write_model: &'a ModelWriter<'a>,
}

/// Writes the single-file checkpoint a DreamBooth run publishes to a path, from the trained
/// UNet's tensors, the text encoder's when it trained, and the step.
pub type ModelWriter<'a> = dyn Fn(
        &Path,
        BTreeMap<String, HostTensor>,
        Option<BTreeMap<String, HostTensor>>,
        u64,
    ) -> anyhow::Result<()>
    + 'a;

/// `unet` as the f32 model it is when the run computes in f32.
pub fn as_f32<D: Device<f32> + Device<E>, E: Elem>(
    unet: &mut UNet<D, E>,
) -> anyhow::Result<&mut UNet<D>> {
    (unet as &mut dyn std::any::Any)
        .downcast_mut::<UNet<D>>()
        .context("a mixed-precision UNet has no f32 weights to update (masters missing)")
}

impl<D: Device<f32> + Device<E>, E: Elem> DreamboothSteps<'_, D, E> {
    /// After training: the weights as the optimiser evaluates them (schedule-free AdamW's
    /// `x`), for the evaluation and the trained file.
    pub fn to_eval(&mut self) -> anyhow::Result<()> {
        match self.master.as_deref_mut() {
            Some(master) => {
                layers_to_eval(master, "", self.optimizer)?;
                copy_params(master, self.unet).map_err(anyhow::Error::msg)?;
            }
            None => layers_to_eval(as_f32(self.unet)?, "", self.optimizer)?,
        }
        if let Some(te) = self.text_encoder.as_deref_mut() {
            layers_to_eval(te, TE, self.optimizer)?;
        }
        Ok(())
    }

    fn batch_grads(
        &mut self,
        batch: &Batch<D>,
    ) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)> {
        let g = joint_grads(
            self.unet,
            self.text_encoder.as_deref_mut(),
            self.ddpm,
            batch,
            &self.text,
            &mut self.scaler,
            |unet, grads| named_grads(unet, grads),
            |te, grads| named_grads(te, grads),
        )?;
        let mut out = g.unet;
        for (name, grad) in g.text_encoder {
            out.insert(format!("{TE}{name}"), grad);
        }
        Ok((g.loss, out))
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> DreamboothSteps<'_, D, E> {
    /// Host copies of the f32 weights: the UNet's (the masters' in mixed precision) and the
    /// text encoder's when it trains.
    #[allow(clippy::type_complexity)]
    fn weights(
        &mut self,
    ) -> anyhow::Result<(
        BTreeMap<String, HostTensor>,
        Option<BTreeMap<String, HostTensor>>,
    )> {
        let unet = match self.master.as_deref_mut() {
            Some(master) => crate::diffusion::params::named_tensors(master),
            None => crate::diffusion::params::named_tensors(as_f32(self.unet)?),
        };
        let te = self
            .text_encoder
            .as_deref_mut()
            .map(crate::diffusion::params::named_tensors);
        Ok((unet, te))
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> TrainStep<D> for DreamboothSteps<'_, D, E> {
    type Batch = Batch<D>;

    fn grads(&mut self, batch: &Batch<D>) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)> {
        let (mut loss, mut grads) = self.batch_grads(batch)?;
        if !self.class_items.is_empty() {
            let dev = batch.latents.device().clone();
            let class_batch = self.sampling.draw(
                self.class_items,
                self.scaling,
                self.seed ^ CLASS_SALT,
                batch.step,
                batch.micro,
                &dev,
            );
            let (class_loss, class_grads) = self.batch_grads(&class_batch)?;
            loss += self.prior_weight * class_loss;
            for (name, g) in class_grads {
                if let Some(acc) = grads.get_mut(&name) {
                    for (a, b) in acc.data.iter_mut().zip(&g.data) {
                        *a += self.prior_weight * b;
                    }
                }
            }
        }
        Ok((loss, grads))
    }

    fn apply(&mut self, grads: &BTreeMap<String, HostTensor>, lr: f64) -> anyhow::Result<()> {
        if !self.scaler.begin_update::<E>() {
            // an f16 overflow: the step is skipped with a smaller scale (GradScaler)
            return Ok(());
        }
        for &pass in self.optimizer.passes() {
            match self.master.as_deref_mut() {
                Some(master) => update_all(master, "", grads, self.optimizer, lr, pass)?,
                None => update_all(as_f32(self.unet)?, "", grads, self.optimizer, lr, pass)?,
            }
            if let Some(te) = self.text_encoder.as_deref_mut() {
                let te_lr = lr * self.te_lr_factor;
                update_all(te, TE, grads, self.optimizer, te_lr, pass)?;
            }
        }
        if let Some(master) = self.master.as_deref_mut() {
            copy_params(master, self.unet).map_err(anyhow::Error::msg)?;
        }
        self.scaler.applied();
        Ok(())
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> TrainMethod<D> for DreamboothSteps<'_, D, E> {
    fn checkpoint(&mut self, state: &TrainState) -> anyhow::Result<()> {
        let weights = match self.master.as_deref_mut() {
            Some(master) => crate::diffusion::params::named_tensors(master),
            None => crate::diffusion::params::named_tensors(self.unet),
        };
        let mut state = state.clone();
        state.loss_scaler = self.scaler.saved::<E>();
        let state = &state;
        let te_weights = self
            .text_encoder
            .as_deref_mut()
            .map(crate::diffusion::params::named_tensors);
        resume::save(self.scratch, state, |dir| {
            write_safetensors(&dir.join("unet.safetensors"), &weights, None)?;
            if let Some(te) = &te_weights {
                write_safetensors(&dir.join("text_encoder.safetensors"), te, None)?;
            }
            self.optimizer.save(&dir.join("optimizer.safetensors"))?;
            Ok(())
        })
    }

    fn write_artifact(
        &mut self,
        file: &Path,
        weights: Option<&BTreeMap<String, HostTensor>>,
        step: u64,
    ) -> anyhow::Result<()> {
        let (unet, te) = match weights {
            // the EMA's: every trained tensor, the text encoder's under the `TE` prefix
            Some(w) => {
                let (mut unet, mut te) = (BTreeMap::new(), BTreeMap::new());
                for (name, t) in w {
                    match name.strip_prefix(TE) {
                        Some(local) => te.insert(local.to_string(), t.clone()),
                        None => unet.insert(name.clone(), t.clone()),
                    };
                }
                (unet, self.text_encoder.is_some().then_some(te))
            }
            // the weights as evaluated (schedule-free's x), on these host copies
            None => {
                let (mut unet, mut te) = self.weights()?;
                for (name, t) in unet.iter_mut() {
                    self.optimizer.to_eval_host(name, &mut t.data);
                }
                for (name, t) in te.iter_mut().flatten() {
                    self.optimizer
                        .to_eval_host(&format!("{TE}{name}"), &mut t.data);
                }
                (unet, te)
            }
        };
        (self.write_model)(file, unet, te, step)
    }

    fn validation_loss(&mut self, items: &[Item], scaling: f32, seed: u64) -> anyhow::Result<f32> {
        super::joint::validation_loss(
            self.unet,
            self.text_encoder.as_deref(),
            &self.text,
            self.ddpm,
            items,
            (scaling, seed),
        )
    }

    fn trained(&mut self) -> anyhow::Result<BTreeMap<String, HostTensor>> {
        let (mut all, te) = self.weights()?;
        for (name, t) in te.into_iter().flatten() {
            all.insert(format!("{TE}{name}"), t);
        }
        Ok(all)
    }
}
