//! Normalisation layers.

use dfdx::prelude::*;

use super::elem::Elem;
use super::host::{NormLayout, host_vec, norm_affine};
use super::ops::silu;
use super::weights::Loader;
use super::{Tensor1, Tensor3, Tensor4};
use crate::diffusion::error::{DiffusionError, Result};

/// Group normalisation over `[b, c, h, w]` (PyTorch `nn.GroupNorm`, biased variance) with a
/// per-channel affine transform. The epsilon differs per use site in SD: 1e-5 in the UNet
/// resnets (`norm_eps`), 1e-6 in the transformer blocks' input norm and everywhere in the VAE.
#[derive(Debug, Clone)]
pub struct GroupNorm<D: Storage<E>, E = f32> {
    /// `[c]`
    pub weight: Tensor1<D, NoneTape, E>,
    /// `[c]`
    pub bias: Tensor1<D, NoneTape, E>,
    /// Number of groups (divides the channels).
    pub num_groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Whether gamma and beta get gradients under a tape (full fine-tuning).
    pub trainable: bool,
}

impl<E: Elem, D: Device<E>> GroupNorm<D, E> {
    /// Loads `weight` and `bias` of `channels` channels.
    pub fn load(l: &Loader<D, E>, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            return Err(DiffusionError::Input {
                model: "GroupNorm",
                reason: format!("{channels} channels cannot be split into {num_groups} groups"),
            });
        }
        Ok(Self {
            weight: l.tensor1("weight", channels)?,
            bias: l.tensor1("bias", channels)?,
            num_groups,
            eps,
            trainable: false,
        })
    }

    /// `[b, c, h, w] -> [b, c, h, w]`
    pub fn forward<T: Tape<E, D>>(&self, x: Tensor4<D, T, E>) -> Tensor4<D, T, E> {
        match E::fused_group_norm(self, x, false) {
            Ok(y) => y,
            Err(x) => self.forward_generic(x),
        }
    }

    /// `silu(group_norm(x))`, `[b, c, h, w] -> [b, c, h, w]` (the ResNet blocks' and the
    /// output norms' pattern; one fused op on the CPU).
    pub fn forward_silu<T: Tape<E, D>>(&self, x: Tensor4<D, T, E>) -> Tensor4<D, T, E> {
        match E::fused_group_norm(self, x, true) {
            Ok(y) => y,
            Err(x) => silu(self.forward_generic(x)),
        }
    }

    fn forward_generic<T: Tape<E, D>>(&self, x: Tensor4<D, T, E>) -> Tensor4<D, T, E> {
        let shape = *x.shape();
        let (b, c, h, w) = shape;
        let g = self.num_groups;
        let x = x
            // [b, g, c/g*h*w]
            .reshape_like(&(b, g, c / g * h * w))
            .normalize::<Axis<2>>(self.eps)
            .reshape_like(&shape);
        if self.trainable && T::OWNS_TAPE {
            return x * self
                .weight
                .retaped::<T>()
                .broadcast_like::<_, Axes3<0, 2, 3>>(&shape)
                + self
                    .bias
                    .retaped::<T>()
                    .broadcast_like::<_, Axes3<0, 2, 3>>(&shape);
        }
        x * self
            .weight
            .clone()
            .broadcast_like::<_, Axes3<0, 2, 3>>(&shape)
            + self
                .bias
                .clone()
                .broadcast_like::<_, Axes3<0, 2, 3>>(&shape)
    }
}

impl<D: Device<f32>> GroupNorm<D> {
    /// The fused CPU kernel (`silu`: followed by SiLU).
    pub(super) fn forward_host<T: Tape<f32, D>>(
        &self,
        x: Tensor4<D, T>,
        silu: bool,
    ) -> Tensor4<D, T> {
        let (b, c, h, w) = *x.shape();
        let g = self.num_groups;
        let layout = NormLayout {
            groups: b * g,
            len: c / g * h * w,
            groups_per_item: g,
            channels_per_group: c / g,
            inner: h * w,
        };
        let (gamma, beta) = (host_vec(&self.weight), host_vec(&self.bias));
        let trained =
            (self.trainable && T::OWNS_TAPE).then(|| [self.weight.clone(), self.bias.clone()]);
        norm_affine(x, layout, gamma, beta, self.eps, silu, trained)
    }
}

/// Layer normalisation over the last axis of `[b, n, d]` with an affine transform.
#[derive(Debug, Clone)]
pub struct LayerNorm<D: Storage<E>, E = f32> {
    /// `[d]`
    pub weight: Tensor1<D, NoneTape, E>,
    /// `[d]`
    pub bias: Tensor1<D, NoneTape, E>,
    /// Added to the variance.
    pub eps: f64,
    /// Whether gamma and beta get gradients under a tape (full fine-tuning).
    pub trainable: bool,
}

impl<E: Elem, D: Device<E>> LayerNorm<D, E> {
    /// Loads `weight` and `bias` of width `dim`.
    pub fn load(l: &Loader<D, E>, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: l.tensor1("weight", dim)?,
            bias: l.tensor1("bias", dim)?,
            eps,
            trainable: false,
        })
    }

    /// `[b, n, d] -> [b, n, d]`
    pub fn forward<T: Tape<E, D>>(&self, x: Tensor3<D, T, E>) -> Tensor3<D, T, E> {
        let shape = *x.shape();
        let x = match E::fused_layer_norm(self, x) {
            Ok(y) => return y,
            Err(x) => x,
        };
        let x = x.normalize::<Axis<2>>(self.eps);
        if self.trainable && T::OWNS_TAPE {
            return x * self
                .weight
                .retaped::<T>()
                .broadcast_like::<_, Axes2<0, 1>>(&shape)
                + self
                    .bias
                    .retaped::<T>()
                    .broadcast_like::<_, Axes2<0, 1>>(&shape);
        }
        x * self.weight.clone().broadcast_like::<_, Axes2<0, 1>>(&shape)
            + self.bias.clone().broadcast_like::<_, Axes2<0, 1>>(&shape)
    }
}

