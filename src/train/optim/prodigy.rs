//! Prodigy (Mishchenko & Defazio 2023) as `prodigyopt` 1.x computes it: Adam whose step size
//! `d` is estimated from the distance travelled, so the learning rate stays 1 (it multiplies
//! the estimate). A step first observes every parameter (moments and the sums for `d`, with
//! the step's starting `d` and `dlr = d·lr`), then updates every parameter with the new `d`:
//! ```text
//! observe (each p, g):                                  // p0: p's first value
//!   num += (d/d0)·dlr·⟨g, p0 − p⟩                        // after num = β3·num at step start
//!   m = β1·m + d(1 − β1)·g;   v = β2·v + d²(1 − β2)·g²
//!   s = β3·s + (d/d0)·dlr·g;  den += Σ|s|
//! between passes:
//!   d̂ = d_coef·num/den;  d = max(d, d̂) while d = d0;  d_max = max(d_max, d̂)
//!   d = min(d_max, d·growth_rate)
//! update (each p):
//!   p = p − wd·dlr·p                                    // decoupled decay (decouple=True)
//!   p = p − dlr·m / (sqrt(v) + d·eps)
//! ```
//! Defaults (prodigyopt): d0 1e-6, β = (0.9, 0.999), β3 = sqrt(β2), eps 1e-8,
//! `decouple=True`, `use_bias_correction=False`, `safeguard_warmup=False`, d_coef 1,
//! growth_rate ∞. A step whose `den` is 0 changes nothing but the moments, as the package.
//! State: four f32 values per parameter value (s, p0, m, v; p0 is not stored for a parameter
//! that starts at zero, such as LoRA's `up`).

use std::collections::BTreeMap;

use super::host::{HostOptimizer, StateFile, StateIo, StateWriter, state_shape, sum};
use super::{OptimError, OptimizerKind};

/// Prodigy's hyper-parameters (prodigyopt's defaults; weight decay the stage's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProdigyConfig {
    /// β1 (default 0.9).
    pub beta1: f64,
    /// β2 (default 0.999).
    pub beta2: f64,
    /// β3, the decay of the sums for `d` (default `None`: sqrt(β2)).
    pub beta3: Option<f64>,
    /// ε (default 1e-8), scaled by `d`.
    pub eps: f64,
    /// Weight decay (the train stage's `weight_decay`, default 1e-2).
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) decay, scaled by `d·lr` (default true); false adds it to the
    /// gradient.
    pub decouple: bool,
    /// Adam's bias correction in `dlr` (default false).
    pub use_bias_correction: bool,
    /// `s` accumulates with `d` instead of `d·lr` (default false).
    pub safeguard_warmup: bool,
    /// The initial estimate (default 1e-6).
    pub d0: f64,
    /// The estimate is multiplied by it (default 1).
    pub d_coef: f64,
    /// The largest growth of `d` per step (default ∞).
    pub growth_rate: f64,
}

impl Default for ProdigyConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            beta3: None,
            eps: 1e-8,
            weight_decay: 1e-2,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
        }
    }
}

/// One parameter's state.
#[derive(Debug, Clone)]
struct State {
    /// Updates done.
    step: u64,
    /// `[numel]`.
    s: Vec<f32>,
    /// The first value, `[numel]`; empty for a parameter that started at zero.
    p0: Vec<f32>,
    /// `[numel]`, `exp_avg`.
    m: Vec<f32>,
    /// `[numel]`, `exp_avg_sq`.
    v: Vec<f32>,
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Between steps.
    Idle,
    /// Observing, with the step's rate and `dlr`, the sums so far.
    Observing {
        lr: f64,
        dlr: f64,
        numerator: f64,
        denom: f64,
    },
    /// Updating, with the step's `dlr` (`None`: the step is skipped, `den` was 0).
    Updating { dlr: Option<f64> },
}

/// The Prodigy optimiser: hyper-parameters, the step-wide estimate and each parameter's
/// state.
#[derive(Debug, Clone)]
pub struct Prodigy {
    /// Hyper-parameters.
    pub config: ProdigyConfig,
    d: f64,
    d_max: f64,
    d_numerator: f64,
    /// Steps taken (the package's `k`).
    k: u64,
    phase: Phase,
    states: BTreeMap<String, State>,
}

impl Prodigy {
    /// A fresh optimiser (`d = d0`).
    pub fn new(config: ProdigyConfig) -> Self {
        Self {
            config,
            d: config.d0,
            d_max: config.d0,
            d_numerator: 0.0,
            k: 0,
            phase: Phase::Idle,
            states: BTreeMap::new(),
        }
    }

