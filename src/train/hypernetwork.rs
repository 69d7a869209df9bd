//! A1111 hypernetworks on the UNet: the file type ([`Hypernetwork`]) on a device
//! ([`HyperNet`]), hooking networks into the attentions ([`install`]), one training step of the
//! epsilon objective ([`loss_and_grads`], [`param_grads`], [`apply_grads`]) and the trained
//! weights back in the file type ([`HyperNet::to_host`]).
//!
//! Parameters are named as in the safetensors twin: `<width>.<k|v>.linear.<Sequential
//! index>.<weight|bias>` (e.g. `768.k.linear.0.weight`).

use std::collections::BTreeMap;

use dfdx::prelude::*;

use crate::diffusion::nn::elem::Elem;
use thiserror::Error;

use super::objective;
use super::optim::{OptimError, Optimizer, ParamOptimizer, Pass};
use crate::diffusion::UNet;
use crate::diffusion::hypernetwork::{
    HyperActivation, HyperLayer, HyperMlp, HyperPair, HyperStack,
};
use crate::diffusion::nn::{Tensor1, Tensor2, Tensor3, Tensor4};
use crate::diffusion::schedulers::Ddpm;
use crate::formats::HostTensor;
use crate::formats::hypernetwork::{HyperLinear, Hypernetwork, HypernetworkModule};

