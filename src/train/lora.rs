//! LoRA on the UNet's attention projections and the text encoder's linear layers: installing
//! adapters from a [`LoraNetwork`], one training step of the epsilon objective, and reading
//! the trained adapters back. Every function works on any [`LoraTarget`] (the UNet or the text
//! encoder), on that model's part of the network.

use std::collections::BTreeMap;

use dfdx::prelude::*;

use crate::diffusion::nn::elem::Elem;
use thiserror::Error;

use super::objective;
use super::optim::{OptimError, ParamOptimizer, Pass};
use crate::diffusion::nn::{Conv2d, ConvLoraAdapter, Linear, LoraAdapter, Tensor3, Tensor4};
use crate::diffusion::params::{Layer, Layers};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};
use crate::formats::HostTensor;
use crate::formats::lora::{LoraComponent, LoraModule, LoraNetwork, NetworkModule};

/// A layer LoRA can adapt: a linear layer (the classic LoRA) or a convolution (LoCon), each
/// carrying its optional adapter.
pub enum Adaptable<'a, D: Storage<E>, E = f32> {
    /// `[out, in]` weight, [`LoraAdapter`].
    Linear(&'a mut Linear<D, E>),
    /// `[out, in, kh, kw]` weight, [`ConvLoraAdapter`].
    Conv(&'a mut Conv2d<D, E>),
}

impl<E: Elem, D: Device<E>> Adaptable<'_, D, E> {
    /// The layer's weight shape: `[out, in]` or `[out, in, kh, kw]` (what a [`LoraModule`]
    /// for it must fit).
    pub fn weight_shape(&self) -> Vec<usize> {
        match self {
            Adaptable::Linear(l) => l.weight.shape().concrete().to_vec(),
            Adaptable::Conv(c) => c.weight.shape().concrete().to_vec(),
        }
    }

    /// Removes the adapter (and any full-size update).
    pub fn remove_adapter(&mut self) {
        match self {
            Adaptable::Linear(l) => (l.lora, l.delta) = (None, None),
            Adaptable::Conv(c) => (c.lora, c.delta) = (None, None),
        }
    }

    /// The layer's (frozen) weight on the host.
    pub fn weight_host(&self) -> HostTensor {
        match self {
            Adaptable::Linear(l) => HostTensor::from_tensor(&l.weight),
            Adaptable::Conv(c) => HostTensor::from_tensor(&c.weight),
        }
    }

    /// Sets the full-size update `ΔW` (shaped like the weight) the layer adds to its output.
    pub fn set_delta(&mut self, delta: &HostTensor, dev: &D) -> Result<(), String> {
        let misfit = || format!("ΔW {:?} does not fit the layer", delta.shape);
        match self {
            Adaptable::Linear(l) => {
                let shape = *l.weight.shape();
                let d = delta.to_tensor_as::<(usize, usize), E, D>(dev);
                l.delta = Some(d.filter(|d| *d.shape() == shape).ok_or_else(misfit)?);
            }
            Adaptable::Conv(c) => {
                let shape = *c.weight.shape();
                let d = delta.to_tensor_as::<Shape4, E, D>(dev);
                c.delta = Some(d.filter(|d| *d.shape() == shape).ok_or_else(misfit)?);
            }
        }
        Ok(())
    }

    /// The gradient of the layer's `ΔW` in `grads`, when it has one.
    fn delta_grad(&self, grads: &Gradients<E, D>) -> Option<HostTensor> {
        match self {
            Adaptable::Linear(l) => {
                (l.delta.as_ref()).map(|d| HostTensor::from_tensor(&grads.get(d)))
            }
            Adaptable::Conv(c) => {
                (c.delta.as_ref()).map(|d| HostTensor::from_tensor(&grads.get(d)))
            }
        }
    }

    /// Installs `module` on the layer at `multiplier`: a LoRA as the adapter (scaled by
    /// `multiplier · alpha / r`), the others as their update `ΔW`; why not when it does not fit.
    fn install_module(
        &mut self,
        module: &NetworkModule,
        multiplier: f32,
        dev: &D,
    ) -> Result<(), String> {
        match module {
            NetworkModule::Lora(m) => self.install(m, multiplier * m.scale(), dev),
            m => {
                let delta = m.delta_for(&self.weight_host(), multiplier)?;
                self.set_delta(&delta, dev)
            }
        }
    }

    /// Installs `module` as the adapter, its output scaled by `scale`; why not when it does
    /// not fit the layer.
    fn install(&mut self, module: &LoraModule, scale: f32, dev: &D) -> Result<(), String> {
        let shape = self.weight_shape();
        let misfit = || {
            format!(
                "down {:?} / up {:?} do not fit a {shape:?} layer",
                module.down.shape, module.up.shape
            )
        };
        if module.weight_shape() != shape || module.up.shape.len() != 2 {
            return Err(misfit());
        }
        match self {
            Adaptable::Linear(l) => {
                let down = module.down.to_tensor_as::<(usize, usize), E, D>(dev);
                let up = module.up.to_tensor_as::<(usize, usize), E, D>(dev);
                let (Some(down), Some(up)) = (down, up) else {
                    return Err(misfit());
                };
                l.lora = Some(LoraAdapter {
                    down,
                    up,
                    scale,
                    dropout: 0.0,
                    dropout_seed: 0,
                });
            }
            Adaptable::Conv(c) => {
                let down = module.down.to_tensor_as::<Shape4, E, D>(dev);
                let up = as_1x1(module.up.clone()).to_tensor_as::<Shape4, E, D>(dev);
                let (Some(down), Some(up)) = (down, up) else {
                    return Err(misfit());
                };
                c.lora = Some(ConvLoraAdapter { down, up, scale });
            }
        }
        Ok(())
    }

    /// Adds `module`'s update at `multiplier` to the weight; why not when it does not fit.
    fn merge(&mut self, module: &NetworkModule, multiplier: f32) -> Result<(), String> {
        match self {
            Adaptable::Linear(l) => {
                let mut weight = HostTensor::from_tensor(&l.weight);
                module.merge_into(&mut weight, multiplier)?;
                let dev = l.weight.device().clone();
                if let Some(w) = weight.to_tensor_as::<(usize, usize), E, D>(&dev) {
                    l.weight = w;
                }
            }
            Adaptable::Conv(c) => {
                let mut weight = HostTensor::from_tensor(&c.weight);
                module.merge_into(&mut weight, multiplier)?;
                let dev = c.weight.device().clone();
                if let Some(w) = weight.to_tensor_as::<Shape4, E, D>(&dev) {
                    c.weight = w;
                }
            }
        }
        Ok(())
    }

    /// The adapter's `(down, up)` as a [`LoraModule`] holds them (a conv's `up` as `[out, r]`).
    fn adapter_tensors(&self) -> Option<(HostTensor, HostTensor)> {
        match self {
            Adaptable::Linear(l) => (l.lora.as_ref()).map(|a| {
                (
                    HostTensor::from_tensor(&a.down),
                    HostTensor::from_tensor(&a.up),
                )
            }),
            Adaptable::Conv(c) => c.lora.as_ref().map(|a| {
                let up = as_matrix(HostTensor::from_tensor(&a.up));
                (HostTensor::from_tensor(&a.down), up)
            }),
        }
    }

    /// The gradients of the adapter's `(down, up)` in `grads`, shaped as
    /// [`Self::adapter_tensors`].
    fn adapter_grads(&self, grads: &Gradients<E, D>) -> Option<(HostTensor, HostTensor)> {
        match self {
            Adaptable::Linear(l) => l.lora.as_ref().map(|a| {
                let down = HostTensor::from_tensor(&grads.get(&a.down));
                (down, HostTensor::from_tensor(&grads.get(&a.up)))
            }),
            Adaptable::Conv(c) => c.lora.as_ref().map(|a| {
                let down = HostTensor::from_tensor(&grads.get(&a.down));
                (down, as_matrix(HostTensor::from_tensor(&grads.get(&a.up))))
            }),
        }
    }
}

