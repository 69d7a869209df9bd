//! `kind = "pretrain"`: trains a whole Stable Diffusion 1.x-shaped model from scratch on the
//! synthetic shapes world ([`crate::world`]), in two phases:
//!
//! 1. the VAE, on rendered images: `mse(decode(z), x) + kl_weight · KL(q(z|x) ‖ N(0, 1))` with
//!    `z` drawn from the posterior (the KL summed over the latent and divided by the number of
//!    pixel values, so both terms are per-value means); the latent scaling factor is then set
//!    to `1 / std` of the latents, as SD's 0.18215 was;
//! 2. the UNet and the text encoder together, with the diffusion loss on the latents of freshly
//!    rendered images and their captions (a share of captions dropped to `""`, so that
//!    classifier-free guidance works).
//!
//! Every batch is rendered anew from the seed, the step and its index (the world is infinite,
//! nothing is stored). Checkpoints hold all three models and the optimiser, so a killed run
//! resumes where it stopped and ends in the same bytes. The result is one single-file
//! checkpoint in the original layout with its configs in the metadata.

use crate::stages::artifact::Artifact;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use dfdx::prelude::*;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::dreambooth::{load_weights, update_all};
use crate::diffusion::clip::{ClipActivation, ClipConfig};
use crate::diffusion::nn::Tensor4;
use crate::diffusion::params::{count_params, named_grads, named_tensors, set_trainable};
use crate::diffusion::schedulers::{Ddpm, SchedulerConfig, SeededNoise};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::{PerLevel, UNetConfig};
use crate::diffusion::vae::VaeConfig;
use crate::diffusion::weights::single_file::StoredConfigs;
use crate::diffusion::weights::{Loader, WeightStore};
use crate::diffusion::{TextEncoder, UNet, Vae};
use crate::formats::checkpoint::{ModelTensors, SaveDtype, write_single_file};
use crate::formats::{HostTensor, read_safetensors, write_safetensors};
use crate::stages::ParamError;
use crate::stages::context::{StageContext, StageResult};
use crate::train::batch::mix;
use crate::train::lora::loss_and_grads_taped;
use crate::train::lr::LrSchedule;
use crate::train::optim::{AdamW, AdamWConfig, clip_coefficient};
use crate::train::peak_memory_mib;
use crate::train::resume::{self, ResumeState, read_state};

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// The worlds a model can be pretrained on.
pub const WORLDS: &[&str] = &["shapes"];

/// The architecture of a pretrained model. Defaults: the bundled base model's, for 64×64 images
/// and 8×8×4 latents (about 1 M parameters, plus the 49408-row token table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Architecture {
    /// UNet width per level (`[32, 64]`); every level but the last has cross-attention.
    pub unet_channels: Vec<usize>,
    /// ResNets per UNet down level (1).
    pub unet_layers_per_block: usize,
    /// Attention heads per UNet transformer (4).
    pub unet_heads: usize,
    /// GroupNorm groups of the UNet and the VAE (8).
    pub norm_groups: usize,
    /// VAE width per level (`[16, 32, 64, 64]`: the image is downsampled 8×, as in SD).
    pub vae_channels: Vec<usize>,
    /// ResNets per VAE encoder level (1).
    pub vae_layers_per_block: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Text-encoder width (64).
    pub text_width: usize,
    /// Text-encoder layers (2).
    pub text_layers: usize,
    /// Text-encoder attention heads (4).
    pub text_heads: usize,
}

impl Default for Architecture {
    fn default() -> Self {
        Self {
            unet_channels: vec![32, 64],
            unet_layers_per_block: 1,
            unet_heads: 4,
            norm_groups: 8,
            vae_channels: vec![16, 32, 64, 64],
            vae_layers_per_block: 1,
            latent_channels: 4,
            text_width: 64,
            text_layers: 2,
            text_heads: 4,
        }
    }
}

