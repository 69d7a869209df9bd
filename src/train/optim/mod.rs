//! The optimisers a train stage can use (its `optimizer` key), each with its reference
//! implementation's numerics and defaults, per-parameter state that checkpoints to
//! safetensors, and gradient clipping by global norm ([`clip`]).
//!
//! | key | reference | file |
//! |---|---|---|
//! | `adamw` (default) | `torch.optim.AdamW` | [`adamw`] |
//! | `adamw8bit` | `bitsandbytes.optim.AdamW8bit` | [`adamw8bit`] |
//! | `lion` | `lion_pytorch.Lion` | [`lion`] |
//! | `prodigy` | `prodigyopt.Prodigy` | [`prodigy`] |
//! | `schedulefree_adamw` | `schedulefree.AdamWScheduleFree` | [`schedulefree`] |
//! | `adafactor` | `transformers.optimization.Adafactor` | [`adafactor`] |
//!
//! A step updates every trained parameter once, in the same order each step. Most optimisers
//! update each parameter on its own ([`Pass::Update`]); Prodigy's step size comes from sums
//! over all parameters, so its step first [`Pass::Observe`]s every parameter (moments and
//! sums, parameters untouched), then updates them. Callers loop over [`Optimizer::passes`].
//!
//! AdamW runs on the parameter's device (dfdx ops); the others compute on the host in f32 with
//! f64 scalars, as torch does with Python floats, and keep their state there.
//!
//! Schedule-free AdamW trains a point `y` and evaluates another, `x`: the model holds `y`
//! during training and in checkpoints; [`Optimizer::to_eval`] turns a parameter into `x` for
//! the evaluation and the trained file.

pub mod adafactor;
pub mod adamw;
pub mod adamw8bit;
pub mod clip;
mod host;
pub mod lion;
pub mod prodigy;
pub mod schedulefree;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig, ParamState};
pub use adamw8bit::{AdamW8bit, AdamW8bitConfig};
pub use clip::{clip_coefficient, clip_grad_norm, grad_norm};
pub use lion::{Lion, LionConfig};
pub use prodigy::{Prodigy, ProdigyConfig};
pub use schedulefree::{ScheduleFreeAdamW, ScheduleFreeConfig};

use crate::formats::{FormatError, HostTensor, read_safetensors, write_safetensors};

/// Errors of the optimisers.
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
    /// A parameter was updated in a step that did not observe it first (Prodigy).
    #[error("parameter `{name}`: updated before the step observed it (Prodigy needs both passes)")]
    NotObserved {
        /// Parameter name.
        name: String,
    },
    /// Parameters of one step have different non-zero learning rates (Prodigy, as
    /// prodigyopt, supports one).
    #[error("parameter `{name}`: learning rate {lr} in a step at {step_lr} (Prodigy takes one)")]
    MixedLr {
        /// Parameter name.
        name: String,
        /// Its learning rate.
        lr: f64,
        /// The step's.
        step_lr: f64,
    },
    /// The state file holds another optimiser's state.
    #[error("{path}: optimiser state of `{found}`, this run uses `{expected}`")]
    Kind {
        /// The file.
        path: std::path::PathBuf,
        /// The stage's optimiser.
        expected: OptimizerKind,
        /// The file's.
        found: String,
    },
    /// Reading or writing the state file failed, or it is malformed.
    #[error(transparent)]
    File(#[from] FormatError),
}

/// The train stage's `optimizer` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OptimizerKind {
    /// `torch.optim.AdamW` (the default).
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
    /// bitsandbytes' AdamW8bit: block-wise 8-bit moments.
    #[serde(rename = "adamw8bit")]
    AdamW8bit,
    /// Lion (Chen et al. 2023): sign of an interpolated momentum.
    #[serde(rename = "lion")]
    Lion,
    /// Prodigy (Mishchenko & Defazio 2023): Adam with an estimated step size (use lr = 1).
    #[serde(rename = "prodigy")]
    Prodigy,
    /// Schedule-free AdamW (Defazio et al. 2024).
    #[serde(rename = "schedulefree_adamw")]
    ScheduleFreeAdamW,
    /// Adafactor (Shazeer & Stern 2018) with a fixed learning rate.
    #[serde(rename = "adafactor")]
    Adafactor,
}

impl OptimizerKind {
    /// Every optimiser, in the order the docs list them.
    pub const ALL: [OptimizerKind; 6] = [
        Self::AdamW,
        Self::AdamW8bit,
        Self::Lion,
        Self::Prodigy,
        Self::ScheduleFreeAdamW,
        Self::Adafactor,
    ];

