//! Adafactor (Shazeer & Stern 2018) as `transformers.optimization.Adafactor` computes it with
//! `lr` given and `scale_parameter=False, relative_step=False, warmup_init=False`, `beta1=None`
//! (kohya's usual Stable Diffusion settings): no first moment, a factored second moment for
//! tensors of two or more dimensions. One update of parameter `p` (step `t`, 1-based) with
//! gradient `g`:
//! ```text
//! β2t = 1 − t^decay_rate
//! u = g² + eps1
//! ≥ 2-D, viewed as [batch, R, C] (the last two axes):
//!   row = β2t·row + (1 − β2t)·mean_C(u)                       // [batch, R]
//!   col = β2t·col + (1 − β2t)·mean_R(u)                       // [batch, C]
//!   u = rsqrt(row / mean_R(row)) ⊗ rsqrt(col) · g
//! 1-D:
//!   v = β2t·v + (1 − β2t)·u;  u = rsqrt(v) · g
//! u = u / max(1, rms(u) / clip_threshold) · lr
//! p = p − wd·lr·p − u                                           // decoupled decay
//! ```
//! Defaults: eps (1e-30, 1e-3), clip_threshold 1.0, decay_rate −0.8; `eps2` only enters with
//! `scale_parameter`, which is off. State: R + C values per `R×C` slice of a factored tensor,
//! one value per value of a vector.

use std::collections::BTreeMap;

use super::host::{HostOptimizer, StateFile, StateIo, StateWriter, state_shape, sum};
use super::{OptimError, OptimizerKind};

/// Adafactor's hyper-parameters (transformers' defaults; learning rate from the stage).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorConfig {
    /// Added to the squared gradient (default 1e-30).
    pub eps1: f64,
    /// Floor of the parameter scale (default 1e-3; unused without `scale_parameter`).
    pub eps2: f64,
    /// The update's RMS is clipped to it (default 1.0).
    pub clip_threshold: f64,
    /// Exponent of the second moment's decay `1 − t^decay_rate` (default −0.8).
    pub decay_rate: f64,
    /// Decoupled weight decay (the train stage's `weight_decay`, default 1e-2).
    pub weight_decay: f64,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            weight_decay: 1e-2,
        }
    }
}

/// One parameter's second-moment state.
#[derive(Debug, Clone)]
struct State {
    step: u64,
    /// Factored: `[batch·R]` row and `[batch·C]` column means (`R`, `C` the last two axes);
    /// `None` for vectors.
    factored: Option<(Vec<f32>, Vec<f32>)>,
    /// Unfactored: `[numel]` (empty when factored).
    v: Vec<f32>,
}

/// The Adafactor optimiser: hyper-parameters and each parameter's second moment.
#[derive(Debug, Clone)]
pub struct Adafactor {
    /// Hyper-parameters.
    pub config: AdafactorConfig,
    states: BTreeMap<String, State>,
}

impl Adafactor {
    /// A fresh optimiser.
    pub fn new(config: AdafactorConfig) -> Self {
        Self {
            config,
            states: BTreeMap::new(),
        }
    }
}

/// `[batch, R, C]` of a shape of two or more axes.
fn factors(dims: &[usize]) -> Option<(usize, usize, usize)> {
    match dims {
        [lead @ .., r, c] => Some((lead.iter().product(), *r, *c)),
        _ => None,
    }
}

