//! `sdpipe bench`: times one training or inference task of the diffusion core on random data,
//! through the same functions the stages use, and reports step times, throughput and peak
//! memory (human table or one JSON object whose field names follow
//! `bench/reference/ref_bench.py`, so the two can be put side by side; see
//! `scripts/bench-side-by-side.sh`).
//!
//! Tasks (every one on random latents, timesteps and text states of the asked batch and
//! resolution):
//! - `lora-train`: LoRA adapters of rank `--rank` on the UNet's attention projections,
//!   forward + backward of the epsilon MSE loss, clipping, one AdamW step
//!   ([`crate::train::lora`], the `train` stage's `method = "lora"`);
//! - `full-train`: every UNet weight trains with AdamW (DreamBooth's path);
//! - `ti-train`: one new token's vector trained through the text encoder and the UNet
//!   ([`crate::train::textual_inversion`]);
//! - `unet-forward`: one UNet forward without a tape;
//! - `sample-step`: one classifier-free-guidance step: the UNet on the batch doubled
//!   (uncond + cond), the guidance mix and an Euler scheduler step;
//! - `vae-encode`: images → latent means.
//!
//! The work is generic over the dfdx device ([`run_on`]); [`run_cli`] picks the device.

use crate::exit::ExitCode;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use dfdx::prelude::*;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use thiserror::Error;

use crate::diffusion::checkpoint::single_file::StoredConfigs;
use crate::diffusion::clip::ClipConfig;
use crate::diffusion::nn::weights::{Loader, WeightStore};
use crate::diffusion::nn::{DEFAULT_ATTENTION_CHUNK, Elem};
use crate::diffusion::nn::{Tensor2, Tensor3, Tensor4};
use crate::diffusion::params::{count_params, set_trainable};
use crate::diffusion::schedulers::{Ddpm, SamplerKind, SchedulerConfig, SeededNoise};
use crate::diffusion::{Checkpoint, DiffusionError, TextEncoder, UNet, UNetConfig, Vae, VaeConfig};
use crate::engine::Progress;
use crate::formats::HostTensor;
use crate::formats::embedding::Embedding;
use crate::formats::lora::{LoraModule, LoraNetwork};
use crate::memory::{
    LoadedModels, MemoryProbe, TrainShape, TrainedPart, estimate_train, human_bytes,
};
use crate::train::batch::{Batch, Item, Sampling};
use crate::train::lora::install;
use crate::train::methods::{DreamboothSteps, LoraSteps, TiSteps};
use crate::train::mixed::{Masters, StepScaler};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::run_loop::step as train_step;

/// The task a benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchTask {
    /// LoRA training step (UNet attention projections, AdamW).
    LoraTrain,
    /// Full UNet training step (DreamBooth's path, AdamW).
    FullTrain,
    /// Textual-inversion step (one new token through the text encoder and the UNet).
    TiTrain,
    /// One UNet forward, no tape.
    UnetForward,
    /// One classifier-free-guidance sampling step (UNet on 2·batch + scheduler step).
    SampleStep,
    /// VAE encoding of images to latents.
    VaeEncode,
}

impl BenchTask {
    /// The CLI name (`lora-train`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoraTrain => "lora-train",
            Self::FullTrain => "full-train",
            Self::TiTrain => "ti-train",
            Self::UnetForward => "unet-forward",
            Self::SampleStep => "sample-step",
            Self::VaeEncode => "vae-encode",
        }
    }

    /// The unit of the throughput figure.
    pub fn unit(self) -> &'static str {
        match self {
            Self::SampleStep => "it/s",
            Self::VaeEncode => "images/s",
            _ => "samples/s",
        }
    }

    /// Whether the task trains (it then builds a tape and an optimiser).
    pub fn trains(self) -> bool {
        matches!(self, Self::LoraTrain | Self::FullTrain | Self::TiTrain)
    }

    /// The figure's key, named as `ref_bench.py` names the same measurement
    /// (`lora_train_bs4`, `full_train_bs1`, `ti_train_bs4`; the reference's CFG step and VAE
    /// encode carry a precision suffix, `unet_cfg_step_bf16` and `vae_encode_512_bf16`, which
    /// the side-by-side script maps).
    pub fn key(self, batch: usize, resolution: usize) -> String {
        match self {
            Self::LoraTrain => format!("lora_train_bs{batch}"),
            Self::FullTrain => format!("full_train_bs{batch}"),
            Self::TiTrain => format!("ti_train_bs{batch}"),
            Self::UnetForward => format!("unet_forward_bs{batch}"),
            Self::SampleStep => format!("unet_cfg_step_bs{batch}"),
            Self::VaeEncode => format!("vae_encode_{resolution}_bs{batch}"),
        }
    }
}

