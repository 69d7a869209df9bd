//! Fully connected layer.

use dfdx::prelude::*;

use super::elem::{Elem, elems, lit};
use super::host;
use super::weights::Loader;
use super::{Tensor1, Tensor2, Tensor3};
use crate::diffusion::error::Result;

/// `y = x Wᵀ + b` with `W: [out, in]` (PyTorch layout) and an optional bias `[out]`, plus an
/// optional LoRA branch `scale · (x downᵀ) upᵀ` (the weights stay untouched).
#[derive(Debug, Clone)]
pub struct Linear<D: Storage<E>, E = f32> {
    /// `[out, in]`
    pub weight: Tensor2<D, NoneTape, E>,
    /// `[out]`
    pub bias: Option<Tensor1<D, NoneTape, E>>,
    /// A low-rank adapter added to the output (training, or unmerged inference).
    pub lora: Option<LoraAdapter<D, E>>,
    /// A full-size update `ΔW` (`[out, in]`) added to the output as `x ΔWᵀ`: how LoHa, LoKr
    /// and DoRA modules act (their trainer rebuilds it from the factors each step and reads its
    /// gradient under its id).
    pub delta: Option<Tensor2<D, NoneTape, E>>,
    /// Whether the weight and bias get gradients under a tape (full fine-tuning).
    pub trainable: bool,
}

/// A LoRA pair on a [`Linear`]: `down: [r, in]` (kohya's `lora_down`, PEFT's `lora_A`),
/// `up: [out, r]` (`lora_up`, `lora_B`) and the factor `multiplier · alpha / r`.
///
/// The tensors carry no tape; [`Linear::forward2`] attaches the activation's tape to them, so a
/// backward pass yields their gradients under their own ids (`grads.get(&adapter.down)`).
#[derive(Debug, Clone)]
pub struct LoraAdapter<D: Storage<E>, E = f32> {
    /// `[r, in]`
    pub down: Tensor2<D, NoneTape, E>,
    /// `[out, r]`
    pub up: Tensor2<D, NoneTape, E>,
    /// `multiplier · alpha / r`.
    pub scale: f32,
    /// Dropout probability on the adapter's input (PEFT's `lora_dropout`); only under a tape.
    pub dropout: f32,
    /// Seed of the dropout mask (set per micro-batch by the trainer, so masks reproduce).
    pub dropout_seed: u64,
}

