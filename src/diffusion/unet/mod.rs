//! diffusers `UNet2DConditionModel` as SD 1.x uses it: sinusoidal timestep embedding and its
//! MLP, `conv_in`, down blocks (collecting skip states), the cross-attention mid block, up
//! blocks (consuming them), GroupNorm, SiLU, `conv_out`.

use dfdx::prelude::*;

use crate::diffusion::nn::elem::{Elem, elems};

mod blocks;
mod config;
mod plan;

pub use blocks::{DownBlock, Downsample2D, MidBlock, UpBlock, Upsample2D};
pub use config::{PerLevel, UNetConfig};
pub use plan::{LdmKeys, UNetPlan};

use super::attention::{CrossAttention, Transformer2D};
use super::error::{DiffusionError, Result};
use super::nn::weights::Loader;
use super::nn::{Conv2d, GroupNorm, Linear, Padding2d, Tensor2, Tensor3, Tensor4, silu};
use super::params::{Layer, Layers, join};
use super::resnet::ResnetBlock2D;

/// What the UNet is conditioned on besides the timestep. SD 1.x and 2.x condition on text
/// states only; SDXL's added embeddings (pooled text, size and crop ids) will join here, so
/// callers build one value and [`UNet::forward`] keeps one signature.
///
/// A bare context tensor converts into it (`unet.forward(x, &t, context)`).
#[derive(Debug, Clone)]
pub struct Conditioning<D: Storage<E>, T, E = f32> {
    /// Text states the cross-attentions attend to: `[b, m, cross_attention_dim]`.
    pub context: Tensor3<D, T, E>,
}

impl<D: Storage<E>, T, E> Conditioning<D, T, E> {
    /// Conditioning on text states alone.
    pub fn text(context: Tensor3<D, T, E>) -> Self {
        Self { context }
    }
}

impl<D: Storage<E>, T, E> From<Tensor3<D, T, E>> for Conditioning<D, T, E> {
    fn from(context: Tensor3<D, T, E>) -> Self {
        Self::text(context)
    }
}

/// The UNet.
#[derive(Debug, Clone)]
pub struct UNet<D: Storage<E>, E = f32> {
    /// `time_embedding.linear_1`: `[4 c0, c0]`.
    pub time_linear_1: Linear<D, E>,
    /// `time_embedding.linear_2`: `[4 c0, 4 c0]`.
    pub time_linear_2: Linear<D, E>,
    /// `conv_in`.
    pub conv_in: Conv2d<D, E>,
    /// Down blocks.
    pub down_blocks: Vec<DownBlock<D, E>>,
    /// Mid block.
    pub mid_block: MidBlock<D, E>,
    /// Up blocks.
    pub up_blocks: Vec<UpBlock<D, E>>,
    /// `conv_norm_out`.
    pub conv_norm_out: GroupNorm<D, E>,
    /// `conv_out`.
    pub conv_out: Conv2d<D, E>,
    /// The configuration the weights were loaded for.
    pub config: UNetConfig,
}

impl<E: Elem, D: Device<E>> UNet<D, E> {
    /// Every transformer with its diffusers module path (`down_blocks.0.attentions.1`,
    /// `mid_block.attentions.0`, …), in module order: the one walk over the UNet's attention
    /// sites that the methods below build on.
    pub fn transformers_mut(&mut self) -> Vec<(String, &mut Transformer2D<D, E>)> {
        let down = (self.down_blocks.iter_mut().enumerate()).flat_map(|(i, b)| {
            (b.attentions.iter_mut().enumerate())
                .map(move |(j, t)| (format!("down_blocks.{i}.attentions.{j}"), t))
        });
        let mid = std::iter::once((
            "mid_block.attentions.0".to_string(),
            &mut self.mid_block.attention,
        ));
        let up = (self.up_blocks.iter_mut().enumerate()).flat_map(|(i, b)| {
            (b.attentions.iter_mut().enumerate())
                .map(move |(j, t)| (format!("up_blocks.{i}.attentions.{j}"), t))
        });
        down.chain(mid).chain(up).collect()
    }

