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

mod architecture;
mod phases;
mod run;

pub use architecture::Architecture;

use serde::{Deserialize, Serialize};

use crate::formats::checkpoint::SaveDtype;
use crate::stages::ParamError;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// The worlds a model can be pretrained on.
pub const WORLDS: &[&str] = &["shapes"];

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
    /// the bundled base model's sizes (`Architecture::default()`).
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
}
