//! `train`: fine-tunes the base model on the latents of an `encode_latents` stage. Methods:
//! `lora` (low-rank adapters on the UNet's attention projections, kohya-format output),
//! `textual_inversion`, `hypernetwork` (A1111 hypernetworks, in `hypernetwork.rs`).
//!
//! Every step draws its batch, latent samples, noise and timesteps from a generator seeded by
//! the pipeline seed and the step, so a rerun is bit-identical on the CPU and a run resumed
//! from a checkpoint ends exactly where an uninterrupted one does.

mod hypernetwork;

pub use hypernetwork::HypernetworkParams;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use dfdx::prelude::*;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::ParamError;
use super::context::{StageContext, StageResult};
use super::encode_latents::{LatentsManifest, read_f32};
use super::model::{Component, open_checkpoint};
use crate::cache::BlobRef;
use crate::diffusion::nn::{Elem, Tensor2, Tensor3, Tensor4};
use crate::diffusion::pipeline::TextToImage;
use crate::diffusion::schedulers::{Ddpm, SeededNoise};
use crate::diffusion::{TextEncoder, UNet};
use crate::formats::HostTensor;
use crate::formats::embedding::{
    Embedding, read_embedding, write_a1111_safetensors, write_diffusers,
};
use crate::formats::lora::{
    KohyaMetadata, LoraComponent, LoraModule, LoraNetwork, read_lora, write_kohya,
};
use crate::pipeline::PipelineSettings;
use crate::train::lora::{LoraTarget, adapter_grads, extract, install, set_dropout};
use crate::train::lr::{A1111Schedule, LrSchedule};
use crate::train::mixed::{self, LossScaler, Masters};
use crate::train::optim::{AdamW, AdamWConfig, clip_coefficient};

mod dreambooth;
pub use dreambooth::DreamboothParams;
pub mod pretrain;
pub use pretrain::PretrainParams;

/// Implementation version (part of the key); bumped whenever the numbers change (v2: fused CPU kernels).
pub const VERSION: u32 = 2;

pub use crate::train::{Method, TrainMetrics};

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
    /// AdamW's decoupled weight decay.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Global gradient-norm clipping; 0 turns it off.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Timesteps are drawn uniformly from `min_timestep..max_timestep`.
    #[serde(default)]
    pub min_timestep: usize,
    /// Exclusive upper bound of the timesteps.
    #[serde(default = "default_max_timestep")]
    pub max_timestep: usize,
    /// Text-encoder layers skipped (diffusers' convention).
    #[serde(default)]
    pub clip_skip: usize,
    /// Recompute each UNet block's activations in the backward pass instead of keeping them
    /// (diffusers' `--gradient_checkpointing`): less memory, about a third more compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
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
    /// Module-name suffixes to adapt (the UNet's attention projections by default).
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
fn default_targets() -> Vec<String> {
    ["to_q", "to_k", "to_v", "to_out.0"]
        .map(String::from)
        .to_vec()
}

/// A parsed learning-rate schedule.
fn schedule(p: &TrainParams) -> Result<LrSchedule, String> {
    if p.lr_scheduler.contains(':') || p.lr_scheduler.trim().parse::<f64>().is_ok() {
        A1111Schedule::parse(&p.lr_scheduler)
            .map(LrSchedule::A1111)
            .map_err(|e| e.to_string())
    } else {
        LrSchedule::from_name(&p.lr_scheduler, p.lr_warmup_steps, p.steps)
            .map_err(|e| e.to_string())
    }
}

/// A resumable checkpoint: `state.json` beside the adapters and the optimiser state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    losses: Vec<f32>,
    eval_loss_before: f32,
    /// The loss scaler of a mixed-precision run (absent in f32 runs and older checkpoints).
    #[serde(default)]
    loss_scaler: Option<LossScaler>,
}

/// What a training run starts from (see [`TrainParams::setup`]).
struct Setup<D: Device<f32> + Device<E>, E: Elem = f32> {
    manifest: LatentsManifest,
    items: Vec<Item>,
    ckpt: crate::diffusion::Checkpoint,
    model_path: PathBuf,
    t2i: TextToImage<D, E>,
    dev: D,
}

/// How a run ended, for its metrics.
#[derive(Debug, Clone, Copy)]
struct RunEnd {
    eval_after: f32,
    wall_s: f64,
    resumed_from: u64,
    trainable_params: usize,
}

/// One latent item in memory.
struct Item {
    caption: String,
    mean: Vec<f32>,
    std: Vec<f32>,
    shape: [usize; 3],
}