impl std::fmt::Display for BenchTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which model a benchmark runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchArch {
    /// Random weights with SD 1.5's shapes (the documented default configs).
    Sd15,
    /// The tiny test model (`tests/fixtures/tiny-sd`).
    Tiny,
    /// A checkpoint sdpipe opens (diffusers folder or single file).
    Path(PathBuf),
}

impl BenchArch {
    /// Parses `sd15`, `tiny` or a path.
    pub fn parse(text: &str) -> Self {
        match text {
            "sd15" => Self::Sd15,
            "tiny" => Self::Tiny,
            p => Self::Path(PathBuf::from(p)),
        }
    }

    /// The name in reports.
    pub fn name(&self) -> String {
        match self {
            Self::Sd15 => "sd15".into(),
            Self::Tiny => "tiny".into(),
            Self::Path(p) => p.display().to_string(),
        }
    }
}

/// Options of `sdpipe bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to time.
    #[arg(long, value_enum)]
    pub task: BenchTask,
    /// `sd15` (random weights, SD 1.5's shapes), `tiny` (the test model
    /// tests/fixtures/tiny-sd) or the path of a checkpoint.
    #[arg(long, default_value = "sd15", value_name = "sd15|tiny|PATH")]
    pub arch: String,
    /// Samples per step (images for vae-encode; sample-step runs the UNet on twice this).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Image side in pixels (a multiple of the model's size multiple: 64 for SD 1.5).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// LoRA rank (lora-train).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Seed of the random weights and data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute the UNet's blocks in the backward pass instead of keeping their activations
    /// (the train stages' `gradient_checkpointing`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// What the UNet computes in: f32, or f16 (mixed precision: f16 storage, f32 arithmetic
    /// inside each op) for unet-forward and sample-step.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Device: auto (the GPU when this build has CUDA and one opens), cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceChoice,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// What can go wrong in a benchmark.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A bad option (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The model could not be opened or built.
    #[error("{context}: {source}")]
    Model {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: DiffusionError,
    },
    /// A step failed.
    #[error("{task} step: {reason}")]
    Step {
        /// The task.
        task: BenchTask,
        /// Why.
        reason: String,
    },
}

/// Step times in milliseconds over the timed iterations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTimes {
    /// Fastest.
    pub min: f64,
    /// Median (the figure throughput is computed from, as `ref_bench.py` does).
    pub median: f64,
    /// Mean.
    pub mean: f64,
}

impl StepTimes {
    /// The statistics of `ms` (not empty).
    pub fn of(ms: &[f64]) -> Self {
        let mut v = ms.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1);
        Self {
            min: v.first().copied().unwrap_or(0.0),
            median: v.get(v.len() / 2).copied().unwrap_or(0.0),
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }
}

/// The result of one benchmark (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The task (`lora-train`, …).
    pub task: BenchTask,
    /// `sd15`, `tiny` or the checkpoint path.
    pub arch: String,
    /// Samples (images) per step.
    pub batch: usize,
    /// Image side in pixels.
    pub resolution: usize,
    /// Latent side.
    pub latent_size: usize,
    /// Whether the UNet's blocks were recomputed in the backward pass.
    pub gradient_checkpointing: bool,
    /// Timed steps.
    pub iters: usize,
    /// Untimed steps before them.
    pub warmup: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Compute precision (`f32`).
    pub precision: String,
    /// sdpipe's version.
    pub sdpipe_version: String,
    /// The figure's name as `ref_bench.py` writes it (`lora_train_bs1`, …).
    pub key: String,
    /// Throughput: batch / median step time.
    pub value: f64,
    /// Its unit (`samples/s`, `it/s`, `images/s`).
    pub unit: String,
    /// `ref_bench.py`'s note: the median step time.
    pub note: String,
    /// Step times.
    pub step_ms: StepTimes,
    /// Peak memory of the task in GiB (weights, optimiser state and activations), as
    /// `ref_bench.py`'s `*_peakmem`; `null` where the device cannot be probed.
    pub peakmem_gib: Option<f64>,
    /// The same in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// How the peak was measured.
    pub memory_source: String,
    /// Parameters of the models the task loaded.
    pub model_params: usize,
    /// Parameters that train (0 for inference tasks).
    pub trainable_params: usize,
    /// LoRA rank (lora-train).
    pub rank: Option<usize>,
    /// What `plan` would estimate for this step's peak memory (training tasks; the same
    /// models loaded), in bytes: compare with `peak_memory_bytes`.
    pub memory_estimate_bytes: Option<u64>,
    /// The loss of the last step (training tasks; a sanity check that it ran).
    pub last_loss: Option<f32>,
}

