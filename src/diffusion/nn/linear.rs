//! Fully connected layer.

use dfdx::prelude::*;

use super::host::{self, is_cpu};
use super::{Tensor1, Tensor2, Tensor3};
use crate::diffusion::error::Result;
use crate::diffusion::weights::Loader;

/// `y = x Wᵀ + b` with `W: [out, in]` (PyTorch layout) and an optional bias `[out]`, plus an
/// optional LoRA branch `scale · (x downᵀ) upᵀ` (the weights stay untouched).
#[derive(Debug, Clone)]
pub struct Linear<D: Storage<f32>> {
    /// `[out, in]`
    pub weight: Tensor2<D>,
    /// `[out]`
    pub bias: Option<Tensor1<D>>,
    /// A low-rank adapter added to the output (training, or unmerged inference).
    pub lora: Option<LoraAdapter<D>>,
}

/// A LoRA pair on a [`Linear`]: `down: [r, in]` (kohya's `lora_down`, PEFT's `lora_A`),
/// `up: [out, r]` (`lora_up`, `lora_B`) and the factor `multiplier · alpha / r`.
///
/// The tensors carry no tape; [`Linear::forward2`] attaches the activation's tape to them, so a
/// backward pass yields their gradients under their own ids (`grads.get(&adapter.down)`).
#[derive(Debug, Clone)]
pub struct LoraAdapter<D: Storage<f32>> {
    /// `[r, in]`
    pub down: Tensor2<D>,
    /// `[out, r]`
    pub up: Tensor2<D>,
    /// `multiplier · alpha / r`.
    pub scale: f32,
}

impl<D: Device<f32>> Linear<D> {
    /// Loads `weight` (and `bias` when `bias` is true) under the loader's prefix.
    pub fn load(l: &Loader<D>, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: l.tensor2("weight", (out_dim, in_dim))?,
            bias: if bias {
                Some(l.tensor1("bias", out_dim)?)
            } else {
                None
            },
            lora: None,
        })
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.shape().1
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.shape().0
    }

    /// `[m, in] -> [m, out]`
    pub fn forward2<T: Tape<f32, D>>(&self, x: Tensor2<D, T>) -> Tensor2<D, T> {
        let m = x.shape().0;
        let out = self.out_features();
        let lora_input = self.lora.as_ref().map(|_| x.retaped::<T>());
        let y = if is_cpu::<D>() {
            // Fused kernel; its backward computes the input's gradient only (frozen weights).
            let bias = self.bias.as_ref().map(host::host_vec);
            host::linear(x, host::host_vec(&self.weight), bias, out)
        } else {
            // [m, in] x [in, out] -> [m, out]
            let y = x.matmul(self.weight.clone().permute::<_, Axes2<1, 0>>());
            match &self.bias {
                Some(b) => y + b.clone().broadcast_like::<_, Axis<0>>(&(m, out)),
                None => y,
            }
        };
        // The LoRA branch runs on dfdx ops, so its tensors get gradients.
        match (&self.lora, lora_input) {
            (Some(lora), Some(x)) => {
                // [m, in] x [in, r] -> [m, r]; x [r, out] -> [m, out]
                let down = lora.down.retaped::<T>().permute::<_, Axes2<1, 0>>();
                let up = lora.up.retaped::<T>().permute::<_, Axes2<1, 0>>();
                y + x.matmul(down).matmul(up) * lora.scale
            }
            _ => y,
        }
    }

    /// `[b, n, in] -> [b, n, out]`
    pub fn forward<T: Tape<f32, D>>(&self, x: Tensor3<D, T>) -> Tensor3<D, T> {
        let (b, n, i) = *x.shape();
        let y = self.forward2(x.reshape_like(&(b * n, i)));
        y.reshape_like(&(b, n, self.out_features()))
    }
}
