//! The train stage's table in the pipeline file: `[stage.NAME] kind = "train"` and its
//! per-method tables (`[stage.NAME.lora]`, `.textual_inversion`; DreamBooth's and the
//! hypernetwork's live beside their runs), with the documented defaults.

use serde::{Deserialize, Serialize};

use crate::diffusion::schedulers::PredictionType;
use crate::train::optim::OptimizerKind;
use crate::train::timesteps::{TimestepBias, TimestepDistribution};

use super::{DreamboothParams, HypernetworkParams, Method};

/// `[stage.NAME] kind = "train"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// The method.
    pub method: Method,
    /// Optimiser steps.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Items per micro-batch (drawn from one resolution bucket).
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged per step.
    #[serde(default = "one")]
    pub gradient_accumulation: usize,
    /// Base learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// `constant`, `constant_with_warmup`, `cosine`, `linear`, or an A1111 schedule such as
    /// `"1e-3:100, 1e-4:1000, 1e-5"` (rate until step; the last rate runs to the end).
    #[serde(default = "default_scheduler")]
    pub lr_scheduler: String,
    /// Warm-up steps of the named schedules.
    #[serde(default)]
    pub lr_warmup_steps: u64,
    /// Weight decay, decoupled (`p ← p − lr·wd·p`) for every optimiser but schedule-free
    /// AdamW, which adds `wd·y` to its normalised gradient as its package does.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// The optimiser: `"adamw"` (default), `"adamw8bit"`, `"lion"`, `"prodigy"` (set
    /// `lr = 1.0`: it multiplies Prodigy's own step-size estimate), `"schedulefree_adamw"`
    /// or `"adafactor"`, each with its reference implementation's defaults
    /// ([`crate::train::optim`]). Left out when serialised as `adamw`, so pipelines without
    /// the key keep their cache keys.
    #[serde(default, skip_serializing_if = "OptimizerKind::is_adamw")]
    pub optimizer: OptimizerKind,
    /// Global gradient-norm clipping; 0 turns it off.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Timesteps are drawn uniformly from `min_timestep..max_timestep`.
    #[serde(default)]
    pub min_timestep: usize,
    /// Exclusive upper bound of the timesteps.
    #[serde(default = "default_max_timestep")]
    pub max_timestep: usize,
    /// Min-SNR-γ loss weighting (Hang et al. 2023; kohya's and diffusers' `min_snr_gamma`):
    /// each sample's loss times `min(SNR, γ) / SNR` (ε) or `/ (SNR + 1)` (v). Unset = plain MSE;
    /// 5 is the paper's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    /// kohya's `debiased_estimation_loss`: each sample's loss times `1 / √SNR` (SNR capped at
    /// 1000; `√(SNR + 1)` for v-prediction).
    #[serde(default, skip_serializing_if = "is_false")]
    pub debiased_estimation: bool,
    /// kohya's `noise_offset`: each (sample, channel) plane of the training noise is shifted by
    /// `noise_offset · N(0, 1)`, so the model can learn overall brightness (0.05–0.1 is usual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_offset: Option<f64>,
    /// kohya's `adaptive_noise_scale`: the offset grows by this times `|mean|` of each latent
    /// plane (requires `noise_offset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_noise_scale: Option<f64>,
    /// kohya's `multires_noise_iterations`: pyramid noise over up to this many coarser levels
    /// (6–10 is usual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multires_noise_iterations: Option<usize>,
    /// kohya's `multires_noise_discount`: level `i` weighs `discount^i` (default 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multires_noise_discount: Option<f64>,
    /// How timesteps are drawn: `"uniform"` (default) or `"logit_normal"` (SD3's sampling,
    /// favouring the middle of the range; `logit_mean`, `logit_std`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_sampling: Option<TimestepDistribution>,
    /// The logit-normal's mean (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_mean: Option<f64>,
    /// The logit-normal's standard deviation (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_std: Option<f64>,
    /// Bias the uniform draw toward the `"high"` (noisy: composition) or `"low"` (detail) end,
    /// as diffusers' `timestep_bias_strategy` (later / earlier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_bias: Option<TimestepBias>,
    /// How many times likelier the biased timesteps are (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_bias_multiplier: Option<f64>,
    /// The share of the range that is biased (default 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_bias_portion: Option<f64>,
    /// kohya's `caption_dropout_rate`: the share of drawn captions replaced by the empty
    /// caption, so the model also learns the unconditional prediction that classifier-free
    /// guidance uses (0.05–0.1 is usual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_dropout: Option<f64>,
    /// kohya's `caption_tag_dropout_rate`: each tag after the first `keep_tokens` is left out
    /// with this probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_tag_dropout: Option<f64>,
    /// kohya's `shuffle_caption`: the tags after the first `keep_tokens` in a new order each
    /// time an item is drawn.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shuffle_caption: bool,
    /// kohya's `keep_tokens`: leading tags that stay first and are never dropped (the trigger
    /// word); default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_tokens: Option<usize>,
    /// kohya's `caption_separator`: what separates tags (default `","`); shaped captions are
    /// joined with `", "` as kohya joins them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_separator: Option<String>,
    /// What the UNet learns to predict: `"epsilon"` (the noise) or `"v_prediction"` (the
    /// velocity √ᾱ·ε − √(1−ᾱ)·x₀), as diffusers' `--prediction_type`. Default: the base
    /// model's scheduler config. A changed parameterisation is written beside the trained file
    /// as `scheduler_config.json`, and the grid samples that variant with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    /// Rescale the noise schedule to zero terminal SNR (Lin et al. 2023; kohya's
    /// `zero_terminal_snr`, diffusers' `rescale_betas_zero_snr`): the last timestep is pure
    /// noise, so the model learns to make images from it (very dark and bright ones included).
    /// Needs v-prediction. The variant is sampled with the rescaled schedule and `trailing`
    /// timestep spacing, as the paper prescribes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub zero_terminal_snr: bool,
    /// Text-encoder layers skipped (diffusers' convention).
    #[serde(default)]
    pub clip_skip: usize,
    /// Recompute each UNet block's activations in the backward pass instead of keeping them
    /// (diffusers' `--gradient_checkpointing`): less memory, about a third more compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Hold this share of the dataset out of training (at least one item), chosen by the
    /// seed, for the validation loss (kohya's `validation_split`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_split: Option<f64>,
    /// Compute the validation loss on the held-out items (fixed latents, noise and timesteps)
    /// before training and every this many steps; logged in `validation.csv` and plotted in
    /// the report beside the training loss. Needs `validation_split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate_every: Option<u64>,
    /// Keep an exponential moving average of the trained weights with this largest decay
    /// (diffusers' `--use_ema`; 0.999 suits a few hundred steps, 0.9999 long runs). Its
    /// artifact is written as `ema/<file>` and sampled by the grid as the row `NAME#ema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
    /// diffusers' `use_ema_warmup`: the decay grows as `1 − (1 + step)^(−2/3)` instead of
    /// `(1 + step) / (10 + step)`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ema_warmup: bool,
    /// Also save the trained artifact every this many steps (before the last), as
    /// `step=N/<file>`; the grid samples each as its own row `NAME#step=N`, to see which step
    /// is best.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_every: Option<u64>,
    /// Write a resumable checkpoint every this many steps (0: never). Does not change results.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// `[stage.NAME.lora]`.
    #[serde(default)]
    pub lora: LoraParams,
    /// `[stage.NAME.textual_inversion]`.
    #[serde(default)]
    pub textual_inversion: TextualInversionParams,
    /// `[stage.NAME.dreambooth]`.
    #[serde(default)]
    pub dreambooth: DreamboothParams,
    /// `[stage.NAME.hypernetwork]` (boxed: it is large and most stages do not use it).
    #[serde(default)]
    pub hypernetwork: Box<HypernetworkParams>,
}