impl BenchReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("task".into(), self.task.to_string()),
            ("arch".into(), self.arch.clone()),
            (
                "shape".into(),
                format!(
                    "batch {}, {} px ({}² latents)",
                    self.batch, self.resolution, self.latent_size
                ),
            ),
            (
                "device".into(),
                format!("{} ({})", self.device, self.precision),
            ),
            (
                "iterations".into(),
                format!("{} timed after {} warm-up", self.iters, self.warmup),
            ),
            (
                "step ms".into(),
                format!(
                    "min {:.1} / median {:.1} / mean {:.1}",
                    self.step_ms.min, self.step_ms.median, self.step_ms.mean
                ),
            ),
            (
                "throughput".into(),
                format!("{:.3} {}", self.value, self.unit),
            ),
        ];
        let peak = match self.peak_memory_bytes {
            Some(b) => format!("{} — {}", human_bytes(b), self.memory_source),
            None => format!("unknown — {}", self.memory_source),
        };
        rows.push(("peak memory".into(), peak));
        rows.push((
            "parameters".into(),
            format!(
                "{:.2} M loaded, {:.3} M trained",
                self.model_params as f64 / 1e6,
                self.trainable_params as f64 / 1e6
            ),
        ));
        if let (Some(e), Some(m)) = (self.memory_estimate_bytes, self.peak_memory_bytes) {
            rows.push((
                "memory estimate".into(),
                format!(
                    "{} (what `plan` estimates; measured / estimate {:.2})",
                    human_bytes(e),
                    m as f64 / e.max(1) as f64
                ),
            ));
        }
        if let Some(l) = self.last_loss {
            rows.push(("last loss".into(), format!("{l:.4}")));
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = format!("sdpipe {} bench\n", self.sdpipe_version);
        for (k, v) in rows {
            out.push_str(&format!("  {k:<w$}  {v}\n"));
        }
        out
    }
}

/// The resolved benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Task.
    pub task: BenchTask,
    /// Model.
    pub arch: BenchArch,
    /// Samples per step.
    pub batch: usize,
    /// Image side.
    pub resolution: usize,
    /// Timed steps.
    pub iters: usize,
    /// Untimed steps.
    pub warmup: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Seed.
    pub seed: u64,
    /// Gradient checkpointing of the UNet in the training tasks.
    pub gradient_checkpointing: bool,
    /// What the UNet computes in (`f16`: mixed precision; the UNet tasks only).
    pub precision: crate::device::Precision,
}

impl BenchOptions {
    /// Checks the numbers of `args`.
    pub fn from_args(args: &BenchArgs) -> Result<Self, BenchError> {
        for (name, v) in [
            ("--batch", args.batch),
            ("--iters", args.iters),
            ("--resolution", args.resolution),
            ("--rank", args.rank),
        ] {
            if v == 0 {
                return Err(BenchError::Usage(format!("{name} must be positive")));
            }
        }
        Ok(Self {
            task: args.task,
            arch: BenchArch::parse(&args.arch),
            batch: args.batch,
            resolution: args.resolution,
            iters: args.iters,
            warmup: args.warmup,
            rank: args.rank,
            seed: args.seed,
            gradient_checkpointing: args.gradient_checkpointing,
            precision: Self::precision(args)?,
        })
    }

