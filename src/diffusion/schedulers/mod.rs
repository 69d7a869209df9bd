//! Noise schedulers with diffusers' numerics: DDPM (training: noising and targets), and the
//! samplers DDIM, Euler and Euler ancestral behind one [`Sampler`] enum for the txt2img loop.
//!
//! Everything is built from a [`SchedulerConfig`] whose defaults are Stable Diffusion 1.5's
//! (`scaled_linear` betas 0.00085→0.012, 1000 training steps, `steps_offset` 1, `leading`
//! spacing, `set_alpha_to_one` false, epsilon prediction). Samplers are stateless after
//! construction: `step` takes the step index `i` into [`Sampler::timesteps`].
//!
//! `step` works on dfdx tensors of any shape on any device (`D: Device<f32>`), with
//! scalar-tensor ops only, so it runs unchanged on the CPU and on CUDA.

mod ddim;
mod ddpm;
mod euler;
mod euler_ancestral;
mod schedule;

use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use ddim::Ddim;
pub use ddpm::{Ddpm, LossWeighting};
pub use euler::Euler;
pub use euler_ancestral::EulerAncestral;
pub use schedule::NoiseSchedule;

/// How β_t grows over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, N)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2` (Stable Diffusion).
    #[default]
    ScaledLinear,
    /// Cosine schedule (`squaredcos_cap_v2`).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε (SD 1.x).
    #[default]
    Epsilon,
    /// The velocity v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀ (SD 2.x 768 models).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `arange(steps) * (N // steps) + steps_offset` (SD 1.5's config).
    #[default]
    Leading,
    /// `linspace(0, N - 1, steps)` (Euler's own default; close to A1111 / k-diffusion).
    Linspace,
    /// `round(arange(N, 0, -N / steps)) - 1`.
    Trailing,
}

/// Scheduler configuration (the fields of diffusers' `scheduler_config.json` that matter here).
/// Defaults are Stable Diffusion 1.5's; unknown JSON fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Training timesteps N (1000).
    pub num_train_timesteps: usize,
    /// First β (0.00085).
    pub beta_start: f64,
    /// Last β (0.012).
    pub beta_end: f64,
    /// β schedule (`scaled_linear`).
    pub beta_schedule: BetaSchedule,
    /// Model parameterisation (`epsilon`).
    pub prediction_type: PredictionType,
    /// Added to `leading` timesteps (1).
    pub steps_offset: usize,
    /// Spacing of inference timesteps (`leading`).
    pub timestep_spacing: TimestepSpacing,
    /// DDIM: use ᾱ = 1 after the last step instead of ᾱ_0 (false).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x₀ to ±`clip_sample_range` (false).
    pub clip_sample: bool,
    /// DDIM: clamp range (1.0).
    pub clip_sample_range: f64,
    /// Rescale the betas so the last timestep has zero signal-to-noise ratio (Lin et al. 2023,
    /// "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1; false).
    /// Models trained so are v-prediction and sampled with `trailing` spacing.
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::sd15()
    }
}

impl SchedulerConfig {
    /// Stable Diffusion 1.5's scheduler configuration.
    pub fn sd15() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 1,
            timestep_spacing: TimestepSpacing::Leading,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            rescale_betas_zero_snr: false,
        }
    }

    /// Reads a diffusers `scheduler/scheduler_config.json` (any scheduler class; fields it
    /// lacks keep SD 1.5's values).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            SchedulerError::Config { message, .. } => SchedulerError::Config {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })
    }

    /// Parses the JSON text of a diffusers scheduler config.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|e| SchedulerError::Config {
            path: None,
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| {
            Err(SchedulerError::Config {
                path: None,
                message,
            })
        };
        if self.num_train_timesteps < 2 {
            return bad(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            ));
        }
        if !(self.beta_start > 0.0 && self.beta_end >= self.beta_start && self.beta_end < 1.0) {
            return bad(format!(
                "betas must satisfy 0 < beta_start <= beta_end < 1, got {} → {}",
                self.beta_start, self.beta_end
            ));
        }
        if self.clip_sample_range <= 0.0 {
            return bad(format!(
                "clip_sample_range must be positive, got {}",
                self.clip_sample_range
            ));
        }
        Ok(())
    }
}