impl<E: Elem, D: Device<E>> Linear<D, E> {
    /// Loads `weight` (and `bias` when `bias` is true) under the loader's prefix.
    pub fn load(l: &Loader<D, E>, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: l.tensor2("weight", (out_dim, in_dim))?,
            bias: if bias {
                Some(l.tensor1("bias", out_dim)?)
            } else {
                None
            },
            lora: None,
            delta: None,
            trainable: false,
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
    pub fn forward2<T: Tape<E, D>>(&self, x: Tensor2<D, T, E>) -> Tensor2<D, T, E> {
        let lora_input = self.lora.as_ref().map(|_| x.retaped::<T>());
        let delta_input = self.delta.as_ref().map(|_| x.retaped::<T>());
        let train = self.trainable && T::OWNS_TAPE;
        let y = match E::fused_linear(self, x, train) {
            Ok(y) => y,
            Err(x) => self.forward_generic(x, train),
        };
        // [m, in] x [in, out] -> [m, out], ΔW on the tape
        let y = match (&self.delta, delta_input) {
            (Some(d), Some(x)) => y + x.matmul(d.retaped::<T>().permute::<_, Axes2<1, 0>>()),
            _ => y,
        };
        // The LoRA branch runs on dfdx ops, so its tensors get gradients.
        match (&self.lora, lora_input) {
            (Some(lora), Some(x)) => {
                let x = if lora.dropout > 0.0 && T::OWNS_TAPE {
                    // inverted dropout: kept inputs scaled by 1 / (1 - p)
                    let (rows, cols) = *x.shape();
                    let mask = dropout_mask(rows * cols, lora.dropout, lora.dropout_seed);
                    let dev = x.device().clone();
                    x * dev.tensor_from_vec(elems(mask), (rows, cols))
                } else {
                    x
                };
                // [m, in] x [in, r] -> [m, r]; x [r, out] -> [m, out]
                let down = lora.down.retaped::<T>().permute::<_, Axes2<1, 0>>();
                let up = lora.up.retaped::<T>().permute::<_, Axes2<1, 0>>();
                y + x.matmul(down).matmul(up) * lit::<E>(lora.scale)
            }
            _ => y,
        }
    }

    /// The layer on dfdx ops (`train`: the weight and bias join the tape).
    fn forward_generic<T: Tape<E, D>>(&self, x: Tensor2<D, T, E>, train: bool) -> Tensor2<D, T, E> {
        let m = x.shape().0;
        let out = self.out_features();
        if train {
            // [m, in] x [in, out] -> [m, out], the weight on the tape
            let y = x.matmul(self.weight.retaped::<T>().permute::<_, Axes2<1, 0>>());
            match &self.bias {
                Some(b) => y + b.retaped::<T>().broadcast_like::<_, Axis<0>>(&(m, out)),
                None => y,
            }
        } else {
            // [m, in] x [in, out] -> [m, out]
            let y = x.matmul(self.weight.clone().permute::<_, Axes2<1, 0>>());
            match &self.bias {
                Some(b) => y + b.clone().broadcast_like::<_, Axis<0>>(&(m, out)),
                None => y,
            }
        }
    }

    /// `[b, n, in] -> [b, n, out]`
    pub fn forward<T: Tape<E, D>>(&self, x: Tensor3<D, T, E>) -> Tensor3<D, T, E> {
        let (b, n, i) = *x.shape();
        let y = self.forward2(x.reshape_like(&(b * n, i)));
        y.reshape_like(&(b, n, self.out_features()))
    }
}

/// The fused CPU kernel of a f32 layer; its backward computes the weight's gradients only when
/// it trains (`train`).
pub(super) fn host_forward<D: Device<f32>, T: Tape<f32, D>>(
    layer: &Linear<D>,
    x: Tensor2<D, T>,
    train: bool,
) -> Tensor2<D, T> {
    let bias = layer.bias.as_ref().map(host::host_vec);
    let trained = if train {
        std::iter::once(host::flat(&layer.weight))
            .chain(layer.bias.clone())
            .collect()
    } else {
        Vec::new()
    };
    host::linear(
        x,
        host::host_vec(&layer.weight),
        bias,
        layer.out_features(),
        trained,
    )
}

/// `n` mask values: 0 with probability `p`, else `1 / (1 - p)`, from a generator seeded by
/// `seed`.
fn dropout_mask(n: usize, p: f32, seed: u64) -> Vec<f32> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    (0..n)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernel's weight and bias gradients against dfdx's matmul.
    #[test]
    fn trained_linear_gradients_match_dfdx_ops() {
        let dev = Cpu::default();
        let v = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
        let (m, i, o) = (7, 5, 4);
        let layer = Linear {
            weight: dev.tensor_from_vec(v(o * i, 0.37), (o, i)),
            bias: Some(dev.tensor_from_vec(v(o, 1.3), (o,))),
            lora: None,
            delta: None,
            trainable: true,
        };
        let x = dev.tensor_from_vec(v(m * i, 0.71), (m, i));
        let r = dev.tensor_from_vec(v(m * o, 0.53), (m, o));
        let g = (layer.forward2(x.leaky_trace()) * r.clone())
            .sum()
            .backward();
        type Tp = OwnedTape<f32, Cpu>;
        let bias = layer.bias.clone().unwrap_or_else(|| dev.zeros_like(&(o,)));
        let reference = x
            .leaky_trace()
            .matmul(layer.weight.retaped::<Tp>().permute::<_, Axes2<1, 0>>())
            + bias.retaped::<Tp>().broadcast_like::<_, Axis<0>>(&(m, o));
        let gr = (reference * r).sum().backward();
        for (a, b) in [
            (
                g.get(&layer.weight).as_vec(),
                gr.get(&layer.weight).as_vec(),
            ),
            (g.get(&bias).as_vec(), gr.get(&bias).as_vec()),
            (g.get(&x).as_vec(), gr.get(&x).as_vec()),
        ] {
            let max = a
                .iter()
                .zip(&b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-5, "gradient off by {max}");
        }
    }
}
