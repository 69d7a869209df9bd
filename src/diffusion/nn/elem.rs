//! The element type a model computes in: `f32`, or [`Half`] (mixed precision).
//!
//! Every layer is generic over it. [`Half`] is dfdx's `AMP<f16>`: tensors are stored in f16
//! (half the memory and bandwidth of f32; cuBLAS runs its matmuls on the tensor cores with f32
//! accumulation) while each kernel does its arithmetic in f32, so sums, norms and softmaxes
//! do not lose precision inside an op, only where results are stored. Trained tensors keep f32
//! master copies outside the model (see `train::mixed`).
//!
//! The fused CPU kernels (`nn::host`) exist for f32 only: `f32`'s implementation of the
//! hooks below takes them on the [`Cpu`] device, and every other combination runs the generic
//! dfdx composition (what CUDA runs).

use dfdx::dtypes::{AMP, f16};
use dfdx::prelude::*;

use super::conv2d::Padding2d;
use super::linear::Linear;
use super::norm::{GroupNorm, LayerNorm};
use super::{Tensor1, Tensor2, Tensor3, Tensor4};

/// Mixed precision: f16 storage, f32 arithmetic inside each op (dfdx's `AMP<f16>`).
pub type Half = AMP<f16>;

/// A fused kernel's answer: `Ok(output)` when it ran, `Err(input)` (handed back untouched)
/// when the generic path must run.
pub type Fused<T, I = T> = std::result::Result<T, I>;

/// An element type the models compute in (`f32` or [`Half`]).
pub trait Elem: Dtype + Unit + 'static {
    /// The precision's name in pipeline files: `"f32"` or `"f16"`.
    const NAME: &'static str;
    /// Bytes per stored element.
    const BYTES: usize;
    /// Whether this is a half-precision type: training keeps f32 masters and scales the loss.
    const HALF: bool = Self::BYTES < 4;

    /// `v` in this type (rounded to f16 for [`Half`]).
    fn of(v: f32) -> Self;
    /// The value as f32 (exact).
    fn to_f32_lossless(self) -> f32;

    /// Fused linear layer (without its LoRA branch); `train`: the weight gets gradients.
    fn fused_linear<D: Device<Self>, T: Tape<Self, D>>(
        _layer: &Linear<D, Self>,
        x: Tensor2<D, T, Self>,
        _train: bool,
    ) -> Fused<Tensor2<D, T, Self>> {
        Err(x)
    }

    /// Fused group norm (`silu`: followed by SiLU).
    fn fused_group_norm<D: Device<Self>, T: Tape<Self, D>>(
        _layer: &GroupNorm<D, Self>,
        x: Tensor4<D, T, Self>,
        _silu: bool,
    ) -> Fused<Tensor4<D, T, Self>> {
        Err(x)
    }

    /// Fused layer norm.
    fn fused_layer_norm<D: Device<Self>, T: Tape<Self, D>>(
        _layer: &LayerNorm<D, Self>,
        x: Tensor3<D, T, Self>,
    ) -> Fused<Tensor3<D, T, Self>> {
        Err(x)
    }

    /// Fused convolution (see [`super::conv2d`]); `train`: weight and bias get gradients.
    #[allow(clippy::too_many_arguments)]
    fn fused_conv2d<D: Device<Self>, T: Tape<Self, D>>(
        x: Tensor4<D, T, Self>,
        _weight: &Tensor4<D, NoneTape, Self>,
        _bias: Option<&Tensor1<D, NoneTape, Self>>,
        _stride: usize,
        _padding: Padding2d,
        _out: (usize, usize),
        _max_cols: usize,
        _train: bool,
    ) -> Fused<Tensor4<D, T, Self>> {
        Err(x)
    }

    /// Fused attention over `(q, k, v)` (see [`super::attention`]).
    #[allow(clippy::result_large_err)] // the inputs are handed back by value, as tensors
    fn fused_attention<D: Device<Self>, T: Tape<Self, D>>(
        qkv: AttentionInputs<D, T, Self>,
        _causal: bool,
        _chunk: usize,
        _scale: f32,
    ) -> Fused<Tensor4<D, T, Self>, AttentionInputs<D, T, Self>> {
        Err(qkv)
    }

    /// Fused GEGLU: `h[.., :f] · gelu(h[.., f:])` of `h: [b, n, 2f]`.
    fn fused_geglu<D: Device<Self>, T: Tape<Self, D>>(
        h: Tensor3<D, T, Self>,
    ) -> Fused<Tensor3<D, T, Self>> {
        Err(h)
    }

    /// `grads[t] += g` on the host, for the CPU device (`None`: not taken).
    fn host_add_gradient<D: Device<Self>>(
        _grads: &mut Gradients<Self, D>,
        _t: &Tensor1<D, NoneTape, Self>,
        _g: &Tensor1<D, NoneTape, Self>,
    ) -> Option<Result<(), D::Err>> {
        None
    }
}