impl TrainParams {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        if self.steps == 0 {
            return Err(ParamError::new(
                "steps",
                "steps must be positive",
                "e.g. steps = 500",
            ));
        }
        if self.batch_size == 0 {
            return Err(ParamError::new(
                "batch_size",
                "batch_size must be positive",
                "e.g. batch_size = 1",
            ));
        }
        if self.gradient_accumulation == 0 {
            return Err(ParamError::new(
                "gradient_accumulation",
                "gradient_accumulation must be positive",
                "1 means none",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(ParamError::new(
                "lr",
                "lr must be a positive number",
                "LoRA typically uses 1e-4",
            ));
        }
        for (key, lr) in [
            ("lora.lr", self.lora.lr),
            ("textual_inversion.lr", self.textual_inversion.lr),
            ("dreambooth.lr", self.dreambooth.lr),
            ("hypernetwork.lr", self.hypernetwork.lr),
        ] {
            if let Some(lr) = lr
                && !(lr.is_finite() && lr > 0.0)
            {
                return Err(ParamError::new(
                    key,
                    format!("{key} must be a positive number"),
                    "it overrides the stage's `lr` for that method; e.g. 5e-3",
                ));
            }
        }
        if self.min_timestep >= self.max_timestep || self.max_timestep > 1000 {
            return Err(ParamError::new(
                "max_timestep",
                format!(
                    "the timestep range {}..{} is empty or beyond 1000",
                    self.min_timestep, self.max_timestep
                ),
                "use 0 <= min_timestep < max_timestep <= 1000",
            ));
        }
        if let Err(e) = schedule(self) {
            return Err(ParamError::new(
                "lr_scheduler",
                e,
                "constant, constant_with_warmup, cosine, linear, or \"1e-3:100, 1e-4\"",
            ));
        }
        if self.method == Method::TextualInversion {
            let ti = &self.textual_inversion;
            if ti.token.as_deref().is_none_or(|t| t.trim().is_empty()) {
                return Err(ParamError::new(
                    "textual_inversion.token",
                    "textual inversion needs a `token`",
                    "add [stage.NAME.textual_inversion] token = \"zorb\" (the word your captions use)",
                ));
            }
            if ti.num_vectors == 0 || ti.num_vectors > 75 {
                return Err(ParamError::new(
                    "textual_inversion.num_vectors",
                    "num_vectors must be 1..=75",
                    "1 to 8 are common",
                ));
            }
            if ti.init_word.trim().is_empty() {
                return Err(ParamError::new(
                    "textual_inversion.init_word",
                    "init_word is empty",
                    "e.g. init_word = \"star\"",
                ));
            }
        }
        if self.method == Method::Dreambooth {
            self.validate_dreambooth()?;
        }
        if self.method == Method::Hypernetwork {
            self.hypernetwork.validate()?;
        }
        if self.lora.rank == 0 {
            return Err(ParamError::new(
                "lora.rank",
                "lora.rank must be positive",
                "4 to 128 are common",
            ));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(ParamError::new(
                "lora.dropout",
                format!("dropout {} is outside [0, 1)", self.lora.dropout),
                "0.1 is a common value; 0 turns it off",
            ));
        }
        if self.lora.text_encoder && self.lora.text_encoder_targets.is_empty() {
            return Err(ParamError::new(
                "lora.text_encoder_targets",
                "lora.text_encoder_targets is empty",
                "the default is [\"q_proj\", \"k_proj\", \"v_proj\", \"out_proj\"]",
            ));
        }
        if let Some(lr) = self.lora.text_encoder_lr
            && !(lr.is_finite() && lr > 0.0)
        {
            return Err(ParamError::new(
                "lora.text_encoder_lr",
                "text_encoder_lr must be a positive number",
                "kohya users often take half the UNet's rate, e.g. 5e-5",
            ));
        }
        if self.lora.targets.is_empty() {
            return Err(ParamError::new(
                "lora.targets",
                "lora.targets is empty",
                "the default is [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]",
            ));
        }
        Ok(())
    }

    pub(super) fn normalize(&mut self) {
        // A method's own rate replaces the stage's, so everything downstream (schedule, records,
        // metadata, the cache key) sees the rate the method really trains with.
        let method_lr = match self.method {
            Method::Lora => self.lora.lr,
            Method::TextualInversion => self.textual_inversion.lr,
            Method::Dreambooth => self.dreambooth.lr,
            Method::Hypernetwork => self.hypernetwork.lr,
        };
        if let Some(lr) = method_lr {
            self.lr = lr;
        }
        if self.lora.alpha.is_none() {
            self.lora.alpha = Some(self.lora.rank as f32);
        }
    }

    fn alpha(&self) -> f32 {
        self.lora.alpha.unwrap_or(self.lora.rank as f32)
    }

    pub(super) fn key_params(&self, settings: &PipelineSettings) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.remove("checkpoint_every");
            for (section, method) in [
                ("lora", Method::Lora),
                ("textual_inversion", Method::TextualInversion),
                ("dreambooth", Method::Dreambooth),
                ("hypernetwork", Method::Hypernetwork),
            ] {
                if self.method != method {
                    map.remove(section);
                }
            }
            map.insert("seed".into(), settings.seed.into());
            map.insert(
                "device".into(),
                crate::device::key_fragment(settings.device, settings.precision),
            );
        }
        v
    }

    pub(super) fn components() -> &'static [Component] {
        &[Component::Unet, Component::TextEncoder]
    }

    /// Whether the method trains in mixed precision (`precision = "f16"`): every method does.
    pub(crate) fn supports_half(&self) -> bool {
        true
    }

    pub(super) fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<StageResult> {
        let rt = crate::device::open(ctx.pipeline.settings.device)?;
        crate::on_device_precision!(rt, ctx.pipeline.settings.precision, dev, E => {
            self.run_on::<E, _>(ctx, dev)
        })
    }

    /// [`Self::run`] on the opened device, the UNet computing in `E` (LoRA; the other methods
    /// compute in f32, the pipeline refuses f16 for them).
    fn run_on<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        match self.method {
            Method::Lora => self.run_lora::<E, D>(ctx, dev),
            Method::TextualInversion => self.run_textual_inversion::<E, D>(ctx, dev),
            Method::Dreambooth => self.run_dreambooth::<E, D>(ctx, dev),
            Method::Hypernetwork => self.run_hypernetwork::<E, D>(ctx, dev),
        }
    }

    fn run_lora<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let settings = &ctx.pipeline.settings;
        let Setup {
            manifest,
            items,
            ckpt: _,
            model_path,
            t2i,
            dev,
        } = self.setup::<E, D>(ctx, dev)?;
        let mut contexts = self.frozen_contexts(&t2i, &items)?;
        let ddpm = Ddpm::new(&t2i.scheduler_config)?;
        let scaling = manifest.scaling_factor as f32;
        let mut unet = t2i.models.unet;
        let mut text_encoder = t2i.models.text_encoder;
        let mut ids: HashMap<String, Vec<u32>> = HashMap::new();
        for item in &items {
            ids.insert(
                item.caption.clone(),
                t2i.tokenizer.encode(&item.caption)?.input_ids,
            );
        }

        // Adapters: fresh, or from the newest valid checkpoint.
        let scratch = ctx.scratch()?;
        let seed = settings.seed;
        let mut fresh = LoraNetwork {
            unet: self.init_modules(&mut unet, &self.lora.targets, seed)?,
            ..LoraNetwork::default()
        };
        if self.lora.text_encoder {
            fresh.text_encoder =
                self.init_modules(&mut text_encoder, &self.lora.text_encoder_targets, seed)?;
        }
        let trainable_params: usize = fresh
            .iter()
            .map(|(_, _, m)| m.down.numel() + m.up.numel())
            .sum();
        let known = fresh.clone();
        let (network, mut optimizer, mut state) =
            match load_checkpoint(&scratch, &known, &dev, ctx)? {
                Some((n, o, s)) => (n, o, s),
                None => {
                    let (optimizer, state) = self.fresh_start(&dev);
                    (fresh, optimizer, state)
                }
            };
        install(&mut unet, &network, 1.0, &dev)?;
        install(&mut text_encoder, &network, 1.0, &dev)?;
        // The optimiser updates f32 masters; the adapters are refreshed from them (rounded to
        // f16 in mixed precision).
        let masters = Masters::of_lora(&network, &dev)?;
        let te_keys: std::collections::HashSet<String> = network
            .text_encoder
            .keys()
            .flat_map(|n| [format!("{n}.lora_A.weight"), format!("{n}.lora_B.weight")])
            .collect();
        let scaler = state.loss_scaler.unwrap_or_else(LossScaler::for_elem::<E>);
        let resumed_from = state.step;
        if state.step == 0 {
            state.eval_loss_before =
                eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed, &dev)?;
        } else {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {}",
                ctx.instance.name, state.step
            ));
        }

        let sched = schedule(self).map_err(anyhow::Error::msg)?;
        let mut steps = LoraSteps {
            unet: &mut unet,
            text_encoder: self.lora.text_encoder.then_some(&mut text_encoder),
            ddpm: &ddpm,
            items: &items,
            contexts: &contexts,
            ids: &ids,
            clip_skip: self.clip_skip,
            optimizer: &mut optimizer,
            scratch: &scratch,
            alpha: self.alpha(),
            dropout: self.lora.dropout,
            seed,
            te_lr_factor: self.lora.text_encoder_lr.map_or(1.0, |l| l / self.lr),
            masters,
            te_keys,
            scaler,
            finite: true,
        };
        let wall_s = self.drive(
            ctx, "lora", &mut state, &items, scaling, seed, &dev, &sched, &mut steps,
        )?;
        let LoraSteps {
            masters, scaler, ..
        } = steps;
        if scaler.skipped > 0 {
            ctx.progress.message(&format!(
                "{}: {} of {} steps skipped on an f16 gradient overflow (loss scale now {})",
                ctx.instance.name, scaler.skipped, self.steps, scaler.scale
            ));
        }

        // The trained text encoder changes the contexts the evaluation uses.
        if self.lora.text_encoder {
            for (caption, c) in contexts.iter_mut() {
                *c = text_encoder.encode(&[ids[caption].clone()], self.clip_skip)?;
            }
        }
        let eval_after = eval_loss(&unet, &ddpm, &items, &contexts, scaling, seed, &dev)?;
        let mut network = extract(&mut unet, self.alpha());
        network.text_encoder = extract(&mut text_encoder, self.alpha()).text_encoder;
        masters.into_network(&mut network, LoraComponent::Unet);
        masters.into_network(&mut network, LoraComponent::TextEncoder);
        let meta = KohyaMetadata {
            base_model_name: model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned()),
            base_model_hash: crate::sample::short_model_hash(&model_path).ok(),
            output_name: Some(ctx.instance.name.clone()),
            steps: Some(self.steps),
            max_train_steps: Some(self.steps),
            resolution: manifest.items.first().map(|i| (i.size[0], i.size[1])),
            learning_rate: Some(self.lr),
            unet_lr: Some(self.lr),
            text_encoder_lr: self
                .lora
                .text_encoder
                .then(|| self.lora.text_encoder_lr.unwrap_or(self.lr)),
            lr_scheduler: Some(self.lr_scheduler.clone()),
            optimizer: Some("AdamW".into()),
            seed: Some(seed),
            num_train_images: Some(manifest.items.len() as u64),
            ..KohyaMetadata::default()
        };
        let out = scratch.join("final.safetensors");
        write_kohya(&out, &network, &meta).with_context(|| format!("writing {}", out.display()))?;
        let blob = ctx.store.put_file(&out)?;

        let (mut result, metrics) = self.finish(
            ctx,
            &sched,
            &state,
            RunEnd {
                eval_after,
                wall_s,
                resumed_from,
                trainable_params,
            },
            ("lora.safetensors", blob),
        )?;
        result.summary = format!(
            "lora r{} α{}: {} steps, eval loss {:.4} → {:.4}, {:.1} steps/s, {} KiB",
            self.lora.rank,
            self.alpha(),
            self.steps,
            metrics.eval_loss_before,
            metrics.eval_loss_after,
            metrics.steps_per_s,
            metrics.artifact_bytes / 1024
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        Ok(result)
    }

    fn run_textual_inversion<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<StageResult> {
        let settings = &ctx.pipeline.settings;
        let ti = &self.textual_inversion;
        let token = ti
            .token
            .clone()
            .context("textual inversion needs a token")?;
        let Setup {
            manifest,
            items,
            ckpt: _,
            model_path,
            mut t2i,
            dev,
        } = self.setup::<E, D>(ctx, dev)?;
        let ddpm = Ddpm::new(&t2i.scheduler_config)?;
        let scaling = manifest.scaling_factor as f32;
        let d = t2i.models.text_encoder.config.hidden_size;

        // The initial vectors: the init word's token embeddings, repeated to num_vectors.
        let init_ids = t2i.tokenizer.encode_untruncated(&ti.init_word)?;
        let content: Vec<u32> = init_ids
            .iter()
            .copied()
            .filter(|&i| i != t2i.tokenizer.bos_id() && i != t2i.tokenizer.eos_id())
            .collect();
        if content.is_empty() {
            bail!("init_word {:?} has no tokens", ti.init_word);
        }
        let table = t2i.models.text_encoder.token_embedding.as_vec();
        let mut vectors = Vec::with_capacity(ti.num_vectors * d);
        for i in 0..ti.num_vectors {
            let row = content[i % content.len()] as usize;
            vectors.extend_from_slice(&table[row * d..(row + 1) * d]);
        }
        t2i.tokenizer.allow_existing_tokens(ti.allow_existing_token);
        let new_ids = t2i
            .add_embedding(&token, &vectors)
            .with_context(|| format!("adding the token `{token}`"))?;
        let mut ids: HashMap<String, Vec<u32>> = HashMap::new();
        for item in &items {
            let encoded = t2i.tokenizer.encode(&item.caption)?.input_ids;
            ids.insert(item.caption.clone(), encoded);
        }
        if !ids.values().any(|v| v.iter().any(|i| new_ids.contains(i))) {
            bail!(
                "no caption contains the token `{token}`: write it in the captions (e.g. template = \"a photo of {{token}}\" with token = \"{token}\")"
            );
        }

        let scratch = ctx.scratch()?;
        let seed = settings.seed;
        let (mut extra, mut optimizer, mut state) =
            match load_ti_checkpoint(&scratch, &token, ti.num_vectors * d, &dev, ctx)? {
                Some(found) => found,
                None => {
                    let extra = dev.tensor_from_vec(vectors.clone(), (ti.num_vectors, d));
                    let (optimizer, state) = self.fresh_start(&dev);
                    (extra, optimizer, state)
                }
            };
        let resumed_from = state.step;
        let contexts_now = |t2i: &mut TextToImage<D, E>,
                            extra: &Tensor2<D>|
         -> anyhow::Result<HashMap<String, Tensor3<D>>> {
            t2i.extra_embeddings = extra.as_vec();
            let mut out = HashMap::new();
            for caption in ids.keys() {
                out.insert(caption.clone(), t2i.encode_prompt(caption, self.clip_skip)?);
            }
            Ok(out)
        };
        if state.step == 0 {
            let contexts = contexts_now(&mut t2i, &extra)?;
            state.eval_loss_before = eval_loss(
                &t2i.models.unet,
                &ddpm,
                &items,
                &contexts,
                scaling,
                seed,
                &dev,
            )?;
        } else {
            ctx.progress.message(&format!(
                "{}: resuming from the checkpoint at step {}",
                ctx.instance.name, state.step
            ));
        }

        let sched = schedule(self).map_err(anyhow::Error::msg)?;
        let mut steps = TiSteps {
            params: self,
            t2i: &t2i,
            ddpm: &ddpm,
            items: &items,
            ids: &ids,
            extra: &mut extra,
            optimizer: &mut optimizer,
            scratch: &scratch,
            token: &token,
            model_path: &model_path,
            scaler: state.loss_scaler.unwrap_or_else(LossScaler::for_elem::<E>),
            finite: true,
        };
        let wall_s = self.drive(
            ctx,
            "embedding",
            &mut state,
            &items,
            scaling,
            seed,
            &dev,
            &sched,
            &mut steps,
        )?;
        let contexts = contexts_now(&mut t2i, &extra)?;
        let eval_after = eval_loss(
            &t2i.models.unet,
            &ddpm,
            &items,
            &contexts,
            scaling,
            seed,
            &dev,
        )?;

        let embedding = self.embedding(&token, &extra, self.steps, &model_path);
        let a1111 = scratch.join("embedding.safetensors");
        write_a1111_safetensors(&a1111, &embedding)
            .with_context(|| format!("writing {}", a1111.display()))?;
        let diffusers = scratch.join("learned_embeds.safetensors");
        write_diffusers(&diffusers, &embedding)
            .with_context(|| format!("writing {}", diffusers.display()))?;
        let blob = ctx.store.put_file(&a1111)?;
        let (mut result, metrics) = self.finish(
            ctx,
            &sched,
            &state,
            RunEnd {
                eval_after,
                wall_s,
                resumed_from,
                trainable_params: ti.num_vectors * d,
            },
            ("embedding.safetensors", blob),
        )?;
        result.outputs.insert(
            "learned_embeds.safetensors".into(),
            ctx.store.put_file(&diffusers)?,
        );
        result.summary = format!(
            "textual inversion `{token}` ×{}: {} steps, eval loss {:.4} → {:.4}, {:.1} steps/s",
            ti.num_vectors,
            self.steps,
            metrics.eval_loss_before,
            metrics.eval_loss_after,
            metrics.steps_per_s
        );
        let _ = std::fs::remove_dir_all(scratch.join("checkpoints"));
        Ok(result)
    }

    /// What every method starts from: the latent items of the `encode_latents` stage (an
    /// empty dataset is an error) and the base model.
    fn setup<E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        dev: D,
    ) -> anyhow::Result<Setup<D, E>> {
        let settings = &ctx.pipeline.settings;
        let (_, lat_record) = ctx.upstream_of_kind("encode_latents")?;
        let manifest: LatentsManifest = ctx.read_json(lat_record, "manifest.json")?;
        if manifest.items.is_empty() {
            bail!("the encode_latents stage has no items: the dataset has no images");
        }
        let items = load_items(ctx, &manifest)?;
        let ckpt = open_checkpoint(settings)?;
        let model_path = settings.base_model.clone().unwrap_or_default();
        let mut t2i = TextToImage::load_as(&ckpt, settings.model_config.as_deref(), &dev)
            .with_context(|| format!("loading {}", model_path.display()))?;
        t2i.models
            .unet
            .set_gradient_checkpointing(self.gradient_checkpointing);
        Ok(Setup {
            manifest,
            items,
            ckpt,
            model_path,
            t2i,
            dev,
        })
    }

    /// The frozen text encoder's states of every distinct caption of `items`.
    fn frozen_contexts<'i, E: Elem, D: Device<f32> + Device<E>>(
        &self,
        t2i: &TextToImage<D, E>,
        items: impl IntoIterator<Item = &'i Item>,
    ) -> anyhow::Result<HashMap<String, Tensor3<D>>> {
        let mut contexts = HashMap::new();
        for item in items {
            if !contexts.contains_key(&item.caption) {
                let ids = t2i.tokenizer.encode(&item.caption)?.input_ids;
                let c = t2i.models.text_encoder.encode(&[ids], self.clip_skip)?;
                contexts.insert(item.caption.clone(), c);
            }
        }
        Ok(contexts)
    }

    /// The step loop every method shares: per step, the gradients of `gradient_accumulation`
    /// seeded micro-batches are averaged, clipped by global norm and applied at the scheduled
    /// rate; a checkpoint is written every `checkpoint_every` steps. Returns the wall time.
    #[allow(clippy::too_many_arguments)]
    fn drive<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        label: &str,
        state: &mut CheckpointState,
        items: &[Item],
        scaling: f32,
        seed: u64,
        dev: &D,
        sched: &LrSchedule,
        method: &mut dyn StepMethod<D>,
    ) -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        let bar = ctx
            .progress
            .bar(self.steps, &format!("{} {label}", ctx.instance.name));
        bar.set_position(state.step);
        let delay = std::env::var("SDPIPE_TEST_ITEM_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok());
        while state.step < self.steps {
            ctx.check_cancelled()?;
            let step = state.step;
            let lr = sched.lr_at(self.lr, step);
            let mut summed: BTreeMap<String, HostTensor> = BTreeMap::new();
            let mut loss_sum = 0.0f32;
            for micro in 0..self.gradient_accumulation {
                let batch = self.draw_batch(items, scaling, seed, step, micro as u64, dev);
                let (loss, grads) = match method.grads(&batch) {
                    Ok(found) => found,
                    Err(e)
                        if e.downcast_ref::<crate::train::lora::LoraTrainError>()
                            .is_some_and(|e| {
                                matches!(
                                    e,
                                    crate::train::lora::LoraTrainError::Objective(
                                        crate::train::objective::ObjectiveError::NonFinite(_)
                                    )
                                )
                            }) =>
                    {
                        (f32::NAN, BTreeMap::new())
                    }
                    Err(e) => return Err(e.context(format!("step {}", step + 1))),
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
            let k = self.gradient_accumulation as f32;
            if k > 1.0 {
                summed
                    .values_mut()
                    .for_each(|g| g.data.iter_mut().for_each(|v| *v /= k));
            }
            if self.max_grad_norm > 0.0 {
                let norms: Vec<f32> = summed
                    .values()
                    .map(|g| g.data.iter().map(|v| v * v).sum::<f32>().sqrt())
                    .collect();
                let (_, coef) = clip_coefficient(&norms, self.max_grad_norm as f32);
                if coef < 1.0 {
                    summed
                        .values_mut()
                        .for_each(|g| g.data.iter_mut().for_each(|v| *v *= coef));
                }
            }
            if !loss_sum.is_finite() {
                bail!(
                    "the loss became {} at step {}: training diverged (lower `lr`, or set `max_grad_norm`); \
                     the last good checkpoint is kept in {}",
                    loss_sum / k,
                    step + 1,
                    ctx.scratch()?.join("checkpoints").display()
                );
            }
            method.apply(&summed, lr)?;
            state.losses.push(loss_sum / k);
            state.step += 1;
            bar.set_position(state.step);
            bar.set_message(format!(
                "{} {label} loss {:.4}",
                ctx.instance.name,
                loss_sum / k
            ));
            if self.checkpoint_every > 0
                && state.step.is_multiple_of(self.checkpoint_every)
                && state.step < self.steps
            {
                method.checkpoint(state)?;
            }
            if let Some(ms) = delay {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        bar.finish_and_clear();
        Ok(started.elapsed().as_secs_f64())
    }

    fn embedding<D: Device<f32>>(
        &self,
        token: &str,
        extra: &Tensor2<D>,
        step: u64,
        model_path: &Path,
    ) -> Embedding {
        Embedding {
            token: token.to_string(),
            vectors: HostTensor::from_tensor(extra),
            step: Some(step),
            sd_checkpoint: crate::sample::short_model_hash(model_path).ok(),
            sd_checkpoint_name: model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned()),
        }
    }

    /// The figures and outputs of a finished run: the loss curve, the metrics (in the record's
    /// stats) and the trained artifact as output `name`.
    fn finish(
        &self,
        ctx: &StageContext<'_>,
        sched: &LrSchedule,
        state: &CheckpointState,
        end: RunEnd,
        (name, artifact): (&str, BlobRef),
    ) -> anyhow::Result<(StageResult, TrainMetrics)> {
        let metrics = self.metrics(state, &end, artifact.size);
        let mut result = self.result(ctx, sched, state, &metrics)?;
        result.outputs.insert(name.into(), artifact);
        Ok((result, metrics))
    }

    fn metrics(&self, state: &CheckpointState, end: &RunEnd, artifact_bytes: u64) -> TrainMetrics {
        let RunEnd {
            eval_after,
            wall_s,
            resumed_from,
            trainable_params,
        } = *end;
        let tenth = (state.losses.len() / 10).max(1);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        TrainMetrics {
            method: self.method,
            steps: self.steps,
            eval_loss_before: state.eval_loss_before,
            eval_loss_after: eval_after,
            train_loss_first: mean(&state.losses[..tenth.min(state.losses.len())]),
            train_loss_last: mean(&state.losses[state.losses.len().saturating_sub(tenth)..]),
            wall_s,
            steps_per_s: (self.steps - resumed_from) as f64 / wall_s.max(1e-9),
            peak_memory_mib: peak_memory_mib(),
            artifact_bytes,
            trainable_params,
            resumed_from,
        }
    }

    /// The loss curve outputs and the figures of a finished run.
    fn result(
        &self,
        ctx: &StageContext<'_>,
        sched: &LrSchedule,
        state: &CheckpointState,
        metrics: &TrainMetrics,
    ) -> anyhow::Result<StageResult> {
        let mut csv = String::from("step,loss,lr\n");
        for (i, l) in state.losses.iter().enumerate() {
            csv.push_str(&format!(
                "{},{l},{}\n",
                i + 1,
                sched.lr_at(self.lr, i as u64)
            ));
        }
        let mut result = StageResult::default();
        result
            .outputs
            .insert("loss.csv".into(), ctx.store.put_bytes(csv.as_bytes())?);
        result.outputs.insert(
            "loss.json".into(),
            ctx.store.put_bytes(&serde_json::to_vec(&state.losses)?)?,
        );
        // Timings and memory vary between runs: they stay out of the outputs (and downstream
        // keys) and go into the record's figures.
        if let serde_json::Value::Object(mut map) = serde_json::to_value(metrics)? {
            result.stats.append(&mut map);
        }
        Ok(result)
    }

    /// Kohya/PEFT-initialised adapters for every module of `model` whose path ends with one of
    /// `targets`; an unmatched target is an error listing the module names that exist.
    fn init_modules<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
        &self,
        model: &mut M,
        targets: &[String],
        seed: u64,
    ) -> anyhow::Result<BTreeMap<String, LoraModule>> {
        let mut modules: Vec<(String, Vec<usize>)> = Vec::new();
        model.for_each_lora_linear_mut(&mut |name, linear| {
            let (o, i) = *linear.weight.shape();
            modules.push((name.to_string(), vec![o, i]));
        });
        let mut out = BTreeMap::new();
        for target in targets {
            let matching: Vec<&(String, Vec<usize>)> = modules
                .iter()
                .filter(|(n, _)| n.ends_with(&format!(".{target}")))
                .collect();
            if matching.is_empty() {
                let mut suffixes: Vec<String> = modules
                    .iter()
                    .map(|(n, _)| {
                        n.rsplit('.')
                            .take(2)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect::<Vec<_>>()
                            .join(".")
                    })
                    .collect();
                suffixes.sort();
                suffixes.dedup();
                bail!(
                    "LoRA target `{target}` matches no {} module; available: {}",
                    M::NAME,
                    suffixes.join(", ")
                );
            }
            for (name, shape) in matching {
                let module_seed = seed
                    ^ u64::from_le_bytes(blake3::hash(name.as_bytes()).as_bytes()[..8].try_into()?);
                let module = LoraModule::init(shape, self.lora.rank, self.alpha(), module_seed)
                    .map_err(anyhow::Error::msg)?;
                out.insert(name.clone(), module);
            }
        }
        Ok(out)
    }

    /// The micro-batch of `step`: items from one latent size, latent samples, noise, timesteps.
    #[allow(clippy::too_many_arguments)]
    fn draw_batch<D: Device<f32>>(
        &self,
        items: &[Item],
        scaling: f32,
        seed: u64,
        step: u64,
        micro: u64,
        dev: &D,
    ) -> Batch<D> {
        let batch_seed = mix(seed, step, micro);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(batch_seed);
        let first = rng.random_range(0..items.len());
        let same: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].shape == items[first].shape)
            .collect();
        let mut picked = vec![first];
        while picked.len() < self.batch_size {
            picked.push(same[rng.random_range(0..same.len())]);
        }
        let [c, h, w] = items[first].shape;
        let mut noise_src = SeededNoise::new(batch_seed ^ 0x05ee_d0f0_015e);
        let mut latents = Vec::with_capacity(picked.len() * c * h * w);
        for &i in &picked {
            for (m, s) in items[i].mean.iter().zip(&items[i].std) {
                latents.push((m + s * noise_src.next_normal() as f32) * scaling);
            }
        }
        let noise: Vec<f32> = (0..latents.len())
            .map(|_| noise_src.next_normal() as f32)
            .collect();
        let timesteps: Vec<usize> = picked
            .iter()
            .map(|_| rng.random_range(self.min_timestep..self.max_timestep))
            .collect();
        let b = picked.len();
        Batch {
            latents: dev.tensor_from_vec(latents, (b, c, h, w)),
            noise: dev.tensor_from_vec(noise, (b, c, h, w)),
            timesteps,
            picked,
            step,
            micro,
        }
    }
}