    fn precision(args: &BenchArgs) -> Result<crate::device::Precision, BenchError> {
        use crate::device::Precision;
        match args.precision.as_str() {
            "f32" => Ok(Precision::F32),
            "f16"
                if matches!(
                    args.task,
                    BenchTask::UnetForward
                        | BenchTask::SampleStep
                        | BenchTask::LoraTrain
                        | BenchTask::TiTrain
                        | BenchTask::FullTrain
                ) =>
            {
                Ok(Precision::F16)
            }
            "f16" => Err(BenchError::Usage(format!(
                "--precision f16 is implemented for the UNet tasks; {} computes in f32 (the \
                 VAE always does)",
                args.task
            ))),
            "bf16" => Err(BenchError::Usage(
                "--precision bf16 is not available (dfdx 0.13 has no bfloat16 kernels); use f16"
                    .into(),
            )),
            other => Err(BenchError::Usage(format!(
                "unknown --precision `{other}`: use f32 or f16"
            ))),
        }
    }
}

/// Where the weights of a benchmark come from.
enum Weights {
    Synthetic(WeightStore),
    Checkpoint(Box<Checkpoint>),
}

/// The tiny test model: `tests/fixtures/tiny-sd` under the current folder, else under the
/// source tree this binary was built from.
fn tiny_path() -> Result<PathBuf, BenchError> {
    let rel = Path::new("tests/fixtures/tiny-sd");
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    [rel.to_path_buf(), built]
        .into_iter()
        .find(|p| p.join("model_index.json").is_file())
        .ok_or_else(|| {
            BenchError::Usage(
                "--arch tiny: tests/fixtures/tiny-sd is not under the current folder nor in the \
                 source tree of this binary; give its path instead"
                    .into(),
            )
        })
}

/// The configs and weights of `arch`.
fn open_arch(arch: &BenchArch, seed: u64) -> Result<(StoredConfigs, Weights), BenchError> {
    let path = match arch {
        BenchArch::Sd15 => {
            return Ok((
                StoredConfigs {
                    unet: UNetConfig::default(),
                    vae: VaeConfig::default(),
                    text_encoder: ClipConfig::default(),
                },
                Weights::Synthetic(WeightStore::synthetic(seed)),
            ));
        }
        BenchArch::Tiny => tiny_path()?,
        BenchArch::Path(p) => p.clone(),
    };
    let ckpt = Checkpoint::open(&path).map_err(|source| BenchError::Model {
        context: format!("opening {}", path.display()),
        source,
    })?;
    Ok((ckpt.configs(), Weights::Checkpoint(Box::new(ckpt))))
}

fn model_err(what: &str) -> impl FnOnce(DiffusionError) -> BenchError + '_ {
    move |source| BenchError::Model {
        context: format!("building the {what}"),
        source,
    }
}

impl Weights {
    fn unet<E: Elem, D: Device<E>>(
        &self,
        c: &StoredConfigs,
        dev: &D,
        gradient_checkpointing: bool,
    ) -> Result<UNet<D, E>, BenchError> {
        let mut unet = self.unet_plain(c, dev)?;
        unet.set_gradient_checkpointing(gradient_checkpointing);
        Ok(unet)
    }

    fn unet_plain<E: Elem, D: Device<E>>(
        &self,
        c: &StoredConfigs,
        dev: &D,
    ) -> Result<UNet<D, E>, BenchError> {
        match self {
            Self::Synthetic(s) => UNet::load(&Loader::new(s, dev), &c.unet),
            Self::Checkpoint(ck) => ck.load_unet_as(dev),
        }
        .map_err(model_err("UNet"))
    }
    fn text_encoder<D: Device<f32>>(
        &self,
        c: &StoredConfigs,
        dev: &D,
    ) -> Result<TextEncoder<D>, BenchError> {
        match self {
            Self::Synthetic(s) => TextEncoder::load(&Loader::new(s, dev), &c.text_encoder),
            Self::Checkpoint(ck) => ck.load_text_encoder(dev),
        }
        .map_err(model_err("text encoder"))
    }
    fn vae<D: Device<f32>>(&self, c: &StoredConfigs, dev: &D) -> Result<Vae<D>, BenchError> {
        match self {
            Self::Synthetic(s) => Vae::load(&Loader::new(s, dev), &c.vae),
            Self::Checkpoint(ck) => ck.load_vae(dev),
        }
        .map_err(model_err("VAE"))
    }
}