/// `[b0, b1, b2, b3]` with run-time sizes.
type Shape4 = (usize, usize, usize, usize);

/// `[out, r]` → `[out, r, 1, 1]` (a conv adapter's `up` as the model holds it).
fn as_1x1(mut t: HostTensor) -> HostTensor {
    t.shape.extend([1, 1]);
    t
}

/// `[out, r, 1, 1]` → `[out, r]` (as a [`LoraModule`] holds it).
fn as_matrix(mut t: HostTensor) -> HostTensor {
    t.shape.truncate(2);
    t
}

/// A model whose linear and convolution layers LoRA can adapt, walked by module path.
pub trait LoraTarget<D: Device<E>, E: Elem = f32> {
    /// The part of a LoRA network that belongs to this model.
    const COMPONENT: LoraComponent;
    /// What the model is called in messages.
    const NAME: &'static str;
    /// Calls `f` with the module path of every adaptable layer, in module order.
    fn for_each_lora_layer_mut(&mut self, f: &mut dyn FnMut(&str, Adaptable<'_, D, E>));
}

impl<E: Elem, D: Device<E>> LoraTarget<D, E> for UNet<D, E> {
    const COMPONENT: LoraComponent = LoraComponent::Unet;
    const NAME: &'static str = "UNet";
    /// Every linear and convolution layer: the attention projections and feed-forwards (what
    /// LoRA training targets), the transformers' `proj_in`/`proj_out`, the ResNets' and
    /// samplers' convolutions (kohya's LoCon), the time embedding.
    fn for_each_lora_layer_mut(&mut self, f: &mut dyn FnMut(&str, Adaptable<'_, D, E>)) {
        self.visit_layers("", &mut |name, layer| match layer {
            Layer::Linear(l) => f(name, Adaptable::Linear(l)),
            Layer::Conv(c) => f(name, Adaptable::Conv(c)),
            _ => {}
        });
    }
}

impl<D: Device<f32>> LoraTarget<D> for TextEncoder<D> {
    const COMPONENT: LoraComponent = LoraComponent::TextEncoder;
    const NAME: &'static str = "text encoder";
    /// Per layer `text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`, then `.mlp.fc1`,
    /// `.mlp.fc2` (kohya's text-encoder targets: CLIPAttention and CLIPMLP).
    fn for_each_lora_layer_mut(&mut self, f: &mut dyn FnMut(&str, Adaptable<'_, D>)) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let base = format!("text_model.encoder.layers.{i}");
            let a = &mut layer.self_attn;
            for (name, linear) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.out_proj", &mut a.out_proj),
                ("mlp.fc1", &mut layer.fc1),
                ("mlp.fc2", &mut layer.fc2),
            ] {
                f(&format!("{base}.{name}"), Adaptable::Linear(linear));
            }
        }
    }
}

/// What can go wrong installing or training LoRA adapters.
#[derive(Debug, Error)]
pub enum LoraTrainError {
    /// A module of the network is not an adaptable layer of the model.
    #[error(
        "LoRA target `{name}` is not an adaptable layer of this {model}; available: {available}"
    )]
    UnknownTarget {
        /// The model (`UNet`, `text encoder`).
        model: &'static str,
        /// The module path.
        name: String,
        /// The module paths that exist (abridged).
        available: String,
    },
    /// A module's tensors do not fit the layer.
    #[error("LoRA module `{name}`: {reason}")]
    Shape {
        /// The module path.
        name: String,
        /// What does not fit.
        reason: String,
    },
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
    Objective(#[from] crate::train::objective::ObjectiveError),
}

/// The error for a module `name` that is not an adaptable layer of `model`.
fn unknown_target<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    name: &str,
) -> LoraTrainError {
    let available = lora_modules(model);
    let shown: Vec<&str> = available.iter().take(8).map(|(n, _)| n.as_str()).collect();
    LoraTrainError::UnknownTarget {
        model: M::NAME,
        name: name.to_string(),
        available: format!("{} … ({} modules)", shown.join(", "), available.len()),
    }
}

