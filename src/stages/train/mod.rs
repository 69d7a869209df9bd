//! `train`: fine-tunes the base model on the latents of an `encode_latents` stage. One file per
//! method: `lora.rs` (low-rank adapters, LoCon on convolutions, kohya-format output),
//! `textual_inversion.rs`, `dreambooth.rs`, `hypernetwork.rs` (A1111 hypernetworks); the
//! stage's table is `params.rs`, its checks `validate.rs`, and this file what they share
//! (setup, the loop driver, the result).
//!
//! Every step draws its batch, latent samples, noise and timesteps from a generator seeded by
//! the pipeline seed and the step, so a rerun is bit-identical on the CPU and a run resumed
//! from a checkpoint ends exactly where an uninterrupted one does.

mod hypernetwork;

pub use hypernetwork::HypernetworkParams;

use crate::stages::artifact::Artifact;
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use dfdx::prelude::*;

use super::context::{StageContext, StageResult};
use super::encode_latents::{LatentsManifest, read_f32};
use super::model::{Component, open_checkpoint};
use crate::cache::BlobRef;
use crate::diffusion::clip::TextEncoder;
use crate::diffusion::nn::{Elem, Tensor3};
use crate::diffusion::schedulers::{
    Ddpm, LossWeighting, PredictionType, SchedulerConfig, TimestepSpacing,
};
use crate::diffusion::text_to_image::TextToImage;
use crate::settings::PipelineSettings;
use crate::stages::artifact::{ema_output, snapshot_output};
use crate::train::batch::{Item, Sampling};
use crate::train::captions::CaptionShaping;
use crate::train::ema::EmaConfig;
use crate::train::lr::{A1111Schedule, LrSchedule};
use crate::train::noise::NoiseShaping;
use crate::train::optim::Optimizer;
use crate::train::peak_memory_mib;
use crate::train::resume::TrainState;
use crate::train::run_loop::{
    LoopConfig, LoopData, LoopEnv, TrainMethod, ema_artifact, snapshot_dir,
};
use crate::train::timesteps::TimestepSampling;

mod dreambooth;
mod lora;

/// What `method = "locon"` adapts beside the default attention projections, when `targets`
/// is left as it is: the ResNets' convolutions and the down/up-samplers' (`…samplers.0.conv`),
/// as kohya's LoCon (`conv_dim`) does.
const LOCON_TARGETS: [&str; 3] = ["conv1", "conv2", "conv"];
mod params;
mod textual_inversion;
mod validate;
pub use dreambooth::DreamboothParams;

/// Implementation version (part of the key); bumped whenever the numbers change (v2: fused CPU kernels).
pub const VERSION: u32 = 2;

pub use crate::train::{Method, TrainMetrics};
pub use params::{LoraParams, TrainParams};

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
    /// The items `validation_split` holds out of training, for the validation loss.
    validation: Vec<Item>,
    ckpt: crate::diffusion::Checkpoint,
    model_path: PathBuf,
    t2i: TextToImage<D, E>,
    dev: D,
}

