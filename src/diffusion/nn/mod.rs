//! Building blocks of the SD models on dfdx's stable tensor ops, all differentiable through a
//! dfdx tape carried by the activations (parameters are plain, un-taped tensors).
//!
//! * [`linear`]: `Linear` (`y = x Wᵀ + b`).
//! * [`conv2d`]: `Conv2d` by im2col (one gather of the shifted windows) and one matmul; the only
//!   place convolution is implemented, so a faster kernel can replace it.
//! * [`norm`]: `GroupNorm`, `LayerNorm`.
//! * [`attention`]: scaled dot-product attention computed in chunks of queries.
//! * [`ops`]: activations (SiLU, quick GELU, erf GELU), zero padding, nearest upsampling.
//! * `host`: fused CPU kernels (conv, linear, norms (+SiLU), attention, GEGLU) with
//!   hand-written backward passes, taken when the device is [`Cpu`]. Their backward computes
//!   the gradient of the activations only: parameters (the plain tensors in the layer
//!   structs) are frozen, so `grads.get(&layer.weight)` is not filled on the CPU. Train
//!   extra tensors (LoRA, embeddings) by passing them as taped activations.
//!
//! Caveat for anyone adding code here: dfdx 0.13's `slice` backward *assigns* the output
//! gradient instead of adding it, so only slice a tensor into non-overlapping parts that nothing
//! else uses (or use `gather`, whose backward accumulates).

pub mod attention;
pub mod conv2d;
pub mod elem;
pub(crate) mod host;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod weights;

pub use attention::{
    DEFAULT_ATTENTION_CHUNK, merge_heads, scaled_dot_product_attention, split_heads,
};
pub use conv2d::{Conv2d, ConvLoraAdapter, Padding2d};
pub use elem::{Elem, Half, lit};
pub use host::with_generic_kernels;
pub use linear::{Linear, LoraAdapter};
pub use norm::{GroupNorm, LayerNorm};
pub use ops::{gelu, pad2d, quick_gelu, silu, upsample_nearest2x};

use dfdx::prelude::*;

/// A rank-1 tensor (f32 unless `E` says otherwise) with runtime shape.
pub type Tensor1<D, T = NoneTape, E = f32> = Tensor<(usize,), E, D, T>;
/// A rank-2 tensor with runtime shape.
pub type Tensor2<D, T = NoneTape, E = f32> = Tensor<(usize, usize), E, D, T>;
/// A rank-3 tensor with runtime shape (`[b, n, c]` sequences).
pub type Tensor3<D, T = NoneTape, E = f32> = Tensor<(usize, usize, usize), E, D, T>;
/// A rank-4 tensor with runtime shape (`[b, c, h, w]` images, `[b, heads, n, d]`).
pub type Tensor4<D, T = NoneTape, E = f32> = Tensor<(usize, usize, usize, usize), E, D, T>;
