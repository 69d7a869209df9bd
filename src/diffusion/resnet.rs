//! ResNet block of the UNet and the VAE (diffusers `ResnetBlock2D`, `resnet_time_scale_shift =
//! "default"`, `output_scale_factor = 1`): GroupNorm, SiLU, 3x3 conv, (+ time embedding
//! projection), GroupNorm, SiLU, 3x3 conv, plus a 1x1-conv shortcut when the width changes.

use dfdx::prelude::*;

use crate::diffusion::nn::elem::Elem;

use super::error::Result;
use super::nn::weights::Loader;
use super::nn::{Conv2d, GroupNorm, Linear, Padding2d, Tensor2, Tensor4, silu};
use super::params::{Layer, Layers, join};
use super::recompute::{checkpoint, flat_view, trainable_params};

/// Shape of one ResNet block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding (`None` in the VAE, which has none).
    pub temb_channels: Option<usize>,
    /// GroupNorm groups (32 in SD).
    pub groups: usize,
    /// GroupNorm epsilon: 1e-5 in the UNet (`norm_eps`), 1e-6 in the VAE.
    pub eps: f64,
}

/// diffusers `ResnetBlock2D`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D<D: Storage<E>, E = f32> {
    /// First norm.
    pub norm1: GroupNorm<D, E>,
    /// First 3x3 conv.
    pub conv1: Conv2d<D, E>,
    /// Projection of the (SiLU-activated) time embedding to `out_channels`.
    pub time_emb_proj: Option<Linear<D, E>>,
    /// Second norm.
    pub norm2: GroupNorm<D, E>,
    /// Second 3x3 conv.
    pub conv2: Conv2d<D, E>,
    /// 1x1 conv on the residual path when `in_channels != out_channels`.
    pub conv_shortcut: Option<Conv2d<D, E>>,
    /// Gradient checkpointing under a tape (see [`crate::diffusion::recompute`]).
    pub checkpoint: bool,
}

impl<E: Elem, D: Device<E>> ResnetBlock2D<D, E> {
    /// Loads `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`.
    pub fn load(l: &Loader<D, E>, c: &ResnetConfig) -> Result<Self> {
        let (i, o) = (c.in_channels, c.out_channels);
        Ok(Self {
            norm1: GroupNorm::load(&l.pp("norm1"), c.groups, i, c.eps)?,
            conv1: Conv2d::load(&l.pp("conv1"), i, o, 3, 1, Padding2d::same(1))?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(Linear::load(&l.pp("time_emb_proj"), t, o, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&l.pp("norm2"), c.groups, o, c.eps)?,
            conv2: Conv2d::load(&l.pp("conv2"), o, o, 3, 1, Padding2d::same(1))?,
            conv_shortcut: if i != o {
                Some(Conv2d::load(
                    &l.pp("conv_shortcut"),
                    i,
                    o,
                    1,
                    1,
                    Padding2d::default(),
                )?)
            } else {
                None
            },
            checkpoint: false,
        })
    }

    /// `[b, c_in, h, w]` (+ time embedding `[b, temb]`) -> `[b, c_out, h, w]`.
    ///
    /// The time embedding is passed un-taped and re-taped here, so its gradient accumulates
    /// across blocks; the caller merges its tape into `x`'s once.
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Tensor4<D, T, E>,
        temb: Option<&Tensor2<D, NoneTape, E>>,
    ) -> Tensor4<D, T, E> {
        if self.checkpoint && T::OWNS_TAPE {
            let mut block = self.clone();
            block.checkpoint = false;
            let temb = temb.cloned();
            let mut inputs = trainable_params(&mut block);
            inputs.extend(temb.as_ref().map(flat_view));
            return checkpoint(x, inputs, move |x| block.forward(x, temb.as_ref()));
        }
        let h = self
            .conv1
            .forward(self.norm1.forward_silu(x.retaped::<T>()));
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let shape = *h.shape();
                // [b, c_out] -> [b, c_out, h, w]
                let t = proj.forward2(silu(temb.retaped::<T>()));
                h + t.broadcast_like::<_, Axes2<2, 3>>(&shape)
            }
            _ => h,
        };
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        match &self.conv_shortcut {
            Some(sc) => h + sc.forward(x),
            None => h + x,
        }
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for ResnetBlock2D<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        f(&join(prefix, "norm1"), Layer::GroupNorm(&mut self.norm1));
        f(&join(prefix, "conv1"), Layer::Conv(&mut self.conv1));
        if let Some(t) = &mut self.time_emb_proj {
            f(&join(prefix, "time_emb_proj"), Layer::Linear(t));
        }
        f(&join(prefix, "norm2"), Layer::GroupNorm(&mut self.norm2));
        f(&join(prefix, "conv2"), Layer::Conv(&mut self.conv2));
        if let Some(c) = &mut self.conv_shortcut {
            f(&join(prefix, "conv_shortcut"), Layer::Conv(c));
        }
    }
}