/// What width and height must be multiples of for `configs`: 8 and the VAE factor times the
/// UNet's `2^(levels − 1)` (64 for SD 1.5), as the txt2img pipeline requires.
pub fn size_multiple(configs: &StoredConfigs) -> usize {
    let f = configs.vae.downsampling_factor();
    let total = f << configs.unet.block_out_channels.len().saturating_sub(1);
    let g = gcd(8, total);
    8 / g * total
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Normal values from `seed`.
fn normal(seed: u64, n: usize) -> Vec<f32> {
    let mut src = SeededNoise::new(seed);
    (0..n).map(|_| src.next_normal() as f32).collect()
}

/// Runs the benchmark on `dev` (named `device`: `cpu`, `cuda:0`), with a progress bar over
/// the steps. Each timed step ends with a device synchronisation, so asynchronous devices
/// are timed to the end of their work.
pub fn run_on<E: Elem, D: Device<f32> + Device<E> + dfdx::tensor::Synchronize>(
    dev: &D,
    device: &str,
    opts: &BenchOptions,
    progress: &Progress,
) -> Result<BenchReport, BenchError> {
    let task = opts.task;
    let (configs, weights) = open_arch(&opts.arch, opts.seed)?;
    let m = size_multiple(&configs);
    if !opts.resolution.is_multiple_of(m) {
        return Err(BenchError::Usage(format!(
            "--resolution {}: it must be a multiple of {m} for this model (8 and its total \
             downsampling: VAE factor {} × 2^(UNet levels − 1)); e.g. {}",
            opts.resolution,
            configs.vae.downsampling_factor(),
            (opts.resolution / m).max(1) * m
        )));
    }
    let latent = opts.resolution / configs.vae.downsampling_factor();
    let b = opts.batch;
    let step_err = |e: &dyn std::fmt::Display| BenchError::Step {
        task,
        reason: e.to_string(),
    };

    // The probe starts before the models are built: their weights count, as in
    // ref_bench.py's max_memory_allocated.
    let probe = MemoryProbe::start(device);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let lc = configs.unet.in_channels;
    let ctx_dim = configs.unet.cross_attention_dim;
    let tokens = configs.text_encoder.max_position_embeddings;
    let latents: Tensor4<D> = dev.tensor_from_vec(
        normal(opts.seed ^ 1, b * lc * latent * latent),
        (b, lc, latent, latent),
    );
    let noise: Tensor4<D> = dev.tensor_from_vec(
        normal(opts.seed ^ 2, b * lc * latent * latent),
        (b, lc, latent, latent),
    );
    let context: Tensor3<D> = dev.tensor_from_vec(
        normal(opts.seed ^ 3, b * tokens * ctx_dim),
        (b, tokens, ctx_dim),
    );
    let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
    let ddpm = Ddpm::new(&SchedulerConfig::sd15()).map_err(|e| step_err(&e))?;

    let model_params;
    let mut trainable_params = 0;
    let mut last_loss = None;
    let bar = progress.bar(
        (opts.warmup + opts.iters) as u64,
        &format!(
            "bench {task} {} b{b} {}px",
            opts.arch.name(),
            opts.resolution
        ),
    );
    let mut times = Vec::with_capacity(opts.iters);
    let mut timed = |step: &mut dyn FnMut() -> Result<Option<f32>, BenchError>|
     -> Result<Option<f32>, BenchError> {
        let mut loss = None;
        for i in 0..opts.warmup + opts.iters {
            let t0 = Instant::now();
            loss = step()?;
            dev.try_synchronize().map_err(|e| step_err(&format!("{e:?}")))?;
            if i >= opts.warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            bar.inc(1);
        }
        Ok(loss)
    };

    match task {
        BenchTask::LoraTrain => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            let mut network = LoraNetwork::default();
            let rank = opts.rank;
            let mut init_err = None;
            unet.for_each_attention_linear_mut(|name, linear| {
                let (o, i) = *linear.weight.shape();
                match LoraModule::init(&[o, i], rank, rank as f32, opts.seed) {
                    Ok(module) => {
                        network.unet.insert(name.to_string(), module);
                    }
                    Err(e) => init_err = Some(e),
                }
            });
            if let Some(e) = init_err {
                return Err(step_err(&e));
            }
            trainable_params = network
                .unet
                .values()
                .map(|m| m.down.numel() + m.up.numel())
                .sum();
            install(&mut unet, &network, 1.0, dev).map_err(|e| step_err(&e))?;
            // the train stage's step: f32 masters, loss scaling in f16
            let masters = Masters::of_lora(&network, dev).map_err(|e| step_err(&e))?;
            let mut optimizer = AdamW::new(dev, AdamWConfig::default());
            let (items, contexts) = caption_contexts(&context, b);
            let (ids, scratch) = (HashMap::new(), std::env::temp_dir());
            let mut steps = LoraSteps {
                unet: &mut unet,
                text_encoder: None,
                ddpm: &ddpm,
                items: &items,
                contexts: &contexts,
                ids: &ids,
                clip_skip: 0,
                optimizer: &mut optimizer,
                scratch: &scratch,
                alpha: rank as f32,
                dropout: 0.0,
                seed: opts.seed,
                te_lr_factor: 1.0,
                masters,
                te_keys: HashSet::new(),
                scaler: StepScaler::new::<E>(None),
            };
            let draw = |_| whole_batch(&latents, &noise, &timesteps);
            last_loss = timed(&mut || {
                let outcome =
                    train_step(&mut steps, draw, 1e-4, 1, 1.0).map_err(|e| step_err(&e))?;
                Ok(Some(outcome.loss))
            })?;
        }
        BenchTask::FullTrain => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            trainable_params = model_params;
            set_trainable(&mut unet, true);
            // the DreamBooth stage's step: in f16, f32 masters refreshed into the f16 model
            let mut master: Option<UNet<D>> = if E::HALF {
                Some(weights.unet(&configs, dev, false)?)
            } else {
                None
            };
            let mut optimizer = AdamW::new(dev, AdamWConfig::default());
            let (items, contexts) = caption_contexts(&context, b);
            let (ids, scratch) = (HashMap::new(), std::env::temp_dir());
            let mut steps = DreamboothSteps {
                clip_skip: 0,
                sampling: Sampling {
                    batch_size: b,
                    min_timestep: 0,
                    max_timestep: 1000,
                },
                unet: &mut unet,
                text_encoder: None,
                ids: &ids,
                ddpm: &ddpm,
                items: &items,
                class_items: &[],
                contexts: &contexts,
                optimizer: &mut optimizer,
                scratch: &scratch,
                scaling: 1.0,
                prior_weight: 0.0,
                seed: opts.seed,
                te_lr_factor: 1.0,
                master: master.as_mut(),
                scaler: StepScaler::new::<E>(None),
            };
            let draw = |_| whole_batch(&latents, &noise, &timesteps);
            last_loss = timed(&mut || {
                let outcome =
                    train_step(&mut steps, draw, 1e-6, 1, 1.0).map_err(|e| step_err(&e))?;
                Ok(Some(outcome.loss))
            })?;
        }
        BenchTask::TiTrain => {
            let mut te = weights.text_encoder(&configs, dev)?;
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut te) + count_params(&mut unet);
            let d = configs.text_encoder.hidden_size;
            let vocab = configs.text_encoder.vocab_size;
            trainable_params = d;
            let mut extra = dev.tensor_from_vec(normal(opts.seed ^ 4, d), (1, d));
            // Random token ids with the new token (id `vocab`, the first past the table) at
            // position 1 of every caption.
            let ids: Vec<Vec<u32>> = (0..b)
                .map(|_| {
                    (0..tokens)
                        .map(|p| {
                            if p == 1 {
                                vocab as u32
                            } else {
                                rng.random_range(0..vocab as u32)
                            }
                        })
                        .collect()
                })
                .collect();
            // the textual-inversion stage's step
            let items: Vec<Item> = (0..b)
                .map(|i| Item {
                    caption: format!("bench item {i}"),
                    mean: Vec::new(),
                    std: Vec::new(),
                    shape: [0; 3],
                })
                .collect();
            let ids: HashMap<String, Vec<u32>> =
                (items.iter().map(|i| i.caption.clone())).zip(ids).collect();
            let mut optimizer = AdamW::new(dev, AdamWConfig::default());
            let scratch = std::env::temp_dir();
            let embedding = |vectors: &Tensor2<D>, step: u64| Embedding {
                token: "bench".into(),
                vectors: HostTensor::from_tensor(vectors),
                step: Some(step),
                sd_checkpoint: None,
                sd_checkpoint_name: None,
            };
            let mut steps = TiSteps {
                clip_skip: 0,
                text_encoder: &te,
                unet: &unet,
                ddpm: &ddpm,
                items: &items,
                ids: &ids,
                extra: &mut extra,
                optimizer: &mut optimizer,
                scratch: &scratch,
                embedding: &embedding,
                scaler: StepScaler::new::<E>(None),
            };
            let draw = |_| whole_batch(&latents, &noise, &timesteps);
            last_loss = timed(&mut || {
                let outcome =
                    train_step(&mut steps, draw, 5e-4, 1, 1.0).map_err(|e| step_err(&e))?;
                Ok(Some(outcome.loss))
            })?;
        }
        BenchTask::UnetForward => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
            let (latents, context) = (latents.to_dtype::<E>(), context.to_dtype::<E>());
            timed(&mut || {
                let out = unet
                    .forward(latents.clone(), &t, context.clone())
                    .map_err(|e| step_err(&e))?;
                std::hint::black_box(out);
                Ok(None)
            })?;
        }
        BenchTask::SampleStep => {
            let mut unet: UNet<D, E> = weights.unet(&configs, dev, opts.gradient_checkpointing)?;
            model_params = count_params(&mut unet);
            // The text states of the batch doubled: uncond rows, then cond rows.
            let doubled_ctx: Tensor3<D> = dev.tensor_from_vec(
                normal(opts.seed ^ 5, 2 * b * tokens * ctx_dim),
                (2 * b, tokens, ctx_dim),
            );
            let doubled_ctx = doubled_ctx.to_dtype::<E>();
            let sampler = SamplerKind::Euler
                .build(&SchedulerConfig::sd15(), 30)
                .map_err(|e| step_err(&e))?;
            let i = sampler.num_steps() / 2;
            let t = sampler.timesteps()[i];
            let cfg_scale = 7.5f32;
            let x = latents.clone() * sampler.init_noise_sigma();
            let mut src = SeededNoise::new(opts.seed ^ 6);
            timed(&mut || {
                let model_in = sampler
                    .scale_model_input(x.clone(), i)
                    .map_err(|e| step_err(&e))?;
                let doubled = (model_in.clone(), model_in).concat_along(Axis::<0>);
                // the UNet in its element type, the sampler in f32 (as the pipeline does)
                let out = unet
                    .forward(doubled.to_dtype::<E>(), &[t], doubled_ctx.clone())
                    .map_err(|e| step_err(&e))?
                    .to_dtype::<f32>();
                let uncond = out.clone().slice((0..b, .., .., ..));
                let cond = out.slice((b..2 * b, .., .., ..));
                let eps = uncond.clone() + (cond - uncond) * cfg_scale;
                // Every step starts from the same latents, so the figures do not drift.
                let next = sampler
                    .step(&eps, i, &x, &mut src)
                    .map_err(|e| step_err(&e))?
                    .prev_sample;
                std::hint::black_box(next);
                Ok(None)
            })?;
        }
        BenchTask::VaeEncode => {
            let mut vae = weights.vae(&configs, dev)?;
            model_params = count_params(&mut vae);
            let c = configs.vae.in_channels;
            let r = opts.resolution;
            let images: Tensor4<D> =
                dev.tensor_from_vec(normal(opts.seed ^ 7, b * c * r * r), (b, c, r, r));
            timed(&mut || {
                let dist = vae.encode(images.clone()).map_err(|e| step_err(&e))?;
                std::hint::black_box(dist.mean);
                Ok(None)
            })?;
        }
    }
    bar.finish_and_clear();

    let step_ms = StepTimes::of(&times);
    let per_step = match task {
        BenchTask::SampleStep => 1.0,
        _ => b as f64,
    };
    let peak = probe.peak();
    let memory_source = peak.as_ref().map_or_else(
        || format!("{device}: no memory probe in this binary"),
        |p| p.source.clone(),
    );
    let peak_memory_bytes = peak.map(|p| p.bytes);
    let part = match task {
        BenchTask::LoraTrain => Some(TrainedPart::Lora {
            rank: opts.rank,
            targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
            text_encoder: false,
        }),
        BenchTask::FullTrain => Some(TrainedPart::FullUnet {
            text_encoder: false,
        }),
        BenchTask::TiTrain => Some(TrainedPart::TextualInversion { vectors: 1 }),
        _ => None,
    };
    let memory_estimate_bytes = part.map(|part| {
        let shape = TrainShape {
            batch: b,
            height: opts.resolution,
            width: opts.resolution,
            attention_chunk: DEFAULT_ATTENTION_CHUNK,
            gradient_checkpointing: opts.gradient_checkpointing,
            device: device.to_string(),
            loaded: LoadedModels {
                text_encoder: task == BenchTask::TiTrain,
                vae: false,
            },
            unet_elem_bytes: E::BYTES as u64,
        };
        estimate_train(&configs, &part, &shape).map(|e| e.total)
    });
    let memory_estimate_bytes =
        (memory_estimate_bytes.transpose()).map_err(|reason| BenchError::Step { task, reason })?;
    Ok(BenchReport {
        task,
        arch: opts.arch.name(),
        batch: b,
        resolution: opts.resolution,
        latent_size: latent,
        gradient_checkpointing: opts.gradient_checkpointing,
        iters: opts.iters,
        warmup: opts.warmup,
        device: device.to_string(),
        precision: E::NAME.into(),
        sdpipe_version: env!("CARGO_PKG_VERSION").into(),
        key: task.key(b, opts.resolution),
        value: per_step / (step_ms.median / 1e3).max(1e-12),
        unit: task.unit().into(),
        note: format!("step {:.1} ms", step_ms.median),
        step_ms,
        peakmem_gib: peak_memory_bytes.map(|b| b as f64 / (1u64 << 30) as f64),
        peak_memory_bytes,
        memory_source,
        model_params,
        trainable_params,
        rank: (task == BenchTask::LoraTrain).then_some(opts.rank),
        memory_estimate_bytes,
        last_loss,
    })
}