    /// Every ResNet, in module order.
    pub fn resnets_mut(&mut self) -> Vec<&mut ResnetBlock2D<D, E>> {
        let mid = &mut self.mid_block;
        (self.down_blocks.iter_mut())
            .flat_map(|b| b.resnets.iter_mut())
            .chain([&mut mid.resnet0, &mut mid.resnet1])
            .chain(self.up_blocks.iter_mut().flat_map(|b| b.resnets.iter_mut()))
            .collect()
    }

    /// Calls `f` with the diffusers module path (`…transformer_blocks.K.attn1`, `…attn2`) and
    /// the layer of every attention, in module order.
    pub fn for_each_attention_mut(&mut self, mut f: impl FnMut(&str, &mut CrossAttention<D, E>)) {
        for (prefix, t) in self.transformers_mut() {
            for (k, block) in t.transformer_blocks.iter_mut().enumerate() {
                let base = format!("{prefix}.transformer_blocks.{k}");
                f(&format!("{base}.attn1"), &mut block.attn1);
                f(&format!("{base}.attn2"), &mut block.attn2);
            }
        }
    }

    /// Calls `f` with the diffusers module path and the layer of every attention projection,
    /// in module order: `…transformer_blocks.K.attn1.to_q`, `to_k`, `to_v`, `to_out.0`, then
    /// the same for `attn2` (the modules LoRA targets by default).
    pub fn for_each_attention_linear_mut(&mut self, mut f: impl FnMut(&str, &mut Linear<D, E>)) {
        self.for_each_attention_mut(|base, attn| {
            f(&format!("{base}.to_q"), &mut attn.to_q);
            f(&format!("{base}.to_k"), &mut attn.to_k);
            f(&format!("{base}.to_v"), &mut attn.to_v);
            f(&format!("{base}.to_out.0"), &mut attn.to_out);
        });
    }

    /// The context widths the attentions of this UNet see (the width of `to_k`'s input): the
    /// text-encoder width for cross-attention and each level's width for self-attention;
    /// sorted, without repeats. These are the widths a hypernetwork can have modules for.
    pub fn attention_context_widths(&mut self) -> Vec<usize> {
        let mut widths = Vec::new();
        self.for_each_attention_mut(|_, a| widths.push(a.to_k.in_features()));
        widths.sort_unstable();
        widths.dedup();
        widths
    }

