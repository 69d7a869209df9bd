//! Walking a model's parameterised layers by their diffusers names: the basis of full
//! fine-tuning (mark every layer trainable, collect every gradient, update every tensor) and
//! of writing a trained model back out under the names it was loaded from.
//!
//! Every parameter of the UNet lives in one of four layer types ([`Layer`]); a layer named
//! `down_blocks.0.resnets.0.conv1` holds `down_blocks.0.resnets.0.conv1.weight` and `.bias`.

use std::collections::BTreeMap;

use dfdx::prelude::*;

use crate::diffusion::nn::elem::Elem;

use super::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::diffusion::host_tensor::HostTensor;

/// A parameterised layer, borrowed mutably.
pub enum Layer<'a, D: Storage<E>, E = f32> {
    /// A fully connected layer (`weight [out, in]`, optional `bias`).
    Linear(&'a mut Linear<D, E>),
    /// A convolution (`weight [out, in, kh, kw]`, optional `bias`).
    Conv(&'a mut Conv2d<D, E>),
    /// A group norm (`weight`, `bias`).
    GroupNorm(&'a mut GroupNorm<D, E>),
    /// A layer norm (`weight`, `bias`).
    LayerNorm(&'a mut LayerNorm<D, E>),
    /// An embedding table (`weight [rows, d]`); whether it trains is its model's setting.
    Embedding(&'a mut Tensor<(usize, usize), E, D>),
}

impl<E: Elem, D: Device<E>> Layer<'_, D, E> {
    /// Marks the layer's parameters as trained (gradients under a tape) or frozen.
    pub fn set_trainable(&mut self, on: bool) {
        match self {
            Layer::Linear(l) => l.trainable = on,
            Layer::Conv(l) => l.trainable = on,
            Layer::GroupNorm(l) => l.trainable = on,
            Layer::LayerNorm(l) => l.trainable = on,
            Layer::Embedding(_) => {}
        }
    }

    /// The parameters as `(suffix, tensor)` on the host: `weight` then `bias`.
    pub fn to_host(&self) -> Vec<(&'static str, HostTensor)> {
        match self {
            Layer::Linear(l) => weight_bias(&l.weight, l.bias.as_ref()),
            Layer::Conv(l) => weight_bias(&l.weight, l.bias.as_ref()),
            Layer::GroupNorm(l) => weight_bias(&l.weight, Some(&l.bias)),
            Layer::LayerNorm(l) => weight_bias(&l.weight, Some(&l.bias)),
            Layer::Embedding(w) => weight_bias(&**w, None),
        }
    }

    /// The gradients of the parameters as `(suffix, gradient)`, after a backward pass through
    /// the layer while it was trainable (dfdx panics on a parameter the pass did not reach).
    pub fn grads(&self, grads: &Gradients<E, D>) -> Vec<(&'static str, HostTensor)> {
        let mut out = Vec::new();
        let mut push = |suffix: &'static str, g: Option<HostTensor>| {
            if let Some(g) = g {
                out.push((suffix, g));
            }
        };
        match self {
            Layer::Linear(l) => {
                push("weight", grad_of(grads, &l.weight));
                push("bias", l.bias.as_ref().and_then(|b| grad_of(grads, b)));
            }
            Layer::Conv(l) => {
                push("weight", grad_of(grads, &l.weight));
                push("bias", l.bias.as_ref().and_then(|b| grad_of(grads, b)));
            }
            Layer::GroupNorm(l) => {
                push("weight", grad_of(grads, &l.weight));
                push("bias", grad_of(grads, &l.bias));
            }
            Layer::LayerNorm(l) => {
                push("weight", grad_of(grads, &l.weight));
                push("bias", grad_of(grads, &l.bias));
            }
            Layer::Embedding(w) => push("weight", grad_of(grads, &**w)),
        }
        out
    }

    /// Calls `f(suffix, tensor)` for each parameter, mutably (`f` returns an error to stop).
    pub fn try_for_each_param<Er>(
        &mut self,
        mut f: impl FnMut(&'static str, ParamMut<'_, D, E>) -> Result<(), Er>,
    ) -> Result<(), Er> {
        match self {
            Layer::Linear(l) => {
                f("weight", ParamMut::T2(&mut l.weight))?;
                if let Some(b) = &mut l.bias {
                    f("bias", ParamMut::T1(b))?;
                }
            }
            Layer::Conv(l) => {
                f("weight", ParamMut::T4(&mut l.weight))?;
                if let Some(b) = &mut l.bias {
                    f("bias", ParamMut::T1(b))?;
                }
            }
            Layer::GroupNorm(l) => {
                f("weight", ParamMut::T1(&mut l.weight))?;
                f("bias", ParamMut::T1(&mut l.bias))?;
            }
            Layer::LayerNorm(l) => {
                f("weight", ParamMut::T1(&mut l.weight))?;
                f("bias", ParamMut::T1(&mut l.bias))?;
            }
            Layer::Embedding(w) => f("weight", ParamMut::T2(w))?,
        }
        Ok(())
    }
}

/// One parameter tensor, borrowed mutably, by rank.
pub enum ParamMut<'a, D: Storage<E>, E = f32> {
    /// `[n]`
    T1(&'a mut Tensor<(usize,), E, D>),
    /// `[out, in]`
    T2(&'a mut Tensor<(usize, usize), E, D>),
    /// `[out, in, kh, kw]`
    T4(&'a mut Tensor<(usize, usize, usize, usize), E, D>),
}

fn weight_bias<S: Shape, E: Elem, D: Device<E>>(
    w: &Tensor<S, E, D>,
    b: Option<&Tensor<(usize,), E, D>>,
) -> Vec<(&'static str, HostTensor)> {
    let mut out = vec![("weight", HostTensor::from_tensor(w))];
    if let Some(b) = b {
        out.push(("bias", HostTensor::from_tensor(b)));
    }
    out
}

/// The gradient of `t`. Every trainable layer takes part in the forward pass, so its
/// parameters have gradient entries once the backward pass ran.
fn grad_of<S: Shape, E: Elem, D: Device<E>>(
    grads: &Gradients<E, D>,
    t: &Tensor<S, E, D>,
) -> Option<HostTensor> {
    Some(HostTensor::from_tensor(&grads.get(t)))
}

/// A model whose parameterised layers can be walked by diffusers name.
pub trait Layers<D: Device<E>, E: Elem = f32> {
    /// Calls `f(name, layer)` for every parameterised layer under `prefix` (empty for the
    /// model's root), in a fixed order.
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>));

    /// Marks every parameter trainable (or frozen again).
    fn set_trainable(&mut self, on: bool) {
        self.visit_layers("", &mut |_, mut layer| layer.set_trainable(on));
    }
}

/// `prefix.name`, or `name` at the root.
pub(crate) fn join(prefix: &str, name: impl std::fmt::Display) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Marks every parameter of `model` trainable (or frozen again).
pub fn set_trainable<E: Elem, D: Device<E>>(model: &mut impl Layers<D, E>, on: bool) {
    model.set_trainable(on);
}

/// Every parameter of `model` on the host, by full name (`conv_in.weight`, …).
pub fn named_tensors<E: Elem, D: Device<E>>(
    model: &mut impl Layers<D, E>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    model.visit_layers("", &mut |name, layer| {
        for (suffix, t) in layer.to_host() {
            out.insert(format!("{name}.{suffix}"), t);
        }
    });
    out
}

/// The gradients of every parameter of `model` the backward pass reached, by full name.
pub fn named_grads<E: Elem, D: Device<E>>(
    model: &mut impl Layers<D, E>,
    grads: &Gradients<E, D>,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    model.visit_layers("", &mut |name, layer| {
        for (suffix, g) in layer.grads(grads) {
            out.insert(format!("{name}.{suffix}"), g);
        }
    });
    out
}

/// Calls `f(name, param)` for every parameter of `model`, named `layer.suffix`, mutably; stops
/// at (and returns) the first error.
pub fn try_for_each_named_param<E: Elem, D: Device<E>, Er>(
    model: &mut impl Layers<D, E>,
    mut f: impl FnMut(&str, ParamMut<'_, D, E>) -> Result<(), Er>,
) -> Result<(), Er> {
    let mut result = Ok(());
    model.visit_layers("", &mut |name, mut layer| {
        if result.is_ok() {
            result =
                layer.try_for_each_param(|suffix, param| f(&format!("{name}.{suffix}"), param));
        }
    });
    result
}

/// Copies every parameter of `src` (f32) into the same-named parameter of `dst`, converted to
/// `dst`'s element type: mixed-precision full fine-tuning refreshes its f16 working model from
/// the f32 masters this way. Both must be the same architecture (an error names the first
/// parameter that differs).
pub fn copy_params<E: Elem, D: Device<f32> + Device<E>>(
    src: &mut impl Layers<D>,
    dst: &mut impl Layers<D, E>,
) -> Result<(), String> {
    let mut flat: BTreeMap<String, Tensor<(usize,), f32, D>> = BTreeMap::new();
    try_for_each_named_param(src, |name, p| {
        let t = match p {
            ParamMut::T1(t) => t.clone(),
            ParamMut::T2(t) => {
                let n = t.shape().num_elements();
                t.clone().reshape_like(&(n,))
            }
            ParamMut::T4(t) => {
                let n = t.shape().num_elements();
                t.clone().reshape_like(&(n,))
            }
        };
        flat.insert(name.to_string(), t);
        Ok::<(), String>(())
    })?;
    try_for_each_named_param(dst, |name, p| {
        let f = flat
            .remove(name)
            .ok_or_else(|| format!("the source has no parameter `{name}`"))?;
        let n = f.shape().0;
        let mismatch = |m: usize| format!("`{name}` has {n} values in the source, {m} here");
        match p {
            ParamMut::T1(t) => {
                let shape = *t.shape();
                if shape.num_elements() != n {
                    return Err(mismatch(shape.num_elements()));
                }
                *t = f.to_dtype::<E>();
            }
            ParamMut::T2(t) => {
                let shape = *t.shape();
                if shape.num_elements() != n {
                    return Err(mismatch(shape.num_elements()));
                }
                *t = f.reshape_like(&shape).to_dtype::<E>();
            }
            ParamMut::T4(t) => {
                let shape = *t.shape();
                if shape.num_elements() != n {
                    return Err(mismatch(shape.num_elements()));
                }
                *t = f.reshape_like(&shape).to_dtype::<E>();
            }
        }
        Ok(())
    })
}

/// Total number of parameters of `model`.
pub fn count_params<E: Elem, D: Device<E>>(model: &mut impl Layers<D, E>) -> usize {
    let mut n = 0;
    model.visit_layers("", &mut |_, mut layer| {
        let _ = layer.try_for_each_param(|_, p| {
            n += match p {
                ParamMut::T1(t) => t.shape().num_elements(),
                ParamMut::T2(t) => t.shape().num_elements(),
                ParamMut::T4(t) => t.shape().num_elements(),
            };
            Ok::<(), ()>(())
        });
    });
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::Checkpoint;

    /// The walk names every stored tensor of the tiny fixture model, and nothing else.
    #[test]
    fn walked_names_are_the_stored_names() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
        let ckpt = Checkpoint::open(dir).unwrap();
        let dev = Cpu::default();
        let mut unet = ckpt.load_unet(&dev).unwrap();
        let mut te = ckpt.load_text_encoder(&dev).unwrap();
        let walked: Vec<String> = named_tensors(&mut unet).into_keys().collect();
        let mut stored: Vec<String> = ckpt.unet_weights().names().map(String::from).collect();
        stored.sort();
        assert_eq!(walked, stored);
        let walked: Vec<String> = named_tensors(&mut te).into_keys().collect();
        let mut stored: Vec<String> = ckpt
            .text_encoder_weights()
            .names()
            .filter(|n| !n.ends_with("position_ids"))
            .map(String::from)
            .collect();
        stored.sort();
        assert_eq!(walked, stored);
        let mut vae = ckpt.load_vae(&dev).unwrap();
        let walked: Vec<String> = named_tensors(&mut vae).into_keys().collect();
        let mut stored: Vec<String> = ckpt.vae_weights().names().map(String::from).collect();
        stored.sort();
        assert_eq!(walked, stored);
        assert_eq!(
            count_params(&mut unet),
            named_tensors(&mut unet)
                .values()
                .map(|t| t.numel())
                .sum::<usize>()
        );
    }
}
