//! AdamW exactly as `torch.optim.AdamW` (single-tensor path) computes it, on dfdx tensors of
//! any shape and device, with per-parameter state that checkpoints to safetensors; and
//! gradient clipping by global norm as `torch.nn.utils.clip_grad_norm_`.
//!
//! One update of parameter `p` with gradient `g` at its step `t` (1-based), learning rate
//! `lr`:
//! ```text
//! p = p · (1 − lr·wd)                               // decoupled weight decay, first
//! m = m + (1 − β1)·(g − m)                          // torch: exp_avg.lerp_(g, 1 − β1)
//! v = v·β2 + ((1 − β2)·g)·g                         // exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2)
//! denom = sqrt(v) / sqrt(1 − β2^t) + eps
//! p = p + (−lr/(1 − β1^t) · m) / denom              // param.addcdiv_(m, denom, −step_size)
//! ```
//! Scalars (`1 − lr·wd`, the bias corrections, the step size) are computed in f64 and applied
//! as f32, as torch does with Python floats.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use dfdx::prelude::*;

use crate::formats::{FormatError, HostTensor, read_safetensors, write_safetensors};

/// AdamW hyper-parameters (defaults are torch's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1 (default 0.9).
    pub beta1: f64,
    /// β2 (default 0.999).
    pub beta2: f64,
    /// ε (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (default 1e-2, torch's AdamW default).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Errors of the optimiser.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// The gradient's shape is not the parameter's.
    #[error("parameter `{name}`: gradient has {grad} elements, the parameter {param}")]
    GradShape {
        /// Parameter name.
        name: String,
        /// Parameter elements.
        param: usize,
        /// Gradient elements.
        grad: usize,
    },
    /// The stored state does not fit the parameter (e.g. a checkpoint of another config).
    #[error("parameter `{name}`: optimiser state has {state} elements, the parameter {param}")]
    StateShape {
        /// Parameter name.
        name: String,
        /// Parameter elements.
        param: usize,
        /// State elements.
        state: usize,
    },
    /// Reading or writing the state file failed, or it is malformed.
    #[error(transparent)]
    File(#[from] FormatError),
}

/// AdamW state of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct ParamState<D: Device<f32>> {
    /// First moment (`exp_avg`), `[numel]`.
    pub m: Tensor<(usize,), f32, D>,
    /// Second moment (`exp_avg_sq`), `[numel]`.
    pub v: Tensor<(usize,), f32, D>,
    /// Updates done (torch's `state["step"]`).
    pub step: u64,
}

/// The AdamW optimiser: hyper-parameters plus state per named parameter.
#[derive(Debug, Clone)]
pub struct AdamW<D: Device<f32>> {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    states: BTreeMap<String, ParamState<D>>,
    dev: D,
}

impl<D: Device<f32>> AdamW<D> {
    /// A fresh optimiser (no state yet: each parameter starts at step 0 with zero moments).
    pub fn new(dev: &D, config: AdamWConfig) -> Self {
        Self {
            config,
            states: BTreeMap::new(),
            dev: dev.clone(),
        }
    }

    /// The state of a parameter, if it was updated or loaded.
    pub fn state(&self, name: &str) -> Option<&ParamState<D>> {
        self.states.get(name)
    }

