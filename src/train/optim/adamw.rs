//! AdamW exactly as `torch.optim.AdamW` (single-tensor path) computes it, on dfdx tensors of
//! any shape and device, with per-parameter state that checkpoints to safetensors (the file
//! format every checkpoint written before the `optimizer` key has).
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

use super::OptimError;
use crate::formats::{
    FormatError, HostTensor, SafetensorsFile, read_safetensors, write_safetensors,
};

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
        Self::from_file(dev, path, &read_safetensors(path)?)
    }

    /// [`load`](Self::load) of a file already read (`path` names it in errors).
    pub fn from_file(dev: &D, path: &Path, st: &SafetensorsFile) -> Result<Self, OptimError> {
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