/// `b` items with their own captions, and each caption's row of `context` (the stages look
/// contexts up by caption).
fn caption_contexts<D: Device<f32>>(
    context: &Tensor3<D>,
    b: usize,
) -> (Vec<Item>, HashMap<String, Tensor3<D>>) {
    let (_, n, d) = *context.shape();
    let rows = context.as_vec();
    let mut items = Vec::with_capacity(b);
    let mut contexts = HashMap::with_capacity(b);
    for (i, row) in rows.chunks(n * d).take(b).enumerate() {
        let caption = format!("bench item {i}");
        contexts.insert(
            caption.clone(),
            context.device().tensor_from_vec(row.to_vec(), (1, n, d)),
        );
        items.push(Item {
            caption,
            mean: Vec::new(),
            std: Vec::new(),
            shape: [0; 3],
        });
    }
    (items, contexts)
}

/// The benchmark's one batch, as the stages' loop hands it to a method: every item, fixed
/// latents, noise and timesteps.
fn whole_batch<D: Device<f32>>(
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
) -> Batch<D> {
    Batch {
        latents: latents.clone(),
        noise: noise.clone(),
        timesteps: timesteps.to_vec(),
        picked: (0..timesteps.len()).collect(),
        step: 0,
        micro: 0,
    }
}

