//! LoRA on the UNet's attention projections and the text encoder's linear layers: installing
//! adapters from a [`LoraNetwork`], one training step of the epsilon objective, and reading
//! the trained adapters back. Every function works on any [`LoraTarget`] (the UNet or the text
//! encoder), on that model's part of the network.

use std::collections::BTreeMap;

use dfdx::prelude::*;

use crate::diffusion::nn::elem::Elem;
use thiserror::Error;

use super::objective;
use super::optim::{AdamW, OptimError};
use crate::diffusion::nn::{Linear, LoraAdapter, Tensor3, Tensor4};
use crate::diffusion::schedulers::Ddpm;
use crate::diffusion::{TextEncoder, UNet};
use crate::formats::HostTensor;
use crate::formats::lora::{LoraComponent, LoraModule, LoraNetwork};

/// A model whose linear layers LoRA can adapt, walked by module path.
pub trait LoraTarget<D: Device<E>, E: Elem = f32> {
    /// The part of a LoRA network that belongs to this model.
    const COMPONENT: LoraComponent;
    /// What the model is called in messages.
    const NAME: &'static str;
    /// Calls `f` with the module path and the layer of every adaptable linear layer.
    fn for_each_lora_linear_mut(&mut self, f: &mut dyn FnMut(&str, &mut Linear<D, E>));
}

impl<E: Elem, D: Device<E>> LoraTarget<D, E> for UNet<D, E> {
    const COMPONENT: LoraComponent = LoraComponent::Unet;
    const NAME: &'static str = "UNet";
    /// The attention projections (`…attn1.to_q`, `to_k`, `to_v`, `to_out.0`, then `attn2`).
    fn for_each_lora_linear_mut(&mut self, f: &mut dyn FnMut(&str, &mut Linear<D, E>)) {
        self.for_each_attention_linear_mut(|name, linear| f(name, linear));
    }
}

impl<D: Device<f32>> LoraTarget<D> for TextEncoder<D> {
    const COMPONENT: LoraComponent = LoraComponent::TextEncoder;
    const NAME: &'static str = "text encoder";
    /// Per layer `text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`, then `.mlp.fc1`,
    /// `.mlp.fc2` (kohya's text-encoder targets: CLIPAttention and CLIPMLP).
    fn for_each_lora_linear_mut(&mut self, f: &mut dyn FnMut(&str, &mut Linear<D>)) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let base = format!("text_model.encoder.layers.{i}");
            let a = &mut layer.self_attn;
            f(&format!("{base}.self_attn.q_proj"), &mut a.q_proj);
            f(&format!("{base}.self_attn.k_proj"), &mut a.k_proj);
            f(&format!("{base}.self_attn.v_proj"), &mut a.v_proj);
            f(&format!("{base}.self_attn.out_proj"), &mut a.out_proj);
            f(&format!("{base}.mlp.fc1"), &mut layer.fc1);
            f(&format!("{base}.mlp.fc2"), &mut layer.fc2);
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
    let available = attention_targets(model);
    let shown: Vec<&str> = available.iter().take(8).map(String::as_str).collect();
    LoraTrainError::UnknownTarget {
        model: M::NAME,
        name: name.to_string(),
        available: format!("{} … ({} modules)", shown.join(", "), available.len()),
    }
}