impl<D: Device<f32>> LayerNorm<D> {
    /// The fused CPU kernel.
    pub(super) fn forward_host<T: Tape<f32, D>>(&self, x: Tensor3<D, T>) -> Tensor3<D, T> {
        let shape = *x.shape();
        let (b, n, d) = shape;
        let layout = NormLayout {
            groups: b * n,
            len: d,
            groups_per_item: 1,
            channels_per_group: d,
            inner: 1,
        };
        let (gamma, beta) = (host_vec(&self.weight), host_vec(&self.bias));
        let trained =
            (self.trainable && T::OWNS_TAPE).then(|| [self.weight.clone(), self.bias.clone()]);
        norm_affine(x, layout, gamma, beta, self.eps, false, trained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Gamma and beta gradients of the fused kernels (plain and with SiLU) against dfdx ops.
    #[test]
    fn affine_gradients_of_trained_norms_match_dfdx_ops() {
        let dev = Cpu::default();
        let shape = (2, 6, 3, 4);
        let x = dev.tensor_from_vec(values(144, 1), shape);
        let gn = GroupNorm {
            weight: dev.tensor_from_vec(values(6, 2), (6,)),
            bias: dev.tensor_from_vec(values(6, 3), (6,)),
            num_groups: 3,
            eps: 1e-5,
            trainable: true,
        };
        let r = dev.tensor_from_vec(values(144, 4), shape);
        for silu_on in [false, true] {
            let host = if silu_on {
                gn.forward_host(x.leaky_trace(), true)
            } else {
                gn.forward_host(x.leaky_trace(), false)
            };
            let generic = if silu_on {
                silu(gn.forward_generic(x.leaky_trace()))
            } else {
                gn.forward_generic(x.leaky_trace())
            };
            let gh = (host * r.clone()).sum().backward();
            let gg = (generic * r.clone()).sum().backward();
            for (a, b) in [
                (gh.get(&gn.weight).as_vec(), gg.get(&gn.weight).as_vec()),
                (gh.get(&gn.bias).as_vec(), gg.get(&gn.bias).as_vec()),
            ] {
                let max = a
                    .iter()
                    .zip(&b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    max < 1e-4,
                    "group norm (silu {silu_on}) affine grad off by {max}"
                );
            }
        }
        let ln = LayerNorm {
            weight: dev.tensor_from_vec(values(5, 5), (5,)),
            bias: dev.tensor_from_vec(values(5, 6), (5,)),
            eps: 1e-5,
            trainable: true,
        };
        let x = dev.tensor_from_vec(values(30, 7), (2, 3, 5));
        let r = dev.tensor_from_vec(values(30, 8), (2, 3, 5));
        let gh = (ln.forward(x.leaky_trace()) * r.clone()).sum().backward();
        let reference = x.leaky_trace().normalize::<Axis<2>>(1e-5)
            * ln.weight
                .retaped::<OwnedTape<f32, Cpu>>()
                .broadcast_like::<_, Axes2<0, 1>>(&(2, 3, 5))
            + ln.bias
                .retaped::<OwnedTape<f32, Cpu>>()
                .broadcast_like::<_, Axes2<0, 1>>(&(2, 3, 5));
        let gr = (reference * r).sum().backward();
        for (a, b) in [
            (gh.get(&ln.weight).as_vec(), gr.get(&ln.weight).as_vec()),
            (gh.get(&ln.bias).as_vec(), gr.get(&ln.bias).as_vec()),
        ] {
            let max = a
                .iter()
                .zip(&b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-4, "layer norm affine grad off by {max}");
        }
    }

    #[test]
    fn group_norm_matches_definition() {
        let dev = Cpu::default();
        let (b, c, h, w, g) = (2, 6, 3, 2, 3);
        let xv: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 37 % 11) as f32) * 0.3 - 1.0)
            .collect();
        let gn = GroupNorm {
            trainable: false,
            weight: dev.tensor_from_vec((0..c).map(|i| 1.0 + i as f32 * 0.1).collect(), (c,)),
            bias: dev.tensor_from_vec((0..c).map(|i| i as f32 * -0.05).collect(), (c,)),
            num_groups: g,
            eps: 1e-5,
        };
        let y = gn
            .forward(dev.tensor_from_vec(xv.clone(), (b, c, h, w)))
            .as_vec();
        let per = c / g * h * w;
        for bi in 0..b {
            for gi in 0..g {
                let start = (bi * g + gi) * per;
                let vals = &xv[start..start + per];
                let mean = vals.iter().map(|v| *v as f64).sum::<f64>() / per as f64;
                let var = vals.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / per as f64;
                for (k, v) in vals.iter().enumerate() {
                    let ch = gi * (c / g) + k / (h * w);
                    let want = (*v as f64 - mean) / (var + 1e-5).sqrt() * (1.0 + ch as f64 * 0.1)
                        + ch as f64 * -0.05;
                    assert!((y[start + k] as f64 - want).abs() < 1e-5);
                }
            }
        }
    }
}
