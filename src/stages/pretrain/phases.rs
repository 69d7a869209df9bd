//! The two phases of pretraining as [`TrainStep`]s, so that each of their steps is the one
//! optimiser step every method takes ([`crate::train::run_loop::step`]): the VAE on rendered
//! images, then the UNet and the text encoder together on their latents and captions.

use std::collections::BTreeMap;

use dfdx::prelude::*;

use super::PretrainParams;
use crate::diffusion::nn::Tensor4;
use crate::diffusion::params::named_grads;
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet, Vae};
use crate::formats::HostTensor;
use crate::train::lora::loss_and_grads_taped;
use crate::train::optim::{AdamW, Pass, update_layers};
use crate::train::run_loop::{Grads, TrainStep};

/// The three models being trained.
pub(super) struct Models<D: Device<f32>> {
    pub unet: UNet<D>,
    pub vae: Vae<D>,
    pub text_encoder: TextEncoder<D>,
}

/// Parameter-name prefixes of the three models in the optimiser and the checkpoints.
pub(super) const VAE: &str = "vae.";
pub(super) const UNET: &str = "unet.";
pub(super) const TE: &str = "text_encoder.";

/// Phase 1: the VAE's reconstruction and KL loss on a batch of rendered images.
pub(super) struct VaePhase<'a, D: Device<f32>> {
    pub params: &'a PretrainParams,
    pub vae: &'a mut Vae<D>,
    pub optimizer: &'a mut AdamW<D>,
}

#[derive(Clone)]
/// A VAE batch: images `[b, 3, h, w]` and the posterior noise `[b, c, h/f, w/f]`.
pub(super) struct ImageBatch<D: Device<f32>> {
    pub images: Tensor4<D>,
    pub noise: Tensor4<D>,
}

impl<D: Device<f32>> TrainStep<D> for VaePhase<'_, D> {
    type Batch = ImageBatch<D>;

    fn grads(&mut self, batch: &ImageBatch<D>) -> anyhow::Result<(f32, Grads)> {
        let (loss, grads) =
            self.params
                .vae_loss(self.vae, batch.images.clone(), batch.noise.clone())?;
        Ok((loss, prefixed(VAE, named_grads(self.vae, &grads))))
    }

    fn apply(&mut self, grads: &Grads, lr: f64) -> anyhow::Result<()> {
        update_layers(self.vae, VAE, grads, self.optimizer, lr, Pass::Update)?;
        Ok(())
    }
}

/// Phase 2: the diffusion loss through the UNet and the text encoder, both trained.
pub(super) struct DiffusionPhase<'a, D: Device<f32>> {
    pub models: &'a mut Models<D>,
    pub ddpm: &'a Ddpm,
    pub optimizer: &'a mut AdamW<D>,
}

/// A diffusion batch: scaled latents, their noise and timesteps, and the captions' token ids
/// (some dropped to `""`).
#[derive(Clone)]
pub(super) struct WorldBatch<D: Device<f32>> {
    pub latents: Tensor4<D>,
    pub noise: Tensor4<D>,
    pub timesteps: Vec<usize>,
    pub ids: Vec<Vec<u32>>,
}

impl<D: Device<f32>> TrainStep<D> for DiffusionPhase<'_, D> {
    type Batch = WorldBatch<D>;

    fn grads(&mut self, batch: &WorldBatch<D>) -> anyhow::Result<(f32, Grads)> {
        let models = &mut *self.models;
        let embeds = models.text_encoder.embed_tokens_traced(&batch.ids)?;
        let context = models.text_encoder.forward_embeds(embeds, 0)?;
        let (loss, grads) = loss_and_grads_taped(
            &models.unet,
            self.ddpm,
            &batch.latents,
            &batch.noise,
            &batch.timesteps,
            context,
        )?;
        let mut all = prefixed(UNET, named_grads(&mut models.unet, &grads));
        all.extend(prefixed(TE, named_grads(&mut models.text_encoder, &grads)));
        Ok((loss, all))
    }

    fn apply(&mut self, grads: &Grads, lr: f64) -> anyhow::Result<()> {
        update_layers(
            &mut self.models.unet,
            UNET,
            grads,
            self.optimizer,
            lr,
            Pass::Update,
        )?;
        update_layers(
            &mut self.models.text_encoder,
            TE,
            grads,
            self.optimizer,
            lr,
            Pass::Update,
        )?;
        Ok(())
    }
}

/// `grads` with `prefix` before every name.
pub(super) fn prefixed(
    prefix: &str,
    grads: BTreeMap<String, HostTensor>,
) -> BTreeMap<String, HostTensor> {
    grads
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
}
