//! The UNet's attention: diffusers `Transformer2DModel` holding `BasicTransformerBlock`s
//! (self-attention, cross-attention on the text states, GEGLU feed-forward), and the
//! multi-head `Attention` they use.

use dfdx::prelude::*;

use super::error::Result;
use super::hypernetwork::HyperStack;
use super::nn::elem::Elem;
use super::nn::weights::Loader;
use super::nn::{
    Conv2d, DEFAULT_ATTENTION_CHUNK, GroupNorm, LayerNorm, Linear, Padding2d, Tensor3, Tensor4,
    gelu, merge_heads, scaled_dot_product_attention, split_heads,
};
use super::params::{Layer, Layers, join};
use super::recompute::{checkpoint, flat_view, trainable_params};

/// diffusers `Attention` as SD 1.x uses it: bias-free q/k/v projections, a biased output
/// projection, `heads` heads of width `inner / heads`.
#[derive(Debug, Clone)]
pub struct CrossAttention<D: Storage<E>, E = f32> {
    /// `[inner, query_dim]`, no bias.
    pub to_q: Linear<D, E>,
    /// `[inner, context_dim]`, no bias.
    pub to_k: Linear<D, E>,
    /// `[inner, context_dim]`, no bias.
    pub to_v: Linear<D, E>,
    /// `to_out.0`: `[query_dim, inner]` with bias.
    pub to_out: Linear<D, E>,
    /// Number of heads.
    pub heads: usize,
    /// Queries per attention chunk (bounds the memory of long self-attention).
    pub chunk: usize,
    /// A1111 hypernetworks transforming the context of the keys and of the values.
    pub hypernetwork: Option<HyperStack<D, E>>,
}