impl Architecture {
    /// The diffusers configs of the three models for images of `resolution` pixels.
    pub fn configs(&self, resolution: u32) -> StoredConfigs {
        let n = self.unet_channels.len();
        let down: Vec<String> = (0..n)
            .map(|i| {
                if i + 1 < n {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
                .into()
            })
            .collect();
        let up: Vec<String> = (0..n)
            .map(|i| {
                if i == 0 {
                    "UpBlock2D"
                } else {
                    "CrossAttnUpBlock2D"
                }
                .into()
            })
            .collect();
        let vae = VaeConfig {
            block_out_channels: self.vae_channels.clone(),
            layers_per_block: self.vae_layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_groups,
            sample_size: resolution as usize,
            scaling_factor: 1.0,
            ..VaeConfig::default()
        };
        let latent = resolution as usize / vae.downsampling_factor().max(1);
        StoredConfigs {
            unet: UNetConfig {
                in_channels: self.latent_channels,
                out_channels: self.latent_channels,
                block_out_channels: self.unet_channels.clone(),
                down_block_types: down,
                up_block_types: up,
                layers_per_block: self.unet_layers_per_block,
                attention_head_dim: PerLevel::One(self.unet_heads),
                cross_attention_dim: self.text_width,
                norm_num_groups: self.norm_groups,
                sample_size: latent,
                ..UNetConfig::default()
            },
            vae,
            text_encoder: ClipConfig {
                hidden_size: self.text_width,
                intermediate_size: 4 * self.text_width,
                num_hidden_layers: self.text_layers,
                num_attention_heads: self.text_heads,
                hidden_act: ClipActivation::QuickGelu,
                ..ClipConfig::default()
            },
        }
    }
}

/// Pretraining settings (`kind = "pretrain"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainParams {
    /// The world to learn (`"shapes"`).
    #[serde(default = "default_world")]
    pub world: String,
    /// Image size in pixels (64).
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    /// Optimiser steps of the VAE phase (1000).
    #[serde(default = "default_vae_steps")]
    pub vae_steps: u64,
    /// Optimiser steps of the UNet + text-encoder phase (3000).
    #[serde(default = "default_unet_steps")]
    pub unet_steps: u64,
    /// Images per step of the UNet phase (16).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Images per step of the VAE phase (8).
    #[serde(default = "default_vae_batch")]
    pub vae_batch_size: usize,
    /// Peak learning rate of the VAE (1e-3).
    #[serde(default = "default_vae_lr")]
    pub vae_lr: f64,
    /// Peak learning rate of the UNet and the text encoder (1e-3).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Linear warm-up steps at the start of each phase (cosine decay after; 100).
    #[serde(default = "default_warmup")]
    pub lr_warmup_steps: u64,
    /// Reconstruction loss of the VAE: `"l1"` (mean absolute error, as SD's VAE was trained:
    /// sharper edges and truer colours than MSE's averages) or `"mse"`.
    #[serde(default = "default_reconstruction")]
    pub reconstruction: String,
    /// Weight of the KL term of the VAE loss (1e-4).
    #[serde(default = "default_kl")]
    pub kl_weight: f64,
    /// Share of captions replaced by `""` in the UNet phase (0.1).
    #[serde(default = "default_dropout")]
    pub caption_dropout: f64,
    /// Global gradient-norm clip (1.0; 0 = off).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// AdamW weight decay (0.01).
    #[serde(default = "default_decay")]
    pub weight_decay: f64,
    /// Steps between checkpoints (250; 0 = none).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Dtype of the saved model (`"f16"`).
    #[serde(default)]
    pub save_dtype: SaveDtype,
    /// Where the weights start: `"random"` (PyTorch's default initialisation, from the seed)
    /// or `"base_model"` (`[pipeline] base_model`, e.g. to continue pretraining a model with
    /// more steps; its architecture and, with `vae_steps = 0`, its VAE and latent scaling are
    /// kept).
    #[serde(default)]
    pub init: Init,
    /// Model sizes (`[stage.X.architecture]`; only with `init = "random"`). Default:
    /// [`Architecture::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
}

/// Where a pretraining run's weights start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Random weights from the pipeline seed.
    #[default]
    Random,
    /// The pipeline's `base_model`.
    BaseModel,
}

fn default_world() -> String {
    "shapes".into()
}
fn default_resolution() -> u32 {
    64
}
fn default_vae_steps() -> u64 {
    1000
}
fn default_unet_steps() -> u64 {
    3000
}
fn default_batch() -> usize {
    16
}
fn default_vae_batch() -> usize {
    8
}
fn default_vae_lr() -> f64 {
    1e-3
}
fn default_lr() -> f64 {
    1e-3
}
fn default_warmup() -> u64 {
    100
}
fn default_reconstruction() -> String {
    "l1".into()
}
fn default_kl() -> f64 {
    1e-4
}
fn default_dropout() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    1.0
}
fn default_decay() -> f64 {
    0.01
}
fn default_checkpoint_every() -> u64 {
    250
}