/// One micro-batch: latent samples, noise, timesteps, and which items they are.
struct Batch<D: Device<f32>> {
    latents: Tensor4<D>,
    noise: Tensor4<D>,
    timesteps: Vec<usize>,
    picked: Vec<usize>,
    /// The optimiser step and micro-batch it was drawn for.
    step: u64,
    micro: u64,
}

/// The text-encoder states of the picked items' captions, `[b, 77, d]`.
fn batch_context<D: Device<f32>>(
    items: &[Item],
    contexts: &HashMap<String, Tensor3<D>>,
    picked: &[usize],
) -> anyhow::Result<Tensor3<D>> {
    let parts: Vec<&Tensor3<D>> = picked
        .iter()
        .map(|&i| {
            contexts
                .get(&items[i].caption)
                .context("caption not encoded")
        })
        .collect::<anyhow::Result<_>>()?;
    let (_, n, d) = *parts[0].shape();
    let data: Vec<f32> = parts.iter().flat_map(|t| t.as_vec()).collect();
    let dev = parts[0].device().clone();
    Ok(dev.tensor_from_vec(data, (parts.len(), n, d)))
}

fn mix(seed: u64, step: u64, micro: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&step.to_le_bytes());
    h.update(&micro.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or_default())
}

/// Mean loss over a fixed evaluation set: up to 8 items at their latent means, fixed noise and
/// timesteps spread over the range, no gradients.
fn eval_loss<E: Elem, D: Device<f32> + Device<E>>(
    unet: &UNet<D, E>,
    ddpm: &Ddpm,
    items: &[Item],
    contexts: &HashMap<String, Tensor3<D>>,
    scaling: f32,
    seed: u64,
    dev: &D,
) -> anyhow::Result<f32> {
    let n = items.len().min(8);
    let mut total = 0.0f32;
    for (i, item) in items.iter().take(n).enumerate() {
        let [c, h, w] = item.shape;
        let mut noise_src = SeededNoise::new(mix(seed, u64::MAX, i as u64));
        let latents: Vec<f32> = item.mean.iter().map(|m| m * scaling).collect();
        let noise: Vec<f32> = (0..latents.len())
            .map(|_| noise_src.next_normal() as f32)
            .collect();
        let t = 50 + (900 * i) / n.max(1);
        let latents = dev.tensor_from_vec(latents, (1, c, h, w));
        let noise = dev.tensor_from_vec(noise, (1, c, h, w));
        let context = contexts
            .get(&item.caption)
            .cloned()
            .context("caption not encoded")?;
        total += crate::train::objective::eval_loss(
            unet,
            ddpm,
            &latents,
            &noise,
            &[t],
            context.to_dtype::<E>(),
        )?;
    }
    Ok(total / n as f32)
}