/// Module paths of every adaptable layer of `model` (the UNet's attention projections, the
/// text encoder's attention and MLP layers).
pub fn attention_targets<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(model: &mut M) -> Vec<String> {
    let mut names = Vec::new();
    model.for_each_lora_linear_mut(&mut |name, _| names.push(name.to_string()));
    names
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
    let mut remaining: BTreeMap<&String, &LoraModule> =
        network.modules(M::COMPONENT).iter().collect();
    let mut error = None;
    model.for_each_lora_linear_mut(&mut |name, linear| {
        let Some(module) = remaining.remove(&name.to_string()) else {
            return;
        };
        let (out, inp) = *linear.weight.shape();
        let down = module.down.to_tensor_as::<(usize, usize), E, D>(dev);
        let up = module.up.to_tensor_as::<(usize, usize), E, D>(dev);
        match (down, up) {
            (Some(down), Some(up))
                if down.shape().1 == inp
                    && up.shape().0 == out
                    && up.shape().1 == down.shape().0 =>
            {
                linear.lora = Some(LoraAdapter {
                    down,
                    up,
                    scale: multiplier * module.scale(),
                    dropout: 0.0,
                    dropout_seed: 0,
                });
            }
            _ => {
                error.get_or_insert(LoraTrainError::Shape {
                    name: name.to_string(),
                    reason: format!(
                        "down {:?} / up {:?} do not fit a [{out}, {inp}] linear layer",
                        module.down.shape, module.up.shape
                    ),
                });
            }
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
    let mut remaining: BTreeMap<&String, &LoraModule> =
        network.modules(M::COMPONENT).iter().collect();
    let mut error = None;
    model.for_each_lora_linear_mut(&mut |name, linear| {
        let Some(module) = remaining.remove(&name.to_string()) else {
            return;
        };
        let mut weight = HostTensor::from_tensor(&linear.weight);
        match module.merge_into(&mut weight, multiplier) {
            Ok(()) => {
                let dev = linear.weight.device().clone();
                if let Some(w) = weight.to_tensor_as::<(usize, usize), E, D>(&dev) {
                    linear.weight = w;
                }
            }
            Err(reason) => {
                error.get_or_insert(LoraTrainError::Shape {
                    name: name.to_string(),
                    reason,
                });
            }
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
    model.for_each_lora_linear_mut(&mut |_, linear| linear.lora = None);
}

/// Sets the dropout of every installed adapter: probability `p` on the adapter's input
/// (PEFT's `lora_dropout`), the mask of each module drawn from `seed` and its path (so a
/// micro-batch's masks are reproducible). Dropout only acts under a tape (training).
pub fn set_dropout<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(model: &mut M, p: f32, seed: u64) {
    model.for_each_lora_linear_mut(&mut |name, linear| {
        if let Some(l) = &mut linear.lora {
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
    model.for_each_lora_linear_mut(&mut |name, linear| {
        if let Some(l) = &linear.lora {
            network.modules_mut(M::COMPONENT).insert(
                name.to_string(),
                LoraModule {
                    down: HostTensor::from_tensor(&l.down),
                    up: HostTensor::from_tensor(&l.up),
                    alpha,
                },
            );
        }
    });
    network
}

/// One optimisation step of the [`objective`] on the installed adapters:
/// `loss = mse(unet(add_noise(latents, noise, t), t, context), target)`, backward, then AdamW on every adapter (parameter names `<module>.lora_A.weight` /
/// `.lora_B.weight`, as PEFT calls them). Returns the loss before the update.
#[allow(clippy::too_many_arguments)]
pub fn train_step<D: Device<f32>>(
    unet: &mut UNet<D>,
    ddpm: &Ddpm,
    latents: &Tensor4<D>,
    noise: &Tensor4<D>,
    timesteps: &[usize],
    context: &Tensor3<D>,
    optimizer: &mut AdamW<D>,
    lr: f64,
) -> Result<f32, LoraTrainError> {
    let (loss, grads) = loss_and_grads(unet, ddpm, latents, noise, timesteps, context)?;
    let grads = adapter_grads(unet, &grads);
    apply_grads(unet, &grads, optimizer, lr)?;
    Ok(loss)
}

/// One AdamW update of every adapter with `grads` (by PEFT parameter name, as
/// [`adapter_grads`] gives them; summed or clipped by the caller as needed).
pub fn apply_grads<D: Device<f32>, M: LoraTarget<D>>(
    model: &mut M,
    grads: &BTreeMap<String, HostTensor>,
    optimizer: &mut AdamW<D>,
    lr: f64,
) -> Result<(), LoraTrainError> {
    let mut error = None;
    model.for_each_lora_linear_mut(&mut |name, linear| {
        if error.is_some() {
            return;
        }
        let Some(l) = &mut linear.lora else { return };
        let dev = l.down.device().clone();
        for (suffix, param) in [("lora_A.weight", &mut l.down), ("lora_B.weight", &mut l.up)] {
            let key = format!("{name}.{suffix}");
            let Some(grad) = grads
                .get(&key)
                .and_then(|g| g.to_tensor::<(usize, usize), D>(&dev))
            else {
                error = Some(LoraTrainError::Shape {
                    name: key,
                    reason: "no gradient".into(),
                });
                return;
            };
            if let Err(e) = optimizer.update(&key, param, &grad, lr) {
                error = Some(e.into());
                return;
            }
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

/// The gradients of every adapter, by PEFT parameter name.
pub fn adapter_grads<E: Elem, D: Device<E>, M: LoraTarget<D, E>>(
    model: &mut M,
    grads: &Gradients<E, D>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    model.for_each_lora_linear_mut(&mut |name, linear| {
        if let Some(l) = &linear.lora {
            out.insert(
                format!("{name}.lora_A.weight"),
                HostTensor::from_tensor(&grads.get(&l.down)),
            );
            out.insert(
                format!("{name}.lora_B.weight"),
                HostTensor::from_tensor(&grads.get(&l.up)),
            );
        }
    });
    out
}