/// Module path and weight shape of every adaptable layer of `model` (see
/// [`LoraTarget::for_each_lora_layer_mut`]), in module order.
pub fn lora_modules<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    model.for_each_lora_layer_mut(&mut |name, layer| {
        out.push((name.to_string(), layer.weight_shape()))
    });
    out
}

/// Installs `model`'s part of `network` (its UNet or text-encoder modules) as adapters
/// (replacing any), scaled by `multiplier · alpha / r`. Every module must name an adaptable
/// layer of `model`.
pub fn install<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    network: &LoraNetwork,
    multiplier: f32,
    dev: &D,
) -> Result<(), LoraTrainError> {
    let mut remaining: BTreeMap<&String, &NetworkModule> =
        network.modules(M::COMPONENT).iter().collect();
    let mut error = None;
    model.for_each_lora_layer_mut(&mut |name, mut layer| {
        let Some(module) = remaining.remove(&name.to_string()) else {
            return;
        };
        if let Err(reason) = layer.install_module(module, multiplier, dev) {
            error.get_or_insert(LoraTrainError::Shape {
                name: name.to_string(),
                reason,
            });
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    match remaining.into_keys().next() {
        Some(name) => Err(unknown_target(model, name)),
        None => Ok(()),
    }
}

/// Adds `multiplier · alpha/r · up·down` of every module of `model`'s part of `network` to the
/// layer's weight (A1111's `<lora:name:multiplier>`, diffusers' `fuse_lora`): inference then
/// costs nothing extra, and several networks simply add up.
pub fn merge_into_unet<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    network: &LoraNetwork,
    multiplier: f32,
) -> Result<(), LoraTrainError> {
    let mut remaining: BTreeMap<&String, &NetworkModule> =
        network.modules(M::COMPONENT).iter().collect();
    let mut error = None;
    model.for_each_lora_layer_mut(&mut |name, mut layer| {
        let Some(module) = remaining.remove(&name.to_string()) else {
            return;
        };
        if let Err(reason) = layer.merge(module, multiplier) {
            error.get_or_insert(LoraTrainError::Shape {
                name: name.to_string(),
                reason,
            });
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    match remaining.into_keys().next() {
        Some(name) => Err(unknown_target(model, name)),
        None => Ok(()),
    }
}

/// Removes every adapter.
pub fn uninstall<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(model: &mut M) {
    model.for_each_lora_layer_mut(&mut |_, mut layer| layer.remove_adapter());
}

/// Sets the dropout of every installed adapter: probability `p` on the adapter's input
/// (PEFT's `lora_dropout`), the mask of each module drawn from `seed` and its path (so a
/// micro-batch's masks are reproducible). Dropout only acts under a tape (training), and on
/// linear layers' adapters only.
pub fn set_dropout<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(model: &mut M, p: f32, seed: u64) {
    model.for_each_lora_layer_mut(&mut |name, layer| {
        if let Adaptable::Linear(Linear { lora: Some(l), .. }) = layer {
            let h = blake3::hash(name.as_bytes());
            let salt = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default());
            l.dropout = p;
            l.dropout_seed = seed ^ salt;
        }
    });
}

/// The installed adapters as `model`'s part of a network (alpha given, `multiplier` = 1).
pub fn extract<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    alpha: f32,
) -> LoraNetwork {
    let mut network = LoraNetwork::default();
    model.for_each_lora_layer_mut(&mut |name, layer| {
        if let Some((down, up)) = layer.adapter_tensors() {
            let module = LoraModule { down, up, alpha };
            network
                .modules_mut(M::COMPONENT)
                .insert(name.to_string(), module.into());
        }
    });
    network
}

/// One optimisation step of the [`objective`] on the installed adapters:
/// `loss = mse(unet(add_noise(latents, noise, t), t, context), target)`, backward, then the optimiser on every adapter (parameter names `<module>.lora_A.weight` /
/// `.lora_B.weight`, as PEFT calls them). Returns the loss before the update.
#[allow(clippy::too_many_arguments)]
pub fn train_step<D: Device<f32>>(
    unet: &mut UNet<D>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    context: &Tensor3<D>,
    optimizer: &mut impl ParamOptimizer<D>,
    lr: f64,
) -> Result<f32, LoraTrainError> {
    let (loss, grads) = loss_and_grads(unet, ddpm, latents, noise, timesteps, context)?;
    let grads = adapter_grads(unet, &grads);
    apply_grads(unet, &grads, optimizer, lr)?;
    Ok(loss)
}

/// Pass `pass` of the optimiser's step for `param` with `grad` (host values of the same shape).
fn update<S: Shape, D: Device<f32>>(
    optimizer: &mut impl ParamOptimizer<D>,
    pass: Pass,
    key: &str,
    param: &mut Tensor<S, f32, D>,
    grad: &HostTensor,
    lr: f64,
) -> Result<(), LoraTrainError> {
    let dev = param.device().clone();
    let shape = *param.shape();
    let grad = (HostTensor::new(grad.shape.clone(), grad.data.clone()))
        .filter(|g| g.shape == shape.concrete().into_iter().collect::<Vec<_>>())
        .map(|g| dev.tensor_from_vec(g.data, shape))
        .ok_or_else(|| LoraTrainError::Shape {
            name: key.to_string(),
            reason: format!(
                "gradient of shape {:?} for {:?}",
                grad.shape,
                shape.concrete()
            ),
        })?;
    Ok(optimizer.apply(pass, key, param, &grad, lr)?)
}

/// One optimiser step of every adapter with `grads` (by PEFT parameter name, as
/// [`adapter_grads`] gives them; summed or clipped by the caller as needed).
pub fn apply_grads<D: Device<f32>, M: LoraTarget<D>>(
    model: &mut M,
    grads: &BTreeMap<String, HostTensor>,
    optimizer: &mut impl ParamOptimizer<D>,
    lr: f64,
) -> Result<(), LoraTrainError> {
    for &pass in optimizer.passes() {
        apply_pass(model, grads, optimizer, lr, pass)?;
    }
    Ok(())
}

/// One pass of [`apply_grads`].
fn apply_pass<D: Device<f32>, M: LoraTarget<D>>(
    model: &mut M,
    grads: &BTreeMap<String, HostTensor>,
    optimizer: &mut impl ParamOptimizer<D>,
    lr: f64,
    pass: Pass,
) -> Result<(), LoraTrainError> {
    let mut error = None;
    model.for_each_lora_layer_mut(&mut |name, layer| {
        if error.is_some() {
            return;
        }
        let grad = |suffix: &str| {
            let key = format!("{name}.{suffix}");
            match grads.get(&key) {
                Some(g) => Ok((key, g.clone())),
                None => Err(LoraTrainError::Shape {
                    name: key,
                    reason: "no gradient".into(),
                }),
            }
        };
        let result = match layer {
            Adaptable::Linear(Linear { lora: Some(l), .. }) => {
                [("lora_A.weight", &mut l.down), ("lora_B.weight", &mut l.up)]
                    .into_iter()
                    .try_for_each(|(suffix, param)| {
                        let (key, g) = grad(suffix)?;
                        update(optimizer, pass, &key, param, &g, lr)
                    })
            }
            Adaptable::Conv(Conv2d { lora: Some(c), .. }) => grad("lora_A.weight")
                .and_then(|(key, g)| update(optimizer, pass, &key, &mut c.down, &g, lr))
                .and_then(|()| {
                    let (key, g) = grad("lora_B.weight")?;
                    update(optimizer, pass, &key, &mut c.up, &as_1x1(g), lr)
                }),
            _ => Ok(()),
        };
        if let Err(e) = result {
            error = Some(e);
        }
    });
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// [`loss_and_grads`] with a context that carries its own tape (text-encoder adapters that
/// train): the gradients reach whatever produced `context`.
pub fn loss_and_grads_taped<D: Device<f32>>(
    unet: &UNet<D>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    context: Tensor3<D, OwnedTape<f32, D>>,
) -> Result<(f32, Gradients<f32, D>), LoraTrainError> {
    Ok(objective::loss_and_grads(
        unet, ddpm, latents, noise, timesteps, context, 1.0,
    )?)
}

/// The loss and the gradients of one batch (no update), [`objective::loss_and_grads`] in f32.
pub fn loss_and_grads<D: Device<f32>>(
    unet: &UNet<D>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    context: &Tensor3<D>,
) -> Result<(f32, Gradients<f32, D>), LoraTrainError> {
    loss_and_grads_taped(unet, ddpm, latents, noise, timesteps, context.retaped())
}

/// The name suffix of a layer's `ΔW` gradient in [`adapter_grads`]' map.
pub const DELTA_GRAD: &str = "delta_weight";

/// The gradients of every adapter, by PEFT parameter name, and of every full-size update
/// `ΔW` (LoHa, LoKr, DoRA) as `<module>.delta_weight` ([`DELTA_GRAD`]; see
/// [`factor_grads_of`] for its factors').
pub fn adapter_grads<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    grads: &Gradients<E, D>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    model.for_each_lora_layer_mut(&mut |name, layer| {
        if let Some((down, up)) = layer.adapter_grads(grads) {
            out.insert(format!("{name}.lora_A.weight"), down);
            out.insert(format!("{name}.lora_B.weight"), up);
        }
        if let Some(g) = layer.delta_grad(grads) {
            out.insert(format!("{name}.{DELTA_GRAD}"), g);
        }
    });
    out
}

/// Replaces every `<module>.delta_weight` gradient in `grads` (the UNet's and the text
/// encoder's) by the gradients of that module's factors ([`super::lycoris::factor_grads`]), the
/// module taken from `network` (its current values) and its frozen weight from `weights`
/// (module path → weight).
pub fn factor_grads_of(
    grads: &mut BTreeMap<String, HostTensor>,
    network: &LoraNetwork,
    weights: &BTreeMap<String, HostTensor>,
) -> Result<(), LoraTrainError> {
    let keys: Vec<String> = (grads.keys())
        .filter(|k| k.ends_with(DELTA_GRAD))
        .cloned()
        .collect();
    for key in keys {
        let Some(g) = grads.remove(&key) else {
            continue;
        };
        let name = key.trim_end_matches(DELTA_GRAD).trim_end_matches('.');
        let shape_error = |reason: String| LoraTrainError::Shape {
            name: name.to_string(),
            reason,
        };
        let module = (network.unet.get(name)).or_else(|| network.text_encoder.get(name));
        let (Some(module), Some(weight)) = (module, weights.get(name)) else {
            return Err(shape_error("no module for its ΔW gradient".into()));
        };
        for (suffix, grad) in
            super::lycoris::factor_grads(module, weight, &g).map_err(shape_error)?
        {
            grads.insert(format!("{name}.{suffix}"), grad);
        }
    }
    Ok(())
}

/// Rebuilds the full-size update `ΔW` of every LoHa, LoKr and DoRA module of `modules` on its
/// layer of `model` (after the optimiser changed their factors); `weights` holds each one's
/// frozen weight.
pub fn refresh_deltas<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    modules: &BTreeMap<String, NetworkModule>,
    weights: &BTreeMap<String, HostTensor>,
    dev: &D,
) -> Result<(), LoraTrainError> {
    let mut error = None;
    model.for_each_lora_layer_mut(&mut |name, mut layer| {
        let (Some(module), Some(weight)) = (modules.get(name), weights.get(name)) else {
            return;
        };
        if module.as_lora().is_some() || error.is_some() {
            return;
        }
        let result = module
            .delta_for(weight, 1.0)
            .and_then(|d| layer.set_delta(&d, dev));
        if let Err(reason) = result {
            error = Some(LoraTrainError::Shape {
                name: name.to_string(),
                reason,
            });
        }
    });
    error.map_or(Ok(()), Err)
}

/// The frozen weight of every layer of `model` that a non-LoRA module of `modules` adapts.
pub fn delta_weights<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    modules: &BTreeMap<String, NetworkModule>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    model.for_each_lora_layer_mut(&mut |name, layer| {
        if modules.get(name).is_some_and(|m| m.as_lora().is_none()) {
            out.insert(name.to_string(), layer.weight_host());
        }
    });
    out
}