    /// The key's value (`"adamw"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::AdamW8bit => "adamw8bit",
            Self::Lion => "lion",
            Self::Prodigy => "prodigy",
            Self::ScheduleFreeAdamW => "schedulefree_adamw",
            Self::Adafactor => "adafactor",
        }
    }

    /// Whether this is the default (the key is then left out of the serialised parameters,
    /// so pipelines without it keep their cache keys).
    pub fn is_adamw(&self) -> bool {
        *self == Self::AdamW
    }

    /// What kohya writes as `ss_optimizer`: the class path, `(key=value,…)` appended for the
    /// arguments it was given (`weight_decay` always, as kohya passes it).
    pub fn kohya_name(self, weight_decay: f64) -> String {
        match self {
            Self::AdamW => "AdamW".into(),
            Self::AdamW8bit => {
                format!("bitsandbytes.optim.adamw.AdamW8bit(weight_decay={weight_decay})")
            }
            Self::Lion => format!("lion_pytorch.lion_pytorch.Lion(weight_decay={weight_decay})"),
            Self::Prodigy => format!("prodigyopt.prodigy.Prodigy(weight_decay={weight_decay})"),
            Self::ScheduleFreeAdamW => format!(
                "schedulefree.adamw_schedulefree.AdamWScheduleFree(weight_decay={weight_decay})"
            ),
            Self::Adafactor => format!(
                "transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,\
                 warmup_init=False,weight_decay={weight_decay})"
            ),
        }
    }

    /// f32 values of optimiser state per trained parameter (the memory estimate's count; the
    /// 8-bit states count as a quarter each, plus their per-block absmax).
    pub fn state_floats_per_param(self) -> f64 {
        match self {
            Self::AdamW => 2.0,
            // two u8 codes, one f32 absmax per 256 values per moment
            Self::AdamW8bit => 0.5 + 2.0 / 256.0,
            Self::Lion => 1.0,
            // s, p0, m, v
            Self::Prodigy => 4.0,
            // z, v
            Self::ScheduleFreeAdamW => 2.0,
            // factored rows and columns (R + C per R×C: under a quarter for LoRA's rank ≥ 4
            // matrices, far less for full weights); vectors keep one value each
            Self::Adafactor => 0.25,
        }
    }
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One pass of a step over the trained parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Read the parameter and its gradient into step-wide sums (Prodigy); the parameter stays.
    Observe,
    /// Update the parameter.
    Update,
}

/// One optimiser update per parameter, in [`passes`](Self::passes): what the training steps
/// drive, for [`Optimizer`] and plain [`AdamW`] (pretraining, benches).
pub trait ParamOptimizer<D: Device<f32>> {
    /// The passes of a step over every parameter, in order.
    fn passes(&self) -> &'static [Pass];
    /// Pass `pass` of parameter `name` with gradient `grad` at learning rate `lr`.
    fn apply<S: Shape>(
        &mut self,
        pass: Pass,
        name: &str,
        param: &mut Tensor<S, f32, D>,
        grad: &Tensor<S, f32, D>,
        lr: f64,
    ) -> Result<(), OptimError>;
}

impl<D: Device<f32>> ParamOptimizer<D> for AdamW<D> {
    fn passes(&self) -> &'static [Pass] {
        &[Pass::Update]
    }

    fn apply<S: Shape>(
        &mut self,
        pass: Pass,
        name: &str,
        param: &mut Tensor<S, f32, D>,
        grad: &Tensor<S, f32, D>,
        lr: f64,
    ) -> Result<(), OptimError> {
        match pass {
            Pass::Observe => Ok(()),
            Pass::Update => self.update(name, param, grad, lr),
        }
    }
}

/// The optimiser of a training run: one of [`OptimizerKind`] with its state.
#[derive(Debug, Clone)]
pub enum Optimizer<D: Device<f32>> {
    /// `adamw`.
    AdamW(AdamW<D>),
    /// `adamw8bit`.
    AdamW8bit(AdamW8bit),
    /// `lion`.
    Lion(Lion),
    /// `prodigy`.
    Prodigy(Prodigy),
    /// `schedulefree_adamw`.
    ScheduleFree(ScheduleFreeAdamW),
    /// `adafactor`.
    Adafactor(Adafactor),
}

/// Metadata key naming the optimiser of a state file (absent: AdamW, as every file before
/// the key).
pub const KIND_KEY: &str = "optimizer.kind";

