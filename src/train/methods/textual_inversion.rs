//! Textual inversion inside the shared loop: the token's vectors, fed through the frozen text
//! encoder and UNet.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use dfdx::prelude::*;

use crate::diffusion::host_tensor::HostTensor;
use crate::diffusion::nn::{Elem, Tensor2};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};
use crate::formats::embedding::{Embedding, write_a1111_safetensors};
use crate::train::batch::Batch;
use crate::train::mixed::StepScaler;
use crate::train::mixed::overwrite;
use crate::train::optim::{Optimizer, ParamOptimizer};
use crate::train::resume::{self, TrainState};
use crate::train::run_loop::{TrainMethod, TrainStep};
use crate::train::text::TextInputs;

/// Textual inversion: the token's vectors, fed through the frozen text encoder.
pub struct TiSteps<'a, D: Device<f32> + Device<E>, E: Elem> {
    /// CLIP skip of the text encoder.
    pub clip_skip: usize,
    /// The frozen text encoder the new vectors pass through.
    pub text_encoder: &'a TextEncoder<D>,
    /// The frozen UNet.
    pub unet: &'a UNet<D, E>,
    pub ddpm: &'a Ddpm,
    /// The captions' token ids (with the new token's).
    pub text: TextInputs<'a, D>,
    pub extra: &'a mut Tensor2<D>,
    pub optimizer: &'a mut Optimizer<D>,
    pub scratch: &'a Path,
    /// The embedding a checkpoint writes for the vectors at a step.
    pub embedding: &'a dyn Fn(&Tensor2<D>, u64) -> Embedding,
    /// Loss scaling (a fixed 1 in f32) and the step's overflow flag.
    pub scaler: StepScaler,
}

/// The parameter name of the trained vectors (A1111's tensor name).
pub const EMB_PARAMS: &str = "emb_params";

impl<D: Device<f32> + Device<E>, E: Elem> TrainStep<D> for TiSteps<'_, D, E> {
    type Batch = Batch<D>;

    fn grads(&mut self, batch: &Batch<D>) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)> {
        let batch_ids = self.text.batch_ids(&batch.captions)?;
        let (loss, grad) = crate::train::textual_inversion::loss_and_grad(
            self.text_encoder,
            self.unet,
            self.ddpm,
            &batch_ids,
            self.extra,
            self.clip_skip,
            &batch.latents,
            &batch.noise,
            &batch.timesteps,
            self.scaler.scale(),
        )?;
        let grad = HostTensor::from_tensor(&grad);
        self.scaler.note_finite([&grad]);
        Ok((loss, BTreeMap::from([(EMB_PARAMS.to_string(), grad)])))
    }

    fn apply(&mut self, grads: &BTreeMap<String, HostTensor>, lr: f64) -> anyhow::Result<()> {
        if !self.scaler.begin_update::<E>() {
            // an f16 overflow: the step is skipped with a smaller scale (GradScaler)
            return Ok(());
        }
        self.scaler.applied();
        let dev = self.extra.device().clone();
        let grad = grads
            .get(EMB_PARAMS)
            .and_then(|g| g.to_tensor::<(usize, usize), D>(&dev))
            .context("no gradient for the embedding")?;
        for &pass in self.optimizer.passes() {
            self.optimizer
                .apply(pass, EMB_PARAMS, self.extra, &grad, lr)?;
        }
        Ok(())
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> TrainMethod<D> for TiSteps<'_, D, E> {
    fn checkpoint(&mut self, state: &TrainState) -> anyhow::Result<()> {
        let embedding = (self.embedding)(self.extra, state.step);
        let mut state = state.clone();
        state.loss_scaler = self.scaler.saved::<E>();
        save_ti_checkpoint(self.scratch, &embedding, self.optimizer, &state)
    }

    fn write_artifact(
        &mut self,
        file: &Path,
        weights: Option<&BTreeMap<String, HostTensor>>,
        step: u64,
    ) -> anyhow::Result<()> {
        let mut vectors = self.extra.clone();
        match weights.and_then(|w| w.get(EMB_PARAMS)) {
            Some(w) => vectors = overwrite(&vectors, &w.data)?,
            None => self.optimizer.to_eval(EMB_PARAMS, &mut vectors),
        }
        Ok(write_a1111_safetensors(
            file,
            &(self.embedding)(&vectors, step),
        )?)
    }

    fn validation_loss(
        &mut self,
        items: &[crate::train::batch::Item],
        scaling: f32,
        seed: u64,
    ) -> anyhow::Result<f32> {
        let (te, text, extra) = (self.text_encoder, &self.text, &*self.extra);
        crate::train::eval::eval_loss_with(
            self.unet,
            self.ddpm,
            items,
            &mut |caption| {
                let ids = text.batch_ids(&[caption.to_string()])?;
                let embeds = te.embed_tokens_with_extra(&ids, extra.clone())?;
                Ok(te.forward_embeds(embeds, text.clip_skip)?)
            },
            scaling,
            seed,
        )
    }

    fn trained(&mut self) -> anyhow::Result<BTreeMap<String, HostTensor>> {
        Ok(BTreeMap::from([(
            EMB_PARAMS.to_string(),
            HostTensor::from_tensor(self.extra),
        )]))
    }
}

/// Writes a resumable textual-inversion checkpoint: the vectors (A1111 format) and the
/// optimiser.
pub fn save_ti_checkpoint<D: Device<f32>>(
    scratch: &Path,
    embedding: &Embedding,
    optimizer: &Optimizer<D>,
    state: &TrainState,
) -> anyhow::Result<()> {
    resume::save(scratch, state, |dir| {
        write_a1111_safetensors(&dir.join("embedding.safetensors"), embedding)?;
        optimizer.save(&dir.join("optimizer.safetensors"))?;
        Ok(())
    })
}