/// Resume state of a pretraining run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PretrainState {
    /// Steps done over both phases (VAE steps first).
    step: u64,
    vae_losses: Vec<f32>,
    losses: Vec<f32>,
    /// Set when the VAE phase ended.
    scaling_factor: Option<f64>,
}

impl ResumeState for PretrainState {
    fn step(&self) -> u64 {
        self.step
    }
}

/// The loss figures of a pretraining run (the record's stats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainMetrics {
    /// VAE steps.
    pub vae_steps: u64,
    /// UNet + text-encoder steps.
    pub unet_steps: u64,
    /// Mean VAE loss over the first and the last tenth of its steps.
    pub vae_loss_first: f32,
    /// See `vae_loss_first`.
    pub vae_loss_last: f32,
    /// Reconstruction PSNR (dB) of the trained VAE on 32 held-out images.
    pub vae_psnr_db: f64,
    /// The latent scaling factor found.
    pub scaling_factor: f64,
    /// Mean diffusion loss over the first and the last tenth of its steps.
    pub train_loss_first: f32,
    /// See `train_loss_first`.
    pub train_loss_last: f32,
    /// Wall time of this process's training loop.
    pub wall_s: f64,
    /// Steps per second in this process (both phases).
    pub steps_per_s: f64,
    /// Wall time of the VAE phase in this process.
    pub vae_wall_s: f64,
    /// Wall time of the UNet phase in this process.
    pub unet_wall_s: f64,
    /// Peak resident memory (MiB).
    pub peak_memory_mib: f64,
    /// Size of the saved model.
    pub artifact_bytes: u64,
    /// Parameters of the UNet, the VAE and the text encoder.
    pub params: [usize; 3],
    /// The step it resumed from (0 = fresh start).
    pub resumed_from: u64,
}

/// The three models being trained.
struct Models<D: Device<f32>> {
    unet: UNet<D>,
    vae: Vae<D>,
    text_encoder: TextEncoder<D>,
}

const VAE: &str = "vae.";
const UNET: &str = "unet.";
const TE: &str = "text_encoder.";

impl PretrainParams {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ParamError> {
        if !WORLDS.contains(&self.world.as_str()) {
            return Err(ParamError::new(
                "world",
                format!("unknown world `{}`", self.world),
                format!("known worlds: {}", WORLDS.join(", ")),
            ));
        }
        if self.init == Init::BaseModel {
            if self.architecture.is_some() {
                return Err(ParamError::new(
                    "architecture",
                    "the architecture comes from the base model when init = \"base_model\"",
                    "remove [stage.NAME.architecture], or set init = \"random\"",
                ));
            }
            return self.validate_training();
        }
        let a = &self.architecture.clone().unwrap_or_default();
        let configs = a.configs(self.resolution);
        let f = configs.vae.downsampling_factor() * (1 << (a.unet_channels.len().max(1) - 1));
        if self.resolution < 16 || !(self.resolution as usize).is_multiple_of(f) {
            return Err(ParamError::new(
                "resolution",
                format!("resolution {} is not a multiple of {f}", self.resolution),
                "the VAE and UNet downsample it: use e.g. 64",
            ));
        }
        if a.unet_channels.is_empty() || a.vae_channels.is_empty() {
            return Err(ParamError::new(
                "architecture",
                "unet_channels and vae_channels need at least one level",
                "e.g. unet_channels = [32, 64, 128], vae_channels = [32, 64, 64]",
            ));
        }
        let groups_ok = a.norm_groups > 0
            && a.unet_channels
                .iter()
                .chain(&a.vae_channels)
                .all(|c| c.is_multiple_of(a.norm_groups));
        if !groups_ok {
            return Err(ParamError::new(
                "architecture.norm_groups",
                format!("norm_groups {} must divide every width", a.norm_groups),
                "e.g. 8 with widths that are multiples of 8",
            ));
        }
        let heads_ok = a.unet_heads > 0
            && a.unet_channels
                .iter()
                .all(|c| c.is_multiple_of(a.unet_heads))
            && a.text_heads > 0
            && a.text_width.is_multiple_of(a.text_heads);
        if !heads_ok {
            return Err(ParamError::new(
                "architecture",
                "unet_heads must divide every UNet width and text_heads the text width",
                "e.g. 4 heads with widths that are multiples of 4",
            ));
        }
        if let Err(reason) = configs.unet.validate() {
            return Err(ParamError::new(
                "architecture",
                reason,
                "see the defaults in the pipeline reference",
            ));
        }
        self.validate_training()
    }

