//! LoRA (and its text-encoder adapters) inside the shared loop: the adapters train through
//! f32 masters; the UNet computes in `E`.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;

use super::joint::{TextInputs, joint_grads};
use crate::diffusion::host_tensor::HostTensor;
use crate::diffusion::nn::Elem;
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};
use crate::formats::lora::{KohyaMetadata, LoraComponent, LoraNetwork, ModuleKind, write_kohya};
use crate::train::batch::{Batch, mix};
use crate::train::lora::{adapter_grads, factor_grads_of, refresh_deltas, set_dropout};
use crate::train::mixed::{Masters, StepScaler};
use crate::train::optim::{Optimizer, ParamOptimizer};
use crate::train::resume::{self, TrainState};
use crate::train::run_loop::{TrainMethod, TrainStep};

/// LoRA: adapters installed on the UNet (computing in `E`) and the text encoder (f32).
pub struct LoraSteps<'a, D: Device<f32> + Device<E>, E: Elem> {
    pub unet: &'a mut UNet<D, E>,
    /// The text encoder when its adapters train too (contexts are then computed per batch).
    pub text_encoder: Option<&'a mut TextEncoder<D>>,
    pub ddpm: &'a Ddpm,
    /// The captions' token ids and frozen-encoder states.
    pub text: TextInputs<'a, D>,
    pub optimizer: &'a mut Optimizer<D>,
    pub scratch: &'a Path,
    pub dropout: f32,
    pub seed: u64,
    /// Text-encoder learning rate / UNet learning rate.
    pub te_lr_factor: f64,
    /// f32 values of every adapter, which the optimiser updates.
    pub masters: Masters<D>,
    /// Parameter names of the text encoder's adapters.
    pub te_keys: std::collections::HashSet<String>,
    /// Loss scaling (a fixed 1 in f32) and the step's overflow flag.
    pub scaler: StepScaler,
    /// The kohya metadata a snapshot is written with (its `ss_steps` set to the step).
    pub metadata: KohyaMetadata,
    /// The network's modules (their kinds, alphas and shapes; their values as of the last
    /// update for LoHa, LoKr and DoRA, which act through `ΔW`).
    pub modules: LoraNetwork,
    /// The frozen weight of each layer a LoHa, LoKr or DoRA module adapts, by module path.
    pub base_weights: BTreeMap<String, HostTensor>,
    /// The device the updates `ΔW` are built on.
    pub dev: D,
}