    /// Names of the parameters with state.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.states.keys().map(String::as_str)
    }

    /// One AdamW update of parameter `name` with gradient `grad` at learning rate `lr`.
    pub fn update<S: Shape>(
        &mut self,
        name: &str,
        param: &mut Tensor<S, f32, D>,
        grad: &Tensor<S, f32, D>,
        lr: f64,
    ) -> Result<(), OptimError> {
        let shape = *param.shape();
        let n = shape.num_elements();
        let gn = grad.shape().num_elements();
        if gn != n {
            return Err(OptimError::GradShape {
                name: name.to_string(),
                param: n,
                grad: gn,
            });
        }
        let state = match self.states.remove(name) {
            Some(s) => s,
            None => ParamState {
                m: self.dev.zeros_like(&(n,)),
                v: self.dev.zeros_like(&(n,)),
                step: 0,
            },
        };
        let sn = state.m.shape().0;
        if sn != n {
            let err = OptimError::StateShape {
                name: name.to_string(),
                param: n,
                state: sn,
            };
            self.states.insert(name.to_string(), state);
            return Err(err);
        }
        let c = self.config;
        let t = state.step + 1;
        let g = grad.clone().reshape_like(&(n,));
        let p = param.clone().reshape_like(&(n,));
        // Decoupled weight decay first.
        let p = if c.weight_decay != 0.0 {
            p * ((1.0 - lr * c.weight_decay) as f32)
        } else {
            p
        };
        // m.lerp_(g, 1 − β1) = m + w·(g − m) for w < 0.5.
        let m = state.m.clone() + (g.clone() - state.m) * ((1.0 - c.beta1) as f32);
        // v.mul_(β2).addcmul_(g, g, value = 1 − β2) = v·β2 + ((1 − β2)·g)·g.
        let v = state.v * (c.beta2 as f32) + (g.clone() * ((1.0 - c.beta2) as f32)) * g;
        let bias_correction1 = 1.0 - c.beta1.powi(t as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(t as i32);
        let step_size = lr / bias_correction1;
        let denom = v.clone().sqrt() / (bias_correction2.sqrt() as f32) + (c.eps as f32);
        // addcdiv: p + (value·m) / denom.
        let p = p + (m.clone() * (-step_size as f32)) / denom;
        *param = p.reshape_like(&shape);
        self.states
            .insert(name.to_string(), ParamState { m, v, step: t });
        Ok(())
    }

    /// The state as safetensors tensors (`<name>.exp_avg`, `<name>.exp_avg_sq`) and metadata
    /// (`adamw.steps`: JSON name → step; `adamw.config`: JSON hyper-parameters).
    pub fn to_safetensors(&self) -> (BTreeMap<String, HostTensor>, HashMap<String, String>) {
        let mut tensors = BTreeMap::new();
        let mut steps = serde_json::Map::new();
        for (name, s) in &self.states {
            let n = s.m.shape().0;
            tensors.insert(
                format!("{name}.exp_avg"),
                HostTensor {
                    shape: vec![n],
                    data: s.m.as_vec(),
                },
            );
            tensors.insert(
                format!("{name}.exp_avg_sq"),
                HostTensor {
                    shape: vec![n],
                    data: s.v.as_vec(),
                },
            );
            steps.insert(name.clone(), s.step.into());
        }
        let c = self.config;
        let meta = HashMap::from([
            (
                "adamw.steps".to_string(),
                serde_json::Value::Object(steps).to_string(),
            ),
            (
                "adamw.config".to_string(),
                serde_json::json!({
                    "beta1": c.beta1, "beta2": c.beta2, "eps": c.eps, "weight_decay": c.weight_decay
                })
                .to_string(),
            ),
        ]);
        (tensors, meta)
    }

    /// Writes the state to a safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let (tensors, meta) = self.to_safetensors();
        Ok(write_safetensors(path, &tensors, Some(meta))?)
    }

    /// Reads a state file written by [`save`](Self::save); the hyper-parameters come from the
    /// file.
    pub fn load(dev: &D, path: &Path) -> Result<Self, OptimError> {
        let st = read_safetensors(path)?;
        let bad = |m: String| OptimError::File(FormatError::invalid(path, m));
        let parse = |k: &str| -> Result<serde_json::Value, OptimError> {
            let text = st
                .metadata
                .get(k)
                .ok_or_else(|| bad(format!("metadata `{k}` is missing")))?;
            serde_json::from_str(text).map_err(|e| bad(format!("metadata `{k}`: {e}")))
        };
        let cfg = parse("adamw.config")?;
        let num = |k: &str| {
            cfg.get(k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| bad(format!("metadata `adamw.config` lacks `{k}`")))
        };
        let config = AdamWConfig {
            beta1: num("beta1")?,
            beta2: num("beta2")?,
            eps: num("eps")?,
            weight_decay: num("weight_decay")?,
        };
        let steps = parse("adamw.steps")?;
        let steps = steps
            .as_object()
            .ok_or_else(|| bad("metadata `adamw.steps` is not an object".into()))?;
        let mut states = BTreeMap::new();
        for (name, step) in steps {
            let step = step
                .as_u64()
                .ok_or_else(|| bad(format!("step of `{name}` is not a count")))?;
            let get = |suffix: &str| -> Result<Tensor<(usize,), f32, D>, OptimError> {
                let key = format!("{name}.{suffix}");
                let t = st
                    .tensors
                    .get(&key)
                    .ok_or_else(|| bad(format!("tensor `{key}` is missing")))?;
                if t.shape.len() != 1 {
                    return Err(bad(format!("tensor `{key}` is not 1-d")));
                }
                Ok(dev.tensor_from_vec(t.data.clone(), (t.shape[0],)))
            };
            let m = get("exp_avg")?;
            let v = get("exp_avg_sq")?;
            if m.shape().0 != v.shape().0 {
                return Err(bad(format!(
                    "`{name}`: exp_avg and exp_avg_sq differ in length"
                )));
            }
            states.insert(name.clone(), ParamState { m, v, step });
        }
        Ok(Self {
            config,
            states,
            dev: dev.clone(),
        })
    }
}

