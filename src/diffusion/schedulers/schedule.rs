//! The training noise schedule shared by every scheduler: betas, ᾱ (alphas_cumprod), the
//! Karras-style sigmas, and the spacing of inference timesteps.
//!
//! Numerics follow diffusers: betas and ᾱ are float32 (torch computes `linspace` and `cumprod`
//! in float32), inference timesteps are computed in float64 like numpy and then cast.

use super::{BetaSchedule, Result, SchedulerConfig, SchedulerError, TimestepSpacing};

/// Betas and cumulative alpha products of the training process (`t` in `0..num_train_timesteps`).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// β_t, float32 as diffusers stores them.
    pub betas: Vec<f32>,
    /// α_t = 1 − β_t.
    pub alphas: Vec<f32>,
    /// ᾱ_t = ∏_{s≤t} α_s (`alphas_cumprod`).
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Computes the schedule of `config`.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        let betas: Vec<f32> = match config.beta_schedule {
            BetaSchedule::Linear => {
                linspace_f32(config.beta_start as f32, config.beta_end as f32, n)
            }
            BetaSchedule::ScaledLinear => linspace_f32(
                config.beta_start.sqrt() as f32,
                config.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                // Nichol & Dhariwal's cosine schedule, as diffusers' `betas_for_alpha_bar`.
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        };
        let betas = if config.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod(&alphas);
        Ok(Self {
            betas,
            alphas,
            alphas_cumprod,
        })
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Whether the schedule has no timesteps (never true for a validated config).
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// ᾱ at integer timestep `t`, or an error naming the valid range.
    pub fn alpha_cumprod(&self, t: usize) -> Result<f32> {
        self.alphas_cumprod
            .get(t)
            .copied()
            .ok_or(SchedulerError::TimestepOutOfRange {
                timestep: t,
                num_train_timesteps: self.len(),
            })
    }

    /// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for every training timestep, in float32 as numpy computes it
    /// from the float32 ᾱ.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (for min-SNR loss weighting).
    pub fn snr(&self, t: usize) -> Result<f64> {
        let a = self.alpha_cumprod(t)? as f64;
        Ok(a / (1.0 - a))
    }
}

/// torch's CPU `cumprod` of float32 values: accumulated in float64 (`acc_type`), each partial
/// product stored as float32.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// Lin et al. 2023, Algorithm 1, in float32 as diffusers' `rescale_zero_terminal_snr`: shift
/// √ᾱ so its last value is 0, scale it so its first value is unchanged, and turn the new ᾱ
/// back into betas. The last beta becomes 1, so ᾱ at the last timestep is exactly 0 and the
/// noisy latent there is pure noise.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt_ab: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    let scale = first / (first - last);
    let ab: Vec<f32> = sqrt_ab
        .iter()
        .map(|&s| {
            let s = (s - last) * scale;
            s * s
        })
        .collect();
    std::iter::once(ab[0])
        .chain(ab.windows(2).map(|w| w[1] / w[0]))
        .map(|a| 1.0 - a)
        .collect()
}

/// torch.linspace in float32 on the CPU: the step is computed in float32, the first half counts
/// up from `start` and the second half down from `end`, each value with one fused multiply-add
/// (this reproduces torch's betas bit for bit).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// numpy's `linspace(start, end, steps)` in float64.
pub(crate) fn linspace_f64(start: f64, end: f64, steps: usize) -> Vec<f64> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f64;
            let mut v: Vec<f64> = (0..steps).map(|i| start + step * i as f64).collect();
            v[steps - 1] = end;
            v
        }
    }
}

/// Inference timesteps (descending) as diffusers computes them for `spacing`, before any cast:
/// `leading` = `arange(steps) * (N // steps)`, rounded, reversed, `+ steps_offset`;
/// `linspace` = `linspace(0, N - 1, steps)` reversed (not rounded);
/// `trailing` = `round(arange(N, 0, -N / steps)) - 1`.
/// Integer schedulers (DDIM) round the linspace values half-to-even, as `np.round` does.
pub(crate) fn inference_timesteps(
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Vec<f64>> {
    let n = config.num_train_timesteps;
    if num_inference_steps == 0 || num_inference_steps > n {
        return Err(SchedulerError::InvalidSteps {
            steps: num_inference_steps,
            num_train_timesteps: n,
        });
    }
    let steps = num_inference_steps;
    let ts: Vec<f64> = match config.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = (n / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| (i as f64 * ratio).round_ties_even() + config.steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Linspace => {
            let mut v = linspace_f64(0.0, (n - 1) as f64, steps);
            v.reverse();
            v
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            // np.arange(N, 0, -ratio): N - k * ratio while > 0.
            let mut v = Vec::with_capacity(steps);
            let mut k = 0usize;
            loop {
                let t = n as f64 - k as f64 * ratio;
                if t <= 0.0 {
                    break;
                }
                v.push(t.round_ties_even() - 1.0);
                k += 1;
            }
            v
        }
    };
    if let Some(&bad) = ts.iter().find(|&&t| t < 0.0 || t > (n - 1) as f64) {
        return Err(SchedulerError::TimestepOutOfRange {
            timestep: bad.max(0.0) as usize,
            num_train_timesteps: n,
        });
    }
    Ok(ts)
}

/// numpy's `interp(x, arange(len(ys)), ys)` in float64 (clamped at both ends).
pub(crate) fn interp_unit_grid(x: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if x <= 0.0 {
        return ys[0] as f64;
    }
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    let (a, b) = (ys[i] as f64, ys[i + 1] as f64);
    if frac == 0.0 { a } else { a + (b - a) * frac }
}