/// What a run trained: its artifact, and the scheduler config it is sampled with when that is
/// not the base model's ([`TrainParams::noise_process`]).
struct Trained<'a> {
    kind: Artifact,
    blob: BlobRef,
    sampling: Option<&'a SchedulerConfig>,
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
            Method::Lora | Method::Locon | Method::Loha | Method::Lokr | Method::Dora => {
                self.lora.lr
            }
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
        if self.method == Method::Locon && self.lora.targets == params::default_targets() {
            // kohya's LoCon: the ResNets' and samplers' convolutions beside the attention
            self.lora.targets.extend(LOCON_TARGETS.map(String::from));
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
                let uses =
                    self.method == method || (method == Method::Lora && self.method.is_network());
                if !uses {
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
            Method::Lora | Method::Locon | Method::Loha | Method::Lokr | Method::Dora => {
                self.run_lora::<E, D>(ctx, dev)
            }
            Method::TextualInversion => self.run_textual_inversion::<E, D>(ctx, dev),
            Method::Dreambooth => self.run_dreambooth::<E, D>(ctx, dev),
            Method::Hypernetwork => self.run_hypernetwork::<E, D>(ctx, dev),
        }
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
        let (items, validation) = self.hold_out(items, settings.seed)?;
        Ok(Setup {
            manifest,
            items,
            validation,
            ckpt,
            model_path,
            t2i,
            dev,
        })
    }

    /// `items` split into the training items and the `validation_split` share held out for
    /// the validation loss (at least one item when the share is set), chosen by a generator
    /// seeded by the pipeline seed. Holding out every item is an error.
    fn hold_out(&self, items: Vec<Item>, seed: u64) -> anyhow::Result<(Vec<Item>, Vec<Item>)> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let Some(share) = self.validation_split else {
            return Ok((items, Vec::new()));
        };
        let n = items.len();
        let held = ((n as f64 * share).round() as usize).max(1);
        if held >= n {
            bail!(
                "validation_split = {share} holds out {held} of the {n} items and leaves none to \
                 train on: lower it or add images"
            );
        }
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(crate::train::batch::mix(seed, 0x7A11_D47E, 0));
        order.shuffle(&mut rng);
        let held_out: std::collections::HashSet<usize> = order[..held].iter().copied().collect();
        let (validation, train): (Vec<_>, Vec<_>) = items
            .into_iter()
            .enumerate()
            .partition(|(i, _)| held_out.contains(i));
        Ok((
            train.into_iter().map(|(_, it)| it).collect(),
            validation.into_iter().map(|(_, it)| it).collect(),
        ))
    }

    /// The frozen text encoder's states of every distinct caption of `items`: from an
    /// `encode_text` stage in `needs` when there is one, else encoded here.
    fn frozen_contexts<'i, E: Elem, D: Device<f32> + Device<E>>(
        &self,
        ctx: &StageContext<'_>,
        t2i: &TextToImage<D, E>,
        items: impl IntoIterator<Item = &'i Item>,
    ) -> anyhow::Result<HashMap<String, Tensor3<D>>> {
        let dev = t2i.models.text_encoder().token_embedding.device().clone();
        let mut cached = super::encode_text::cached_states(ctx, self.clip_skip, &dev)?;
        let mut contexts = HashMap::new();
        for item in items {
            if !contexts.contains_key(&item.caption) {
                let c = match cached.as_mut().and_then(|c| c.remove(&item.caption)) {
                    Some(c) => c,
                    None => {
                        let ids = t2i.tokenizer.encode(&item.caption)?.input_ids;
                        t2i.models.text_encoder().encode(&[ids], self.clip_skip)?
                    }
                };
                contexts.insert(item.caption.clone(), c);
            }
        }
        Ok(contexts)
    }

    /// The noise process this stage trains with, from the base model's scheduler config
    /// `base`: its `prediction_type` and `zero_terminal_snr` applied, the loss weighted by
    /// [`Self::loss_weighting`]. With it, the scheduler config the trained variant must be
    /// sampled with when that differs from the base's (see [`Self::sampling_scheduler`]).
    fn noise_process(
        &self,
        base: &SchedulerConfig,
    ) -> anyhow::Result<(Ddpm, Option<SchedulerConfig>)> {
        let mut config = base.clone();
        if let Some(prediction) = self.prediction_type {
            config.prediction_type = prediction;
        }
        config.rescale_betas_zero_snr |= self.zero_terminal_snr;
        if config.rescale_betas_zero_snr && config.prediction_type != PredictionType::VPrediction {
            bail!(
                "zero terminal SNR needs v-prediction and the base model predicts {:?}: {}; set \
                 prediction_type = \"v_prediction\" in the train stage",
                config.prediction_type,
                validate::ZERO_SNR_NEEDS_V
            );
        }
        let ddpm = Ddpm::new(&config)?.with_loss_weighting(self.loss_weighting());
        Ok((ddpm, Self::sampling_scheduler(base, config)))
    }

    /// The scheduler config a variant trained with `trained` is sampled with, when it differs
    /// from the base model's: the same parameterisation and schedule, and with zero terminal
    /// SNR `trailing` timestep spacing so sampling starts at the pure-noise timestep (Lin et
    /// al. 2023, §3.3; diffusers' recommendation for such models).
    fn sampling_scheduler(
        base: &SchedulerConfig,
        mut trained: SchedulerConfig,
    ) -> Option<SchedulerConfig> {
        if trained.rescale_betas_zero_snr && !base.rescale_betas_zero_snr {
            trained.timestep_spacing = TimestepSpacing::Trailing;
        }
        (trained != *base).then_some(trained)
    }

    /// kohya's metadata for the objective and noise keys this stage sets (`ss_min_snr_gamma`,
    /// `ss_noise_offset`, `ss_zero_terminal_snr`, …, as kohya's `train_network.py` names
    /// them), and the model-spec `modelspec.prediction_type` of a changed parameterisation.
    /// Keys left at their defaults are left out, so such files keep their bytes.
    fn objective_metadata(&self) -> std::collections::BTreeMap<String, String> {
        let py = |v: f64| format!("{v:?}");
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("ss_min_snr_gamma", self.min_snr_gamma.map(py));
        put(
            "ss_debiased_estimation",
            self.debiased_estimation.then(|| "True".into()),
        );
        put("ss_noise_offset", self.noise_offset.map(py));
        put("ss_adaptive_noise_scale", self.adaptive_noise_scale.map(py));
        put(
            "ss_multires_noise_iterations",
            self.multires_noise_iterations.map(|n| n.to_string()),
        );
        put(
            "ss_multires_noise_discount",
            self.multires_noise_discount.map(py),
        );
        put(
            "ss_zero_terminal_snr",
            self.zero_terminal_snr.then(|| "True".into()),
        );
        put(
            "modelspec.prediction_type",
            self.prediction_type.map(|p| match p {
                PredictionType::VPrediction => "v".into(),
                PredictionType::Epsilon => "epsilon".into(),
                PredictionType::Sample => "sample".into(),
            }),
        );
        m
    }

    /// How this stage weights each sample's loss by its timestep.
    fn loss_weighting(&self) -> LossWeighting {
        LossWeighting {
            // 0 turns it off, as kohya's `if args.min_snr_gamma:` does
            min_snr_gamma: self.min_snr_gamma.filter(|g| *g > 0.0),
            debiased_estimation: self.debiased_estimation,
        }
    }

    /// The artifact the method publishes (and saves every `save_every` steps).
    fn artifact(&self) -> Artifact {
        match self.method {
            Method::Lora | Method::Locon | Method::Loha | Method::Lokr | Method::Dora => {
                Artifact::Lora
            }
            Method::TextualInversion => Artifact::Embedding,
            Method::Dreambooth => Artifact::Checkpoint,
            Method::Hypernetwork => Artifact::Hypernetwork,
        }
    }

    /// The steps `save_every` saves an intermediate artifact after (the last step is the
    /// published artifact itself).
    fn snapshot_steps(&self) -> Vec<u64> {
        match self.save_every {
            Some(every) if every > 0 => (1..)
                .map(|k| k * every)
                .take_while(|&s| s < self.steps)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// How this stage changes captions each time an item is drawn.
    fn caption_shaping(&self) -> CaptionShaping {
        let d = CaptionShaping::default();
        CaptionShaping {
            dropout: self.caption_dropout.unwrap_or(0.0),
            tag_dropout: self.caption_tag_dropout.unwrap_or(0.0),
            shuffle: self.shuffle_caption,
            keep_tokens: self.keep_tokens.unwrap_or(0),
            separator: self.caption_separator.clone().unwrap_or(d.separator),
        }
    }

    /// How this stage draws its micro-batches.
    fn sampling(&self) -> Sampling {
        Sampling {
            batch_size: self.batch_size,
            min_timestep: self.min_timestep,
            max_timestep: self.max_timestep,
            noise: NoiseShaping {
                offset: self.noise_offset.unwrap_or(0.0),
                adaptive_scale: self.adaptive_noise_scale,
                multires_iterations: self.multires_noise_iterations.unwrap_or(0),
                multires_discount: self.multires_noise_discount.unwrap_or(0.3),
            },
            timesteps: {
                let d = TimestepSampling::default();
                TimestepSampling {
                    distribution: self.timestep_sampling.unwrap_or_default(),
                    logit_mean: self.logit_mean.unwrap_or(d.logit_mean),
                    logit_std: self.logit_std.unwrap_or(d.logit_std),
                    bias: self.timestep_bias.unwrap_or_default(),
                    bias_multiplier: self.timestep_bias_multiplier.unwrap_or(d.bias_multiplier),
                    bias_portion: self.timestep_bias_portion.unwrap_or(d.bias_portion),
                }
            },
            captions: self.caption_shaping(),
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
        (items, validation): (&[Item], &[Item]),
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
            save_every: self.save_every.unwrap_or(0),
            validate_every: self.validate_every.unwrap_or(0),
            ema: self.ema_decay.map(|decay| EmaConfig {
                decay,
                warmup: self.ema_warmup,
            }),
            sampling: self.sampling(),
        };
        let scratch = ctx.scratch()?;
        let env = LoopEnv {
            progress: ctx.progress,
            label: format!("{} {label}", ctx.instance.name),
            cancel: ctx.cancel,
            scratch: &scratch,
            artifact: self.artifact().file_name(),
        };
        let data = LoopData {
            items,
            scaling,
            seed,
            validation,
        };
        config.run(data, dev, sched, state, method, &env)
    }

    /// The figures and outputs of a finished run: the loss curve, the metrics (in the record's
    /// stats) and the trained artifact as output `name`.
    fn finish(
        &self,
        ctx: &StageContext<'_>,
        sched: &LrSchedule,
        state: &TrainState,
        end: RunEnd,
        trained: Trained<'_>,
        items: &[Item],
    ) -> anyhow::Result<(StageResult, TrainMetrics)> {
        let Trained {
            kind,
            blob: artifact,
            sampling,
        } = trained;
        let metrics = self.metrics(state, &end, artifact.size);
        let mut result = self.result(ctx, sched, state, &metrics)?;
        // The intermediate artifacts, as `step=N/<file>` (grid rows `NAME#step=N`).
        let scratch = ctx.scratch()?;
        for step in self.snapshot_steps() {
            let file = snapshot_dir(&scratch, step).join(kind.file_name());
            let blob = ctx
                .store
                .put_file(&file)
                .with_context(|| format!("the artifact saved at step {step}"))?;
            result.outputs.insert(snapshot_output(step, kind), blob);
        }
        let _ = std::fs::remove_dir_all(scratch.join("snapshots"));
        // The EMA weights' artifact, as `ema/<file>` (grid row `NAME#ema`).
        if self.ema_decay.is_some() {
            let file = ema_artifact(&scratch, kind.file_name());
            let blob = ctx
                .store
                .put_file(&file)
                .context("the artifact of the EMA weights")?;
            result.outputs.insert(ema_output(kind), blob);
            let _ = std::fs::remove_dir_all(scratch.join("ema"));
        }
        if !state.validation.is_empty() {
            let mut csv = String::from("step,validation_loss\n");
            for (step, loss) in &state.validation {
                csv.push_str(&format!("{step},{loss}\n"));
            }
            result.outputs.insert(
                "validation.csv".into(),
                ctx.store.put_bytes(csv.as_bytes())?,
            );
            if let Some((_, last)) = state.validation.last() {
                result
                    .stats
                    .insert("validation_loss_after".into(), (*last as f64).into());
            }
        }
        if let Some(csv) = self.captions_csv(items, ctx.settings.seed) {
            result
                .outputs
                .insert("captions.csv".into(), ctx.store.put_bytes(csv.as_bytes())?);
        }
        result.outputs.insert(kind.file_name().into(), artifact);
        if let Some(config) = sampling {
            result.outputs.insert(
                Artifact::SchedulerConfig.file_name().into(),
                ctx.store.put_bytes(&serde_json::to_vec_pretty(config)?)?,
            );
        }
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

    /// With caption shaping, the caption every drawn item trained with, as CSV (`step`,
    /// `micro`, `item`, `caption`): the record of what the run saw, which a rerun reproduces
    /// bit for bit. `None` when every caption is used as written.
    fn captions_csv(&self, items: &[Item], seed: u64) -> Option<String> {
        let sampling = self.sampling();
        if sampling.captions.is_identity() {
            return None;
        }
        let mut csv = String::from("step,micro,item,caption\n");
        for step in 0..self.steps {
            for micro in 0..self.gradient_accumulation as u64 {
                for (item, caption) in sampling.captions_at(items, seed, step, micro) {
                    let quoted = caption.replace('"', "\"\"");
                    csv.push_str(&format!("{},{micro},{item},\"{quoted}\"\n", step + 1));
                }
            }
        }
        Some(csv)
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
}

impl TrainParams {
    /// A fresh optimiser and step 0, for a run with no usable checkpoint.
    fn fresh_start<D: Device<f32>>(&self, dev: &D) -> (Optimizer<D>, TrainState) {
        let optimizer = Optimizer::new(dev, self.optimizer, self.weight_decay);
        (optimizer, TrainState::fresh())
    }
}

/// The text encoder of a one-encoder model (SD 1.x), taken out of the loaded models to train or
/// to run beside the UNet. Refused, naming `method`, for a model with several encoders: their
/// states are concatenated and trained together, which `method` does not do.
pub(crate) fn single_text_encoder<D: Storage<f32>>(
    mut encoders: Vec<TextEncoder<D>>,
    method: &str,
) -> anyhow::Result<TextEncoder<D>> {
    match encoders.len() {
        1 => Ok(encoders.remove(0)),
        n => bail!("method `{method}` trains models with one text encoder; this model has {n}"),
    }
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
