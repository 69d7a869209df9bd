//! DDPM forward process, for training: noising clean latents at random timesteps, the
//! regression target the UNet is trained on, and each timestep's weight in the loss.

use dfdx::prelude::*;

use super::{NoiseSchedule, PredictionType, Result, SchedulerConfig, per_item_tensor};

/// How the per-sample losses of a batch are weighted by their timestep's signal-to-noise ratio
/// `SNR(t) = ᾱ_t / (1 − ᾱ_t)`. The default weighs every sample alike (plain MSE).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossWeighting {
    /// Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    /// Strategy"), as diffusers' training examples and kohya's `apply_snr_weight` compute it:
    /// `min(SNR, γ) / SNR` for ε-prediction, `min(SNR, γ) / (SNR + 1)` for v-prediction and
    /// `min(SNR, γ)` for x₀-prediction. γ = 5 is the paper's recommendation.
    pub min_snr_gamma: Option<f64>,
    /// kohya's `debiased_estimation_loss`: `1 / √min(SNR, 1000)` for ε-prediction,
    /// `1 / √(min(SNR, 1000) + 1)` for v-prediction; multiplies with min-SNR when both are set.
    pub debiased_estimation: bool,
}

impl LossWeighting {
    /// Whether every sample weighs 1.
    pub fn is_uniform(&self) -> bool {
        self.min_snr_gamma.is_none() && !self.debiased_estimation
    }

    /// The weight of a sample whose timestep has signal-to-noise ratio `snr`, for a model
    /// predicting `prediction`.
    pub fn weight(&self, snr: f64, prediction: PredictionType) -> f64 {
        let v = prediction == PredictionType::VPrediction;
        let mut w = 1.0;
        if let Some(gamma) = self.min_snr_gamma {
            let clipped = snr.min(gamma);
            w *= match prediction {
                PredictionType::Epsilon => clipped / snr,
                PredictionType::VPrediction => clipped / (snr + 1.0),
                PredictionType::Sample => clipped,
            };
        }
        if self.debiased_estimation {
            let s = snr.min(1000.0);
            w *= 1.0 / if v { s + 1.0 } else { s }.sqrt();
        }
        w
    }
}

/// The DDPM noise process of a [`SchedulerConfig`] (diffusers' `DDPMScheduler` training API).
#[derive(Debug, Clone)]
pub struct Ddpm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    weighting: LossWeighting,
}

impl Ddpm {
    /// Builds the process of `config`.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            schedule: NoiseSchedule::new(config)?,
            weighting: LossWeighting::default(),
        })
    }

    /// The same process, its training loss weighted by `weighting`.
    pub fn with_loss_weighting(mut self, weighting: LossWeighting) -> Self {
        self.weighting = weighting;
        self
    }

    /// The per-sample loss weights of `timesteps` (see [`LossWeighting`]); `None` when every
    /// sample weighs 1, so the loss stays the plain mean over every element.
    pub fn loss_weights(&self, timesteps: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.weighting.is_uniform() {
            return Ok(None);
        }
        let prediction = self.config.prediction_type;
        let snr = self.snr(timesteps)?;
        Ok(Some(
            snr.iter()
                .map(|&s| self.weighting.weight(s, prediction) as f32)
                .collect(),
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The weights of hand-computed SNRs, from the formulas of Hang et al. 2023 (as diffusers and
    /// kohya's `apply_snr_weight` write them) and kohya's `apply_debiased_estimation`.
    #[test]
    fn weights_follow_the_published_formulas() {
        let min_snr = LossWeighting {
            min_snr_gamma: Some(5.0),
            debiased_estimation: false,
        };
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        // SNR above γ: clipped to γ.
        close(min_snr.weight(20.0, PredictionType::Epsilon), 0.25);
        close(
            min_snr.weight(20.0, PredictionType::VPrediction),
            5.0 / 21.0,
        );
        close(min_snr.weight(20.0, PredictionType::Sample), 5.0);
        // SNR below γ: ε weighs 1, v weighs snr / (snr + 1).
        close(min_snr.weight(0.5, PredictionType::Epsilon), 1.0);
        close(min_snr.weight(0.5, PredictionType::VPrediction), 0.5 / 1.5);
        let debiased = LossWeighting {
            min_snr_gamma: None,
            debiased_estimation: true,
        };
        close(debiased.weight(4.0, PredictionType::Epsilon), 0.5);
        close(
            debiased.weight(4.0, PredictionType::VPrediction),
            1.0 / 5f64.sqrt(),
        );
        // SNR capped at 1000 (the first timesteps of SD's schedule reach ~1200).
        close(
            debiased.weight(2000.0, PredictionType::Epsilon),
            1.0 / 1000f64.sqrt(),
        );
        let both = LossWeighting {
            min_snr_gamma: Some(5.0),
            debiased_estimation: true,
        };
        close(
            both.weight(20.0, PredictionType::Epsilon),
            0.25 / 20f64.sqrt(),
        );
        assert!(LossWeighting::default().is_uniform());
        close(
            LossWeighting::default().weight(3.0, PredictionType::Epsilon),
            1.0,
        );
    }

    #[test]
    fn uniform_weighting_leaves_the_plain_loss() {
        let ddpm = Ddpm::new(&SchedulerConfig::sd15()).unwrap();
        assert_eq!(ddpm.loss_weights(&[0, 999]).unwrap(), None);
        let weighted = ddpm.with_loss_weighting(LossWeighting {
            min_snr_gamma: Some(5.0),
            debiased_estimation: false,
        });
        let w = weighted.loss_weights(&[0, 999]).unwrap().unwrap();
        // t = 0 is nearly noise-free (SNR ≫ 5): heavily down-weighted; t = 999 keeps 1.
        assert!(w[0] < 0.01 && (w[1] - 1.0).abs() < 1e-6, "{w:?}");
    }
}
