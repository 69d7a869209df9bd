//! Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled") as the `schedulefree`
//! package's `AdamWScheduleFree` computes it. The model holds the training point `y`; the
//! state holds `z` (the base sequence) and `v`; the evaluated (and saved) point is
//! `x = lerp(y, z, 1 − 1/β1)` (the package's `optimizer.eval()`). One update at the step `k`
//! (0-based) with gradient `g` and learning rate `lr`:
//! ```text
//! lr_k   = lr · min(1, (k + 1) / warmup_steps)
//! lr_max = max(lr_max, lr_k)
//! w      = (k + 1)^r · lr_max^weight_lr_power;  Σw += w;  c = w / Σw
//! v      = β2·v + (1 − β2)·g²
//! ĝ      = g / (sqrt(v / (1 − β2^(k+1))) + eps) + wd·y      // decay at y, inside the step
//! y      = lerp(y, z, c) + lr_k·(β1·(1 − c) − 1)·ĝ
//! z      = z − lr_k·ĝ
//! ```
//! Defaults: β = (0.9, 0.999), eps 1e-8, warmup_steps 0, r 0, weight_lr_power 2 (the package
//! defaults `weight_decay` to 0; the stage's applies). Use a constant learning-rate schedule:
//! the method replaces the schedule. `z` starts at the parameter's first value. State: two
//! f32 values per parameter value, and the step-wide `k`, `lr_max`, `Σw` (kept per
//! parameter, identical for parameters updated every step at one rate).

use std::collections::BTreeMap;

use super::host::{HostOptimizer, StateFile, StateIo, StateWriter, lerp, state_shape};
use super::{OptimError, OptimizerKind};

/// Schedule-free AdamW's hyper-parameters (the package's defaults; weight decay the stage's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleFreeConfig {
    /// β1, the interpolation between `x` and `z` (default 0.9).
    pub beta1: f64,
    /// β2 (default 0.999).
    pub beta2: f64,
    /// ε (default 1e-8).
    pub eps: f64,
    /// Weight decay, evaluated at `y` (the train stage's `weight_decay`, default 1e-2).
    pub weight_decay: f64,
    /// Linear warm-up steps of the rate (default 0).
    pub warmup_steps: u64,
    /// Polynomial weighting of the average (default 0).
    pub r: f64,
    /// The average weighs steps by `lr_max^weight_lr_power` (default 2).
    pub weight_lr_power: f64,
}

impl Default for ScheduleFreeConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
        }
    }
}

/// One parameter's state.
#[derive(Debug, Clone)]
struct State {
    /// Steps taken (`k`).
    k: u64,
    lr_max: f64,
    weight_sum: f64,
    /// `[numel]`.
    z: Vec<f32>,
    /// `[numel]`, `exp_avg_sq`.
    v: Vec<f32>,
}

/// The schedule-free AdamW optimiser.
#[derive(Debug, Clone)]
pub struct ScheduleFreeAdamW {
    /// Hyper-parameters.
    pub config: ScheduleFreeConfig,
    states: BTreeMap<String, State>,
}

impl ScheduleFreeAdamW {
    /// A fresh optimiser.
    pub fn new(config: ScheduleFreeConfig) -> Self {
        Self {
            config,
            states: BTreeMap::new(),
        }
    }

    /// Turns the training point `y` of parameter `name` into `x` in place; false (values
    /// untouched) for a parameter without state.
    pub fn to_eval(&self, name: &str, y: &mut [f32]) -> bool {
        let Some(s) = self.states.get(name).filter(|s| s.z.len() == y.len()) else {
            return false;
        };
        let w = (1.0 - 1.0 / self.config.beta1) as f32;
        for (y, &z) in y.iter_mut().zip(&s.z) {
            *y = lerp(*y, z, w);
        }
        true
    }
}

