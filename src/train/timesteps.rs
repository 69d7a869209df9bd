//! Which training timesteps a batch draws: uniform (DDPM's and every trainer's default),
//! logit-normal (Esser et al. 2024, the SD3 paper, as diffusers' `compute_density_for_timestep_sampling`
//! draws it), or uniform with a bias toward the high (noisy) or low (detailed) end, as
//! diffusers' SDXL example's `generate_timestep_weights` does.

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

/// The distribution of timesteps over `min_timestep..max_timestep`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepDistribution {
    /// Every timestep alike.
    #[default]
    Uniform,
    /// `t = ⌊σ(n)·(max − min)⌋ + min`, `n ~ N(logit_mean, logit_std)`: the middle of the range
    /// drawn most, its ends least.
    LogitNormal,
}

/// Which end of the range a biased uniform draw favours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepBias {
    /// No bias.
    #[default]
    None,
    /// The noisiest timesteps (composition, colour).
    High,
    /// The least noisy ones (fine detail).
    Low,
}

/// How a batch draws its timesteps. The default draws uniformly, exactly as before these
/// options existed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestepSampling {
    /// The distribution.
    pub distribution: TimestepDistribution,
    /// Mean of the logit-normal's normal (default 0).
    pub logit_mean: f64,
    /// Its standard deviation (default 1).
    pub logit_std: f64,
    /// A bias of the uniform draw toward one end.
    pub bias: TimestepBias,
    /// How many times likelier the biased timesteps are (diffusers' `timestep_bias_multiplier`).
    pub bias_multiplier: f64,
    /// The share of the range that is biased (diffusers' `timestep_bias_portion`, 0.25).
    pub bias_portion: f64,
}

impl Default for TimestepSampling {
    fn default() -> Self {
        TimestepSampling {
            distribution: TimestepDistribution::Uniform,
            logit_mean: 0.0,
            logit_std: 1.0,
            bias: TimestepBias::None,
            bias_multiplier: 2.0,
            bias_portion: 0.25,
        }
    }
}

impl TimestepSampling {
    /// One timestep in `min..max` (non-empty).
    pub fn draw(&self, rng: &mut impl Rng, min: usize, max: usize) -> usize {
        match (self.distribution, self.bias) {
            (TimestepDistribution::Uniform, TimestepBias::None) => rng.random_range(min..max),
            (TimestepDistribution::LogitNormal, _) => {
                // Box–Muller from two uniforms in (0, 1].
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let n = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let u = 1.0 / (1.0 + (-(self.logit_mean + self.logit_std * n)).exp());
                (min + (u * (max - min) as f64) as usize).min(max - 1)
            }
            (TimestepDistribution::Uniform, bias) => {
                // The inverse of the cumulative `bias_weights`, without building them per draw:
                // `k` timesteps at one end weigh `m`, the other `n − k` weigh 1.
                let n = max - min;
                let k = self.biased_count(n);
                let m = self.bias_multiplier;
                let x = rng.random::<f64>() * ((n - k) as f64 + k as f64 * m);
                let i = match bias {
                    TimestepBias::Low if x < k as f64 * m => (x / m) as usize,
                    TimestepBias::Low => k + (x - k as f64 * m) as usize,
                    TimestepBias::High if x < (n - k) as f64 => x as usize,
                    _ => n - k + ((x - (n - k) as f64) / m) as usize,
                };
                min + i.min(n - 1)
            }
        }
    }

    /// How many of `n` timesteps the bias favours: `⌊bias_portion·n⌋`.
    fn biased_count(&self, n: usize) -> usize {
        ((self.bias_portion * n as f64) as usize).min(n)
    }

    /// The relative weight of each of the `n` timesteps of the range and their sum: 1, and
    /// `bias_multiplier` for the `⌊bias_portion·n⌋` at the biased end.
    pub fn bias_weights(&self, bias: TimestepBias, n: usize) -> (Vec<f64>, f64) {
        let biased = self.biased_count(n);
        let mut weights = vec![1.0; n];
        let range = match bias {
            TimestepBias::None => 0..0,
            TimestepBias::High => n - biased..n,
            TimestepBias::Low => 0..biased,
        };
        for w in &mut weights[range] {
            *w *= self.bias_multiplier;
        }
        let total = weights.iter().sum();
        (weights, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn histogram(s: &TimestepSampling, draws: usize) -> Vec<usize> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut h = vec![0; 4];
        for _ in 0..draws {
            let t = s.draw(&mut rng, 0, 1000);
            assert!(t < 1000);
            h[t / 250] += 1;
        }
        h
    }

    #[test]
    fn a_high_bias_doubles_the_noisiest_quarter() {
        let s = TimestepSampling {
            bias: TimestepBias::High,
            ..TimestepSampling::default()
        };
        // diffusers: weights 1 and 2 over quarters → the last quarter holds 2/5 of the draws.
        let (w, total) = s.bias_weights(TimestepBias::High, 1000);
        assert_eq!((w[749], w[750], total), (1.0, 2.0, 1250.0));
        let h = histogram(&s, 40_000);
        let last = h[3] as f64 / 40_000.0;
        assert!((last - 0.4).abs() < 0.01, "{h:?}");
        let low = histogram(
            &TimestepSampling {
                bias: TimestepBias::Low,
                ..s
            },
            40_000,
        );
        assert!((low[0] as f64 / 40_000.0 - 0.4).abs() < 0.01, "{low:?}");
    }

    #[test]
    fn logit_normal_favours_the_middle_like_its_density() {
        let s = TimestepSampling {
            distribution: TimestepDistribution::LogitNormal,
            ..TimestepSampling::default()
        };
        let h = histogram(&s, 40_000);
        // P(σ(n) < 1/4) = Φ(logit(1/4)) = Φ(−1.0986) ≈ 0.136 for n ~ N(0, 1); the middle two
        // quarters hold the rest, 0.364 each.
        let share = |i: usize| h[i] as f64 / 40_000.0;
        assert!((share(0) - 0.136).abs() < 0.01, "{h:?}");
        assert!((share(3) - 0.136).abs() < 0.01, "{h:?}");
        assert!((share(1) - 0.364).abs() < 0.01, "{h:?}");
    }
}