    /// Checks the training settings (everything but the architecture).
    fn validate_training(&self) -> Result<(), ParamError> {
        if self.batch_size == 0 || self.vae_batch_size == 0 || self.vae_steps + self.unet_steps == 0
        {
            return Err(ParamError::new(
                "batch_size",
                "batch_size and the steps must be positive",
                "e.g. batch_size = 16, vae_steps = 1000, unet_steps = 3000",
            ));
        }
        for (field, v) in [
            ("lr", self.lr),
            ("vae_lr", self.vae_lr),
            ("kl_weight", self.kl_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ParamError::new(
                    field,
                    format!("{field} {v} must be a non-negative number"),
                    "see the defaults in the pipeline reference",
                ));
            }
        }
        if !["l1", "mse"].contains(&self.reconstruction.as_str()) {
            return Err(ParamError::new(
                "reconstruction",
                format!("unknown reconstruction loss `{}`", self.reconstruction),
                "use \"l1\" or \"mse\"",
            ));
        }
        for (field, v) in [("lr", self.lr), ("vae_lr", self.vae_lr)] {
            if v > crate::stages::checks::MAX_LEARNING_RATE {
                crate::stages::checks::learning_rate(
                    field,
                    v,
                    "see the defaults in the pipeline reference",
                )?;
            }
        }
        crate::stages::checks::non_negative(
            "max_grad_norm",
            self.max_grad_norm,
            "the global gradient norm is clipped to it; 0 turns clipping off",
        )?;
        crate::stages::checks::non_negative(
            "weight_decay",
            self.weight_decay,
            "AdamW's decoupled decay; 0 turns it off",
        )?;
        if !(0.0..1.0).contains(&self.caption_dropout) {
            return Err(ParamError::new(
                "caption_dropout",
                "caption_dropout must be in [0, 1)",
                "0.1 lets classifier-free guidance work",
            ));
        }
        Ok(())
    }

    /// Key parameters (all of them: every field changes the result).
    pub fn key_params(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Runs both phases and writes `model.safetensors`.
    pub fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let rt = crate::device::open(ctx.pipeline.settings.device)?;
        crate::on_device!(rt, dev => self.run_on(ctx, dev))
    }

    /// [`Self::run`] on the opened device.
    fn run_on<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let seed = ctx.pipeline.settings.seed;
        let tokenizer = ClipTokenizer::bundled()?;
        let ddpm = Ddpm::new(&SchedulerConfig::sd15())?;
        let (mut configs, mut models) = match self.init {
            Init::Random => self.random_models(seed, &dev)?,
            Init::BaseModel => self.base_models(ctx, &dev)?,
        };
        let params = [
            count_params(&mut models.unet),
            count_params(&mut models.vae),
            count_params(&mut models.text_encoder),
        ];

        let scratch = ctx.scratch()?;
        let fresh = || {
            let cfg = AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            };
            (
                AdamW::new(&dev, cfg),
                PretrainState {
                    step: 0,
                    vae_losses: Vec::new(),
                    losses: Vec::new(),
                    // A base model's VAE that does not train keeps its latent scaling.
                    scaling_factor: (self.init == Init::BaseModel && self.vae_steps == 0)
                        .then_some(configs.vae.scaling_factor),
                },
            )
        };
        let (mut optimizer, mut state) =
            match load_pretrain_checkpoint(&scratch, &mut models, &dev, ctx)? {
                Some(found) => found,
                None => fresh(),
            };
        let resumed_from = state.step;
        if resumed_from > 0 {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {resumed_from}",
                ctx.instance.name
            ));
        }
        let total = self.vae_steps + self.unet_steps;
        let vae_sched = LrSchedule::from_name("cosine", self.lr_warmup_steps, self.vae_steps)?;
        let unet_sched = LrSchedule::from_name("cosine", self.lr_warmup_steps, self.unet_steps)?;
        let bar = ctx
            .progress
            .bar(total, &format!("{} pretrain", ctx.instance.name));
        bar.set_position(state.step);
        let started = std::time::Instant::now();

        // Phase 1: the VAE.
        set_trainable(&mut models.vae, true);
        while state.step < self.vae_steps {
            ctx.check_cancelled()?;
            let step = state.step;
            let (images, _) = self.world_batch(mix(seed, step, 0), self.vae_batch_size, &dev);
            let noise = self.latent_noise(mix(seed, step, 1), &configs.vae, &dev);
            let (loss, grads) = self.vae_loss(&models.vae, images, noise)?;
            let mut grads = prefixed(VAE, named_grads(&mut models.vae, &grads));
            self.clip(&mut grads);
            update_all(
                &mut models.vae,
                VAE,
                &grads,
                &mut optimizer,
                vae_sched.lr_at(self.vae_lr, step),
            )?;
            state.vae_losses.push(loss);
            self.advance(ctx, &bar, &mut state, loss, "vae", &mut models, &optimizer)?;
        }
        set_trainable(&mut models.vae, false);
        let vae_wall_s = started.elapsed().as_secs_f64();
        let scaling = match state.scaling_factor {
            Some(s) => s,
            None => {
                let s = self.latent_scaling(&models.vae, seed, &dev)?;
                state.scaling_factor = Some(s);
                s
            }
        };
        configs.vae.scaling_factor = scaling;
        models.vae.config.scaling_factor = scaling;

        // Phase 2: the UNet and the text encoder.
        set_trainable(&mut models.unet, true);
        set_trainable(&mut models.text_encoder, true);
        while state.step < total {
            ctx.check_cancelled()?;
            let step = state.step;
            let local = step - self.vae_steps;
            let (images, captions) = self.world_batch(mix(seed, step, 0), self.batch_size, &dev);
            let post = models.vae.encode(images)?;
            let b = captions.len();
            let mut src = SeededNoise::new(mix(seed, step, 1));
            let shape = *post.mean.shape();
            let n = shape.num_elements();
            let eps: Vec<f32> = (0..n).map(|_| src.next_normal() as f32).collect();
            let latents: Vec<f32> = post
                .mean
                .as_vec()
                .iter()
                .zip(post.std.as_vec())
                .zip(&eps)
                .map(|((m, s), e)| (m + s * e) * scaling as f32)
                .collect();
            let latents = dev.tensor_from_vec(latents, shape);
            let noise: Vec<f32> = (0..n).map(|_| src.next_normal() as f32).collect();
            let noise = dev.tensor_from_vec(noise, shape);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(seed, step, 2));
            let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
            let ids = captions
                .iter()
                .map(|c| {
                    let dropped = rng.random::<f64>() < self.caption_dropout;
                    tokenizer
                        .encode(if dropped { "" } else { c })
                        .map(|e| e.input_ids)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let embeds = models.text_encoder.embed_tokens_traced(&ids)?;
            let context = models.text_encoder.forward_embeds(embeds, 0)?;
            let (loss, grads) =
                loss_and_grads_taped(&models.unet, &ddpm, &latents, &noise, &timesteps, context)?;
            let mut all = prefixed(UNET, named_grads(&mut models.unet, &grads));
            all.extend(prefixed(TE, named_grads(&mut models.text_encoder, &grads)));
            self.clip(&mut all);
            let lr = unet_sched.lr_at(self.lr, local);
            update_all(&mut models.unet, UNET, &all, &mut optimizer, lr)?;
            update_all(&mut models.text_encoder, TE, &all, &mut optimizer, lr)?;
            state.losses.push(loss);
            self.advance(ctx, &bar, &mut state, loss, "unet", &mut models, &optimizer)?;
        }
        set_trainable(&mut models.unet, false);
        set_trainable(&mut models.text_encoder, false);
        bar.finish_and_clear();
        let wall_s = started.elapsed().as_secs_f64();
        let unet_wall_s = wall_s - vae_wall_s;
        let psnr = self.vae_psnr(&models.vae, seed, &dev)?;

        let tensors = ModelTensors {
            unet: named_tensors(&mut models.unet),
            vae: named_tensors(&mut models.vae),
            text_encoder: named_tensors(&mut models.text_encoder),
        };
        let recipe = serde_json::json!({
            "method": "pretrain",
            "world": self.world,
            "resolution": self.resolution,
            "vae_steps": self.vae_steps,
            "unet_steps": self.unet_steps,
            "batch_size": self.batch_size,
            "seed": seed,
            "sdpipe_version": env!("CARGO_PKG_VERSION"),
        });
        let metadata = BTreeMap::from([
            ("sdpipe_train_recipe".to_string(), recipe.to_string()),
            ("format".to_string(), "pt".to_string()),
        ]);
        let out = scratch.join(Artifact::Checkpoint.file_name());
        write_single_file(&out, &tensors, &configs, self.save_dtype, &metadata)?;
        let blob = ctx.store.put_file(&out)?;

        let tenth = |v: &[f32], last: bool| {
            let k = (v.len() / 10).max(1).min(v.len());
            let part = if last { &v[v.len() - k..] } else { &v[..k] };
            part.iter().sum::<f32>() / part.len().max(1) as f32
        };
        let metrics = PretrainMetrics {
            vae_steps: self.vae_steps,
            unet_steps: self.unet_steps,
            vae_loss_first: tenth(&state.vae_losses, false),
            vae_loss_last: tenth(&state.vae_losses, true),
            vae_psnr_db: psnr,
            scaling_factor: scaling,
            train_loss_first: tenth(&state.losses, false),
            train_loss_last: tenth(&state.losses, true),
            wall_s,
            steps_per_s: (total - resumed_from) as f64 / wall_s.max(1e-9),
            vae_wall_s,
            unet_wall_s,
            peak_memory_mib: peak_memory_mib(),
            artifact_bytes: blob.size,
            params,
            resumed_from,
        };
        let mut result = StageResult::default();
        result
            .outputs
            .insert(Artifact::Checkpoint.file_name().into(), blob);
        result.outputs.insert(
            "vae_loss.json".into(),
            ctx.store
                .put_bytes(&serde_json::to_vec(&state.vae_losses)?)?,
        );
        result.outputs.insert(
            Artifact::LossCurve.file_name().into(),
            ctx.store.put_bytes(&serde_json::to_vec(&state.losses)?)?,
        );
        if let serde_json::Value::Object(mut map) = serde_json::to_value(&metrics)? {
            result.stats.append(&mut map);
        }
        result.summary = format!(
            "pretrained on the {} world: VAE {} steps (PSNR {:.1} dB), UNet + text encoder {} steps \
             (loss {:.4} → {:.4}), {:.2} steps/s, {:.1} MiB model",
            self.world,
            self.vae_steps,
            psnr,
            self.unet_steps,
            metrics.train_loss_first,
            metrics.train_loss_last,
            metrics.steps_per_s,
            metrics.artifact_bytes as f64 / (1024.0 * 1024.0)
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        let _ = std::fs::remove_file(&out);
        Ok(result)
    }

    /// After a step: progress, divergence check, checkpoint.
    #[allow(clippy::too_many_arguments)]
    fn advance<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        bar: &indicatif::ProgressBar,
        state: &mut PretrainState,
        loss: f32,
        phase: &str,
        models: &mut Models<D>,
        optimizer: &AdamW<D>,
    ) -> anyhow::Result<()> {
        if !loss.is_finite() {
            let advice = if phase == "vae" {
                "lower `vae_lr`, or set `max_grad_norm`"
            } else {
                "lower `lr`, or set `max_grad_norm`"
            };
            return Err(crate::train::run_loop::divergence(
                loss,
                state.step,
                advice,
                &ctx.scratch()?,
            )
            .context(format!("pretraining the {phase}")));
        }
        state.step += 1;
        bar.set_position(state.step);
        bar.set_message(format!("{} {phase} loss {loss:.4}", ctx.instance.name));
        let total = self.vae_steps + self.unet_steps;
        if self.checkpoint_every > 0
            && state.step.is_multiple_of(self.checkpoint_every)
            && state.step < total
        {
            let (u, v, t) = (
                named_tensors(&mut models.unet),
                named_tensors(&mut models.vae),
                named_tensors(&mut models.text_encoder),
            );
            resume::save(&ctx.scratch()?, &*state, |dir| {
                write_safetensors(&dir.join("unet.safetensors"), &u, None)?;
                write_safetensors(&dir.join("vae.safetensors"), &v, None)?;
                write_safetensors(&dir.join("text_encoder.safetensors"), &t, None)?;
                optimizer.save(&dir.join("optimizer.safetensors"))?;
                Ok(())
            })?;
        }
        if let Some(ms) = std::env::var("SDPIPE_TEST_ITEM_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Ok(())
    }

    /// Clips the global gradient norm to `max_grad_norm`.
    fn clip(&self, grads: &mut BTreeMap<String, HostTensor>) {
        if self.max_grad_norm <= 0.0 {
            return;
        }
        let norms: Vec<f32> = grads
            .values()
            .map(|g| g.data.iter().map(|v| v * v).sum::<f32>().sqrt())
            .collect();
        let (_, coef) = clip_coefficient(&norms, self.max_grad_norm as f32);
        if coef < 1.0 {
            grads
                .values_mut()
                .for_each(|g| g.data.iter_mut().for_each(|v| *v *= coef));
        }
    }

    /// `batch_size` rendered scenes `[b, 3, r, r]` in [-1, 1] and their captions.
    /// Random initial weights (PyTorch's default ranges), the same for every run of a seed.
    fn random_models<D: Device<f32>>(
        &self,
        seed: u64,
        dev: &D,
    ) -> anyhow::Result<(StoredConfigs, Models<D>)> {
        let configs = self
            .architecture
            .clone()
            .unwrap_or_default()
            .configs(self.resolution);
        let init = WeightStore::synthetic(seed);
        let l = Loader::new(&init, dev);
        let mut models = Models {
            unet: UNet::load(&l, &configs.unet)?,
            vae: Vae::load(&l, &configs.vae)?,
            text_encoder: TextEncoder::load(&l, &configs.text_encoder)?,
        };
        small_initial_variance(&mut models.vae, dev);
        Ok((configs, models))
    }

    /// The pipeline's base model, whose architecture must take `resolution`-pixel images.
    fn base_models<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        dev: &D,
    ) -> anyhow::Result<(StoredConfigs, Models<D>)> {
        let path = ctx
            .pipeline
            .settings
            .base_model
            .as_deref()
            .context("init = \"base_model\" needs [pipeline] base_model")?;
        let ckpt = crate::diffusion::Checkpoint::open(path)
            .with_context(|| format!("opening the base model {}", path.display()))?;
        let mut configs = ckpt.configs();
        let f = configs.vae.downsampling_factor()
            * (1 << configs.unet.block_out_channels.len().saturating_sub(1));
        if !(self.resolution as usize).is_multiple_of(f) {
            bail!(
                "resolution {} is not a multiple of {f}, the base model {}'s total downsampling",
                self.resolution,
                path.display()
            );
        }
        let sd = ckpt.load(dev)?;
        configs.unet.sample_size = self.resolution as usize / configs.vae.downsampling_factor();
        configs.vae.sample_size = self.resolution as usize;
        Ok((
            configs,
            Models {
                unet: sd.unet,
                vae: sd.vae,
                text_encoder: sd.text_encoder,
            },
        ))
    }

    fn world_batch<D: Device<f32>>(
        &self,
        seed: u64,
        n: usize,
        dev: &D,
    ) -> (Tensor4<D>, Vec<String>) {
        let r = self.resolution as usize;
        let mut data = Vec::with_capacity(n * 3 * r * r);
        let mut captions = Vec::with_capacity(n);
        for i in 0..n {
            let (img, caption) =
                crate::world::base_example(mix(seed, i as u64, 7), self.resolution);
            data.extend(crate::image::to_chw_tensor(&img));
            captions.push(caption);
        }
        (dev.tensor_from_vec(data, (n, 3, r, r)), captions)
    }

    /// N(0, 1) noise of the latent shape of a batch.
    fn latent_noise<D: Device<f32>>(&self, seed: u64, vae: &VaeConfig, dev: &D) -> Tensor4<D> {
        let h = self.resolution as usize / vae.downsampling_factor();
        let shape = (self.vae_batch_size, vae.latent_channels, h, h);
        let mut src = SeededNoise::new(seed);
        let v: Vec<f32> = (0..shape.num_elements())
            .map(|_| src.next_normal() as f32)
            .collect();
        dev.tensor_from_vec(v, shape)
    }

    /// The VAE loss of a batch and its gradients.
    fn vae_loss<D: Device<f32>>(
        &self,
        vae: &Vae<D>,
        images: Tensor4<D>,
        eps: Tensor4<D>,
    ) -> anyhow::Result<(f32, Gradients<f32, D>)> {
        let (mean, logvar) = vae.encode_moments(images.leaky_trace())?;
        let std = (logvar.retaped::<OwnedTape<f32, D>>() * 0.5).exp();
        let z = mean.retaped::<OwnedTape<f32, D>>() + std * eps;
        let recon = vae.decode(z)?;
        let rec = if self.reconstruction == "mse" {
            mse_loss(recon, images.clone())
        } else {
            (recon - images.clone()).abs().mean()
        };
        // KL(N(m, s²) ‖ N(0, 1)) = ½ Σ (m² + s² − 1 − log s²), per image, over the pixel values.
        let (b, c, h, w) = *images.shape();
        let kl = (mean.square() + logvar.retaped::<OwnedTape<f32, D>>().exp() - logvar - 1.0)
            .sum::<Rank0, _>()
            * (0.5 / (b * c * h * w) as f32);
        let loss = rec + kl * self.kl_weight as f32;
        let value = loss.as_vec().first().copied().unwrap_or(f32::NAN);
        Ok((value, loss.backward()))
    }

    /// `1 / std` of the latent means of 64 held-out images.
    fn latent_scaling<D: Device<f32>>(
        &self,
        vae: &Vae<D>,
        seed: u64,
        dev: &D,
    ) -> anyhow::Result<f64> {
        let mut values = Vec::new();
        for k in 0..4 {
            let (images, _) = self.world_batch(mix(seed, u64::MAX - k as u64, 0), 16, dev);
            values.extend(vae.encode(images)?.mean.as_vec());
        }
        let n = values.len().max(1) as f64;
        let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|v| (*v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        Ok(1.0 / var.sqrt().max(1e-6))
    }

    /// Reconstruction PSNR (dB, images in [0, 1]) of 32 held-out images at their latent means.
    fn vae_psnr<D: Device<f32>>(&self, vae: &Vae<D>, seed: u64, dev: &D) -> anyhow::Result<f64> {
        let mut se = 0.0f64;
        let mut n = 0usize;
        for k in 0..2 {
            let (images, _) = self.world_batch(mix(seed, u64::MAX / 2 - k as u64, 0), 16, dev);
            let post = vae.encode(images.clone())?;
            let recon = vae.decode(post.mean)?.clamp(-1.0, 1.0);
            for (a, b) in recon.as_vec().iter().zip(images.as_vec()) {
                se += ((a - b) as f64 / 2.0).powi(2);
                n += 1;
            }
        }
        let mse = se / n.max(1) as f64;
        Ok(10.0 * (1.0 / mse.max(1e-12)).log10())
    }
}