impl<D: Device<f32>> Optimizer<D> {
    /// A fresh optimiser of `kind` with its reference defaults and `weight_decay`.
    pub fn new(dev: &D, kind: OptimizerKind, weight_decay: f64) -> Self {
        match kind {
            OptimizerKind::AdamW => Self::AdamW(AdamW::new(
                dev,
                AdamWConfig {
                    weight_decay,
                    ..AdamWConfig::default()
                },
            )),
            OptimizerKind::AdamW8bit => Self::AdamW8bit(AdamW8bit::new(AdamW8bitConfig {
                weight_decay,
                ..AdamW8bitConfig::default()
            })),
            OptimizerKind::Lion => Self::Lion(Lion::new(LionConfig {
                weight_decay,
                ..LionConfig::default()
            })),
            OptimizerKind::Prodigy => Self::Prodigy(Prodigy::new(ProdigyConfig {
                weight_decay,
                ..ProdigyConfig::default()
            })),
            OptimizerKind::ScheduleFreeAdamW => {
                Self::ScheduleFree(ScheduleFreeAdamW::new(ScheduleFreeConfig {
                    weight_decay,
                    ..ScheduleFreeConfig::default()
                }))
            }
            OptimizerKind::Adafactor => Self::Adafactor(Adafactor::new(AdafactorConfig {
                weight_decay,
                ..AdafactorConfig::default()
            })),
        }
    }

    /// Which optimiser this is.
    pub fn kind(&self) -> OptimizerKind {
        match self {
            Self::AdamW(_) => OptimizerKind::AdamW,
            Self::AdamW8bit(_) => OptimizerKind::AdamW8bit,
            Self::Lion(_) => OptimizerKind::Lion,
            Self::Prodigy(_) => OptimizerKind::Prodigy,
            Self::ScheduleFree(_) => OptimizerKind::ScheduleFreeAdamW,
            Self::Adafactor(_) => OptimizerKind::Adafactor,
        }
    }

    /// The host optimisers (every one but AdamW).
    fn host(&mut self) -> Option<&mut dyn host::HostOptimizer> {
        match self {
            Self::AdamW(_) => None,
            Self::AdamW8bit(o) => Some(o),
            Self::Lion(o) => Some(o),
            Self::Prodigy(o) => Some(o),
            Self::ScheduleFree(o) => Some(o),
            Self::Adafactor(o) => Some(o),
        }
    }

    /// One update of parameter `name` (for optimisers with a single pass; Prodigy's step needs
    /// [`ParamOptimizer::apply`] with both passes).
    pub fn update<S: Shape>(
        &mut self,
        name: &str,
        param: &mut Tensor<S, f32, D>,
        grad: &Tensor<S, f32, D>,
        lr: f64,
    ) -> Result<(), OptimError> {
        self.apply(Pass::Update, name, param, grad, lr)
    }

    /// `param` as it is evaluated and saved: schedule-free AdamW's `x` (its
    /// `optimizer.eval()`), from the training point `y` the model holds and the state `z`;
    /// the parameter itself for every other optimiser.
    pub fn to_eval<S: Shape>(&self, name: &str, param: &mut Tensor<S, f32, D>) {
        if let Self::ScheduleFree(o) = self {
            let mut values = param.as_vec();
            if o.to_eval(name, &mut values) {
                *param = param.device().tensor_from_vec(values, *param.shape());
            }
        }
    }

    /// [`Self::to_eval`] of host values: a copy of the weights (a snapshot's) made as
    /// they are evaluated, leaving the training point in the model untouched.
    pub fn to_eval_host(&self, name: &str, values: &mut [f32]) {
        if let Self::ScheduleFree(o) = self {
            o.to_eval(name, values);
        }
    }

    /// Writes the state to a safetensors file (atomically). AdamW's file is the format it has
    /// always had; the others name themselves in the metadata [`KIND_KEY`].
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let (tensors, meta) = match self {
            Self::AdamW(o) => o.to_safetensors(),
            Self::AdamW8bit(o) => host::to_file(o),
            Self::Lion(o) => host::to_file(o),
            Self::Prodigy(o) => host::to_file(o),
            Self::ScheduleFree(o) => host::to_file(o),
            Self::Adafactor(o) => host::to_file(o),
        };
        Ok(write_safetensors(path, &tensors, Some(meta))?)
    }

    /// Reads a state file written by [`save`](Self::save), which must hold `kind`'s state
    /// (the hyper-parameters come from the file).
    pub fn load(dev: &D, path: &Path, kind: OptimizerKind) -> Result<Self, OptimError> {
        let st = read_safetensors(path)?;
        let found = st.metadata.get(KIND_KEY).map_or("adamw", String::as_str);
        if found != kind.name() {
            return Err(OptimError::Kind {
                path: path.to_path_buf(),
                expected: kind,
                found: found.to_string(),
            });
        }
        let state_file = |st: crate::formats::SafetensorsFile| {
            host::StateFile::new(path, st.tensors, st.metadata)
        };
        Ok(match kind {
            OptimizerKind::AdamW => Self::AdamW(AdamW::from_file(dev, path, &st)?),
            OptimizerKind::AdamW8bit => Self::AdamW8bit(host::from_file(&state_file(st))?),
            OptimizerKind::Lion => Self::Lion(host::from_file(&state_file(st))?),
            OptimizerKind::Prodigy => Self::Prodigy(host::from_file(&state_file(st))?),
            OptimizerKind::ScheduleFreeAdamW => {
                Self::ScheduleFree(host::from_file(&state_file(st))?)
            }
            OptimizerKind::Adafactor => Self::Adafactor(host::from_file(&state_file(st))?),
        })
    }
}

