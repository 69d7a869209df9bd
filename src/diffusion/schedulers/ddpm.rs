//! DDPM forward process, for training: noising clean latents at random timesteps and the
//! regression target the UNet is trained on.

use dfdx::prelude::*;

use super::{NoiseSchedule, PredictionType, Result, SchedulerConfig, per_item_tensor};

/// The DDPM noise process of a [`SchedulerConfig`] (diffusers' `DDPMScheduler` training API).
#[derive(Debug, Clone)]
pub struct Ddpm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
}

impl Ddpm {
    /// Builds the process of `config`.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            schedule: NoiseSchedule::new(config)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The schedule (betas, ᾱ).
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// β_t for every training timestep.
    pub fn betas(&self) -> &[f32] {
        &self.schedule.betas
    }

    /// ᾱ_t for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    /// Number of training timesteps (sample `t` uniformly in `0..num_train_timesteps()`).
    pub fn num_train_timesteps(&self) -> usize {
        self.schedule.len()
    }

    /// (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) for each timestep, computed from the float32 ᾱ.
    fn coefficients(&self, timesteps: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut a = Vec::with_capacity(timesteps.len());
        let mut b = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let ac = self.schedule.alpha_cumprod(t)?;
            a.push(ac.sqrt());
            b.push((1.0 - ac).sqrt());
        }
        Ok((a, b))
    }

    /// x_t = sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε, one timestep per batch item (first dimension).
    pub fn add_noise<S: Shape, D: Device<f32>>(
        &self,
        original: &Tensor<S, f32, D>,
        noise: &Tensor<S, f32, D>,
        timesteps: &[usize],
    ) -> Result<Tensor<S, f32, D>> {
        let (a, b) = self.coefficients(timesteps)?;
        let a = per_item_tensor(original, &a, "add_noise")?;
        let b = per_item_tensor(original, &b, "add_noise")?;
        Ok(a * original.clone() + b * noise.clone())
    }

    /// The velocity v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x₀ (diffusers' `get_velocity`).
    pub fn velocity<S: Shape, D: Device<f32>>(
        &self,
        original: &Tensor<S, f32, D>,
        noise: &Tensor<S, f32, D>,
        timesteps: &[usize],
    ) -> Result<Tensor<S, f32, D>> {
        let (a, b) = self.coefficients(timesteps)?;
        let a = per_item_tensor(original, &a, "velocity")?;
        let b = per_item_tensor(original, &b, "velocity")?;
        Ok(a * noise.clone() - b * original.clone())
    }

    /// What the UNet is trained to predict for this config's `prediction_type`: ε, v, or x₀.
    pub fn training_target<S: Shape, D: Device<f32>>(
        &self,
        original: &Tensor<S, f32, D>,
        noise: &Tensor<S, f32, D>,
        timesteps: &[usize],
    ) -> Result<Tensor<S, f32, D>> {
        match self.config.prediction_type {
            PredictionType::Epsilon => {
                // Still validate the timesteps so a bad batch fails the same way for every type.
                self.coefficients(timesteps)?;
                Ok(noise.clone())
            }
            PredictionType::VPrediction => self.velocity(original, noise, timesteps),
            PredictionType::Sample => {
                self.coefficients(timesteps)?;
                Ok(original.clone())
            }
        }
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep (min-SNR weighting).
    pub fn snr(&self, timesteps: &[usize]) -> Result<Vec<f64>> {
        timesteps.iter().map(|&t| self.schedule.snr(t)).collect()
    }
}
