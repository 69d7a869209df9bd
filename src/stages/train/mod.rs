//! `train`: fine-tunes the base model on the latents of an `encode_latents` stage. Methods:
//! `lora` (low-rank adapters on the UNet's attention projections, kohya-format output),
//! `textual_inversion`, `hypernetwork` (A1111 hypernetworks, in `hypernetwork.rs`).
//!
//! Every step draws its batch, latent samples, noise and timesteps from a generator seeded by
//! the pipeline seed and the step, so a rerun is bit-identical on the CPU and a run resumed
//! from a checkpoint ends exactly where an uninterrupted one does.

mod hypernetwork;

pub use hypernetwork::HypernetworkParams;

use crate::stages::artifact::Artifact;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::context::{StageContext, StageResult};
use super::encode_latents::{LatentsManifest, read_f32};
use super::model::{Component, open_checkpoint};
use crate::cache::BlobRef;
use crate::diffusion::nn::{Elem, Tensor2, Tensor3};
use crate::diffusion::pipeline::TextToImage;
use crate::diffusion::schedulers::Ddpm;
use crate::formats::HostTensor;
use crate::formats::embedding::{
    Embedding, read_embedding, write_a1111_safetensors, write_diffusers,
};
use crate::formats::lora::{
    KohyaMetadata, LoraComponent, LoraModule, LoraNetwork, read_lora, write_kohya,
};
use crate::settings::PipelineSettings;
use crate::train::batch::{Item, Sampling};
use crate::train::eval::eval_loss;
use crate::train::lora::{LoraTarget, extract, install};
use crate::train::lr::{A1111Schedule, LrSchedule};
use crate::train::methods::{LoraSteps, TiSteps};
use crate::train::mixed::Masters;
use crate::train::mixed::StepScaler;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::peak_memory_mib;
use crate::train::resume::{self, TrainState, read_state};
use crate::train::run_loop::{LoopConfig, LoopData, LoopEnv, TrainMethod};

mod dreambooth;
mod validate;
pub use dreambooth::DreamboothParams;

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