fn save_checkpoint<D: Device<f32>>(
    scratch: &Path,
    network: &LoraNetwork,
    optimizer: &AdamW<D>,
    state: &CheckpointState,
) -> anyhow::Result<()> {
    save_checkpoint_with(scratch, state, |dir| {
        write_kohya(
            &dir.join("lora.safetensors"),
            network,
            &KohyaMetadata::default(),
        )?;
        optimizer.save(&dir.join("optimizer.safetensors"))?;
        Ok(())
    })
}

/// Writes a checkpoint (`write` fills the method's files, then `state.json`) into a temp dir
/// renamed to `checkpoints/step-N` (atomic), keeping the two newest.
fn save_checkpoint_with(
    scratch: &Path,
    state: &impl StepState,
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
    let mut all = checkpoint_dirs(scratch);
    while all.len() > 2 {
        let _ = std::fs::remove_dir_all(all.remove(0));
    }
    Ok(())
}

fn checkpoint_dirs(scratch: &Path) -> Vec<PathBuf> {
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

/// The newest checkpoint `read` accepts (newest first); one it rejects is reported and the
/// previous one tried, so a checkpoint corrupted by a crash costs only the steps since the one
/// before it.
fn newest_checkpoint<T>(
    scratch: &Path,
    ctx: &StageContext<'_>,
    mut read: impl FnMut(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    for dir in checkpoint_dirs(scratch).into_iter().rev() {
        match read(&dir) {
            Ok(found) => return Ok(Some(found)),
            Err(e) => ctx.progress.message(&format!(
                "warning: checkpoint {} is unreadable ({e:#}); trying the previous one",
                dir.display()
            )),
        }
    }
    Ok(None)
}

/// What a checkpoint's `state.json` holds: at least the step it was written at.
trait StepState: Serialize {
    /// Steps done when the checkpoint was written.
    fn step(&self) -> u64;
}

impl StepState for CheckpointState {
    fn step(&self) -> u64 {
        self.step
    }
}

/// The `state.json` of a checkpoint directory.
fn read_state<S: serde::de::DeserializeOwned>(dir: &Path) -> anyhow::Result<S> {
    Ok(serde_json::from_slice(&std::fs::read(
        dir.join("state.json"),
    )?)?)
}

impl TrainParams {
    /// A fresh optimiser and step 0, for a run with no usable checkpoint.
    fn fresh_start<D: Device<f32>>(&self, dev: &D) -> (AdamW<D>, CheckpointState) {
        let cfg = AdamWConfig {
            weight_decay: self.weight_decay,
            ..AdamWConfig::default()
        };
        (
            AdamW::new(dev, cfg),
            CheckpointState {
                step: 0,
                losses: Vec::new(),
                eval_loss_before: f32::NAN,
                loss_scaler: None,
            },
        )
    }
}

/// The newest readable LoRA checkpoint with this run's modules.
fn load_checkpoint<D: Device<f32>>(
    scratch: &Path,
    known: &LoraNetwork,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<(LoraNetwork, AdamW<D>, CheckpointState)>> {
    newest_checkpoint(scratch, ctx, |dir| {
        let state = read_state(dir)?;
        let (mut network, _) = read_lora(&dir.join("lora.safetensors"), None)?;
        for component in [LoraComponent::Unet, LoraComponent::TextEncoder] {
            let expected = known.modules(component);
            let found = network.modules_mut(component);
            for (name, m) in found.iter_mut() {
                let fresh = expected
                    .get(name)
                    .context("checkpoint has a module this run does not train")?;
                m.alpha = fresh.alpha;
            }
            if found.len() != expected.len() {
                bail!(
                    "checkpoint has {} {component:?} modules, expected {}",
                    found.len(),
                    expected.len()
                );
            }
        }
        let optimizer = AdamW::load(dev, &dir.join("optimizer.safetensors"))?;
        Ok((network, optimizer, state))
    })
}

/// Peak resident memory of this process in MiB (Linux VmHWM; 0 elsewhere).
fn peak_memory_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The latent items of an encode_latents manifest, in memory.
fn load_items(ctx: &StageContext<'_>, manifest: &LatentsManifest) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::with_capacity(manifest.items.len());
    for item in &manifest.items {
        let bytes = ctx.store.read_blob(&item.latents)?;
        let (mean, shape) =
            read_f32(&bytes, "mean").with_context(|| format!("latents of {}", item.name))?;
        let (std, _) =
            read_f32(&bytes, "std").with_context(|| format!("latents of {}", item.name))?;
        let [c, h, w] = shape[..] else {
            bail!("latents of {} have shape {shape:?}", item.name)
        };
        items.push(Item {
            caption: item.caption.clone(),
            mean,
            std,
            shape: [c, h, w],
        });
    }
    Ok(items)
}

fn save_ti_checkpoint<D: Device<f32>>(
    scratch: &Path,
    embedding: &Embedding,
    optimizer: &AdamW<D>,
    state: &CheckpointState,
) -> anyhow::Result<()> {
    save_checkpoint_with(scratch, state, |dir| {
        write_a1111_safetensors(&dir.join("embedding.safetensors"), embedding)?;
        optimizer.save(&dir.join("optimizer.safetensors"))?;
        Ok(())
    })
}

/// What a textual-inversion checkpoint restores: vectors, optimiser, state.
type TiResume<D> = (Tensor2<D>, AdamW<D>, CheckpointState);

/// The newest readable textual-inversion checkpoint (vectors, optimiser, state).
fn load_ti_checkpoint<D: Device<f32>>(
    scratch: &Path,
    token: &str,
    numel: usize,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<TiResume<D>>> {
    newest_checkpoint(scratch, ctx, |dir| {
        let state = read_state(dir)?;
        let (emb, _) = read_embedding(&dir.join("embedding.safetensors"), Some(token))?;
        if emb.vectors.numel() != numel || emb.vectors.shape.len() != 2 {
            bail!("checkpoint vectors have shape {:?}", emb.vectors.shape);
        }
        let extra = dev.tensor_from_vec(
            emb.vectors.data.clone(),
            (emb.vectors.shape[0], emb.vectors.shape[1]),
        );
        let optimizer = AdamW::load(dev, &dir.join("optimizer.safetensors"))?;
        Ok((extra, optimizer, state))
    })
}

/// What differs between training methods inside the shared step loop ([`TrainParams::drive`]).
trait StepMethod<D: Device<f32>> {
    /// The loss of one micro-batch and the gradients of the trained tensors, by name.
    fn grads(&mut self, batch: &Batch<D>) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)>;
    /// One optimiser update with the averaged, clipped gradients.
    fn apply(&mut self, grads: &BTreeMap<String, HostTensor>, lr: f64) -> anyhow::Result<()>;
    /// Writes a resumable checkpoint of the trained tensors and the optimiser after `state`.
    fn checkpoint(&mut self, state: &CheckpointState) -> anyhow::Result<()>;
}

/// LoRA: adapters installed on the UNet (computing in `E`) and the text encoder (f32).
struct LoraSteps<'a, D: Device<f32> + Device<E>, E: Elem> {
    unet: &'a mut UNet<D, E>,
    /// The text encoder when its adapters train too (contexts are then computed per batch).
    text_encoder: Option<&'a mut TextEncoder<D>>,
    ddpm: &'a Ddpm,
    items: &'a [Item],
    /// Frozen-text-encoder contexts by caption.
    contexts: &'a HashMap<String, Tensor3<D>>,
    /// Token ids by caption.
    ids: &'a HashMap<String, Vec<u32>>,
    clip_skip: usize,
    optimizer: &'a mut AdamW<D>,
    scratch: &'a Path,
    alpha: f32,
    dropout: f32,
    seed: u64,
    /// Text-encoder learning rate / UNet learning rate.
    te_lr_factor: f64,
    /// f32 values of every adapter, which the optimiser updates.
    masters: Masters<D>,
    /// Parameter names of the text encoder's adapters.
    te_keys: std::collections::HashSet<String>,
    /// Loss scaling (a fixed 1 in f32).
    scaler: LossScaler,
    /// Whether the last micro-batches' unscaled gradients were all finite.
    finite: bool,
}

impl<D: Device<f32> + Device<E>, E: Elem> LoraSteps<'_, D, E> {
    /// The adapters as a network, with their f32 master values.
    fn network(&mut self) -> LoraNetwork {
        let mut network = extract(self.unet, self.alpha);
        if let Some(te) = self.text_encoder.as_deref_mut() {
            network.text_encoder = extract(te, self.alpha).text_encoder;
        }
        self.masters.into_network(&mut network, LoraComponent::Unet);
        self.masters
            .into_network(&mut network, LoraComponent::TextEncoder);
        network
    }
}

impl<D: Device<f32> + Device<E>, E: Elem> StepMethod<D> for LoraSteps<'_, D, E> {
    fn grads(&mut self, batch: &Batch<D>) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)> {
        if self.dropout > 0.0 {
            let dropout_seed = mix(self.seed ^ 0xD80F_0F7A, batch.step, batch.micro);
            set_dropout(self.unet, self.dropout, dropout_seed);
            if let Some(te) = self.text_encoder.as_deref_mut() {
                set_dropout(te, self.dropout, dropout_seed);
            }
        }
        let scale = self.scaler.scale;
        let Some(te) = self.text_encoder.as_deref_mut() else {
            let context = batch_context(self.items, self.contexts, &batch.picked)?.to_dtype::<E>();
            let (loss, grads) = mixed::loss_and_grads(
                self.unet,
                self.ddpm,
                &batch.latents,
                &batch.noise,
                &batch.timesteps,
                &context,
                scale,
            )?;
            let mut out = adapter_grads(self.unet, &grads);
            self.finite &= self.scaler.unscale(&mut out);
            return Ok((loss, out));
        };
        let batch_ids: Vec<Vec<u32>> = batch
            .picked
            .iter()
            .map(|&i| self.ids[&self.items[i].caption].clone())
            .collect();
        // Two backward passes: the UNet's (in `E`) gives the context's gradient, which the
        // text encoder's (f32) carries to its adapters.
        let embeds = te.embed_tokens(&batch_ids)?;
        let (context, te_tape) = te
            .forward_embeds(embeds.leaky_trace(), self.clip_skip)?
            .split_tape();
        let context_e = context.clone().to_dtype::<E>();
        let (loss, grads) = mixed::loss_and_grads(
            self.unet,
            self.ddpm,
            &batch.latents,
            &batch.noise,
            &batch.timesteps,
            &context_e,
            scale,
        )?;
        let mut out = adapter_grads(self.unet, &grads);
        let g_context = grads.get(&context_e).to_dtype::<f32>() * (1.0 / scale);
        drop(grads);
        let te_grads = (context.put_tape(te_tape) * g_context).sum().backward();
        let mut te_out = adapter_grads(te, &te_grads);
        self.finite &= self.scaler.unscale(&mut out);
        self.finite &= te_out
            .values()
            .all(|g| g.data.iter().all(|v| v.is_finite()));
        out.append(&mut te_out);
        Ok((loss, out))
    }

    fn apply(&mut self, grads: &BTreeMap<String, HostTensor>, lr: f64) -> anyhow::Result<()> {
        let finite = std::mem::replace(&mut self.finite, true);
        if !finite && E::HALF {
            // an f16 overflow: skip the step with a smaller scale (GradScaler)
            self.scaler.update(false);
            return Ok(());
        }
        let te_keys = &self.te_keys;
        self.masters
            .update(grads, self.optimizer, lr, |n| !te_keys.contains(n))?;
        if self.text_encoder.is_some() {
            self.masters
                .update(grads, self.optimizer, lr * self.te_lr_factor, |n| {
                    te_keys.contains(n)
                })?;
        }
        self.masters.write_lora(self.unet);
        if let Some(te) = self.text_encoder.as_deref_mut() {
            self.masters.write_lora(te);
        }
        self.scaler.update(true);
        Ok(())
    }

    fn checkpoint(&mut self, state: &CheckpointState) -> anyhow::Result<()> {
        let network = self.network();
        let mut state = state.clone();
        state.loss_scaler = E::HALF.then_some(self.scaler);
        save_checkpoint(self.scratch, &network, self.optimizer, &state)
    }
}