/// The L2 norm of a gradient (computed on its device).
pub fn grad_norm<S: Shape, D: Device<f32>>(grad: &Tensor<S, f32, D>) -> f32 {
    let n = grad.shape().num_elements();
    grad.clone()
        .reshape_like(&(n,))
        .square()
        .sum::<Rank0, _>()
        .as_vec()
        .first()
        .copied()
        .unwrap_or(0.0)
        .sqrt()
}

/// `clip_grad_norm_`'s factor: the total norm `sqrt(Σ normᵢ²)` of the per-tensor norms and
/// the coefficient `min(1, max_norm / (total + 1e-6))` every gradient is multiplied by.
pub fn clip_coefficient(norms: &[f32], max_norm: f32) -> (f32, f32) {
    let total = norms.iter().map(|n| n * n).sum::<f32>().sqrt();
    (total, (max_norm / (total + 1e-6)).min(1.0))
}

/// Clips gradients of one shape by their global norm in place, as
/// `torch.nn.utils.clip_grad_norm_(max_norm, norm_type=2)`; returns the total norm before
/// clipping. For gradients of mixed shapes use [`grad_norm`] and [`clip_coefficient`], then
/// multiply each gradient by the coefficient.
pub fn clip_grad_norm<S: Shape, D: Device<f32>>(
    grads: &mut [Tensor<S, f32, D>],
    max_norm: f32,
) -> f32 {
    let norms: Vec<f32> = grads.iter().map(grad_norm).collect();
    let (total, coef) = clip_coefficient(&norms, max_norm);
    for g in grads.iter_mut() {
        *g = g.clone() * coef;
    }
    total
}

/// One AdamW update of every parameter of `model` with `grads` (by `prefix` + the parameter's
/// full name, as [`crate::diffusion::params::named_grads`] gives them): full fine-tuning's
/// step (DreamBooth, pretraining, `sdpipe bench --task full-train`).
pub fn update_layers<D: Device<f32>, M: crate::diffusion::params::Layers<D>>(
    model: &mut M,
    prefix: &str,
    grads: &BTreeMap<String, HostTensor>,
    optimizer: &mut AdamW<D>,
    lr: f64,
) -> anyhow::Result<()> {
    use crate::diffusion::params::{ParamMut, try_for_each_named_param};
    use anyhow::Context as _;
    try_for_each_named_param(model, |name, param| {
        let key = format!("{prefix}{name}");
        let grad = grads
            .get(&key)
            .with_context(|| format!("no gradient for `{key}`"))?;
        let shape_err = || anyhow::anyhow!("gradient of `{key}` has shape {:?}", grad.shape);
        match param {
            ParamMut::T1(t) => {
                let dev = t.device().clone();
                let g = grad.to_tensor::<(usize,), D>(&dev).ok_or_else(shape_err)?;
                optimizer.update(&key, t, &g, lr)?;
            }
            ParamMut::T2(t) => {
                let dev = t.device().clone();
                let g = grad
                    .to_tensor::<(usize, usize), D>(&dev)
                    .ok_or_else(shape_err)?;
                optimizer.update(&key, t, &g, lr)?;
            }
            ParamMut::T4(t) => {
                let dev = t.device().clone();
                let g = grad
                    .to_tensor::<(usize, usize, usize, usize), D>(&dev)
                    .ok_or_else(shape_err)?;
                optimizer.update(&key, t, &g, lr)?;
            }
        }
        Ok(())
    })
}
