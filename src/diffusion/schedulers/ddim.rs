//! DDIM sampler (Song et al. 2020), as diffusers' `DDIMScheduler`.

use dfdx::prelude::*;

use super::schedule::inference_timesteps;
use super::{
    NoiseSchedule, NoiseSource, PredictionType, Result, SchedulerConfig, SchedulerError,
    StepOutput, noise_tensor,
};

/// DDIM for a fixed number of steps. `eta` = 0 is deterministic; `eta` = 1 matches DDPM's
/// posterior variance.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<usize>,
    timesteps_f32: Vec<f32>,
    /// N // steps: distance to the previous timestep (diffusers uses it for every spacing).
    step_ratio: usize,
    eta: f64,
}

impl Ddim {
    /// DDIM with `eta` = 0 for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(config)?;
        let timesteps: Vec<usize> = inference_timesteps(config, steps)?
            .into_iter()
            .map(|t| t.round_ties_even() as usize)
            .collect();
        Ok(Self {
            config: config.clone(),
            schedule,
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            step_ratio: config.num_train_timesteps / steps,
            eta: 0.0,
        })
    }

    /// Sets the stochasticity η (0 = deterministic DDIM, 1 = DDPM-like).
    pub fn with_eta(mut self, eta: f64) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(SchedulerError::Config {
                path: None,
                message: format!("DDIM eta must be a finite number >= 0, got {eta}"),
            });
        }
        self.eta = eta;
        Ok(self)
    }

    /// η.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// Integer timesteps, descending (e.g. 901, 801, …, 1 for 10 SD 1.5 steps).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The same timesteps as float32, for the UNet.
    pub fn timesteps_f32(&self) -> &[f32] {
        &self.timesteps_f32
    }

    /// 1: DDIM starts from unit-variance noise.
    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub(crate) fn check_index(&self, i: usize) -> Result<()> {
        if i < self.timesteps.len() {
            Ok(())
        } else {
            Err(SchedulerError::StepOutOfRange {
                index: i,
                num_steps: self.timesteps.len(),
            })
        }
    }

    /// (ᾱ_t, ᾱ_prev) for step `i`; past the first training step ᾱ_prev is 1 when
    /// `set_alpha_to_one`, else ᾱ_0. float32, like diffusers' `alphas_cumprod` tensor.
    fn alphas(&self, i: usize) -> Result<(f32, f32)> {
        self.check_index(i)?;
        let t = self.timesteps[i];
        let a_t = self.schedule.alpha_cumprod(t)?;
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.schedule.alpha_cumprod(prev)?,
            None if self.config.set_alpha_to_one => 1.0,
            None => self.schedule.alphas_cumprod[0],
        };
        Ok((a_t, a_prev))
    }

    /// One DDIM step (formula (12) of the paper, diffusers' `DDIMScheduler.step`). The scalar
    /// coefficients are computed in float32 in diffusers' order, so results agree to an ulp.
    pub fn step<S: Shape, D: Device<f32>>(
        &self,
        model_output: &Tensor<S, f32, D>,
        i: usize,
        sample: &Tensor<S, f32, D>,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput<S, D>> {
        let (a_t, a_prev) = self.alphas(i)?;
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        // [x0, eps] from the model's parameterisation.
        let (mut x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                (sample.clone() - model_output.clone() * sb) / sa,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                (sample.clone() - model_output.clone() * sa) / sb,
            ),
            PredictionType::VPrediction => (
                sample.clone() * sa - model_output.clone() * sb,
                model_output.clone() * sa + sample.clone() * sb,
            ),
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r);
        }
        // σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev))
        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let dir_coef = (1.0 - a_prev - std_dev * std_dev).max(0.0).sqrt();
        let mut prev = x0.clone() * a_prev.sqrt() + eps * dir_coef;
        if std_dev > 0.0 {
            let z = noise_tensor(noise, *sample.shape(), &sample.device().clone());
            prev = prev + z * std_dev;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}