/// Textual inversion: the token's vectors, fed through the frozen text encoder.
struct TiSteps<'a, D: Device<f32> + Device<E>, E: Elem> {
    params: &'a TrainParams,
    t2i: &'a TextToImage<D, E>,
    ddpm: &'a Ddpm,
    items: &'a [Item],
    ids: &'a HashMap<String, Vec<u32>>,
    extra: &'a mut Tensor2<D>,
    optimizer: &'a mut AdamW<D>,
    scratch: &'a Path,
    token: &'a str,
    model_path: &'a Path,
    /// Loss scaling (a fixed 1 in f32).
    scaler: LossScaler,
    /// Whether the last micro-batches' gradients were all finite.
    finite: bool,
}

/// The parameter name of the trained vectors (A1111's tensor name).
const EMB_PARAMS: &str = "emb_params";

impl<D: Device<f32> + Device<E>, E: Elem> StepMethod<D> for TiSteps<'_, D, E> {
    fn grads(&mut self, batch: &Batch<D>) -> anyhow::Result<(f32, BTreeMap<String, HostTensor>)> {
        let batch_ids: Vec<Vec<u32>> = batch
            .picked
            .iter()
            .map(|&i| self.ids[&self.items[i].caption].clone())
            .collect();
        let (loss, grad) = crate::train::textual_inversion::loss_and_grad(
            &self.t2i.models.text_encoder,
            &self.t2i.models.unet,
            self.ddpm,
            &batch_ids,
            self.extra,
            self.params.clip_skip,
            &batch.latents,
            &batch.noise,
            &batch.timesteps,
            self.scaler.scale,
        )?;
        let grad = HostTensor::from_tensor(&grad);
        self.finite &= grad.data.iter().all(|v| v.is_finite());
        Ok((loss, BTreeMap::from([(EMB_PARAMS.to_string(), grad)])))
    }

    fn apply(&mut self, grads: &BTreeMap<String, HostTensor>, lr: f64) -> anyhow::Result<()> {
        let finite = std::mem::replace(&mut self.finite, true);
        if !finite && E::HALF {
            // an f16 overflow: skip the step with a smaller scale (GradScaler)
            self.scaler.update(false);
            return Ok(());
        }
        self.scaler.update(true);
        let dev = self.extra.device().clone();
        let grad = grads
            .get(EMB_PARAMS)
            .and_then(|g| g.to_tensor::<(usize, usize), D>(&dev))
            .context("no gradient for the embedding")?;
        Ok(self.optimizer.update(EMB_PARAMS, self.extra, &grad, lr)?)
    }

    fn checkpoint(&mut self, state: &CheckpointState) -> anyhow::Result<()> {
        let embedding = self
            .params
            .embedding(self.token, self.extra, state.step, self.model_path);
        let mut state = state.clone();
        state.loss_scaler = E::HALF.then_some(self.scaler);
        save_ti_checkpoint(self.scratch, &embedding, self.optimizer, &state)
    }
}
