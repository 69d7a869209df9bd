//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as `lion-pytorch`
//! computes it. One update of parameter `p` with gradient `g`, momentum `m`, learning rate
//! `lr` (the paper suggests 3–10× smaller than AdamW's) and weight decay `wd`:
//! ```text
//! p = p · (1 − lr·wd)                       // decoupled decay, as the package (always applied)
//! u = sign(β1·m + (1 − β1)·g)               // exp_avg.clone().mul_(β1).add(g, 1 − β1).sgn_()
//! p = p − lr·u
//! m = β2·m + (1 − β2)·g
//! ```
//! Defaults: β = (0.9, 0.99). One f32 state value per parameter value.

use std::collections::BTreeMap;

use super::host::{HostOptimizer, StateFile, StateIo, StateWriter, state_shape};
use super::{OptimError, OptimizerKind};

/// Lion's hyper-parameters (defaults are lion-pytorch's; weight decay the stage's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionConfig {
    /// β1, the interpolation of the update's sign (default 0.9).
    pub beta1: f64,
    /// β2, the momentum's decay (default 0.99).
    pub beta2: f64,
    /// Decoupled weight decay (the train stage's `weight_decay`, default 1e-2).
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 1e-2,
        }
    }
}

/// The Lion optimiser: hyper-parameters and each parameter's momentum (`exp_avg`).
#[derive(Debug, Clone)]
pub struct Lion {
    /// Hyper-parameters.
    pub config: LionConfig,
    momentum: BTreeMap<String, Vec<f32>>,
}

impl Lion {
    /// A fresh optimiser (zero momentum for every parameter).
    pub fn new(config: LionConfig) -> Self {
        Self {
            config,
            momentum: BTreeMap::new(),
        }
    }
}

impl HostOptimizer for Lion {
    fn update(
        &mut self,
        name: &str,
        p: &mut [f32],
        g: &[f32],
        _dims: &[usize],
        lr: f64,
    ) -> Result<(), OptimError> {
        let c = self.config;
        let m = self
            .momentum
            .entry(name.to_string())
            .or_insert_with(|| vec![0.0; p.len()]);
        if m.len() != p.len() {
            return Err(state_shape(name, p.len(), m.len()));
        }
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let (b1, one_b1) = (c.beta1 as f32, (1.0 - c.beta1) as f32);
        let (b2, one_b2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
        let neg_lr = -lr as f32;
        for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
            *p *= decay;
            let u = *m * b1 + one_b1 * g;
            let sign = if u > 0.0 {
                1.0
            } else if u < 0.0 {
                -1.0
            } else {
                0.0
            };
            *p += neg_lr * sign;
            *m = *m * b2 + one_b2 * g;
        }
        Ok(())
    }
}

impl StateIo for Lion {
    const KIND: OptimizerKind = OptimizerKind::Lion;

    fn write(&self, out: &mut StateWriter) {
        let c = self.config;
        for (k, v) in [
            ("beta1", c.beta1),
            ("beta2", c.beta2),
            ("weight_decay", c.weight_decay),
        ] {
            out.config.insert(k.into(), v.into());
        }
        for (name, m) in &self.momentum {
            out.params
                .insert(name.clone(), serde_json::json!({ "numel": m.len() }));
            out.tensor(name, "exp_avg", m.clone());
        }
    }

    fn read(file: &StateFile) -> Result<Self, OptimError> {
        let config = LionConfig {
            beta1: file.config("beta1")?,
            beta2: file.config("beta2")?,
            weight_decay: file.config("weight_decay")?,
        };
        let mut momentum = BTreeMap::new();
        for (name, scalars) in file.params()? {
            let n = file.param_count(&name, &scalars, "numel")? as usize;
            momentum.insert(name.clone(), file.tensor_of(&name, "exp_avg", n)?);
        }
        Ok(Self { config, momentum })
    }
}