impl<E: Elem, D: Device<E>> CrossAttention<D, E> {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0`.
    pub fn load(
        l: &Loader<D, E>,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(&l.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&l.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&l.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&l.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            chunk: DEFAULT_ATTENTION_CHUNK,
            hypernetwork: None,
        })
    }

    /// `x: [b, n, query_dim]` attending to `context: [b, m, context_dim]` (or to itself when
    /// `None`) -> `[b, n, query_dim]`. The context is re-taped here (see
    /// [`super::resnet::ResnetBlock2D::forward`] for the convention).
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Tensor3<D, T, E>,
        context: Option<&Tensor3<D, NoneTape, E>>,
    ) -> Tensor3<D, T, E> {
        let (q, k, v) = match (context, &self.hypernetwork) {
            (None, None) => (
                self.to_q.forward(x.retaped::<T>()),
                self.to_k.forward(x.retaped::<T>()),
                self.to_v.forward(x),
            ),
            (Some(ctx), None) => (
                self.to_q.forward(x),
                self.to_k.forward(ctx.retaped::<T>()),
                self.to_v.forward(ctx.retaped::<T>()),
            ),
            // A1111: the hypernetwork of the context's width transforms the keys' and the
            // values' context (the hidden states themselves in self-attention).
            (None, Some(hyper)) => {
                let (ck, cv) = hyper.apply(x.retaped::<T>());
                (
                    self.to_q.forward(x),
                    self.to_k.forward(ck),
                    self.to_v.forward(cv),
                )
            }
            (Some(ctx), Some(hyper)) => {
                let (ck, cv) = hyper.apply(ctx.retaped::<T>());
                (
                    self.to_q.forward(x),
                    self.to_k.forward(ck),
                    self.to_v.forward(cv),
                )
            }
        };
        let o = scaled_dot_product_attention(
            split_heads(q, self.heads),
            split_heads(k, self.heads),
            split_heads(v, self.heads),
            false,
            self.chunk,
        );
        self.to_out.forward(merge_heads(o))
    }
}

/// GEGLU feed-forward: `ff.net.0.proj` (C -> 2F) split into `h, gate`, `h * gelu(gate)`, then
/// `ff.net.2` (F -> C).
#[derive(Debug, Clone)]
pub struct FeedForward<D: Storage<E>, E = f32> {
    /// `ff.net.0.proj`: `[2F, C]`.
    pub proj: Linear<D, E>,
    /// `ff.net.2`: `[C, F]`.
    pub out: Linear<D, E>,
}

impl<E: Elem, D: Device<E>> FeedForward<D, E> {
    /// Loads a GEGLU feed-forward of width `dim` with inner width `4 * dim`.
    pub fn load(l: &Loader<D, E>, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::load(&l.pp("net").pp(0).pp("proj"), dim, 2 * inner, true)?,
            out: Linear::load(&l.pp("net").pp(2), inner, dim, true)?,
        })
    }

    /// `[b, n, C] -> [b, n, C]`
    pub fn forward<T: Tape<E, D>>(&self, x: Tensor3<D, T, E>) -> Tensor3<D, T, E> {
        // [b, n, 2F]
        let h = self.proj.forward(x);
        let h = match E::fused_geglu(h) {
            Ok(g) => return self.out.forward(g),
            Err(h) => h,
        };
        let f = h.shape().2 / 2;
        // two non-overlapping slices of a tensor used nowhere else (see nn's slice caveat)
        let gate = gelu(h.retaped::<T>().slice((.., .., f..2 * f)));
        let h = h.slice((.., .., 0..f));
        self.out.forward(h * gate)
    }
}

/// diffusers `BasicTransformerBlock` (pre-LN): self-attention, cross-attention, feed-forward,
/// each with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock<D: Storage<E>, E = f32> {
    /// Norm before self-attention.
    pub norm1: LayerNorm<D, E>,
    /// Self-attention.
    pub attn1: CrossAttention<D, E>,
    /// Norm before cross-attention.
    pub norm2: LayerNorm<D, E>,
    /// Cross-attention on the text states.
    pub attn2: CrossAttention<D, E>,
    /// Norm before the feed-forward.
    pub norm3: LayerNorm<D, E>,
    /// GEGLU feed-forward.
    pub ff: FeedForward<D, E>,
}

impl<E: Elem, D: Device<E>> BasicTransformerBlock<D, E> {
    /// Loads one block of width `dim`.
    pub fn load(
        l: &Loader<D, E>,
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&l.pp("norm1"), dim, 1e-5)?,
            attn1: CrossAttention::load(&l.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(&l.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention::load(&l.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&l.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&l.pp("ff"), dim)?,
        })
    }

    /// `[b, n, dim] -> [b, n, dim]`
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Tensor3<D, T, E>,
        context: &Tensor3<D, NoneTape, E>,
    ) -> Tensor3<D, T, E> {
        let x = self
            .attn1
            .forward(self.norm1.forward(x.retaped::<T>()), None)
            + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.retaped::<T>()), Some(context))
            + x;
        self.ff.forward(self.norm3.forward(x.retaped::<T>())) + x
    }
}

/// `proj_in` / `proj_out` of a `Transformer2DModel`: a 1x1 conv (SD 1.x,
/// `use_linear_projection = false`) or a linear layer.
#[derive(Debug, Clone)]
pub enum Projection<D: Storage<E>, E = f32> {
    /// 1x1 convolution on `[b, c, h, w]`.
    Conv(Conv2d<D, E>),
    /// Linear layer on `[b, h*w, c]`.
    Linear(Linear<D, E>),
}

/// Configuration of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transformer2DConfig {
    /// Channels in and out.
    pub in_channels: usize,
    /// Number of heads.
    pub heads: usize,
    /// Width of a head (`in_channels / heads` in SD 1.x).
    pub head_dim: usize,
    /// Width of the text states.
    pub context_dim: usize,
    /// Number of `BasicTransformerBlock`s (1 in SD 1.x).
    pub layers: usize,
    /// GroupNorm groups of the input norm.
    pub groups: usize,
    /// Linear instead of 1x1-conv projections.
    pub use_linear_projection: bool,
}

/// diffusers `Transformer2DModel` (continuous input): GroupNorm (eps 1e-6), `proj_in`,
/// transformer blocks over the `h*w` tokens, `proj_out`, plus the input.
#[derive(Debug, Clone)]
pub struct Transformer2D<D: Storage<E>, E = f32> {
    /// Input GroupNorm (eps 1e-6).
    pub norm: GroupNorm<D, E>,
    /// Input projection.
    pub proj_in: Projection<D, E>,
    /// Transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock<D, E>>,
    /// Output projection.
    pub proj_out: Projection<D, E>,
    /// Gradient checkpointing under a tape (see [`crate::diffusion::recompute`]).
    pub checkpoint: bool,
}

impl<E: Elem, D: Device<E>> Transformer2D<D, E> {
    /// Loads `norm`, `proj_in`, `transformer_blocks.*`, `proj_out`.
    pub fn load(l: &Loader<D, E>, c: &Transformer2DConfig) -> Result<Self> {
        let inner = c.heads * c.head_dim;
        let proj = |name: &str, i: usize, o: usize| -> Result<Projection<D, E>> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Linear::load(&l.pp(name), i, o, true)?)
            } else {
                Projection::Conv(Conv2d::load(&l.pp(name), i, o, 1, 1, Padding2d::default())?)
            })
        };
        Ok(Self {
            norm: GroupNorm::load(&l.pp("norm"), c.groups, c.in_channels, 1e-6)?,
            proj_in: proj("proj_in", c.in_channels, inner)?,
            transformer_blocks: (0..c.layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &l.pp("transformer_blocks").pp(i),
                        inner,
                        c.context_dim,
                        c.heads,
                        c.head_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out", inner, c.in_channels)?,
            checkpoint: false,
        })
    }

    /// Sets the number of queries per attention chunk of every attention in this model.
    pub fn set_attention_chunk(&mut self, chunk: usize) {
        for b in &mut self.transformer_blocks {
            b.attn1.chunk = chunk;
            b.attn2.chunk = chunk;
        }
    }

    /// `[b, c, h, w]` with text states `[b, m, context_dim]` -> `[b, c, h, w]`.
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Tensor4<D, T, E>,
        context: &Tensor3<D, NoneTape, E>,
    ) -> Tensor4<D, T, E> {
        if self.checkpoint && T::OWNS_TAPE {
            let mut block = self.clone();
            block.checkpoint = false;
            let context = context.clone();
            let mut inputs = trainable_params(&mut block);
            for b in &block.transformer_blocks {
                inputs.extend(hypernetwork_params(&b.attn1));
                inputs.extend(hypernetwork_params(&b.attn2));
            }
            inputs.push(flat_view(&context));
            return checkpoint(x, inputs, move |x| block.forward(x, &context));
        }
        let (b, c, h, w) = *x.shape();
        let hs = self.norm.forward(x.retaped::<T>());
        // [b, h*w, inner]
        let mut hs = match &self.proj_in {
            Projection::Conv(conv) => {
                let hs = conv.forward(hs);
                let inner = hs.shape().1;
                hs.reshape_like(&(b, inner, h * w))
                    .permute::<_, Axes3<0, 2, 1>>()
                    .reshape_like(&(b, h * w, inner))
            }
            Projection::Linear(lin) => lin.forward(
                hs.reshape_like(&(b, c, h * w))
                    .permute::<_, Axes3<0, 2, 1>>()
                    .reshape_like(&(b, h * w, c)),
            ),
        };
        for block in &self.transformer_blocks {
            hs = block.forward(hs, context);
        }
        let inner = hs.shape().2;
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(
                hs.permute::<_, Axes3<0, 2, 1>>()
                    .reshape_like(&(b, inner, h, w)),
            ),
            Projection::Linear(lin) => lin
                .forward(hs)
                .permute::<_, Axes3<0, 2, 1>>()
                .reshape_like(&(b, c, h, w)),
        };
        out + x
    }
}

/// Flat views of the parameters of the hypernetworks hooked into `attention`.
fn hypernetwork_params<E: Elem, D: Device<E>>(
    attention: &CrossAttention<D, E>,
) -> Vec<super::nn::Tensor1<D, NoneTape, E>> {
    let mut out = Vec::new();
    for pair in attention.hypernetwork.iter().flat_map(|h| &h.pairs) {
        for layer in pair.k.layers.iter().chain(&pair.v.layers) {
            out.push(flat_view(&layer.weight));
            out.push(flat_view(&layer.bias));
            if let Some((w, b)) = &layer.layer_norm {
                out.push(flat_view(w));
                out.push(flat_view(b));
            }
        }
    }
    out
}

impl<E: Elem, D: Device<E>> Layers<D, E> for CrossAttention<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        f(&join(prefix, "to_q"), Layer::Linear(&mut self.to_q));
        f(&join(prefix, "to_k"), Layer::Linear(&mut self.to_k));
        f(&join(prefix, "to_v"), Layer::Linear(&mut self.to_v));
        f(&join(prefix, "to_out.0"), Layer::Linear(&mut self.to_out));
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for BasicTransformerBlock<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        f(&join(prefix, "norm1"), Layer::LayerNorm(&mut self.norm1));
        self.attn1.visit_layers(&join(prefix, "attn1"), f);
        f(&join(prefix, "norm2"), Layer::LayerNorm(&mut self.norm2));
        self.attn2.visit_layers(&join(prefix, "attn2"), f);
        f(&join(prefix, "norm3"), Layer::LayerNorm(&mut self.norm3));
        f(
            &join(prefix, "ff.net.0.proj"),
            Layer::Linear(&mut self.ff.proj),
        );
        f(&join(prefix, "ff.net.2"), Layer::Linear(&mut self.ff.out));
    }
}

fn projection<'a, E, D: Storage<E>>(p: &'a mut Projection<D, E>) -> Layer<'a, D, E> {
    match p {
        Projection::Conv(c) => Layer::Conv(c),
        Projection::Linear(l) => Layer::Linear(l),
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for Transformer2D<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        f(&join(prefix, "norm"), Layer::GroupNorm(&mut self.norm));
        f(&join(prefix, "proj_in"), projection(&mut self.proj_in));
        for (k, block) in self.transformer_blocks.iter_mut().enumerate() {
            block.visit_layers(&join(prefix, format!("transformer_blocks.{k}")), f);
        }
        f(&join(prefix, "proj_out"), projection(&mut self.proj_out));
    }
}