impl<D: Device<f32>> ParamOptimizer<D> for Optimizer<D> {
    fn passes(&self) -> &'static [Pass] {
        match self {
            Self::Prodigy(_) => &[Pass::Observe, Pass::Update],
            _ => &[Pass::Update],
        }
    }

    fn apply<S: Shape>(
        &mut self,
        pass: Pass,
        name: &str,
        param: &mut Tensor<S, f32, D>,
        grad: &Tensor<S, f32, D>,
        lr: f64,
    ) -> Result<(), OptimError> {
        let n = param.shape().num_elements();
        let gn = grad.shape().num_elements();
        if gn != n {
            return Err(OptimError::GradShape {
                name: name.to_string(),
                param: n,
                grad: gn,
            });
        }
        if let Self::AdamW(o) = self {
            return o.apply(pass, name, param, grad, lr);
        }
        let Some(host) = self.host() else {
            return Ok(());
        };
        let dims: Vec<usize> = param.shape().concrete().into_iter().collect();
        let mut p = param.as_vec();
        let g = grad.as_vec();
        match pass {
            Pass::Observe => host.observe(name, &p, &g, &dims, lr),
            Pass::Update => {
                host.update(name, &mut p, &g, &dims, lr)?;
                *param = param.device().tensor_from_vec(p, *param.shape());
                Ok(())
            }
        }
    }
}

/// One optimiser step of every parameter of `model` with `grads` (by `prefix` + the
/// parameter's full name, as [`crate::diffusion::params::named_grads`] gives them), in pass
/// `pass`: full fine-tuning's step (DreamBooth, pretraining, `sdpipe bench --task
/// full-train`). Call it once per pass of [`ParamOptimizer::passes`].
pub fn update_layers<D: Device<f32>, M: crate::diffusion::params::Layers<D>>(
    model: &mut M,
    prefix: &str,
    grads: &BTreeMap<String, HostTensor>,
    optimizer: &mut impl ParamOptimizer<D>,
    lr: f64,
    pass: Pass,
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
                optimizer.apply(pass, &key, t, &g, lr)?;
            }
            ParamMut::T2(t) => {
                let dev = t.device().clone();
                let g = grad
                    .to_tensor::<(usize, usize), D>(&dev)
                    .ok_or_else(shape_err)?;
                optimizer.apply(pass, &key, t, &g, lr)?;
            }
            ParamMut::T4(t) => {
                let dev = t.device().clone();
                let g = grad
                    .to_tensor::<(usize, usize, usize, usize), D>(&dev)
                    .ok_or_else(shape_err)?;
                optimizer.apply(pass, &key, t, &g, lr)?;
            }
        }
        Ok(())
    })
}

/// Every parameter of `model` (by `prefix` + its full name) as [`Optimizer::to_eval`] makes
/// it: schedule-free AdamW's `x`; nothing changes for the other optimisers.
pub fn layers_to_eval<D: Device<f32>, M: crate::diffusion::params::Layers<D>>(
    model: &mut M,
    prefix: &str,
    optimizer: &Optimizer<D>,
) -> anyhow::Result<()> {
    use crate::diffusion::params::{ParamMut, try_for_each_named_param};
    if !matches!(optimizer, Optimizer::ScheduleFree(_)) {
        return Ok(());
    }
    try_for_each_named_param(model, |name, param| {
        let key = format!("{prefix}{name}");
        match param {
            ParamMut::T1(t) => optimizer.to_eval(&key, t),
            ParamMut::T2(t) => optimizer.to_eval(&key, t),
            ParamMut::T4(t) => optimizer.to_eval(&key, t),
        }
        Ok(())
    })
}

/// The metadata of a state file as text (for errors naming what is missing).
pub(crate) type Metadata = HashMap<String, String>;