/// Scheduler errors.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A config file could not be read.
    #[error("cannot read scheduler config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A config is malformed or has unusable values.
    #[error("invalid scheduler config{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        /// The file, when read from one.
        path: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
    /// The number of inference steps is unusable.
    #[error("number of sampling steps must be between 1 and {num_train_timesteps}, got {steps}")]
    InvalidSteps {
        /// Requested steps.
        steps: usize,
        /// Training timesteps.
        num_train_timesteps: usize,
    },
    /// A timestep outside the training range.
    #[error("timestep {timestep} is outside the training range 0..{num_train_timesteps}")]
    TimestepOutOfRange {
        /// The timestep.
        timestep: usize,
        /// Training timesteps.
        num_train_timesteps: usize,
    },
    /// A step index past the schedule.
    #[error("step index {index} is past the last of the {num_steps} sampling steps")]
    StepOutOfRange {
        /// The index.
        index: usize,
        /// Number of sampling steps.
        num_steps: usize,
    },
    /// One timestep per batch item is needed.
    #[error("{what}: got {timesteps} timesteps for a batch of {batch}")]
    BatchMismatch {
        /// The operation.
        what: &'static str,
        /// Number of timesteps given.
        timesteps: usize,
        /// Batch size (first dimension).
        batch: usize,
    },
    /// The sampler name is not one of the supported ones.
    #[error("unknown sampler {0:?}: supported are ddim, euler, euler_a")]
    UnknownSampler(String),
}

/// Result alias for scheduler operations.
pub type Result<T> = std::result::Result<T, SchedulerError>;

/// Source of standard-normal noise for stochastic samplers (DDIM with eta > 0, Euler
/// ancestral) and for initial latents. Seeded sources make runs reproducible.
pub trait NoiseSource {
    /// Fills `out` with independent N(0, 1) samples.
    fn fill_normal(&mut self, out: &mut [f32]);

    /// A tensor of shape `shape` on `device` filled with N(0, 1) samples.
    fn normal_tensor<S: Shape, D: Device<f32>>(&mut self, shape: S, device: &D) -> Tensor<S, f32, D>
    where
        Self: Sized,
    {
        noise_tensor(self, shape, device)
    }
}

/// A tensor of shape `shape` on `device` filled with N(0, 1) samples from `noise` (the initial
/// latents of txt2img are `noise_tensor(..) * sampler.init_noise_sigma()`).
pub fn noise_tensor<S: Shape, D: Device<f32>>(
    noise: &mut dyn NoiseSource,
    shape: S,
    device: &D,
) -> Tensor<S, f32, D> {
    let mut v = vec![0.0f32; shape.num_elements()];
    noise.fill_normal(&mut v);
    device.tensor_from_vec(v, shape)
}

impl<N: NoiseSource + ?Sized> NoiseSource for &mut N {
    fn fill_normal(&mut self, out: &mut [f32]) {
        (**self).fill_normal(out)
    }
}

impl<N: NoiseSource + ?Sized> NoiseSource for Box<N> {
    fn fill_normal(&mut self, out: &mut [f32]) {
        (**self).fill_normal(out)
    }
}

/// A seeded, platform-independent N(0, 1) generator (ChaCha8 + Box–Muller in float64): the same
/// seed gives the same numbers on every machine and device.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl SeededNoise {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    /// A uniform sample in the open interval (0, 1).
    fn uniform_open(&mut self) -> f64 {
        // 53 random bits, shifted by half an ulp so 0 is impossible.
        ((self.rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// One N(0, 1) sample.
    pub fn next_normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (u1, u2) = (self.uniform_open(), self.uniform_open());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

impl NoiseSource for SeededNoise {
    fn fill_normal(&mut self, out: &mut [f32]) {
        for x in out {
            *x = self.next_normal() as f32;
        }
    }
}

/// Output of one sampler step.
#[derive(Debug, Clone)]
pub struct StepOutput<S: Shape, D: Device<f32>> {
    /// The sample for the next step (x_{t-1}).
    pub prev_sample: Tensor<S, f32, D>,
    /// The model's estimate of the clean sample x₀ at this step.
    pub pred_original_sample: Tensor<S, f32, D>,
}

/// The samplers the txt2img loop offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// DDIM (deterministic with eta 0).
    Ddim,
    /// Euler (k-diffusion's "Euler").
    Euler,
    /// Euler ancestral ("Euler a").
    #[serde(rename = "euler_a")]
    EulerAncestral,
}

impl SamplerKind {
    /// All kinds, in CLI order.
    pub const ALL: [SamplerKind; 3] = [Self::Ddim, Self::Euler, Self::EulerAncestral];

    /// The CLI / config name (`ddim`, `euler`, `euler_a`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
        }
    }

    /// The name AUTOMATIC1111 writes in its `parameters` text (`DDIM`, `Euler`, `Euler a`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
        }
    }

    /// Parses an A1111 sampler name back.
    pub fn from_a1111_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.a1111_name() == name)
    }

    /// Builds the sampler for `steps` inference steps.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Sampler> {
        Ok(match self {
            Self::Ddim => Sampler::Ddim(Ddim::new(config, steps)?),
            Self::Euler => Sampler::Euler(Euler::new(config, steps)?),
            Self::EulerAncestral => Sampler::EulerAncestral(EulerAncestral::new(config, steps)?),
        })
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            "euler_a" | "euler-a" | "euler a" | "euler_ancestral" => Ok(Self::EulerAncestral),
            _ => Err(SchedulerError::UnknownSampler(s.to_string())),
        }
    }
}