    /// The current step-size estimate.
    pub fn d(&self) -> f64 {
        self.d
    }

    fn beta3(&self) -> f64 {
        self.config
            .beta3
            .unwrap_or_else(|| self.config.beta2.sqrt())
    }

    /// Ends the observing pass: the new `d`.
    fn finish_observing(&mut self, lr: f64, dlr: f64, numerator: f64, denom: f64) {
        let c = self.config;
        if denom == 0.0 {
            self.phase = Phase::Updating { dlr: None };
            return;
        }
        if lr > 0.0 {
            let d_hat = c.d_coef * numerator / denom;
            if self.d == c.d0 {
                self.d = self.d.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            self.d = self.d_max.min(self.d * c.growth_rate);
        }
        self.d_numerator = numerator;
        self.k += 1;
        self.phase = Phase::Updating { dlr: Some(dlr) };
    }
}

impl HostOptimizer for Prodigy {
    fn observe(
        &mut self,
        name: &str,
        p: &[f32],
        g: &[f32],
        _dims: &[usize],
        lr: f64,
    ) -> Result<(), OptimError> {
        let c = self.config;
        let beta3 = self.beta3();
        let (step_lr, dlr, mut numerator, mut denom) = match self.phase {
            Phase::Observing {
                lr,
                dlr,
                numerator,
                denom,
            } => (lr, dlr, numerator, denom),
            Phase::Idle | Phase::Updating { .. } => {
                let bias_correction = if c.use_bias_correction {
                    let k = (self.k + 1) as i32;
                    (1.0 - c.beta2.powi(k)).sqrt() / (1.0 - c.beta1.powi(k))
                } else {
                    1.0
                };
                (
                    lr,
                    self.d * lr * bias_correction,
                    self.d_numerator * beta3,
                    0.0,
                )
            }
        };
        if lr != step_lr && lr != 0.0 {
            return Err(OptimError::MixedLr {
                name: name.to_string(),
                lr,
                step_lr,
            });
        }
        let n = p.len();
        let state = self
            .states
            .entry(name.to_string())
            .or_insert_with(|| State {
                step: 0,
                s: vec![0.0; n],
                p0: if p.iter().any(|&x| x != 0.0) {
                    p.to_vec()
                } else {
                    Vec::new()
                },
                m: vec![0.0; n],
                v: vec![0.0; n],
            });
        if state.m.len() != n
            || state.v.len() != n
            || state.s.len() != n
            || !(state.p0.is_empty() || state.p0.len() == n)
        {
            return Err(state_shape(name, n, state.m.len()));
        }
        let g: Vec<f32> = if c.weight_decay != 0.0 && !c.decouple {
            let wd = c.weight_decay as f32;
            g.iter().zip(p).map(|(g, p)| g + wd * p).collect()
        } else {
            g.to_vec()
        };
        if lr > 0.0 {
            let d = self.d;
            let dot = if state.p0.is_empty() {
                sum(g.iter().zip(p).map(|(g, p)| g * (0.0 - p)))
            } else {
                sum(g
                    .iter()
                    .zip(p)
                    .zip(&state.p0)
                    .map(|((g, p), p0)| g * (p0 - p)))
            };
            numerator += (d / c.d0) * dlr * f64::from(dot);
            let (b1, m_take) = (c.beta1 as f32, (d * (1.0 - c.beta1)) as f32);
            let (b2, v_take) = (c.beta2 as f32, (d * d * (1.0 - c.beta2)) as f32);
            let b3 = beta3 as f32;
            let s_take = if c.safeguard_warmup {
                ((d / c.d0) * d) as f32
            } else {
                ((d / c.d0) * dlr) as f32
            };
            for (((&g, m), v), s) in g
                .iter()
                .zip(&mut state.m)
                .zip(&mut state.v)
                .zip(&mut state.s)
            {
                *m = *m * b1 + m_take * g;
                *v = *v * b2 + v_take * g * g;
                *s = *s * b3 + s_take * g;
            }
            denom += f64::from(sum(state.s.iter().map(|s| s.abs())));
        }
        self.phase = Phase::Observing {
            lr: step_lr,
            dlr,
            numerator,
            denom,
        };
        Ok(())
    }