impl<D: Device<f32> + Device<E>, E: Elem> LoraSteps<'_, D, E> {
    /// After training: the masters and adapters as the optimiser evaluates them
    /// (schedule-free AdamW's `x`), for the evaluation and the trained file.
    pub fn to_eval(&mut self) -> anyhow::Result<()> {
        self.masters.to_eval(self.optimizer);
        self.refresh()
    }

    /// The adapters as a network, with their f32 master values.
    pub fn network(&mut self) -> LoraNetwork {
        let mut network = self.modules.clone();
        self.masters.into_network(&mut network, LoraComponent::Unet);
        self.masters
            .into_network(&mut network, LoraComponent::TextEncoder);
        network
    }

    /// Puts the masters' values into the model: the LoRA adapters', and the `ΔW` of every
    /// LoHa, LoKr and DoRA module rebuilt from its factors.
    fn refresh(&mut self) -> anyhow::Result<()> {
        self.masters.write_lora(self.unet);
        if let Some(te) = self.text_encoder.as_deref_mut() {
            self.masters.write_lora(te);
        }
        if self.modules.kinds().iter().any(|k| *k != ModuleKind::Lora) {
            for component in [LoraComponent::Unet, LoraComponent::TextEncoder] {
                self.masters.into_network(&mut self.modules, component);
            }
            let (modules, weights, dev) = (&self.modules, &self.base_weights, &self.dev);
            refresh_deltas(self.unet, &modules.unet, weights, dev)?;
            if let Some(te) = self.text_encoder.as_deref_mut() {
                refresh_deltas(te, &modules.text_encoder, weights, dev)?;
            }
        }
        Ok(())
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> TrainStep<D> for LoraSteps<'_, D, E> {
    type Batch = Batch<D>;

    fn grads(&mut self, batch: &Batch<D>) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)> {
        if self.dropout > 0.0 {
            let dropout_seed = mix(self.seed ^ 0xD80F_0F7A, batch.step, batch.micro);
            set_dropout(self.unet, self.dropout, dropout_seed);
            if let Some(te) = self.text_encoder.as_deref_mut() {
                set_dropout(te, self.dropout, dropout_seed);
            }
        }
        let g = joint_grads(
            self.unet,
            self.text_encoder.as_deref_mut(),
            self.ddpm,
            batch,
            &self.text,
            &mut self.scaler,
            |unet, grads| adapter_grads(unet, grads),
            |te, grads| adapter_grads(te, grads),
        )?;
        let mut out = g.unet;
        out.extend(g.text_encoder);
        // LoHa, LoKr and DoRA: ΔW's gradient to the factors'
        factor_grads_of(&mut out, &self.modules, &self.base_weights)?;
        Ok((g.loss, out))
    }

    fn apply(&mut self, grads: &BTreeMap<String, HostTensor>, lr: f64) -> anyhow::Result<()> {
        if !self.scaler.begin_update::<E>() {
            // an f16 overflow: the step is skipped with a smaller scale (GradScaler)
            return Ok(());
        }
        let te_keys = &self.te_keys;
        for &pass in self.optimizer.passes() {
            self.masters
                .update(grads, self.optimizer, lr, pass, |n| !te_keys.contains(n))?;
            if self.text_encoder.is_some() {
                self.masters
                    .update(grads, self.optimizer, lr * self.te_lr_factor, pass, |n| {
                        te_keys.contains(n)
                    })?;
            }
        }
        self.refresh()?;
        self.scaler.applied();
        Ok(())
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> TrainMethod<D> for LoraSteps<'_, D, E> {
    fn checkpoint(&mut self, state: &TrainState) -> anyhow::Result<()> {
        let network = self.network();
        let mut state = state.clone();
        state.loss_scaler = self.scaler.saved::<E>();
        save_lora_checkpoint(self.scratch, &network, self.optimizer, &state)
    }

    fn write_artifact(
        &mut self,
        file: &Path,
        weights: Option<&BTreeMap<String, HostTensor>>,
        step: u64,
    ) -> anyhow::Result<()> {
        let mut network = self.network();
        let mut masters = self.masters.clone();
        match weights {
            Some(w) => masters.overwrite(w)?,
            // the weights as evaluated (schedule-free's x), from a copy of the masters
            None => masters.to_eval(self.optimizer),
        }
        masters.into_network(&mut network, LoraComponent::Unet);
        masters.into_network(&mut network, LoraComponent::TextEncoder);
        let mut metadata = self.metadata.clone();
        metadata.steps = Some(step);
        Ok(write_kohya(file, &network, &metadata)?)
    }

    fn trained(&mut self) -> anyhow::Result<BTreeMap<String, HostTensor>> {
        Ok(self.masters.to_host())
    }

    fn validation_loss(
        &mut self,
        items: &[crate::train::batch::Item],
        scaling: f32,
        seed: u64,
    ) -> anyhow::Result<f32> {
        super::joint::validation_loss(
            self.unet,
            self.text_encoder.as_deref(),
            &self.text,
            self.ddpm,
            items,
            (scaling, seed),
        )
    }

    fn divergence_advice(&self) -> &'static str {
        "lower `lr` or `lora.alpha` (the update is scaled by alpha / rank), or set `max_grad_norm`"
    }
}

/// Writes a resumable LoRA checkpoint: the adapters (kohya format) and the optimiser.
pub fn save_lora_checkpoint<D: Device<f32>>(
    scratch: &Path,
    network: &LoraNetwork,
    optimizer: &Optimizer<D>,
    state: &TrainState,
) -> anyhow::Result<()> {
    resume::save(scratch, state, |dir| {
        write_kohya(
            &dir.join("lora.safetensors"),
            network,
            &KohyaMetadata::default(),
        )?;
        optimizer.save(&dir.join("optimizer.safetensors"))?;
        Ok(())
    })
}