/// What can go wrong installing or training a hypernetwork.
#[derive(Debug, Error)]
pub enum HyperTrainError {
    /// The network has a module for a context width no attention of the model has.
    #[error(
        "hypernetwork `{name}` has a module for context width {width}, but this model's attentions have widths {available:?}"
    )]
    MissingWidth {
        /// The network's name.
        name: String,
        /// The width the model lacks.
        width: usize,
        /// The widths the model has.
        available: Vec<usize>,
    },
    /// The network's settings or tensors are inconsistent.
    #[error("hypernetwork `{name}`: {reason}")]
    Invalid {
        /// The network's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A parameter has no gradient (it was not used by the forward pass).
    #[error("hypernetwork parameter `{0}` has no gradient")]
    NoGradient(String),
    /// The model rejected its inputs.
    #[error(transparent)]
    Model(#[from] crate::diffusion::DiffusionError),
    /// The noise schedule rejected its inputs.
    #[error(transparent)]
    Schedule(#[from] crate::diffusion::schedulers::SchedulerError),
    /// The optimiser failed.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// The objective gave no loss (a bad input, or NaN/infinity: training diverged).
    #[error(transparent)]
    Objective(#[from] super::objective::ObjectiveError),
}

/// The key and value MLPs of one width.
pub type MlpPair<D, E = f32> = (HyperMlp<D, E>, HyperMlp<D, E>);

/// A hypernetwork on a device: the k and v MLPs per context width.
#[derive(Debug, Clone)]
pub struct HyperNet<D: Storage<E>, E = f32> {
    /// Name (for messages).
    pub name: String,
    /// Width → (k MLP, v MLP).
    pub modules: BTreeMap<usize, MlpPair<D, E>>,
}

/// A mutable parameter of a [`HyperNet`].
pub enum ParamMut<'a, D: Storage<E>, E = f32> {
    /// A linear weight `[out, in]`.
    Matrix(&'a mut Tensor2<D, NoneTape, E>),
    /// A bias or a LayerNorm parameter.
    Vector(&'a mut Tensor1<D, NoneTape, E>),
}

/// A parameter of a [`HyperNet`].
pub enum ParamRef<'a, D: Storage<E>, E = f32> {
    /// A linear weight `[out, in]`.
    Matrix(&'a Tensor2<D, NoneTape, E>),
    /// A bias or a LayerNorm parameter.
    Vector(&'a Tensor1<D, NoneTape, E>),
}

/// Calls `f(sequential index of the linear, index of its LayerNorm, layer)` for each layer,
/// numbering as A1111's Sequential does (linear, activation, LayerNorm, dropout).
fn sequential_indices<L>(
    layers: &[L],
    f: impl Fn(&L) -> (bool, bool, bool),
) -> Vec<(usize, usize)> {
    let mut idx = 0;
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        let (activate, norm, dropout) = f(l);
        let linear = idx;
        idx += 1 + usize::from(activate);
        let ln = idx;
        idx += usize::from(norm) + usize::from(dropout);
        out.push((linear, ln));
    }
    out
}

fn layer_flags<E, D: Storage<E>>(l: &HyperLayer<D, E>) -> (bool, bool, bool) {
    (l.activate, l.layer_norm.is_some(), l.dropout > 0.0)
}

impl<D: Device<f32>> HyperNet<D> {
    /// The same network with its tensors converted to `E` (the working copy hooked into a
    /// mixed-precision UNet; this f32 network stays the master the optimiser updates).
    pub fn to_elem<E: Elem>(&self) -> HyperNet<D, E>
    where
        D: Device<E>,
    {
        HyperNet {
            name: self.name.clone(),
            modules: self
                .modules
                .iter()
                .map(|(w, (k, v))| (*w, (k.to_elem(), v.to_elem())))
                .collect(),
        }
    }
}

impl<E: Elem, D: Device<E>> HyperNet<D, E> {
    /// The network of a file on `dev` (dropout probabilities, activation placement and layer
    /// norms from its settings, as A1111 builds its Sequential).
    pub fn from_host(hn: &Hypernetwork, dev: &D) -> Result<Self, HyperTrainError> {
        let invalid = |reason: String| HyperTrainError::Invalid {
            name: hn.name.clone(),
            reason,
        };
        let c = &hn.config;
        let activation = HyperActivation::parse(c.activation_func.as_deref()).map_err(&invalid)?;
        let dropout = c.effective_dropout_structure();
        let n = c.layer_structure.len().saturating_sub(1);
        let mlp = |m: &HypernetworkModule,
                   width: usize|
         -> Result<HyperMlp<D, E>, HyperTrainError> {
            // the same checks A1111's loader makes (names, shapes, dropout range)
            m.state_dict(width, c).map_err(&invalid)?;
            let t1 = |t: &HostTensor| {
                t.to_tensor_as::<(usize,), E, D>(dev)
                    .ok_or_else(|| invalid(format!("tensor of shape {:?} is not 1-d", t.shape)))
            };
            let layers = m
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    Ok(HyperLayer {
                        weight: l
                            .weight
                            .to_tensor_as::<(usize, usize), E, D>(dev)
                            .ok_or_else(|| {
                                invalid(format!("weight of shape {:?} is not 2-d", l.weight.shape))
                            })?,
                        bias: t1(&l.bias)?,
                        activate: activation != HyperActivation::Linear
                            && (c.activate_output || i + 1 < n),
                        layer_norm: match &l.layer_norm {
                            Some((w, b)) => Some((t1(w)?, t1(b)?)),
                            None => None,
                        },
                        dropout: dropout.get(i + 1).copied().unwrap_or(0.0) as f32,
                    })
                })
                .collect::<Result<Vec<_>, HyperTrainError>>()?;
            Ok(HyperMlp { layers, activation })
        };
        let mut modules = BTreeMap::new();
        for (&width, (k, v)) in &hn.modules {
            modules.insert(width, (mlp(k, width)?, mlp(v, width)?));
        }
        Ok(Self {
            name: hn.name.clone(),
            modules,
        })
    }

    /// The file type with this network's weights and `template`'s name and settings.
    pub fn to_host(&self, template: &Hypernetwork) -> Hypernetwork {
        let module = |m: &HyperMlp<D, E>| HypernetworkModule {
            layers: m
                .layers
                .iter()
                .map(|l| HyperLinear {
                    weight: HostTensor::from_tensor(&l.weight),
                    bias: HostTensor::from_tensor(&l.bias),
                    layer_norm: l
                        .layer_norm
                        .as_ref()
                        .map(|(w, b)| (HostTensor::from_tensor(w), HostTensor::from_tensor(b))),
                })
                .collect(),
        };
        let mut out = template.clone();
        out.modules = self
            .modules
            .iter()
            .map(|(&w, (k, v))| (w, (module(k), module(v))))
            .collect();
        out
    }

    /// Number of trained scalars.
    pub fn num_params(&self) -> usize {
        let mut n = 0;
        self.for_each_param(|_, p| {
            n += match p {
                ParamRef::Matrix(t) => t.shape().num_elements(),
                ParamRef::Vector(t) => t.shape().num_elements(),
            }
        });
        n
    }

    /// Calls `f` with the name and the tensor of every parameter.
    pub fn for_each_param(&self, mut f: impl FnMut(String, ParamRef<'_, D, E>)) {
        for (width, (k, v)) in &self.modules {
            for (which, m) in [("k", k), ("v", v)] {
                let idx = sequential_indices(&m.layers, layer_flags);
                for (l, (li, ni)) in m.layers.iter().zip(idx) {
                    let p = format!("{width}.{which}.linear");
                    f(format!("{p}.{li}.weight"), ParamRef::Matrix(&l.weight));
                    f(format!("{p}.{li}.bias"), ParamRef::Vector(&l.bias));
                    if let Some((w, b)) = &l.layer_norm {
                        f(format!("{p}.{ni}.weight"), ParamRef::Vector(w));
                        f(format!("{p}.{ni}.bias"), ParamRef::Vector(b));
                    }
                }
            }
        }
    }

    /// Calls `f` with the name and the tensor of every parameter, mutably.
    pub fn for_each_param_mut(&mut self, mut f: impl FnMut(String, ParamMut<'_, D, E>)) {
        for (width, (k, v)) in &mut self.modules {
            for (which, m) in [("k", k), ("v", v)] {
                let idx = sequential_indices(&m.layers, layer_flags);
                for (l, (li, ni)) in m.layers.iter_mut().zip(idx) {
                    let p = format!("{width}.{which}.linear");
                    f(format!("{p}.{li}.weight"), ParamMut::Matrix(&mut l.weight));
                    f(format!("{p}.{li}.bias"), ParamMut::Vector(&mut l.bias));
                    if let Some((w, b)) = &mut l.layer_norm {
                        f(format!("{p}.{ni}.weight"), ParamMut::Vector(w));
                        f(format!("{p}.{ni}.bias"), ParamMut::Vector(b));
                    }
                }
            }
        }
    }
}

/// Hooks `networks` (each with its multiplier, applied in order as A1111 stacks them) into
/// every attention whose context width they have a module for, replacing any hook. With
/// `dropout_seed` (training), each attention draws its dropout masks from its own seed derived
/// from it. A width no attention has is an error naming the widths the model has.
pub fn install<E: Elem, D: Device<E>>(
    unet: &mut UNet<D, E>,
    networks: &[(&HyperNet<D, E>, f32)],
    dropout_seed: Option<u64>,
) -> Result<(), HyperTrainError> {
    let available = unet.attention_context_widths();
    for (net, _) in networks {
        if let Some(&width) = net.modules.keys().find(|w| !available.contains(w)) {
            return Err(HyperTrainError::MissingWidth {
                name: net.name.clone(),
                width,
                available,
            });
        }
    }
    let mut position = 0u64;
    unet.for_each_attention_mut(|_, attn| {
        let width = attn.to_k.in_features();
        let pairs: Vec<HyperPair<D, E>> = networks
            .iter()
            .filter_map(|(net, multiplier)| {
                net.modules.get(&width).map(|(k, v)| HyperPair {
                    k: k.clone(),
                    v: v.clone(),
                    multiplier: *multiplier,
                })
            })
            .collect();
        attn.hypernetwork = (!pairs.is_empty()).then(|| HyperStack {
            pairs,
            dropout_seed: dropout_seed.map(|s| mix(s, position)),
        });
        position += 1;
    });
    Ok(())
}

/// A seed per attention layer.
fn mix(seed: u64, position: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"hypernetwork dropout");
    h.update(&seed.to_le_bytes());
    h.update(&position.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or_default())
}

/// Removes every hypernetwork hook.
pub fn uninstall<E: Elem, D: Device<E>>(unet: &mut UNet<D, E>) {
    unet.for_each_attention_mut(|_, attn| attn.hypernetwork = None);
}

/// The loss of one batch of the [`objective`] with the installed hypernetworks, and the
/// gradients (no update).
pub fn loss_and_grads<D: Device<f32>>(
    unet: &UNet<D>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    context: &Tensor3<D>,
) -> Result<(f32, Gradients<f32, D>), HyperTrainError> {
    Ok(objective::loss_and_grads(
        unet,
        ddpm,
        latents,
        noise,
        timesteps,
        context.retaped(),
        1.0,
    )?)
}

/// The gradients of every parameter of `net`, by name (zero for a parameter the forward pass
/// did not use).
pub fn param_grads<E: Elem, D: Device<E>>(
    net: &HyperNet<D, E>,
    grads: &mut Gradients<E, D>,
) -> Result<BTreeMap<String, HostTensor>, HyperTrainError> {
    let mut out = BTreeMap::new();
    let mut missing = None;
    net.for_each_param(|name, p| {
        let g = match p {
            ParamRef::Matrix(t) => grads
                .try_alloc_for(t)
                .ok()
                .map(|_| HostTensor::from_tensor(&grads.get(t))),
            ParamRef::Vector(t) => grads
                .try_alloc_for(t)
                .ok()
                .map(|_| HostTensor::from_tensor(&grads.get(t))),
        };
        match g {
            Some(g) => {
                out.insert(name, g);
            }
            None => {
                missing.get_or_insert(name);
            }
        }
    });
    match missing {
        Some(name) => Err(HyperTrainError::NoGradient(name)),
        None => Ok(out),
    }
}

/// One optimiser step of every parameter of `net` with `grads` (by name, as [`param_grads`]
/// gives them; averaged or clipped by the caller as needed). Reinstall the network afterwards:
/// the attentions hold copies.
pub fn apply_grads<D: Device<f32>>(
    net: &mut HyperNet<D>,
    grads: &BTreeMap<String, HostTensor>,
    optimizer: &mut impl ParamOptimizer<D>,
    lr: f64,
) -> Result<(), HyperTrainError> {
    for &pass in optimizer.passes() {
        apply_pass(net, grads, optimizer, lr, pass)?;
    }
    Ok(())
}

/// Host copies of every parameter of `net`, by name.
pub fn named_values<D: Device<f32>>(net: &HyperNet<D>) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    net.for_each_param(|name, p| {
        let t = match p {
            ParamRef::Matrix(t) => HostTensor::from_tensor(t),
            ParamRef::Vector(t) => HostTensor::from_tensor(t),
        };
        out.insert(name, t);
    });
    out
}

/// Replaces every parameter of `net` with its value in `weights` (an EMA's); one missing
/// there or of another size is an error naming it.
pub fn overwrite<D: Device<f32>>(
    net: &mut HyperNet<D>,
    weights: &BTreeMap<String, HostTensor>,
) -> anyhow::Result<()> {
    let mut result = Ok(());
    net.for_each_param_mut(|name, p| {
        if result.is_err() {
            return;
        }
        let Some(w) = weights.get(&name) else {
            result = Err(anyhow::anyhow!("no value for `{name}`"));
            return;
        };
        let done = match p {
            ParamMut::Matrix(t) => crate::train::mixed::overwrite(t, &w.data).map(|n| *t = n),
            ParamMut::Vector(t) => crate::train::mixed::overwrite(t, &w.data).map(|n| *t = n),
        };
        result = done.map_err(|e| anyhow::anyhow!("`{name}`: {e}"));
    });
    result
}

/// Every parameter of `net` as the optimiser evaluates it ([`Optimizer::to_eval`]:
/// schedule-free AdamW's `x`).
pub fn to_eval<D: Device<f32>>(net: &mut HyperNet<D>, optimizer: &Optimizer<D>) {
    net.for_each_param_mut(|name, p| match p {
        ParamMut::Matrix(t) => optimizer.to_eval(&name, t),
        ParamMut::Vector(t) => optimizer.to_eval(&name, t),
    });
}

/// One pass of [`apply_grads`].
fn apply_pass<D: Device<f32>>(
    net: &mut HyperNet<D>,
    grads: &BTreeMap<String, HostTensor>,
    optimizer: &mut impl ParamOptimizer<D>,
    lr: f64,
    pass: Pass,
) -> Result<(), HyperTrainError> {
    let mut error = None;
    net.for_each_param_mut(|name, p| {
        if error.is_some() {
            return;
        }
        let Some(g) = grads.get(&name) else {
            error = Some(HyperTrainError::NoGradient(name));
            return;
        };
        let r = match p {
            ParamMut::Matrix(t) => {
                let dev = t.device().clone();
                match g.to_tensor::<(usize, usize), D>(&dev) {
                    Some(g) => optimizer.apply(pass, &name, t, &g, lr),
                    None => {
                        error = Some(HyperTrainError::NoGradient(name));
                        return;
                    }
                }
            }
            ParamMut::Vector(t) => {
                let dev = t.device().clone();
                match g.to_tensor::<(usize,), D>(&dev) {
                    Some(g) => optimizer.apply(pass, &name, t, &g, lr),
                    None => {
                        error = Some(HyperTrainError::NoGradient(name));
                        return;
                    }
                }
            }
        };
        if let Err(e) = r {
            error = Some(e.into());
        }
    });
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedulers::SeededNoise;
    use crate::formats::hypernetwork::HypernetworkConfig;

    /// A width-4 network with every parameter drawn at a scale where the nonlinearities matter.
    fn network(activation: &str, layer_norm: bool, dropout: bool) -> (Hypernetwork, HyperNet<Cpu>) {
        let config = HypernetworkConfig {
            layer_structure: vec![1.0, 1.5, 1.0],
            activation_func: Some(activation.into()),
            is_layer_norm: layer_norm,
            activate_output: true,
            use_dropout: dropout,
            dropout_structure: dropout.then(|| vec![0.0, 0.4, 0.0]),
            ..HypernetworkConfig::default()
        };
        let mut hn = Hypernetwork::new("t", config, &[4], 3).unwrap();
        let mut noise = SeededNoise::new(11);
        for (k, v) in hn.modules.values_mut() {
            for m in [k, v] {
                for l in &mut m.layers {
                    let mut tensors = vec![&mut l.weight, &mut l.bias];
                    if let Some((w, b)) = &mut l.layer_norm {
                        tensors.push(w);
                        tensors.push(b);
                    }
                    for t in tensors {
                        t.data
                            .iter_mut()
                            .for_each(|x| *x = noise.next_normal() as f32 * 0.7);
                    }
                }
            }
        }
        let net = HyperNet::from_host(&hn, &Cpu::default()).unwrap();
        (hn, net)
    }

    /// `sum(k(x) · r1 + v(x) · r2)` through the hypernetwork stack.
    fn loss<T: Tape<f32, Cpu>>(
        net: &HyperNet<Cpu>,
        x: Tensor3<Cpu, T>,
        r: &(Tensor3<Cpu>, Tensor3<Cpu>),
        seed: Option<u64>,
    ) -> Tensor<(), f32, Cpu, T> {
        let (k, v) = &net.modules[&4];
        let stack = HyperStack {
            pairs: vec![HyperPair {
                k: k.clone(),
                v: v.clone(),
                multiplier: 0.8,
            }],
            dropout_seed: seed,
        };
        let (ck, cv) = stack.apply(x);
        (ck * r.0.clone()).sum() + (cv * r.1.clone()).sum()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Cpu::default();
        let x: Tensor3<Cpu> = dev.sample_normal_like(&(2, 3, 4));
        let r = (
            dev.sample_normal_like(&(2, 3, 4)),
            dev.sample_normal_like(&(2, 3, 4)),
        );
        let mut worst = 0.0f32;
        let cases = HyperActivation::NAMES
            .iter()
            .map(|a| (*a, true, false))
            .chain([("relu", false, false), ("tanh", true, true)]);
        for (activation, ln, dropout) in cases {
            let mut case_worst = 0.0f32;
            let (_, net) = network(activation, ln, dropout);
            let seed = dropout.then_some(7);
            let mut grads = loss(&net, x.leaky_trace(), &r, seed).backward();
            let analytic = param_grads(&net, &mut grads).unwrap();
            let eps = 2e-3f32;
            let mut names = Vec::new();
            net.for_each_param(|n, _| names.push(n));
            for name in names {
                let g = &analytic[&name];
                for i in 0..g.data.len() {
                    let eval = |delta: f32| {
                        let mut moved = net.clone();
                        moved.for_each_param_mut(|n, p| {
                            if n != name {
                                return;
                            }
                            let bump = |v: &mut Vec<f32>| v[i] += delta;
                            match p {
                                ParamMut::Matrix(t) => {
                                    let mut v = t.as_vec();
                                    bump(&mut v);
                                    *t = dev.tensor_from_vec(v, *t.shape());
                                }
                                ParamMut::Vector(t) => {
                                    let mut v = t.as_vec();
                                    bump(&mut v);
                                    *t = dev.tensor_from_vec(v, *t.shape());
                                }
                            }
                        });
                        loss(&moved, x.clone(), &r, seed).array() as f64
                    };
                    let numeric = ((eval(eps) - eval(-eps)) / (2.0 * eps as f64)) as f32;
                    let err = (numeric - g.data[i]).abs() / (1.0 + numeric.abs());
                    worst = worst.max(err);
                    case_worst = case_worst.max(err);
                    assert!(
                        err < 2e-2,
                        "{activation}: {name}[{i}] analytic {} vs numeric {numeric}",
                        g.data[i]
                    );
                }
            }
            println!("{activation} ln={ln} dropout={dropout}: {case_worst:.2e}");
        }
        println!("worst relative gradient error {worst:.2e}");
    }

    #[test]
    fn dropout_is_seeded_and_off_without_a_seed() {
        let dev = Cpu::default();
        let (_, net) = network("relu", false, true);
        let x: Tensor3<Cpu> = dev.sample_normal_like(&(1, 50, 4));
        let (k, _) = &net.modules[&4];
        let a = k.forward(x.clone(), 1.0, Some(1)).as_vec();
        let b = k.forward(x.clone(), 1.0, Some(1)).as_vec();
        let c = k.forward(x.clone(), 1.0, Some(2)).as_vec();
        let off = k.forward(x.clone(), 1.0, None).as_vec();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, off);
        // multiplier 0 is the identity
        assert_eq!(k.forward(x.clone(), 0.0, Some(1)).as_vec(), x.as_vec());
    }

    #[test]
    fn names_follow_the_sequential_numbering_and_round_trip() {
        let (hn, net) = network("relu", true, true);
        let mut names = Vec::new();
        net.for_each_param(|n, _| names.push(n));
        // Linear(0) ReLU(1) LayerNorm(2) Dropout(3) Linear(4) ReLU(5) LayerNorm(6)
        assert_eq!(
            &names[..8],
            [
                "4.k.linear.0.weight",
                "4.k.linear.0.bias",
                "4.k.linear.2.weight",
                "4.k.linear.2.bias",
                "4.k.linear.4.weight",
                "4.k.linear.4.bias",
                "4.k.linear.6.weight",
                "4.k.linear.6.bias"
            ]
        );
        let (tensors, _) = hn.to_safetensors().unwrap();
        let mut twin: Vec<&String> = tensors.keys().collect();
        twin.sort();
        let mut ours: Vec<&String> = names.iter().collect();
        ours.sort();
        assert_eq!(twin, ours);
        assert_eq!(net.to_host(&hn), hn);
        // the trained weights survive the A1111 file and its twin bit for bit
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("h.pt");
        let st = dir.path().join("h.safetensors");
        crate::formats::hypernetwork::write_hypernetwork_pt(&pt, &net.to_host(&hn)).unwrap();
        crate::formats::hypernetwork::write_hypernetwork_safetensors(&st, &net.to_host(&hn))
            .unwrap();
        for path in [pt, st] {
            let back = crate::formats::hypernetwork::read_hypernetwork(&path).unwrap();
            assert_eq!(back.modules, hn.modules, "{}", path.display());
            let again = HyperNet::from_host(&back, &Cpu::default()).unwrap();
            let mut a = Vec::new();
            let mut b = Vec::new();
            net.for_each_param(|n, p| a.push((n, param_vec(p))));
            again.for_each_param(|n, p| b.push((n, param_vec(p))));
            assert_eq!(a, b);
        }
    }

    fn param_vec(p: ParamRef<'_, Cpu>) -> Vec<f32> {
        match p {
            ParamRef::Matrix(t) => t.as_vec(),
            ParamRef::Vector(t) => t.as_vec(),
        }
    }
}