impl TrainParams {
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
        let rt = crate::device::open(ctx.settings.device)?;
        crate::on_device_precision!(rt, ctx.settings.precision, dev, E => {
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
        let settings = &ctx.settings;
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
            scaler: StepScaler::new::<E>(state.loss_scaler),
        };
        let wall_s = self.drive(
            ctx, "lora", &mut state, &items, scaling, seed, &dev, &sched, &mut steps,
        )?;
        let LoraSteps {
            masters, scaler, ..
        } = steps;
        let scaler = scaler.scaler;
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
        write_kohya(&out, &network, &meta)?;
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
            (Artifact::Lora, blob),
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
        let settings = &ctx.settings;
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
        let embedding =
            |extra: &Tensor2<D>, step: u64| self.embedding(&token, extra, step, &model_path);
        let mut steps = TiSteps {
            clip_skip: self.clip_skip,
            t2i: &t2i,
            ddpm: &ddpm,
            items: &items,
            ids: &ids,
            extra: &mut extra,
            optimizer: &mut optimizer,
            scratch: &scratch,
            embedding: &embedding,
            scaler: StepScaler::new::<E>(state.loss_scaler),
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
        let a1111 = scratch.join(Artifact::Embedding.file_name());
        write_a1111_safetensors(&a1111, &embedding)?;
        let diffusers = scratch.join(Artifact::DiffusersEmbedding.file_name());
        write_diffusers(&diffusers, &embedding)?;
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
            (Artifact::Embedding, blob),
        )?;
        result.outputs.insert(
            Artifact::DiffusersEmbedding.file_name().into(),
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
        let settings = &ctx.settings;
        let (_, lat_record) = ctx.upstream_of_kind("encode_latents")?;
        let manifest: LatentsManifest =
            ctx.read_json(lat_record, Artifact::Manifest.file_name())?;
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

    /// How this stage draws its micro-batches.
    fn sampling(&self) -> Sampling {
        Sampling {
            batch_size: self.batch_size,
            min_timestep: self.min_timestep,
            max_timestep: self.max_timestep,
        }
    }

    /// Runs the shared step loop ([`LoopConfig::run`]) for this stage's `method`, labelled
    /// `label` on the progress bar. Returns the wall time.
    #[allow(clippy::too_many_arguments)]
    fn drive<D: Device<f32>>(
        &self,
        ctx: &StageContext<'_>,
        label: &str,
        state: &mut TrainState,
        items: &[Item],
        scaling: f32,
        seed: u64,
        dev: &D,
        sched: &LrSchedule,
        method: &mut dyn TrainMethod<D>,
    ) -> anyhow::Result<f64> {
        let config = LoopConfig {
            steps: self.steps,
            lr: self.lr,
            gradient_accumulation: self.gradient_accumulation,
            max_grad_norm: self.max_grad_norm,
            checkpoint_every: self.checkpoint_every,
            sampling: self.sampling(),
        };
        let scratch = ctx.scratch()?;
        // Tests slow a run down to interrupt it mid-way.
        let delay = crate::stages::context::test_item_delay();
        let sleep = move || {
            if let Some(ms) = delay {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        };
        let env = LoopEnv {
            progress: ctx.progress,
            label: format!("{} {label}", ctx.instance.name),
            cancel: ctx.cancel,
            scratch: &scratch,
            after_step: delay.is_some().then_some(&sleep as &dyn Fn()),
        };
        let data = LoopData {
            items,
            scaling,
            seed,
        };
        config.run(data, dev, sched, state, method, &env)
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
        state: &TrainState,
        end: RunEnd,
        (kind, artifact): (Artifact, BlobRef),
    ) -> anyhow::Result<(StageResult, TrainMetrics)> {
        let metrics = self.metrics(state, &end, artifact.size);
        let mut result = self.result(ctx, sched, state, &metrics)?;
        result.outputs.insert(kind.file_name().into(), artifact);
        Ok((result, metrics))
    }

    fn metrics(&self, state: &TrainState, end: &RunEnd, artifact_bytes: u64) -> TrainMetrics {
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
        state: &TrainState,
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
            Artifact::LossCurve.file_name().into(),
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
        let modules = crate::train::lora::lora_modules(model);
        let mut out = BTreeMap::new();
        for target in targets {
            let matching: Vec<&(String, Vec<usize>)> = modules
                .iter()
                .filter(|(n, _)| n.ends_with(&format!(".{target}")))
                .collect();
            if matching.is_empty() {
                let mut suffixes: Vec<&str> = modules.iter().map(|(n, _)| local_name(n)).collect();
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
}

impl TrainParams {
    /// A fresh optimiser and step 0, for a run with no usable checkpoint.
    fn fresh_start<D: Device<f32>>(&self, dev: &D) -> (AdamW<D>, TrainState) {
        let cfg = AdamWConfig {
            weight_decay: self.weight_decay,
            ..AdamWConfig::default()
        };
        (AdamW::new(dev, cfg), TrainState::fresh())
    }
}

/// The newest readable LoRA checkpoint with this run's modules.
fn load_checkpoint<D: Device<f32>>(
    scratch: &Path,
    known: &LoraNetwork,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<(LoraNetwork, AdamW<D>, TrainState)>> {
    resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| {
            let state = read_state(dir)?;
            let (mut network, _) = read_lora(&dir.join(Artifact::Lora.file_name()), None)?;
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
        },
    )
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

/// What a textual-inversion checkpoint restores: vectors, optimiser, state.
type TiResume<D> = (Tensor2<D>, AdamW<D>, TrainState);

/// The newest readable textual-inversion checkpoint (vectors, optimiser, state).
fn load_ti_checkpoint<D: Device<f32>>(
    scratch: &Path,
    token: &str,
    numel: usize,
    dev: &D,
    ctx: &StageContext<'_>,
) -> anyhow::Result<Option<TiResume<D>>> {
    resume::newest(
        scratch,
        |m| ctx.progress.message(m),
        |dir| {
            let state = read_state(dir)?;
            let (emb, _) = read_embedding(&dir.join(Artifact::Embedding.file_name()), Some(token))?;
            if emb.vectors.numel() != numel || emb.vectors.shape.len() != 2 {
                bail!("checkpoint vectors have shape {:?}", emb.vectors.shape);
            }
            let extra = dev.tensor_from_vec(
                emb.vectors.data.clone(),
                (emb.vectors.shape[0], emb.vectors.shape[1]),
            );
            let optimizer = AdamW::load(dev, &dir.join("optimizer.safetensors"))?;
            Ok((extra, optimizer, state))
        },
    )
}

/// A module's name inside its block (`attn1.to_out.0`, `conv1`, `ff.net.2`,
/// `self_attn.q_proj`): what follows the last `resnets.N.`, `attentions.N.`,
/// `transformer_blocks.N.`, `downsamplers.N.`, `upsamplers.N.` or `layers.N.` of its path (the
/// whole path outside blocks, `time_embedding.linear_1`). Any such tail is a LoRA target.
fn local_name(path: &str) -> &str {
    const BLOCKS: [&str; 6] = [
        "resnets",
        "attentions",
        "transformer_blocks",
        "downsamplers",
        "upsamplers",
        "layers",
    ];
    let segments: Vec<&str> = path.split('.').collect();
    let mut start = 0;
    for (i, pair) in segments.windows(2).enumerate() {
        if BLOCKS.contains(&pair[0]) && pair[1].bytes().all(|b| b.is_ascii_digit()) {
            start = i + 2;
        }
    }
    let skipped: usize = segments[..start.min(segments.len())]
        .iter()
        .map(|s| s.len() + 1)
        .sum();
    &path[skipped.min(path.len())..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_are_the_tails_after_the_last_block() {
        for (path, local) in [
            (
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
                "attn1.to_out.0",
            ),
            ("up_blocks.2.resnets.0.conv_shortcut", "conv_shortcut"),
            ("down_blocks.1.downsamplers.0.conv", "conv"),
            ("time_embedding.linear_1", "time_embedding.linear_1"),
            ("text_model.encoder.layers.11.mlp.fc2", "mlp.fc2"),
        ] {
            assert_eq!(local_name(path), local);
        }
    }
}