    /// Loads the UNet from diffusers names (`conv_in.weight`, `down_blocks.0.resnets.0…`),
    /// building each block as [`UNetPlan`] describes it.
    pub fn load(l: &Loader<D, E>, config: &UNetConfig) -> Result<Self> {
        let plan = (config.validate())
            .and_then(|()| UNetPlan::new(config))
            .map_err(|reason| DiffusionError::Input {
                model: "UNet",
                reason: format!("unsupported config: {reason}"),
            })?;
        let (c0, temb) = (plan.base_channels, plan.temb_channels);
        let te = l.pp("time_embedding");
        let down_blocks = (plan.down.iter().enumerate())
            .map(|(i, d)| DownBlock::load(&l.pp("down_blocks").pp(i), d))
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = (plan.up.iter().enumerate())
            .map(|(i, u)| UpBlock::load(&l.pp("up_blocks").pp(i), u))
            .collect::<Result<Vec<_>>>()?;
        let conv3 = |name: &str, i: usize, o: usize| {
            Conv2d::load(&l.pp(name), i, o, 3, 1, Padding2d::same(1))
        };
        Ok(Self {
            time_linear_1: Linear::load(&te.pp("linear_1"), c0, temb, true)?,
            time_linear_2: Linear::load(&te.pp("linear_2"), temb, temb, true)?,
            conv_in: conv3("conv_in", plan.in_channels, c0)?,
            down_blocks,
            mid_block: MidBlock::load(&l.pp("mid_block"), &plan.mid)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&l.pp("conv_norm_out"), plan.groups, c0, plan.eps)?,
            conv_out: conv3("conv_out", c0, plan.out_channels)?,
            config: config.clone(),
        })
    }

    /// Sets the number of queries per attention chunk in every transformer (default
    /// [`super::nn::DEFAULT_ATTENTION_CHUNK`]); smaller bounds memory, larger is faster.
    pub fn set_attention_chunk(&mut self, chunk: usize) {
        for (_, t) in self.transformers_mut() {
            t.set_attention_chunk(chunk);
        }
    }

    /// Turns gradient checkpointing of every ResNet and transformer on or off: under a tape,
    /// their activations are recomputed in the backward pass instead of kept (less memory
    /// between the passes, one more forward pass of each block; see
    /// [`super::recompute`]). No effect without a tape.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.resnets_mut()
            .into_iter()
            .for_each(|r| r.checkpoint = on);
        for (_, t) in self.transformers_mut() {
            t.checkpoint = on;
        }
    }

    /// Sinusoidal timestep features `[b, c0]` computed as diffusers' `get_timestep_embedding`
    /// does in f32: `exp(-ln(10000) · i / (half - freq_shift))`, `[cos, sin]` when flipped.
    pub fn timestep_features(&self, timesteps: &[f32]) -> Vec<f32> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let denom = half as f32 - self.config.freq_shift as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((-(10000f32.ln())) * i as f32 / denom).exp())
            .collect();
        let mut out = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            let (first, second) = if self.config.flip_sin_to_cos {
                (cos, sin)
            } else {
                (sin, cos)
            };
            out.extend(first);
            out.extend(second);
            // odd dims are zero-padded as in diffusers
            out.extend(std::iter::repeat_n(0.0, dim - 2 * half));
        }
        out
    }

    /// Predicts the model output (noise, or `v` for v-prediction models): `sample: [b, in, h,
    /// w]`, `timesteps`: one per batch item (or one for all), `conditioning`: the text states
    /// `[b, m, cross_attention_dim]` (a tensor converts) -> `[b, out, h, w]`. `h` and `w` must
    /// be divisible by `2^(levels-1)`.
    ///
    /// Gradients flow to `sample` and the conditioning (and to whatever produced them) when
    /// they carry a tape; the parameters are constants.
    pub fn forward<T: Tape<E, D>>(
        &self,
        sample: Tensor4<D, T, E>,
        timesteps: &[f32],
        conditioning: impl Into<Conditioning<D, T, E>>,
    ) -> Result<Tensor4<D, T, E>> {
        let Conditioning { context } = conditioning.into();
        let (b, c, h, w) = *sample.shape();
        let (cb, _, cd) = *context.shape();
        let err = |reason: String| DiffusionError::Input {
            model: "UNet",
            reason,
        };
        if c != self.config.in_channels {
            return Err(err(format!(
                "sample has {c} channels, the UNet takes {}",
                self.config.in_channels
            )));
        }
        let factor = 1usize << (self.config.block_out_channels.len() - 1);
        if h == 0 || w == 0 || h % factor != 0 || w % factor != 0 {
            return Err(err(format!(
                "sample size {h}x{w} is not a multiple of {factor}"
            )));
        }
        if cb != b || cd != self.config.cross_attention_dim {
            return Err(err(format!(
                "context of shape [{cb}, _, {cd}] for a batch of {b}, expected width {}",
                self.config.cross_attention_dim
            )));
        }
        let timesteps: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; b],
            n if n == b => timesteps.to_vec(),
            n => return Err(err(format!("{n} timesteps for a batch of {b}"))),
        };
        let dev = sample.device().clone();
        let c0 = self.config.block_out_channels[0];
        // [b, c0] -> [b, 4 c0]
        let t_feat: Tensor2<D, T, E> = dev
            .tensor_from_vec(elems(self.timestep_features(&timesteps)), (b, c0))
            .retaped::<T>();
        let temb = self
            .time_linear_2
            .forward2(silu(self.time_linear_1.forward2(t_feat)));

        // every block re-tapes the shared time embedding and context; their own tapes join
        // the main one here, once
        let (temb, temb_tape) = temb.split_tape();
        let (context, ctx_tape) = context.split_tape();
        let (x, x_tape) = sample.split_tape();
        let x = x.put_tape(x_tape.merge(temb_tape).merge(ctx_tape));

        let mut x = self.conv_in.forward(x);
        let mut skips = vec![x.retaped::<T>()];
        for block in &self.down_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        x = self.mid_block.forward(x, &temb, &context);
        for block in &self.up_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        Ok(self.conv_out.forward(self.conv_norm_out.forward_silu(x)))
    }
}