impl HostOptimizer for ScheduleFreeAdamW {
    fn update(
        &mut self,
        name: &str,
        y: &mut [f32],
        g: &[f32],
        _dims: &[usize],
        lr: f64,
    ) -> Result<(), OptimError> {
        let c = self.config;
        let s = self
            .states
            .entry(name.to_string())
            .or_insert_with(|| State {
                k: 0,
                lr_max: -1.0,
                weight_sum: 0.0,
                z: y.to_vec(),
                v: vec![0.0; y.len()],
            });
        if s.z.len() != y.len() || s.v.len() != y.len() {
            return Err(state_shape(name, y.len(), s.z.len()));
        }
        let k = s.k;
        let sched = if k < c.warmup_steps {
            (k + 1) as f64 / c.warmup_steps as f64
        } else {
            1.0
        };
        let bias_correction2 = 1.0 - c.beta2.powi((k + 1) as i32);
        let lr = lr * sched;
        s.lr_max = s.lr_max.max(lr);
        let weight = ((k + 1) as f64).powf(c.r) * s.lr_max.powf(c.weight_lr_power);
        s.weight_sum += weight;
        let ckp1 = if s.weight_sum == 0.0 {
            0.0
        } else {
            weight / s.weight_sum
        };
        let (b2, one_b2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
        let bc2 = bias_correction2 as f32;
        let eps = c.eps as f32;
        let decay = c.weight_decay as f32;
        let ckp = ckp1 as f32;
        let y_lr = (lr * (c.beta1 * (1.0 - ckp1) - 1.0)) as f32;
        let z_lr = lr as f32;
        for (((y, &g), z), v) in y.iter_mut().zip(g).zip(&mut s.z).zip(&mut s.v) {
            *v = *v * b2 + one_b2 * g * g;
            let denom = (*v / bc2).sqrt() + eps;
            let mut gn = g / denom;
            if c.weight_decay != 0.0 {
                gn += decay * *y;
            }
            *y = lerp(*y, *z, ckp);
            *y += y_lr * gn;
            *z -= z_lr * gn;
        }
        s.k += 1;
        Ok(())
    }
}

impl StateIo for ScheduleFreeAdamW {
    const KIND: OptimizerKind = OptimizerKind::ScheduleFreeAdamW;

    fn write(&self, out: &mut StateWriter) {
        let c = self.config;
        for (k, v) in [
            ("beta1", c.beta1),
            ("beta2", c.beta2),
            ("eps", c.eps),
            ("weight_decay", c.weight_decay),
            ("r", c.r),
            ("weight_lr_power", c.weight_lr_power),
        ] {
            out.config.insert(k.into(), v.into());
        }
        out.config
            .insert("warmup_steps".into(), c.warmup_steps.into());
        for (name, s) in &self.states {
            out.params.insert(
                name.clone(),
                serde_json::json!({
                    "k": s.k,
                    "lr_max_bits": s.lr_max.to_bits(),
                    "weight_sum_bits": s.weight_sum.to_bits(),
                }),
            );
            out.tensor(name, "z", s.z.clone());
            out.tensor(name, "exp_avg_sq", s.v.clone());
        }
    }

    fn read(file: &StateFile) -> Result<Self, OptimError> {
        let warmup = file.config("warmup_steps")?;
        let config = ScheduleFreeConfig {
            beta1: file.config("beta1")?,
            beta2: file.config("beta2")?,
            eps: file.config("eps")?,
            weight_decay: file.config("weight_decay")?,
            warmup_steps: warmup as u64,
            r: file.config("r")?,
            weight_lr_power: file.config("weight_lr_power")?,
        };
        let mut states = BTreeMap::new();
        for (name, scalars) in file.params()? {
            let z = file.tensor(&name, "z")?;
            let v = file.tensor_of(&name, "exp_avg_sq", z.len())?;
            let state = State {
                k: file.param_count(&name, &scalars, "k")?,
                lr_max: file.param_bits(&name, &scalars, "lr_max_bits")?,
                weight_sum: file.param_bits(&name, &scalars, "weight_sum_bits")?,
                z,
                v,
            };
            states.insert(name, state);
        }
        Ok(Self { config, states })
    }
}