    fn update(
        &mut self,
        name: &str,
        p: &mut [f32],
        _g: &[f32],
        _dims: &[usize],
        _lr: f64,
    ) -> Result<(), OptimError> {
        if let Phase::Observing {
            lr,
            dlr,
            numerator,
            denom,
        } = self.phase
        {
            self.finish_observing(lr, dlr, numerator, denom);
        }
        let Phase::Updating { dlr } = self.phase else {
            return Err(OptimError::NotObserved {
                name: name.to_string(),
            });
        };
        let Some(dlr) = dlr else {
            return Ok(());
        };
        let c = self.config;
        let state = self
            .states
            .get_mut(name)
            .ok_or_else(|| OptimError::NotObserved {
                name: name.to_string(),
            })?;
        if state.m.len() != p.len() {
            return Err(state_shape(name, p.len(), state.m.len()));
        }
        state.step += 1;
        let d_eps = (self.d * c.eps) as f32;
        let decay = (-c.weight_decay * dlr) as f32;
        let neg_dlr = -dlr as f32;
        for ((p, m), v) in p.iter_mut().zip(&state.m).zip(&state.v) {
            let denom = v.sqrt() + d_eps;
            if c.weight_decay != 0.0 && c.decouple {
                *p += decay * *p;
            }
            *p += neg_dlr * m / denom;
        }
        Ok(())
    }
}

impl StateIo for Prodigy {
    const KIND: OptimizerKind = OptimizerKind::Prodigy;

    fn write(&self, out: &mut StateWriter) {
        let c = self.config;
        for (k, v) in [
            ("beta1", c.beta1),
            ("beta2", c.beta2),
            ("eps", c.eps),
            ("weight_decay", c.weight_decay),
            ("d0", c.d0),
            ("d_coef", c.d_coef),
        ] {
            out.config.insert(k.into(), v.into());
        }
        if let Some(beta3) = c.beta3 {
            out.config
                .insert("beta3_bits".into(), beta3.to_bits().into());
        }
        // ∞ has no JSON number: the growth rate goes as its bits
        out.config
            .insert("growth_rate_bits".into(), c.growth_rate.to_bits().into());
        for (k, v) in [
            ("decouple", c.decouple),
            ("use_bias_correction", c.use_bias_correction),
            ("safeguard_warmup", c.safeguard_warmup),
        ] {
            out.config.insert(k.into(), v.into());
        }
        for (k, v) in [
            ("d_bits", self.d),
            ("d_max_bits", self.d_max),
            ("d_numerator_bits", self.d_numerator),
        ] {
            out.scalars.insert(k.into(), v.to_bits().into());
        }
        out.scalars.insert("k".into(), self.k.into());
        for (name, s) in &self.states {
            out.params.insert(
                name.clone(),
                serde_json::json!({ "step": s.step, "p0_is_zero": s.p0.is_empty() }),
            );
            out.tensor(name, "s", s.s.clone());
            if !s.p0.is_empty() {
                out.tensor(name, "p0", s.p0.clone());
            }
            out.tensor(name, "exp_avg", s.m.clone());
            out.tensor(name, "exp_avg_sq", s.v.clone());
        }
    }

    fn read(file: &StateFile) -> Result<Self, OptimError> {
        let config = ProdigyConfig {
            beta1: file.config("beta1")?,
            beta2: file.config("beta2")?,
            beta3: file.config_bits("beta3_bits").ok(),
            eps: file.config("eps")?,
            weight_decay: file.config("weight_decay")?,
            decouple: file.config_flag("decouple")?,
            use_bias_correction: file.config_flag("use_bias_correction")?,
            safeguard_warmup: file.config_flag("safeguard_warmup")?,
            d0: file.config("d0")?,
            d_coef: file.config("d_coef")?,
            growth_rate: file.config_bits("growth_rate_bits")?,
        };
        let mut states = BTreeMap::new();
        for (name, scalars) in file.params()? {
            let m = file.tensor(&name, "exp_avg")?;
            let n = m.len();
            let p0_is_zero = scalars
                .get("p0_is_zero")
                .and_then(serde_json::Value::as_bool)
                .ok_or_else(|| file.bad(format!("state of `{name}` lacks `p0_is_zero`")))?;
            let state = State {
                step: file.param_count(&name, &scalars, "step")?,
                s: file.tensor_of(&name, "s", n)?,
                p0: if p0_is_zero {
                    Vec::new()
                } else {
                    file.tensor_of(&name, "p0", n)?
                },
                m,
                v: file.tensor_of(&name, "exp_avg_sq", n)?,
            };
            states.insert(name, state);
        }
        Ok(Self {
            config,
            d: file.scalar_bits("d_bits")?,
            d_max: file.scalar_bits("d_max_bits")?,
            d_numerator: file.scalar_bits("d_numerator_bits")?,
            k: file.scalar("k")? as u64,
            phase: Phase::Idle,
            states,
        })
    }
}