/// A sampler ready for a fixed number of steps; the txt2img loop is
///
/// ```text
/// x = noise * sampler.init_noise_sigma()
/// for i in 0..sampler.num_steps():
///     eps = unet(sampler.scale_model_input(x, i), sampler.timesteps()[i], text)   // + CFG
///     x = sampler.step(eps, i, x, rng).prev_sample
/// ```
#[derive(Debug, Clone)]
pub enum Sampler {
    /// DDIM.
    Ddim(Ddim),
    /// Euler.
    Euler(Euler),
    /// Euler ancestral.
    EulerAncestral(EulerAncestral),
}

impl Sampler {
    /// Which sampler this is.
    pub fn kind(&self) -> SamplerKind {
        match self {
            Self::Ddim(_) => SamplerKind::Ddim,
            Self::Euler(_) => SamplerKind::Euler,
            Self::EulerAncestral(_) => SamplerKind::EulerAncestral,
        }
    }

    /// Timesteps to feed the UNet, one per step, descending.
    pub fn timesteps(&self) -> &[f32] {
        match self {
            Self::Ddim(s) => s.timesteps_f32(),
            Self::Euler(s) => s.timesteps(),
            Self::EulerAncestral(s) => s.timesteps(),
        }
    }

    /// Number of sampling steps.
    pub fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// Standard deviation of the initial noise (multiply N(0, 1) latents by it).
    pub fn init_noise_sigma(&self) -> f32 {
        match self {
            Self::Ddim(s) => s.init_noise_sigma(),
            Self::Euler(s) => s.init_noise_sigma(),
            Self::EulerAncestral(s) => s.init_noise_sigma(),
        }
    }

    /// Scales the UNet input for step `i` (identity for DDIM, x / sqrt(σ² + 1) for Euler).
    pub fn scale_model_input<S: Shape, D: Device<f32>>(
        &self,
        sample: Tensor<S, f32, D>,
        i: usize,
    ) -> Result<Tensor<S, f32, D>> {
        match self {
            Self::Ddim(s) => {
                s.check_index(i)?;
                Ok(sample)
            }
            Self::Euler(s) => s.scale_model_input(sample, i),
            Self::EulerAncestral(s) => s.scale_model_input(sample, i),
        }
    }

    /// One denoising step from `sample` at step `i` given the (guided) model output. `noise`
    /// is drawn from only by stochastic samplers (Euler a; DDIM with eta > 0).
    pub fn step<S: Shape, D: Device<f32>>(
        &self,
        model_output: &Tensor<S, f32, D>,
        i: usize,
        sample: &Tensor<S, f32, D>,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<S, D>> {
        match self {
            Self::Ddim(s) => s.step(model_output, i, sample, noise),
            Self::Euler(s) => s.step(model_output, i, sample),
            Self::EulerAncestral(s) => s.step(model_output, i, sample, noise),
        }
    }
}

/// Shape-generic helper: builds a tensor shaped like `like` whose every batch item (first
/// dimension) is filled with `per_item[b]`.
pub(crate) fn per_item_tensor<S: Shape, D: Device<f32>>(
    like: &Tensor<S, f32, D>,
    per_item: &[f32],
    what: &'static str,
) -> Result<Tensor<S, f32, D>> {
    let shape = *like.shape();
    let dims = shape.concrete();
    let batch = if S::NUM_DIMS == 0 { 1 } else { dims[0] };
    if per_item.len() != batch {
        return Err(SchedulerError::BatchMismatch {
            what,
            timesteps: per_item.len(),
            batch,
        });
    }
    let numel = shape.num_elements();
    let inner = numel.checked_div(batch).unwrap_or(0);
    let mut v = Vec::with_capacity(numel);
    for &c in per_item {
        v.extend(std::iter::repeat_n(c, inner));
    }
    Ok(like.device().tensor_from_vec(v, shape))
}