/// `sdpipe bench`: runs the benchmark on `--device` and prints the table or the JSON object.
/// Returns the exit code (0, 2 for bad options, 1 when a step fails, 3 when the model cannot
/// be read, 4 when the device does not open).
pub fn run_cli(args: &BenchArgs, quiet: bool) -> ExitCode {
    let opts = match BenchOptions::from_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::Usage;
        }
    };
    let progress = Progress::new(quiet);
    if let Err(e) = crate::device::check_supported(args.device) {
        eprintln!("error: --device: {e}");
        return ExitCode::Usage;
    }
    let runtime = match crate::device::open(args.device) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::Device;
        }
    };
    let name = runtime.name();
    let result = crate::on_device_precision!(runtime, opts.precision, dev, E => {
        run_on::<E, _>(&dev, &name, &opts, &progress)
    });
    match result {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => crate::outln!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::Environment;
                    }
                }
            } else {
                crate::out!("{}", report.table());
            }
            ExitCode::Ok
        }
        Err(e) => {
            eprintln!("error: {e}");
            match &e {
                BenchError::Usage(_) => ExitCode::Usage,
                BenchError::Model {
                    source: DiffusionError::Io { source, .. },
                    ..
                } if source.kind() != std::io::ErrorKind::NotFound => ExitCode::Environment,
                BenchError::Model { .. } => ExitCode::Usage,
                BenchError::Step { .. } => ExitCode::Failed,
            }
        }
    }
}