/// Textual-inversion settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextualInversionParams {
    /// The new token, as the captions and prompts write it (e.g. `zorb`); it must not already
    /// be a single token of the vocabulary.
    #[serde(default)]
    pub token: Option<String>,
    /// Word whose embedding initialises the vectors (A1111's "initialization text").
    #[serde(default = "default_init_word")]
    pub init_word: String,
    /// Vectors per token (A1111's "number of vectors per token").
    #[serde(default = "one")]
    pub num_vectors: usize,
    /// Allow a `token` that is already one word of the vocabulary: the embedding then replaces
    /// that word in every prompt.
    #[serde(default)]
    pub allow_existing_token: bool,
    /// This method's learning rate in a `matrix.method` stage; default the stage's `lr`.
    #[serde(default)]
    pub lr: Option<f64>,
}

fn minus_one() -> i64 {
    -1
}

fn is_minus_one(v: &i64) -> bool {
    *v == -1
}

impl Default for TextualInversionParams {
    fn default() -> Self {
        TextualInversionParams {
            token: None,
            init_word: default_init_word(),
            num_vectors: 1,
            allow_existing_token: false,
            lr: None,
        }
    }
}

fn default_init_word() -> String {
    "*".into()
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraParams {
    /// Rank (kohya's `network_dim`).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Alpha (kohya's `network_alpha`); the update is scaled by alpha / rank. Default: the rank.
    #[serde(default)]
    pub alpha: Option<f32>,
    /// Module-path suffixes to adapt (the UNet's attention projections by default; any linear
    /// or convolution layer, `ff.net.2`, `proj_in`, `conv1` (LoCon), may be named).
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Dropout probability on each adapter's input during training (PEFT's `lora_dropout`).
    #[serde(default)]
    pub dropout: f32,
    /// Also adapt the text encoder (kohya's default; `lora_te_…` modules).
    #[serde(default)]
    pub text_encoder: bool,
    /// Text-encoder module suffixes to adapt (`q_proj`, `k_proj`, `v_proj`, `out_proj`,
    /// `mlp.fc1`, `mlp.fc2`).
    #[serde(default = "default_te_targets")]
    pub text_encoder_targets: Vec<String>,
    /// Learning rate of the text-encoder adapters (kohya's `text_encoder_lr`); default `lr`.
    #[serde(default)]
    pub text_encoder_lr: Option<f64>,
    /// This method's learning rate in a `matrix.method` stage; default the stage's `lr`.
    #[serde(default)]
    pub lr: Option<f64>,
    /// LoKr's factorization factor (LyCORIS' `factor`): each of a weight's dimensions splits
    /// into `factor × rest`; -1 (the default) splits as close to a square as possible.
    #[serde(default = "minus_one", skip_serializing_if = "is_minus_one")]
    pub factor: i64,
}

impl Default for LoraParams {
    fn default() -> Self {
        LoraParams {
            rank: default_rank(),
            alpha: None,
            targets: default_targets(),
            dropout: 0.0,
            text_encoder: false,
            text_encoder_targets: default_te_targets(),
            text_encoder_lr: None,
            lr: None,
            factor: -1,
        }
    }
}

fn default_te_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "out_proj"]
        .map(String::from)
        .to_vec()
}

fn default_steps() -> u64 {
    500
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-4
}
fn default_scheduler() -> String {
    "constant".into()
}
fn default_weight_decay() -> f64 {
    1e-2
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_max_timestep() -> usize {
    1000
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_rank() -> usize {
    4
}
pub(super) fn default_targets() -> Vec<String> {
    ["to_q", "to_k", "to_v", "to_out.0"]
        .map(String::from)
        .to_vec()
}

/// serde's `skip_serializing_if` for a flag off by default: a key added later leaves the cache
/// keys of existing pipelines as they were.
fn is_false(b: &bool) -> bool {
    !*b
}
