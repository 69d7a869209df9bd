//! The UNet's down, mid and up blocks (diffusers `CrossAttnDownBlock2D`/`DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`/`UpBlock2D`) and their down/upsamplers.

use dfdx::prelude::*;

use crate::diffusion::nn::elem::Elem;

use crate::diffusion::attention::{Transformer2D, Transformer2DConfig};
use crate::diffusion::error::Result;
use crate::diffusion::nn::weights::Loader;
use crate::diffusion::nn::{Conv2d, Padding2d, Tensor2, Tensor3, Tensor4, upsample_nearest2x};
use crate::diffusion::params::{Layer, Layers, join};
use crate::diffusion::resnet::{ResnetBlock2D, ResnetConfig};

use super::plan::{DownLevel, MidLevel, UpLevel};

/// 3x3 stride-2 conv with padding 1 (`downsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Downsample2D<D: Storage<E>, E = f32> {
    /// The strided conv.
    pub conv: Conv2d<D, E>,
}

impl<E: Elem, D: Device<E>> Downsample2D<D, E> {
    /// Loads `conv` of `channels` channels with the given padding (`downsample_padding`, 1).
    pub fn load(l: &Loader<D, E>, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(
                &l.pp("conv"),
                channels,
                channels,
                3,
                2,
                Padding2d::same(padding),
            )?,
        })
    }

    /// `[b, c, h, w] -> [b, c, h/2, w/2]`
    pub fn forward<T: Tape<E, D>>(&self, x: Tensor4<D, T, E>) -> Tensor4<D, T, E> {
        self.conv.forward(x)
    }
}

/// Nearest x2 upsampling, then a 3x3 conv (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D<D: Storage<E>, E = f32> {
    /// The conv after upsampling.
    pub conv: Conv2d<D, E>,
}

impl<E: Elem, D: Device<E>> Upsample2D<D, E> {
    /// Loads `conv` of `channels` channels.
    pub fn load(l: &Loader<D, E>, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&l.pp("conv"), channels, channels, 3, 1, Padding2d::same(1))?,
        })
    }

    /// `[b, c, h, w] -> [b, c, 2h, 2w]`
    pub fn forward<T: Tape<E, D>>(&self, x: Tensor4<D, T, E>) -> Tensor4<D, T, E> {
        self.conv.forward(upsample_nearest2x(x))
    }
}

/// A level's `resnets.{j}` and `attentions.{j}` as the plan gives their configs.
type Stack<D, E> = (Vec<ResnetBlock2D<D, E>>, Vec<Transformer2D<D, E>>);

fn load_stack<E: Elem, D: Device<E>>(
    l: &Loader<D, E>,
    resnets: &[ResnetConfig],
    attentions: &[Transformer2DConfig],
) -> Result<Stack<D, E>> {
    let resnets = (resnets.iter().enumerate())
        .map(|(j, c)| ResnetBlock2D::load(&l.pp("resnets").pp(j), c))
        .collect::<Result<Vec<_>>>()?;
    let attentions = (attentions.iter().enumerate())
        .map(|(j, c)| Transformer2D::load(&l.pp("attentions").pp(j), c))
        .collect::<Result<Vec<_>>>()?;
    Ok((resnets, attentions))
}

/// A down block: ResNets (each followed by a transformer on cross-attention levels), then
/// an optional downsampler. Returns its output and the skip states it produced.
#[derive(Debug, Clone)]
pub struct DownBlock<D: Storage<E>, E = f32> {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D<D, E>>,
    /// Transformers (empty for `DownBlock2D`).
    pub attentions: Vec<Transformer2D<D, E>>,
    /// Downsampler (absent on the last level).
    pub downsampler: Option<Downsample2D<D, E>>,
}