impl<E: Elem, D: Device<E>> Layers<D, E> for UNet<D, E> {
    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Layer<'_, D, E>)) {
        f(
            &join(prefix, "time_embedding.linear_1"),
            Layer::Linear(&mut self.time_linear_1),
        );
        f(
            &join(prefix, "time_embedding.linear_2"),
            Layer::Linear(&mut self.time_linear_2),
        );
        f(&join(prefix, "conv_in"), Layer::Conv(&mut self.conv_in));
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            b.visit_layers(&join(prefix, format!("down_blocks.{i}")), f);
        }
        self.mid_block.visit_layers(&join(prefix, "mid_block"), f);
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            b.visit_layers(&join(prefix, format!("up_blocks.{i}")), f);
        }
        f(
            &join(prefix, "conv_norm_out"),
            Layer::GroupNorm(&mut self.conv_norm_out),
        );
        f(&join(prefix, "conv_out"), Layer::Conv(&mut self.conv_out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::nn::weights::WeightStore;

    /// An architecture unlike the fixture's: 3 levels, 2 ResNets per level, per-level head
    /// counts, 2 transformer blocks per attention, linear projections, odd widths.
    #[test]
    fn other_architectures_run_forward_and_backward() {
        let dev = Cpu::default();
        let config = UNetConfig {
            block_out_channels: vec![16, 32, 48],
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            layers_per_block: 2,
            attention_head_dim: PerLevel::Each(vec![2, 4, 4]),
            cross_attention_dim: 24,
            norm_num_groups: 4,
            use_linear_projection: true,
            transformer_layers_per_block: PerLevel::One(2),
            ..UNetConfig::default()
        };
        let store = WeightStore::synthetic(3);
        let mut unet = UNet::load(&Loader::new(&store, &dev), &config).unwrap();
        unet.set_attention_chunk(7);
        let sample: Tensor4<Cpu> = dev.sample_normal_like(&(2, 4, 12, 12));
        let context: Tensor3<Cpu> = dev.sample_normal_like(&(2, 5, 24));
        let out = unet
            .forward(sample.leaky_trace(), &[3.0, 700.0], context.retaped())
            .unwrap();
        assert_eq!(*out.shape(), (2, 4, 12, 12));
        let grads = out.square().mean().backward();
        let gs = grads.get(&sample).as_vec();
        let gc = grads.get(&context).as_vec();
        assert!(gs.iter().chain(&gc).all(|v| v.is_finite()));
        assert!(gs.iter().any(|v| *v != 0.0) && gc.iter().any(|v| *v != 0.0));

        // a size that the levels cannot halve is an error, not a panic
        let bad: Tensor4<Cpu> = dev.sample_normal_like(&(2, 4, 10, 12));
        let ctx: Tensor3<Cpu> = dev.sample_normal_like(&(2, 5, 24));
        assert!(unet.forward(bad, &[1.0], ctx).is_err());
    }
}
