//! A1111 hypernetworks on the UNet's attention: small MLPs that transform the context feeding
//! an attention's keys and values, `x + mlp(x) · multiplier`, with separate k and v MLPs per
//! context width (A1111's `apply_hypernetworks`; several networks apply in order, each to the
//! output of the previous one).
//!
//! The MLP is A1111's `HypernetworkModule` Sequential: per linear, the linear, the activation
//! (except after the last linear unless `activate_output`), a LayerNorm (eps 1e-5) when enabled,
//! then dropout when its probability is positive. Everything runs on dfdx ops, so the MLP
//! parameters get gradients when the context carries a tape.

use dfdx::prelude::*;

use crate::diffusion::nn::elem::{Elem, elems, lit};

use super::nn::{Tensor1, Tensor2, Tensor3, gelu, silu};

/// The activations A1111's `activation_dict` offers (the torch activation class, lower-cased).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HyperActivation {
    /// `linear` (also A1111's `None`): no activation layer at all.
    Linear,
    /// `relu`.
    Relu,
    /// `leakyrelu` (negative slope 0.01).
    LeakyRelu,
    /// `elu` (alpha 1).
    Elu,
    /// `swish` in A1111 is `torch.nn.Hardswish`: `x · relu6(x + 3) / 6`; also `hardswish`.
    Hardswish,
    /// `tanh`.
    Tanh,
    /// `sigmoid`.
    Sigmoid,
    /// `silu`: `x · sigmoid(x)`.
    Silu,
    /// `gelu` (exact, erf).
    Gelu,
    /// `relu6`: `min(max(x, 0), 6)`.
    Relu6,
    /// `softplus` (beta 1).
    Softplus,
    /// `mish`: `x · tanh(softplus(x))`.
    Mish,
    /// `selu`.
    Selu,
}

impl HyperActivation {
    /// The names accepted by [`HyperActivation::parse`].
    pub const NAMES: &'static [&'static str] = &[
        "linear",
        "relu",
        "leakyrelu",
        "elu",
        "swish",
        "hardswish",
        "tanh",
        "sigmoid",
        "silu",
        "gelu",
        "relu6",
        "softplus",
        "mish",
        "selu",
    ];

    /// Parses A1111's `activation_func` (`None` is linear, as in A1111).
    pub fn parse(name: Option<&str>) -> Result<Self, String> {
        Ok(match name.map(str::to_ascii_lowercase).as_deref() {
            None | Some("linear") | Some("identity") => Self::Linear,
            Some("relu") => Self::Relu,
            Some("leakyrelu") => Self::LeakyRelu,
            Some("elu") => Self::Elu,
            Some("swish") | Some("hardswish") => Self::Hardswish,
            Some("tanh") => Self::Tanh,
            Some("sigmoid") => Self::Sigmoid,
            Some("silu") => Self::Silu,
            Some("gelu") => Self::Gelu,
            Some("relu6") => Self::Relu6,
            Some("softplus") => Self::Softplus,
            Some("mish") => Self::Mish,
            Some("selu") => Self::Selu,
            Some(other) => {
                return Err(format!(
                    "activation `{other}` is not supported; use one of {}",
                    Self::NAMES.join(", ")
                ));
            }
        })
    }

    /// Applies the activation elementwise.
    pub fn apply<S: Shape, E: Elem, D: Device<E>, T: Tape<E, D>>(
        self,
        x: Tensor<S, E, D, T>,
    ) -> Tensor<S, E, D, T> {
        // exp(min(x, 0)) - 1, written with relu so its gradient is exact on both sides
        let expm1_neg = |x: Tensor<S, E, D, T>| (x.negate().relu().negate()).exp() - lit::<E>(1.0);
        // softplus(x) = relu(x) + ln(1 + exp(-|x|)), stable for large |x|
        let softplus = |x: Tensor<S, E, D, T>| {
            let abs = x.retaped::<T>().relu() + x.retaped::<T>().negate().relu();
            x.relu() + ((abs.negate().exp()) + lit::<E>(1.0)).ln()
        };
        match self {
            Self::Linear => x,
            Self::Relu => x.relu(),
            Self::LeakyRelu => x.retaped::<T>().relu() - x.negate().relu() * lit::<E>(0.01),
            Self::Elu => x.retaped::<T>().relu() + expm1_neg(x),
            Self::Hardswish => {
                let gate = (x.retaped::<T>() + lit::<E>(3.0)).clamp(0.0, 6.0) / lit::<E>(6.0);
                x * gate
            }
            Self::Tanh => x.tanh(),
            Self::Sigmoid => x.sigmoid(),
            Self::Silu => silu(x),
            Self::Gelu => gelu(x),
            Self::Relu6 => x.clamp(0.0, 6.0),
            Self::Softplus => softplus(x),
            Self::Mish => {
                let t = softplus(x.retaped::<T>()).tanh();
                x * t
            }
            Self::Selu => {
                const ALPHA: f32 = 1.673_263_2;
                const SCALE: f32 = 1.050_701;
                (x.retaped::<T>().relu() + expm1_neg(x) * lit::<E>(ALPHA)) * lit::<E>(SCALE)
            }
        }
    }
}

/// A LayerNorm's `(weight, bias)`.
pub type AffinePair<D, E = f32> = (Tensor1<D, NoneTape, E>, Tensor1<D, NoneTape, E>);

/// One linear of a hypernetwork MLP with what follows it in A1111's Sequential.
#[derive(Debug, Clone)]
pub struct HyperLayer<D: Storage<E>, E = f32> {
    /// `[out, in]`.
    pub weight: Tensor2<D, NoneTape, E>,
    /// `[out]`.
    pub bias: Tensor1<D, NoneTape, E>,
    /// Whether the activation follows this linear.
    pub activate: bool,
    /// LayerNorm `(weight [out], bias [out])` after the activation.
    pub layer_norm: Option<AffinePair<D, E>>,
    /// Dropout probability after it (0: no dropout layer).
    pub dropout: f32,
}

