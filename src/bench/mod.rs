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

mod results;
mod run;

pub use results::{BenchReport, StepTimes};
pub use run::run_on;

use crate::exit::ExitCode;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;
use thiserror::Error;

use crate::diffusion::DiffusionError;
use crate::engine::Progress;

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