impl HostOptimizer for Adafactor {
    fn update(
        &mut self,
        name: &str,
        p: &mut [f32],
        g: &[f32],
        dims: &[usize],
        lr: f64,
    ) -> Result<(), OptimError> {
        let c = self.config;
        let n = p.len();
        let shape = factors(dims).filter(|(b, r, cc)| b * r * cc == n);
        let state = self
            .states
            .entry(name.to_string())
            .or_insert_with(|| State {
                step: 0,
                factored: shape.map(|(b, r, cc)| (vec![0.0; b * r], vec![0.0; b * cc])),
                v: if shape.is_some() {
                    Vec::new()
                } else {
                    vec![0.0; n]
                },
            });
        state.step += 1;
        let beta2t = 1.0 - (state.step as f64).powf(c.decay_rate);
        let (keep, take) = (beta2t as f32, (1.0 - beta2t) as f32);
        let eps1 = c.eps1 as f32;
        let sq: Vec<f32> = g.iter().map(|g| g * g + eps1).collect();
        let mut u = vec![0.0f32; n];
        match (&mut state.factored, shape) {
            (Some((row, col)), Some((b, r, cc))) => {
                if row.len() != b * r || col.len() != b * cc {
                    return Err(state_shape(name, n, row.len() + col.len()));
                }
                for bi in 0..b {
                    let slab = &sq[bi * r * cc..(bi + 1) * r * cc];
                    for ri in 0..r {
                        let mean = sum(slab[ri * cc..(ri + 1) * cc].iter().copied()) / cc as f32;
                        let x = &mut row[bi * r + ri];
                        *x = *x * keep + take * mean;
                    }
                    for ci in 0..cc {
                        let mean = sum((0..r).map(|ri| slab[ri * cc + ci])) / r as f32;
                        let x = &mut col[bi * cc + ci];
                        *x = *x * keep + take * mean;
                    }
                    let rows = &row[bi * r..(bi + 1) * r];
                    let row_mean = sum(rows.iter().copied()) / r as f32;
                    for (ri, &row_v) in rows.iter().enumerate() {
                        let r_factor = 1.0 / (row_v / row_mean).sqrt();
                        for ci in 0..cc {
                            let c_factor = 1.0 / col[bi * cc + ci].sqrt();
                            let i = bi * r * cc + ri * cc + ci;
                            u[i] = r_factor * c_factor * g[i];
                        }
                    }
                }
            }
            (None, None) => {
                if state.v.len() != n {
                    return Err(state_shape(name, n, state.v.len()));
                }
                for ((v, &s), (u, &g)) in state.v.iter_mut().zip(&sq).zip(u.iter_mut().zip(g)) {
                    *v = *v * keep + take * s;
                    *u = (1.0 / v.sqrt()) * g;
                }
            }
            _ => {
                let held = state
                    .factored
                    .as_ref()
                    .map_or(state.v.len(), |(r, c)| r.len() + c.len());
                return Err(state_shape(name, n, held));
            }
        }
        let rms = sum(u.iter().map(|x| x * x)).sqrt() / (n as f32).sqrt();
        let clip = (rms / c.clip_threshold as f32).max(1.0);
        let lr32 = lr as f32;
        let decay = (-c.weight_decay * lr) as f32;
        for (p, u) in p.iter_mut().zip(&u) {
            let u = u / clip * lr32;
            if c.weight_decay != 0.0 {
                *p += decay * *p;
            }
            *p -= u;
        }
        Ok(())
    }
}

impl StateIo for Adafactor {
    const KIND: OptimizerKind = OptimizerKind::Adafactor;

    fn write(&self, out: &mut StateWriter) {
        let c = self.config;
        for (k, v) in [
            ("eps1", c.eps1),
            ("eps2", c.eps2),
            ("clip_threshold", c.clip_threshold),
            ("decay_rate", c.decay_rate),
            ("weight_decay", c.weight_decay),
        ] {
            out.config.insert(k.into(), v.into());
        }
        for (name, s) in &self.states {
            match &s.factored {
                Some((row, col)) => {
                    out.params.insert(
                        name.clone(),
                        serde_json::json!({ "step": s.step, "factored": true }),
                    );
                    out.tensor(name, "exp_avg_sq_row", row.clone());
                    out.tensor(name, "exp_avg_sq_col", col.clone());
                }
                None => {
                    out.params.insert(
                        name.clone(),
                        serde_json::json!({ "step": s.step, "factored": false }),
                    );
                    out.tensor(name, "exp_avg_sq", s.v.clone());
                }
            }
        }
    }

    fn read(file: &StateFile) -> Result<Self, OptimError> {
        let config = AdafactorConfig {
            eps1: file.config("eps1")?,
            eps2: file.config("eps2")?,
            clip_threshold: file.config("clip_threshold")?,
            decay_rate: file.config("decay_rate")?,
            weight_decay: file.config("weight_decay")?,
        };
        let mut states = BTreeMap::new();
        for (name, scalars) in file.params()? {
            let step = file.param_count(&name, &scalars, "step")?;
            let factored = scalars
                .get("factored")
                .and_then(serde_json::Value::as_bool)
                .ok_or_else(|| file.bad(format!("state of `{name}` lacks `factored`")))?;
            let state = if factored {
                State {
                    step,
                    factored: Some((
                        file.tensor(&name, "exp_avg_sq_row")?,
                        file.tensor(&name, "exp_avg_sq_col")?,
                    )),
                    v: Vec::new(),
                }
            } else {
                State {
                    step,
                    factored: None,
                    v: file.tensor(&name, "exp_avg_sq")?,
                }
            };
            states.insert(name, state);
        }
        Ok(Self { config, states })
    }
}
