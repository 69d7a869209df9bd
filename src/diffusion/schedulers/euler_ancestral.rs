//! Euler ancestral sampler ("Euler a"), as diffusers' `EulerAncestralDiscreteScheduler`: an
//! Euler step down to σ_down followed by fresh noise of scale σ_up.

use dfdx::prelude::*;

use super::euler::SigmaSchedule;
use super::{NoiseSource, Result, SchedulerConfig, StepOutput, noise_tensor};

/// Euler ancestral sampler for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    sigmas: SigmaSchedule,
}

impl EulerAncestral {
    /// Euler ancestral for `steps` inference steps (same timesteps and σ's as [`super::Euler`]).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Ok(Self {
            sigmas: SigmaSchedule::new(config, steps)?,
        })
    }

    /// Timesteps fed to the UNet (float32, descending).
    pub fn timesteps(&self) -> &[f32] {
        &self.sigmas.timesteps
    }

    /// σ for each step and a trailing 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas.sigmas
    }

    /// Scale of the initial noise (same rule as Euler).
    pub fn init_noise_sigma(&self) -> f32 {
        self.sigmas.init_noise_sigma
    }

    /// x / sqrt(σ_i² + 1).
    pub fn scale_model_input<S: Shape, D: Device<f32>>(
        &self,
        sample: Tensor<S, f32, D>,
        i: usize,
    ) -> Result<Tensor<S, f32, D>> {
        self.sigmas.scale_model_input(sample, i)
    }

    /// (σ_up, σ_down) of step `i`: σ_up = sqrt(σ_to²·(σ_from² − σ_to²)/σ_from²),
    /// σ_down = sqrt(σ_to² − σ_up²).
    pub fn ancestral_sigmas(&self, i: usize) -> Result<(f32, f32)> {
        let (from, to) = self.sigmas.sigma(i)?;
        let up = ((to * to) * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        Ok((up, down))
    }

    /// One step: x₀ = x − σ·ε, x' = x + (σ_down − σ)·(x − x₀)/σ + σ_up·z with z ~ N(0, 1) from
    /// `noise` (not drawn on the last step, where σ_up = 0).
    pub fn step<S: Shape, D: Device<f32>>(
        &self,
        model_output: &Tensor<S, f32, D>,
        i: usize,
        sample: &Tensor<S, f32, D>,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<S, D>> {
        let (sigma, _) = self.sigmas.sigma(i)?;
        let (sigma_up, sigma_down) = self.ancestral_sigmas(i)?;
        let x0 = self.sigmas.pred_original(model_output, sample, sigma);
        let derivative = (sample.clone() - x0.clone()) / sigma;
        let mut prev = sample.clone() + derivative * (sigma_down - sigma);
        if sigma_up > 0.0 {
            let z = noise_tensor(noise, *sample.shape(), &sample.device().clone());
            prev = prev + z * sigma_up;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}