/// Log-variance the posterior starts at: a standard deviation of 0.05. From the usual zero the
/// latents would start drowned in unit noise, and Adam moves the log-variance by about the
/// learning rate per step, so the VAE would spend its first thousands of steps only shrinking it.
const INITIAL_LOGVAR: f32 = -6.0;

/// Sets the bias of the log-variance half of the encoder's last conv (`quant_conv`, or
/// `conv_out` without it) to [`INITIAL_LOGVAR`].
fn small_initial_variance<D: Device<f32>>(vae: &mut Vae<D>, dev: &D) {
    let z = vae.config.latent_channels;
    let conv = match &mut vae.quant_conv {
        Some(q) => q,
        None => &mut vae.encoder.conv_out,
    };
    if let Some(bias) = &mut conv.bias {
        let mut b = bias.as_vec();
        for v in b.iter_mut().skip(z) {
            *v = INITIAL_LOGVAR;
        }
        *bias = dev.tensor_from_vec(b, (2 * z,));
    }
}

/// `grads` with `prefix` before every name.
fn prefixed(prefix: &str, grads: BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor> {
    grads
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
}

/// The newest readable checkpoint, loaded into `models`.
fn load_pretrain_checkpoint<D: Device<f32>>(
    scratch: &Path,
    models: &mut Models<D>,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<(AdamW<D>, PretrainState)>> {
    let found = resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| -> anyhow::Result<_> {
            let state: PretrainState = read_state(dir)?;
            let mut unet = models.unet.clone();
            let mut vae = models.vae.clone();
            let mut te = models.text_encoder.clone();
            load_weights(
                &mut unet,
                &read_safetensors(&dir.join("unet.safetensors"))?.tensors,
            )?;
            load_weights(
                &mut vae,
                &read_safetensors(&dir.join("vae.safetensors"))?.tensors,
            )?;
            load_weights(
                &mut te,
                &read_safetensors(&dir.join("text_encoder.safetensors"))?.tensors,
            )?;
            let optimizer = AdamW::load(dev, &dir.join("optimizer.safetensors"))?;
            Ok((unet, vae, te, optimizer, state))
        },
    )?;
    let Some((unet, mut vae, text_encoder, optimizer, state)) = found else {
        return Ok(None);
    };
    if let Some(s) = state.scaling_factor {
        vae.config.scaling_factor = s;
    }
    *models = Models {
        unet,
        vae,
        text_encoder,
    };
    Ok(Some((optimizer, state)))
}