/// The three inputs of an attention, handed back when no fused kernel takes them.
pub type AttentionInputs<D, T, E> = (Tensor4<D, T, E>, Tensor4<D, T, E>, Tensor4<D, T, E>);

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const BYTES: usize = 4;

    fn of(v: f32) -> Self {
        v
    }

    fn to_f32_lossless(self) -> f32 {
        self
    }

    fn fused_linear<D: Device<f32>, T: Tape<f32, D>>(
        layer: &Linear<D>,
        x: Tensor2<D, T>,
        train: bool,
    ) -> Fused<Tensor2<D, T>> {
        if !super::host::is_cpu::<D>() {
            return Err(x);
        }
        Ok(super::linear::host_forward(layer, x, train))
    }

    fn fused_group_norm<D: Device<f32>, T: Tape<f32, D>>(
        layer: &GroupNorm<D>,
        x: Tensor4<D, T>,
        silu: bool,
    ) -> Fused<Tensor4<D, T>> {
        if !super::host::is_cpu::<D>() {
            return Err(x);
        }
        Ok(layer.forward_host(x, silu))
    }

    fn fused_layer_norm<D: Device<f32>, T: Tape<f32, D>>(
        layer: &LayerNorm<D>,
        x: Tensor3<D, T>,
    ) -> Fused<Tensor3<D, T>> {
        if !super::host::is_cpu::<D>() {
            return Err(x);
        }
        Ok(layer.forward_host(x))
    }

    fn fused_conv2d<D: Device<f32>, T: Tape<f32, D>>(
        x: Tensor4<D, T>,
        weight: &Tensor4<D>,
        bias: Option<&Tensor1<D>>,
        stride: usize,
        padding: Padding2d,
        out: (usize, usize),
        max_cols: usize,
        train: bool,
    ) -> Fused<Tensor4<D, T>> {
        if !super::host::is_cpu::<D>() {
            return Err(x);
        }
        Ok(super::conv2d::conv2d_host(
            x, weight, bias, stride, padding, out, max_cols, train,
        ))
    }

    #[allow(clippy::result_large_err)]
    fn fused_attention<D: Device<f32>, T: Tape<f32, D>>(
        (q, k, v): AttentionInputs<D, T, f32>,
        causal: bool,
        chunk: usize,
        scale: f32,
    ) -> Fused<Tensor4<D, T>, AttentionInputs<D, T, f32>> {
        if !super::host::is_cpu::<D>() {
            return Err((q, k, v));
        }
        Ok(super::host::attention(q, k, v, causal, chunk, scale))
    }

    fn fused_geglu<D: Device<f32>, T: Tape<f32, D>>(h: Tensor3<D, T>) -> Fused<Tensor3<D, T>> {
        if !super::host::is_cpu::<D>() {
            return Err(h);
        }
        Ok(super::host::geglu(h))
    }

    fn host_add_gradient<D: Device<f32>>(
        grads: &mut Gradients<f32, D>,
        t: &Tensor1<D>,
        g: &Tensor1<D>,
    ) -> Option<Result<(), D::Err>> {
        if !super::host::is_cpu::<D>() {
            return None;
        }
        let g = super::host::host_vec(g);
        Some(grads.get_or_alloc_mut(t).map(|buf| {
            for (d, v) in super::host::cpu_grad(buf).iter_mut().zip(&g) {
                *d += v;
            }
        }))
    }
}

impl Elem for Half {
    const NAME: &'static str = "f16";
    const BYTES: usize = 2;

    fn of(v: f32) -> Self {
        AMP(f16::from_f32(v))
    }

    fn to_f32_lossless(self) -> f32 {
        self.0.to_f32()
    }
}

/// `v` as the element type `E`.
#[inline]
pub fn lit<E: Elem>(v: f32) -> E {
    E::of(v)
}

/// Host values as a vector of `E`.
pub fn elems<E: Elem>(v: Vec<f32>) -> Vec<E> {
    v.into_iter().map(E::of).collect()
}

/// The values of `t` as f32, in logical order.
pub fn to_f32_vec<S: Shape, E: Elem, D: Device<E>, T>(t: &Tensor<S, E, D, T>) -> Vec<f32> {
    t.as_vec().into_iter().map(E::to_f32_lossless).collect()
}
