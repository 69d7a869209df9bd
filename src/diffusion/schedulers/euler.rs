//! Euler sampler (Karras et al. 2022, Algorithm 2 without churn), as diffusers'
//! `EulerDiscreteScheduler` with its default (zero) churn.

use dfdx::prelude::*;

use super::schedule::{inference_timesteps, interp_unit_grid};
use super::{
    NoiseSchedule, PredictionType, Result, SchedulerConfig, SchedulerError, StepOutput,
    TimestepSpacing,
};

/// Timesteps and σ's of the discrete-time k-diffusion samplers (shared by Euler and Euler
/// ancestral).
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    pub(crate) config: SchedulerConfig,
    /// float32 timesteps, descending.
    pub(crate) timesteps: Vec<f32>,
    /// σ for each timestep plus a trailing 0.
    pub(crate) sigmas: Vec<f32>,
    pub(crate) init_noise_sigma: f32,
}

impl SigmaSchedule {
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let mut schedule = NoiseSchedule::new(config)?;
        if config.rescale_betas_zero_snr {
            // diffusers: ᾱ at the last timestep is set close to 0 without being 0 (float16's
            // smallest subnormal, 2⁻²⁴), so the first σ is large but finite.
            if let Some(last) = schedule.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        // diffusers: timesteps cast to float32 by numpy; σ(t) = interp(t, arange(N),
        // sqrt((1-ᾱ)/ᾱ)) in float64 from float32 inputs, then cast to float32.
        let timesteps: Vec<f32> = inference_timesteps(config, steps)?
            .into_iter()
            .map(|t| t as f32)
            .collect();
        let train_sigmas = schedule.train_sigmas();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp_unit_grid(t as f64, &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        let init_noise_sigma = match config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            config: config.clone(),
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    pub(crate) fn sigma(&self, i: usize) -> Result<(f32, f32)> {
        if i + 1 < self.sigmas.len() {
            Ok((self.sigmas[i], self.sigmas[i + 1]))
        } else {
            Err(SchedulerError::StepOutOfRange {
                index: i,
                num_steps: self.timesteps.len(),
            })
        }
    }

    /// x / sqrt(σ_i² + 1).
    pub(crate) fn scale_model_input<S: Shape, D: Device<f32>>(
        &self,
        sample: Tensor<S, f32, D>,
        i: usize,
    ) -> Result<Tensor<S, f32, D>> {
        let (sigma, _) = self.sigma(i)?;
        Ok(sample / (sigma * sigma + 1.0).sqrt())
    }

    /// The denoised estimate x₀ from the model output at σ.
    pub(crate) fn pred_original<S: Shape, D: Device<f32>>(
        &self,
        model_output: &Tensor<S, f32, D>,
        sample: &Tensor<S, f32, D>,
        sigma: f32,
    ) -> Tensor<S, f32, D> {
        match self.config.prediction_type {
            PredictionType::Epsilon => sample.clone() - model_output.clone() * sigma,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                model_output.clone() * (-sigma / s2.sqrt()) + sample.clone() / s2
            }
            PredictionType::Sample => model_output.clone(),
        }
    }
}

/// Euler sampler for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Euler {
    sigmas: SigmaSchedule,
}

impl Euler {
    /// Euler for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Ok(Self {
            sigmas: SigmaSchedule::new(config, steps)?,
        })
    }

    /// Timesteps fed to the UNet (float32, descending; fractional with `linspace` spacing).
    pub fn timesteps(&self) -> &[f32] {
        &self.sigmas.timesteps
    }

    /// σ for each step and a trailing 0 (`steps + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas.sigmas
    }

    /// Scale of the initial noise: σ_max for `linspace`/`trailing`, sqrt(σ_max² + 1) for
    /// `leading` (diffusers' rule).
    pub fn init_noise_sigma(&self) -> f32 {
        self.sigmas.init_noise_sigma
    }

    /// x / sqrt(σ_i² + 1): the UNet input at step `i`.
    pub fn scale_model_input<S: Shape, D: Device<f32>>(
        &self,
        sample: Tensor<S, f32, D>,
        i: usize,
    ) -> Result<Tensor<S, f32, D>> {
        self.sigmas.scale_model_input(sample, i)
    }

    /// One Euler step: x₀ = x − σ·ε, d = (x − x₀)/σ, x' = x + (σ_{i+1} − σ_i)·d.
    pub fn step<S: Shape, D: Device<f32>>(
        &self,
        model_output: &Tensor<S, f32, D>,
        i: usize,
        sample: &Tensor<S, f32, D>,
    ) -> Result<StepOutput<S, D>> {
        let (sigma, sigma_next) = self.sigmas.sigma(i)?;
        let x0 = self.sigmas.pred_original(model_output, sample, sigma);
        let derivative = (sample.clone() - x0.clone()) / sigma;
        let dt = sigma_next - sigma;
        Ok(StepOutput {
            prev_sample: sample.clone() + derivative * dt,
            pred_original_sample: x0,
        })
    }
}