impl<E: Elem, D: Device<E>> DownBlock<D, E> {
    /// Loads `down_blocks.i` as its plan describes it.
    pub fn load(l: &Loader<D, E>, plan: &DownLevel) -> Result<Self> {
        let (resnets, attentions) = load_stack(l, &plan.resnets, &plan.attentions)?;
        let downsampler = match plan.downsample_padding {
            Some(padding) => Some(Downsample2D::load(
                &l.pp("downsamplers").pp(0),
                plan.channels,
                padding,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Runs the block; pushes one skip state per ResNet and one for the downsampler.
    pub fn forward<T: Tape<E, D>>(
        &self,
        mut x: Tensor4<D, T, E>,
        temb: &Tensor2<D, NoneTape, E>,
        context: &Tensor3<D, NoneTape, E>,
        skips: &mut Vec<Tensor4<D, T, E>>,
    ) -> Tensor4<D, T, E> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, context);
            }
            skips.push(x.retaped::<T>());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(x);
            skips.push(x.retaped::<T>());
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, transformer, ResNet.
#[derive(Debug, Clone)]
pub struct MidBlock<D: Storage<E>, E = f32> {
    /// First ResNet.
    pub resnet0: ResnetBlock2D<D, E>,
    /// Transformer.
    pub attention: Transformer2D<D, E>,
    /// Second ResNet.
    pub resnet1: ResnetBlock2D<D, E>,
}

impl<E: Elem, D: Device<E>> MidBlock<D, E> {
    /// Loads `mid_block` as its plan describes it.
    pub fn load(l: &Loader<D, E>, plan: &MidLevel) -> Result<Self> {
        let [r0, r1] = &plan.resnets;
        Ok(Self {
            resnet0: ResnetBlock2D::load(&l.pp("resnets").pp(0), r0)?,
            attention: Transformer2D::load(&l.pp("attentions").pp(0), &plan.attention)?,
            resnet1: ResnetBlock2D::load(&l.pp("resnets").pp(1), r1)?,
        })
    }

    /// `[b, c, h, w] -> [b, c, h, w]`
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Tensor4<D, T, E>,
        temb: &Tensor2<D, NoneTape, E>,
        context: &Tensor3<D, NoneTape, E>,
    ) -> Tensor4<D, T, E> {
        let x = self.resnet0.forward(x, Some(temb));
        let x = self.attention.forward(x, context);
        self.resnet1.forward(x, Some(temb))
    }
}

/// An up block: ResNets, each on the concatenation of the running state and a skip state (each
/// followed by a transformer on cross-attention levels), then an optional upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock<D: Storage<E>, E = f32> {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D<D, E>>,
    /// Transformers (empty for `UpBlock2D`).
    pub attentions: Vec<Transformer2D<D, E>>,
    /// Upsampler (absent on the last level).
    pub upsampler: Option<Upsample2D<D, E>>,
}

impl<E: Elem, D: Device<E>> UpBlock<D, E> {
    /// Loads `up_blocks.i` as its plan describes it.
    pub fn load(l: &Loader<D, E>, plan: &UpLevel) -> Result<Self> {
        let (resnets, attentions) = load_stack(l, &plan.resnets, &plan.attentions)?;
        let upsampler = if plan.upsample {
            Some(Upsample2D::load(&l.pp("upsamplers").pp(0), plan.channels)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Runs the block, popping one skip state per ResNet.
    pub fn forward<T: Tape<E, D>>(
        &self,
        mut x: Tensor4<D, T, E>,
        temb: &Tensor2<D, NoneTape, E>,
        context: &Tensor3<D, NoneTape, E>,
        skips: &mut Vec<Tensor4<D, T, E>>,
    ) -> Tensor4<D, T, E> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("the UNet pushes one skip state per up ResNet");
            // [b, c + c_skip, h, w]
            x = (x, skip).concat_along(Axis::<1>);
            x = resnet.forward(x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, context);
            }
        }
        if let Some(up) = &self.upsampler {
            x = up.forward(x);
        }
        x
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for DownBlock<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.visit_layers(&join(prefix, format!("resnets.{j}")), f);
        }
        for (j, a) in self.attentions.iter_mut().enumerate() {
            a.visit_layers(&join(prefix, format!("attentions.{j}")), f);
        }
        if let Some(d) = &mut self.downsampler {
            f(
                &join(prefix, "downsamplers.0.conv"),
                Layer::Conv(&mut d.conv),
            );
        }
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for MidBlock<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        self.resnet0.visit_layers(&join(prefix, "resnets.0"), f);
        self.attention
            .visit_layers(&join(prefix, "attentions.0"), f);
        self.resnet1.visit_layers(&join(prefix, "resnets.1"), f);
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for UpBlock<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.visit_layers(&join(prefix, format!("resnets.{j}")), f);
        }
        for (j, a) in self.attentions.iter_mut().enumerate() {
            a.visit_layers(&join(prefix, format!("attentions.{j}")), f);
        }
        if let Some(u) = &mut self.upsampler {
            f(&join(prefix, "upsamplers.0.conv"), Layer::Conv(&mut u.conv));
        }
    }
}