/// One hypernetwork MLP (the k or the v module of a width).
#[derive(Debug, Clone)]
pub struct HyperMlp<D: Storage<E>, E = f32> {
    /// The linears in order.
    pub layers: Vec<HyperLayer<D, E>>,
    /// The activation.
    pub activation: HyperActivation,
}

/// torch's LayerNorm epsilon.
const LAYER_NORM_EPS: f64 = 1e-5;

impl<D: Device<f32>> HyperMlp<D> {
    /// The same MLP with its tensors converted to `E` (mixed precision's working copy).
    pub fn to_elem<E: Elem>(&self) -> HyperMlp<D, E>
    where
        D: Device<E>,
    {
        HyperMlp {
            layers: self
                .layers
                .iter()
                .map(|l| HyperLayer {
                    weight: l.weight.clone().to_dtype::<E>(),
                    bias: l.bias.clone().to_dtype::<E>(),
                    activate: l.activate,
                    layer_norm: l
                        .layer_norm
                        .as_ref()
                        .map(|(w, b)| (w.clone().to_dtype::<E>(), b.clone().to_dtype::<E>())),
                    dropout: l.dropout,
                })
                .collect(),
            activation: self.activation,
        }
    }
}

impl<E: Elem, D: Device<E>> HyperMlp<D, E> {
    /// Context width it takes and returns.
    pub fn width(&self) -> usize {
        self.layers.first().map_or(0, |l| l.weight.shape().1)
    }

    /// `x + mlp(x) · multiplier`: `[b, n, d] -> [b, n, d]`. With `dropout_seed`, the dropout
    /// layers draw their masks (keep with probability `1 - p`, kept values scaled by
    /// `1 / (1 - p)`, as torch's training mode does) from that seed; without it they are off
    /// (inference).
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Tensor3<D, T, E>,
        multiplier: f32,
        dropout_seed: Option<u64>,
    ) -> Tensor3<D, T, E> {
        let (b, n, d) = *x.shape();
        let m = b * n;
        let dev = x.device().clone();
        // [m, d]
        let mut h: Tensor2<D, T, E> = x.retaped::<T>().reshape_like(&(m, d));
        for (i, layer) in self.layers.iter().enumerate() {
            let out = layer.weight.shape().0;
            // [m, in] x [in, out] -> [m, out]
            h = h.matmul(layer.weight.retaped::<T>().permute::<_, Axes2<1, 0>>())
                + layer
                    .bias
                    .retaped::<T>()
                    .broadcast_like::<_, Axis<0>>(&(m, out));
            if layer.activate {
                h = self.activation.apply(h);
            }
            if let Some((w, bias)) = &layer.layer_norm {
                h = h.normalize::<Axis<1>>(LAYER_NORM_EPS)
                    * w.retaped::<T>().broadcast_like::<_, Axis<0>>(&(m, out))
                    + bias.retaped::<T>().broadcast_like::<_, Axis<0>>(&(m, out));
            }
            if let (Some(seed), true) = (dropout_seed, layer.dropout > 0.0) {
                let mask = dropout_mask(
                    seed ^ (i as u64).wrapping_mul(0x9e37_79b9),
                    m * out,
                    layer.dropout,
                );
                h = h * dev.tensor_from_vec(elems(mask), (m, out));
            }
        }
        let out = h.reshape_like(&(b, n, d));
        x + out * lit::<E>(multiplier)
    }
}

/// Inverted-dropout mask: `1 / (1 - p)` with probability `1 - p`, else 0.
fn dropout_mask(seed: u64, len: usize, p: f32) -> Vec<f32> {
    use rand_chacha::rand_core::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    (0..len)
        .map(|_| {
            // uniform in [0, 1) from the top 24 bits
            let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
            if u < p { 0.0 } else { keep }
        })
        .collect()
}

/// The k and v MLPs of one hypernetwork at one context width, with its strength.
#[derive(Debug, Clone)]
pub struct HyperPair<D: Storage<E>, E = f32> {
    /// Applied to the context of the keys.
    pub k: HyperMlp<D, E>,
    /// Applied to the context of the values.
    pub v: HyperMlp<D, E>,
    /// A1111's multiplier (1 while training, as A1111's training mode uses).
    pub multiplier: f32,
}

/// The hypernetworks hooked into one attention layer: applied in order to its k and v contexts.
#[derive(Debug, Clone)]
pub struct HyperStack<D: Storage<E>, E = f32> {
    /// The networks whose width matches this attention's context, in application order.
    pub pairs: Vec<HyperPair<D, E>>,
    /// Training: the seed of this layer's dropout masks for the current forward pass.
    pub dropout_seed: Option<u64>,
}

impl<E: Elem, D: Device<E>> HyperStack<D, E> {
    /// `context: [b, m, d]` -> (keys' context, values' context), each `[b, m, d]`.
    pub fn apply<T: Tape<E, D>>(
        &self,
        context: Tensor3<D, T, E>,
    ) -> (Tensor3<D, T, E>, Tensor3<D, T, E>) {
        let mut k = context.retaped::<T>();
        let mut v = context;
        for (i, pair) in self.pairs.iter().enumerate() {
            let seed = |which: u64| {
                self.dropout_seed
                    .map(|s| s ^ ((i as u64) << 32 | which).wrapping_mul(0xbf58_476d_1ce4_e5b9))
            };
            k = pair.k.forward(k, pair.multiplier, seed(1));
            v = pair.v.forward(v, pair.multiplier, seed(2));
        }
        (k, v)
    }
}
